"""The corpus a base model is trained on: the world's questions (QA) or claims (classifier)."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from datamodules.encoding import Family, collate, encode, load_tokenizer


class BaseTaskDataModule(L.LightningDataModule):
    """Question -> answer pairs (``base-qa.jsonl``) or claim -> verdict pairs (``base-claims.jsonl``).

    Validation scores the model on the very examples it is trained on: the job of a base model
    here is to know the world's facts, and the edit data are built from what it knows.
    """

    def __init__(self, world_dir: str = "runs/world", tokenizer: str = "runs/world/tokenizer",
                 family: Family = "causal", batch_size: int = 64, max_length: int = 48,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        if hp.family == "classifier":
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
        raise FileNotFoundError(f"{path} not found: generate the world first (train.py does it from the config's 'world' section)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
