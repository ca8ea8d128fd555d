"""Callbacks of editor meta-training: what editing does to unrelated inputs while an editor trains
(:class:`LocalityDrift`), and a guard against non-finite steps (:class:`NonFiniteGuard`)."""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
import torch

from editors.losses import forward_logits, kl_pre_post


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class LocalityDrift(L.Callback):
    """Every validation, apply a fixed set of validation edits one at a time and measure, on a fixed
    probe set of validation's own unrelated inputs, KL(unedited || edited) and the share of probes whose top-1
    prediction flips (at any answer position; label for classifiers). Logged as ``drift/kl`` and
    ``drift/top1_flip_rate`` (means over the probe edits), so drift is visible in TensorBoard as
    the editor trains, not only at the end."""

    def __init__(self, n_edits: int = 4, n_probes: int = 64) -> None:
        self.n_edits, self.n_probes = n_edits, n_probes
        self.edits: list[dict] = []
        self.probe: dict | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        ds = dm.dataset("val")
        self.edits = [dm.collate([ds[i]])["edit_inner"] for i in range(min(self.n_edits, len(ds)))]
        fam = pl_module.hparams.family
        from datamodules.encoding import collate

        self.probe = collate(dm.loc_pools["val"][: self.n_probes], dm.tokenizer.pad_token_id, fam, dm.decoder_start_id)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.edits or trainer.sanity_checking:
            return
        fam, model, dev = pl_module.hparams.family, pl_module.model, pl_module.device
        probe = _to(self.probe, dev)
        pre = forward_logits(model, probe, fam)
        kls, flips = [], []
        for e in self.edits:
            edited = pl_module.editor.edit(model, _to(e, dev), fam)
            post = forward_logits(edited, probe, fam)
            kls.append(kl_pre_post(pre, post, probe, fam).mean())
            flips.append(_flipped(pre, post, probe, fam).float().mean())
        pl_module.log_dict({"drift/kl": torch.stack(kls).mean(), "drift/top1_flip_rate": torch.stack(flips).mean()},
                           rank_zero_only=True)


def _flipped(pre: torch.Tensor, post: torch.Tensor, batch: dict, family: str) -> torch.Tensor:
    if family == "classifier":
        return (pre > 0) != (post > 0)
    mask = batch["decoder_attention_mask" if family == "seq2seq" else "attention_mask"].bool()
    return ((pre.argmax(-1) != post.argmax(-1)) & mask).any(1)


class NonFiniteGuard(L.Callback):
    """Skip any optimiser step whose gradient (after the data-parallel all-reduce, so every process
    decides alike) holds a NaN or infinity, count it (``train/skipped_steps``), and stop the run with a
    message naming the step after ``max_consecutive`` such steps in a row. A skipped step leaves the
    parameters and Adam's moments as they were (their gradients are dropped, not zeroed). Every
    meta-training module adds it (``configure_callbacks``)."""

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.in_a_row = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        if finite:
            self.in_a_row = 0
        else:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row >= self.max_consecutive:
                raise RuntimeError(f"{self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                                   f"(the last at global step {trainer.global_step}); stopping. Lower the learning "
                                   "rates or check the data of these steps")
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = state["skipped"], state["in_a_row"]


class ProgressLog(L.Callback):
    """One plain progress line every ``every_seconds`` when the output is not a terminal (a cluster job's
    log file shows no progress bar until the run ends): step, epoch, elapsed time and the logged
    training metrics. Added by every training module (``configure_callbacks``); silent on terminals."""

    def __init__(self, every_seconds: float = 60.0, stream: TextIO | None = None) -> None:
        self.every, self.stream = every_seconds, stream
        self.start = self.last = 0.0

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every or self._out().isatty() or not trainer.is_global_zero:
            return
        self.last = now
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        metrics = " ".join(f"{k} {float(v):.4g}" for k, v in trainer.callback_metrics.items() if k.startswith("train/"))
        print(f"[hypedit] step {trainer.global_step}/{total} epoch {trainer.current_epoch} "
              f"{now - self.start:.0f}s {metrics}", file=self._out(), flush=True)


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to export an editor holding a NaN or infinity."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RuntimeError(f"{what} holds non-finite values in {', '.join(bad[:5])}: not exported")
