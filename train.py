"""Launch a hypedit job from a YAML config: base-model training or editor meta-training.

    python train.py --config configs/base_zsre_gpt2_tiny.yaml
    python train.py --config configs/mend_zsre_gpt2_tiny.yaml --trainer.max_steps 500
    python train.py --config configs/mend_zsre_gpt2_tiny.yaml --print_config
    python train.py --config ... --trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu
"""
from __future__ import annotations

import json

from lightning_modules.cli import HypeditCLI


def main(args: list[str] | None = None) -> dict:
    cli = HypeditCLI(args=args)
    summary = cli.run_job()
    if summary and cli.trainer.is_global_zero:
        print("[hypedit] " + json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
