"""Launch a hypedit job from a YAML config: base-model training or editor meta-training.

    python train.py --config configs/base_zsre_gpt2_tiny.yaml
    python train.py --config configs/mend_zsre_gpt2_tiny.yaml --trainer.max_steps 500
    python train.py --config configs/mend_zsre_gpt2_tiny.yaml --print_config
    python train.py --config ... --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu
"""
from __future__ import annotations

import json
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

from lightning_modules.cli import INPUT_ERRORS, HypeditCLI

# what the classes of a config (Lightning's Trainer included) raise when they refuse their arguments
BUILD_ERRORS = (ValueError, TypeError, OSError, MisconfigurationException)


def main(args: list[str] | None = None) -> dict:
    """Build the job from ``args`` (default: the command line) and run it; errors propagate."""
    return run(HypeditCLI(args=args))


def run(cli: HypeditCLI) -> dict:
    """Fit (or reuse a cached result) and export; rank 0 prints the summary."""
    summary = cli.run_job()
    if summary and cli.trainer.is_global_zero:
        print("[hypedit] " + json.dumps(summary, indent=1))
    return summary


def command() -> None:
    """train.py as a command: a config or input it refuses ends the job with one error line (after
    jsonargparse's usage where the config does not parse) and exit status 1, not a traceback."""
    try:
        cli = HypeditCLI()
    except BUILD_ERRORS as e:
        # jsonargparse wraps what a class raised while being built in a ValueError listing every type
        # it tried; the class's own error is its cause
        sys.exit(f"train.py: error: {e.__cause__ if type(e) is ValueError and e.__cause__ else e}")
    try:
        run(cli)
    except INPUT_ERRORS as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    command()
