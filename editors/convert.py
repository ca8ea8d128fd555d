"""Convert a pickle-based editor checkpoint (hypedit 0.1's editor.ckpt, or a meta-training checkpoint)
to the safe editor file format. It reads the file with ``torch.load(weights_only=True)``: tensors and
plain containers only, so nothing in it runs; a file that needs more is refused.

    python -m editors.convert runs/old/editor.ckpt runs/old/editor.safetensors
"""
from __future__ import annotations

import argparse

import torch

from editors.io import CHECKPOINT_KEY, save_blob


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="pickle-based checkpoint holding a hypedit MEND editor")
    p.add_argument("target", help="editor file to write (.safetensors)")
    args = p.parse_args(argv)
    try:  # tensors and plain containers only: nothing in the file is executed
        ckpt = torch.load(args.source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a file it will not load safely
        p.error(f"{args.source} cannot be read safely (weights_only): {e}")
    blob = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not blob or blob.get("class") != "MEND":
        p.error(f"{args.source} holds no hypedit MEND editor (no '{CHECKPOINT_KEY}' entry of class MEND)")
    save_blob(args.target, {k: blob[k] for k in ("class", "config", "fingerprint", "state_dict")})
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
