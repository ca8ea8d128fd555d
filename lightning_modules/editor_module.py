"""What every editor meta-training module shares: a frozen base model, validation metrics logged at
the end of each validation, checkpoints that hold the editor only (with the base model's
fingerprint), and the export of the best editor to ``output_dir/editor.safetensors``.

:class:`lightning_modules.mend_module.MENDModule` and
:class:`lightning_modules.selector_module.SelectorModule` subclass it; each builds its ``editor``
(an ``nn.Module`` with ``layers``, ``export`` and a class name its files carry) and its objective.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.encoding import Family
from editors.io import CHECKPOINT_KEY, save_blob
from editors.layers import check_fingerprint, fingerprint
from lightning_modules.callbacks import NonFiniteGuard, ProgressLog, check_finite
from lightning_modules.models import BaseDtype, load_model
from lightning_modules.schedules import warmup_cosine

class EditorModule(L.LightningModule):
    """A frozen base model (``self.model``) and a trainable editor (``self.editor``, set by the subclass).

    ``val``: a ``ModuleDict`` of torchmetrics the subclass updates in ``validation_step``; each is
    logged as ``val/<name>`` at the end of validation, reduced across processes. Adam with two
    parameter groups: the editor's networks at ``hparams.lr``, its step sizes at ``hparams.edit_lr_lr``,
    both decayed to zero along a half cosine over ``trainer.max_steps`` with ``hparams.cosine_decay``.
    """

    val: torch.nn.ModuleDict
    editor: torch.nn.Module
    step_size_param = "edit_lrs"  # the editor's learned step sizes: their own rate, ``edit_lr_lr``

    def _load_base(self, base_model: str, family: Family, base_dtype: BaseDtype | None) -> None:
        self.model = load_model(base_model, family, base_dtype).eval()
        self.model.requires_grad_(False)
        self._base_fingerprint: dict[str, str] | None = None

    def train(self, mode: bool = True) -> "EditorModule":
        super().train(mode)
        self.model.eval()  # the base model never runs with dropout: edits must be deterministic
        return self

    def on_validation_epoch_end(self) -> None:
        for k, metric in self.val.items():  # compute() reduces across processes
            self.log(f"val/{k}", metric.compute(), prog_bar=k in ("edit_success", "generality", "drawdown"))
            metric.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        nets = [p for n, p in self.editor.named_parameters() if n != self.step_size_param]
        # fused Adam: the default per-tensor loop costs up to ~3 base forward+backward passes per step
        # on CPU (benchmarks/NOTES.md); Lightning refuses clipping with a fused optimizer under fp16
        # loss scaling, where the multi-tensor (foreach) kernel is used instead
        fused = self._trainer is None or self._trainer.precision not in ("16-mixed", "16")
        # the step sizes get their own learning rate, and it really applies (one optimizer, two groups)
        opt = torch.optim.Adam([{"params": nets, "lr": self.hparams.lr},
                                {"params": [getattr(self.editor, self.step_size_param)], "lr": self.hparams.edit_lr_lr}],
                               fused=fused or None, foreach=None if fused else True)
        total = self._trainer.max_steps if self._trainer is not None else -1
        if not self.hparams.cosine_decay or total <= 0:
            return opt
        # both rates to 0 along a half cosine over max_steps: at a constant rate the step sizes keep
        # swinging and a validation catches the editor anywhere between eager and timid
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total=total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        return [NonFiniteGuard(), ProgressLog()]

    # -- checkpoints: the editor only, fingerprinted
    def base_fingerprint(self) -> dict[str, str]:
        """The base model's fingerprint, computed once: the base is frozen, and hashing a 6B base's
        edited weights takes about a second, which every checkpoint save would otherwise pay again."""
        if self._base_fingerprint is None:
            self._base_fingerprint = fingerprint(self.model, self.editor.layers)
        return self._base_fingerprint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}
        checkpoint[CHECKPOINT_KEY] = self.editor.export(self.model, self.base_fingerprint())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind = type(self.editor).__name__
        blob = checkpoint.get(CHECKPOINT_KEY)
        if blob is None or blob.get("class") != kind:
            raise ValueError(f"not a hypedit {kind} checkpoint: no {kind} editor entry")
        check_fingerprint(blob["fingerprint"], self.model, self.editor.layers, "checkpoint", self.base_fingerprint())
        # the base weights are not stored: take them from the model this module was built with
        checkpoint["state_dict"].update({f"model.{k}": v for k, v in self.model.state_dict().items()})

    def export(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> dict:
        """Write the editor to ``output_dir/editor.safetensors``: the best one by the checkpoint callback
        that monitors a metric when there is one, else the final one; return the run summary."""
        if not trainer.is_global_zero:
            return {}
        out = Path(self.hparams.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # the callback that keeps the best validation's state (a second one may keep the latest)
        cb = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        best = getattr(cb, "best_model_path", "") if cb is not None else ""
        # the best validation's editor (this run's own checkpoint, read without unpickling arbitrary
        # objects), else the final one
        blob = (torch.load(best, map_location="cpu", weights_only=True)[CHECKPOINT_KEY] if best
                else self.editor.export(self.model, self.base_fingerprint()))
        check_finite(blob["state_dict"], "the trained editor")
        save_blob(out / "editor.safetensors", blob)
        return {"editor": str(out / "editor.safetensors"), "best_checkpoint": best or None,
                "best_score": float(cb.best_model_score) if best and cb.best_model_score is not None else None,
                "monitor": getattr(cb, "monitor", None), "base_model": self.base_fingerprint()["name"]}
