"""What every editor meta-training module shares: a frozen base model; the objective (edit loss on
the paraphrases + ``c_loc`` * KL on locality inputs, all problems of a batch in one forward pass of
the edited model) with its training and validation steps; checkpoints that hold the editor only
(with the base model's fingerprint); and the export of the best editor to
``output_dir/editor.safetensors``.

:class:`lightning_modules.mend_module.MENDModule` and
:class:`lightning_modules.selector_module.SelectorModule` subclass it: each builds its ``editor``
(an ``nn.Module`` with ``layers``, ``export`` and a class name its files carry) and says how a
batch's problems are edited (:meth:`EditorModule._edit`), what else training logs and what else
validation measures.
"""
from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from datamodules.encoding import Family
from editors.losses import forward_logits, kl_pre_post, model_inputs, nll, scores, top1_agreement
from editors.io import CHECKPOINT_KEY, DATA_KEY, save_blob
from editors.layers import check_fingerprint, fingerprint
from lightning_modules.callbacks import NonFiniteGuard, ProgressLog, check_finite
from lightning_modules.models import BaseDtype, load_model
from lightning_modules.schedules import warmup_cosine

# what every editor module validates (torchmetrics means, exact under DDP)
VAL_METRICS = ("edit_success", "edit_success_token_acc", "generality", "generality_token_acc",
               "loc_agreement", "loc_kl", "drawdown", "loss")

