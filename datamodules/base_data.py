"""The corpus a base model is trained on: the world's questions (QA) or claims (classifier), or the
user's own zsRE/FEVER/NQ files."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from datamodules.encoding import Family, collate, encode, load_tokenizer
from datamodules.formats import FEVER_LABELS, read_training_pairs


class BaseTaskDataModule(L.LightningDataModule):
    """Question -> answer pairs (``base-qa.jsonl``) or claim -> verdict pairs (``base-claims.jsonl``)
    of the world in ``world_dir``; or, with ``train_files``, those of the user's own files instead.

    - ``train_files``: zsRE/FEVER files in either released format, FEVER locality claims or NQ pairs
      (:func:`datamodules.formats.read_training_pairs`): the model learns every wording of every row
      with its gold answer; ``world_dir`` is not read.
    - ``annotate``: split ("train", "val", "test") -> zsRE/FEVER file, annotated from the trained model
      into ``output_dir/data`` when training ends (:func:`lightning_modules.base_task.annotate_files`).
      Default: the world's edit files when training on the world, none with ``train_files``.

    Validation scores the model on the very examples it is trained on: the job of a base model
    here is to know the facts, and the edit data are built from what it knows.
    """

    def __init__(self, world_dir: str | None = "runs/world", tokenizer: str = "runs/world/tokenizer",
                 family: Family = "causal", batch_size: int = 64, max_length: int = 48,
                 num_workers: int = 0, train_files: list[str] | None = None,
                 annotate: dict[str, str] | None = None) -> None:
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be at least 1 and max_length at least 2; got {batch_size}, {max_length}")
        self.save_hyperparameters()
        self.train_set: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        for split, f in (hp.annotate or {}).items():  # checked now, not after the whole training run
            if split not in ("train", "val", "test"):
                raise ValueError(f"data.init_args.annotate: unknown split {split!r} (train, val or test)")
            if not Path(f).exists():
                raise FileNotFoundError(f"data.init_args.annotate.{split}: {f} not found")
        if hp.train_files:
            labels = FEVER_LABELS if hp.family == "classifier" else None
            # a question listed in several files is learnt once
            pairs = list(dict.fromkeys(p for f in hp.train_files for p in read_training_pairs(f, labels)))
            prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
        elif not hp.world_dir:
            raise ValueError("set data.init_args.train_files (your own files) or world_dir (the built-in world)")
        elif hp.family == "classifier":
            rows = _read(Path(hp.world_dir) / "base-claims.jsonl")
            prompts, targets = [r["claim"] for r in rows], [r["label"] for r in rows]
        else:
            rows = _read(Path(hp.world_dir) / "base-qa.jsonl")
            prompts, targets = [r["question"] for r in rows], [r["answer"] for r in rows]
        self.train_set = encode(self.tokenizer, hp.family, prompts, targets, hp.max_length)

    def _loader(self, shuffle: bool) -> DataLoader:
        hp = self.hparams
        start = self.trainer.lightning_module.decoder_start_id if self.trainer else None
        return DataLoader(self.train_set, batch_size=hp.batch_size if shuffle else 4 * hp.batch_size,
                          shuffle=shuffle, num_workers=hp.num_workers,
                          collate_fn=lambda f: collate(f, self.tokenizer.pad_token_id, hp.family, start))

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: generate the world first (train.py does it from the config's "
                                "'world' section), or train on your own files (data.init_args.train_files)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