class EditorModule(L.LightningModule):
    """A frozen base model (``self.model``) and a trainable editor (``self.editor``, set by the subclass).

    ``val``: a ``ModuleDict`` of torchmetrics the subclass updates in ``validation_step``; each is
    logged as ``val/<name>`` at the end of validation, reduced across processes. Adam with two
    parameter groups: the editor's networks at ``hparams.lr``, its step sizes at ``hparams.edit_lr_lr``,
    both decayed to zero along a half cosine over ``trainer.max_steps`` with ``hparams.cosine_decay``.
    """

    val: torch.nn.ModuleDict
    editor: torch.nn.Module
    step_size_params = ("edit_lrs",)  # the editor's learned step sizes: their own rate, ``edit_lr_lr``

    def _load_base(self, base_model: str, family: Family, base_dtype: BaseDtype | None) -> None:
        # frozen and in eval mode on purpose (see train()): meta-training edits a fixed, deterministic base
        self.model = load_model(base_model, family, base_dtype).eval()
        self.model.requires_grad_(False)
        self._base_fingerprint: dict[str, str] | None = None

    def train(self, mode: bool = True) -> "EditorModule":
        super().train(mode)
        self.model.eval()  # the base model never runs with dropout: edits must be deterministic
        return self

    # -- the meta-training objective, shared by training and validation
    def _edit(self, inner: dict, n_problems: int) -> tuple[Any, contextlib.AbstractContextManager]:
        """The editor's edit of ``n_problems`` problems (``inner``'s rows in equal consecutive groups),
        and a context in which the model runs with problem ``b``'s edit on group ``b``'s rows."""
        raise NotImplementedError

    def _step(self, batch: dict) -> dict[str, Any]:
        fam, inner, outer, loc = self.hparams.family, batch["edit_inner"], batch["edit_outer"], batch["loc"]
        P = batch["n_problems"]
        with torch.no_grad():  # the unedited model's locality logits, once per batch
            pre_loc = forward_logits(self.model, loc, fam)
        edit, edited = self._edit(inner, P)
        # paraphrases and locality inputs (and, in validation, the edit inputs) of all problems in one
        # forward pass of the edited model, each problem's rows seeing only its own edit
        parts = [outer, loc] if self.training else [outer, loc, inner]
        with edited:
            post = split_problems(forward_logits(self.model, join_problems(parts, P), fam), parts, P, fam)
        # per problem: mean NLL over its paraphrases; batch: mean over problems (= mean over rows)
        l_edit = nll(post[0], outer["labels"], fam)
        kl = kl_pre_post(pre_loc, post[1], loc, fam)
        loss = self.hparams.c_edit * l_edit + self.hparams.c_loc * kl.mean()
        out = {"loss": loss, "l_edit": l_edit, "kl": kl, "pre_loc": pre_loc, "post_loc": post[1],
               "post_outer": post[0]}
        if not self.training:
            out["post_inner"], out["edit"] = post[2], edit
        return out

    def _train_logs(self) -> dict[str, torch.Tensor]:
        """Training figures beyond the loss and its two terms."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        self.log_dict({"train/loss": out["loss"], "train/edit_nll": out["l_edit"], "train/loc_kl": out["kl"].mean(),
                       **self._train_logs()}, prog_bar=True, batch_size=batch["n_problems"])
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        fam = self.hparams.family
        # an edit needs autograd (its gradient pieces), and `trainer.validate` runs this under
        # inference_mode: step out of it, with ordinary copies of the batch's inference tensors
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v for k, v in batch.items()}
            out = self._step(batch)
        inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
        with torch.no_grad():
            es, es_tok = scores(out["post_inner"], inner["labels"], fam)
            gs, gs_tok = scores(out["post_outer"], outer["labels"], fam)
            pre_acc, _ = scores(out["pre_loc"], loc["labels"], fam)
            post_acc, _ = scores(out["post_loc"], loc["labels"], fam)
            labelled = has_label(loc["labels"], fam)
        m = self.val
        m["edit_success"].update(es)
        m["edit_success_token_acc"].update(es_tok)
        m["generality"].update(gs)
        m["generality_token_acc"].update(gs_tok)
        m["loc_agreement"].update(top1_agreement(out["pre_loc"], out["post_loc"], loc, fam))
        m["loc_kl"].update(out["kl"])
        m["drawdown"].update((pre_acc - post_acc)[labelled])  # may be empty: unlabelled locality inputs
        m["loss"].update(out["loss"].detach(), weight=es.shape[0])
        self._validate_more(batch, out)

    def _validate_more(self, batch: dict, out: dict[str, Any]) -> None:
        """Validation figures beyond :data:`VAL_METRICS`, from the batch and its :meth:`_step` output."""

    def on_validation_epoch_end(self) -> None:
        for k, metric in self.val.items():  # compute() reduces across processes
            self.log(f"val/{k}", metric.compute(), prog_bar=k in ("edit_success", "generality", "drawdown"))
            # fresh states as ordinary tensors: made under `trainer.validate`'s inference mode they could
            # not be updated by a later fit's validation (which runs under no_grad only)
            with torch.inference_mode(False):
                metric.reset()

    def manual_step(self, grads: list[torch.Tensor], grad_clip: float | None) -> None:
        """One optimisation step from gradients a module computed itself (manual optimisation, in the
        order of ``editor.parameters()``): averaged over data-parallel processes with one all-reduce,
        clipped to norm ``grad_clip``, then Adam and the learning-rate schedule."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            grads = list((flat / dist.get_world_size()).split([g.numel() for g in grads]))
        for p, g in zip(self.editor.parameters(), grads):
            p.grad = g.view_as(p)
        opt, sched = self.optimizers(), self.lr_schedulers()
        if grad_clip:
            self.clip_gradients(opt, gradient_clip_val=grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        nets = [p for n, p in self.editor.named_parameters() if n not in self.step_size_params]
        # fused Adam: the default per-tensor loop costs up to ~3 base forward+backward passes per step
        # on CPU (benchmarks/NOTES.md); Lightning's mixed-precision plugin (16-mixed and bf16-mixed alike)
        # refuses gradient clipping with a fused optimizer, so there the multi-tensor (foreach) kernel is used
        fused = self._trainer is None or self._trainer.precision not in ("16-mixed", "bf16-mixed", "16")
        # the step sizes get their own learning rate, and it really applies (one optimizer, two groups)
        opt = torch.optim.Adam([{"params": nets, "lr": self.hparams.lr},
                                {"params": [getattr(self.editor, n) for n in self.step_size_params], "lr": self.hparams.edit_lr_lr}],
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

    def exported_config(self) -> dict[str, Any]:
        """Editor settings the exported file carries instead of the trained ones (none here)."""
        return {}

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
        blob = {**blob, "config": {**blob["config"], **self.exported_config()}}
        check_finite(blob["state_dict"], "the trained editor")
        # the data it was meta-trained on: eval.py refuses a test locality pool that overlaps its pools
        save_blob(out / "editor.safetensors", {**blob, DATA_KEY: datamodule.data_record()})
        return {"editor": str(out / "editor.safetensors"), "best_checkpoint": best or None,
                "best_score": float(cb.best_model_score) if best and cb.best_model_score is not None else None,
                "monitor": getattr(cb, "monitor", None), "base_model": self.base_fingerprint()["name"]}


def join_problems(parts: list[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """The model inputs of several sub-batches (rows in ``n`` equal consecutive problem groups) as one
    batch whose problem ``b`` rows are those of every part, right-padded to common lengths: the
    padding is masked and follows every real token, so no real position's output changes."""
    out = {}
    for k in model_inputs(parts[0]):
        width = max(p[k].shape[1] for p in parts)
        out[k] = torch.cat([F.pad(p[k], (0, width - p[k].shape[1])).view(n, -1, width) for p in parts], 1).flatten(0, 1)
    return out


def split_problems(logits: torch.Tensor, parts: list[dict[str, torch.Tensor]], n: int, family: Family) -> list[torch.Tensor]:
    """Undo :func:`join_problems` on its logits: each part's rows in their own order and length."""
    sizes = [p["input_ids"].shape[0] // n for p in parts]
    out = []
    for g, p in zip(logits.view(n, -1, *logits.shape[1:]).split(sizes, 1), parts):
        g = g.flatten(0, 1)
        if family != "classifier":  # cut the padding positions off again
            g = g[:, :p["decoder_input_ids" if family == "seq2seq" else "input_ids"].shape[1]]
        out.append(g)
    return out


def has_label(labels: torch.Tensor, family: Family) -> torch.Tensor:
    """Which rows carry a label (locality inputs without one count for agreement and KL only)."""
    if family == "classifier":
        return labels >= 0
    return (labels != -100).any(1)
