"""Meta-training of a surgery selector (:class:`editors.selector.Selector`) around a frozen base model.

The sibling of :mod:`lightning_modules.mend_module`, with the same objective and data. One step,
per batch of ``n_problems`` independent edit problems:

1. the unedited model's logits on the locality inputs (no grad);
2. the edit: gradient pieces of the edit loss on ``edit_inner``, entries scored by the selector,
   the top ``n_params`` kept (straight-through: hard mask forward, sigmoid backward), one masked
   descent step with the learned per-layer step sizes;
3. the edited model (base weights + each problem's sparse change, functionally) on the paraphrases
   and locality inputs;
4. ``loss = c_edit * NLL(paraphrase, new target) + c_loc * KL(pre || post on locality)``;
5. backprop into the selector only (scores, priors, step sizes; ``u``/``delta`` are constants).

Adam with two parameter groups (the scorer at ``lr``, the log step sizes at ``edit_lr_lr``), both
optionally decayed to zero along a half cosine over ``trainer.max_steps`` (``cosine_decay``).

Validation logs, on the validation edits (the one meta-trained step, as trained): ``val/edit_success``
(exact match on the edit input) and ``val/edit_success_token_acc``, ``val/generality`` and
``val/generality_token_acc`` (paraphrases), ``val/loc_agreement`` (top-1 agreement with the unedited
model), ``val/loc_kl`` (KL(unedited || edited)), ``val/drawdown`` (exact-match accuracy on labelled
locality inputs, unedited minus edited), ``val/loss`` and ``val/params_changed`` (scalar weights of the
edited model that differ from the base model's, counted in the model's dtype, per edit problem).
All are torchmetrics means, exact under DDP. The selector has no running statistics, so a step
under DDP equals one process on the same global batch (the loss is a mean over problems).
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.losses import forward_logits, kl_pre_post, nll, scores, top1_agreement
from editors.selector import Selector, dense_edit
from lightning_modules.editor_module import EditorModule
from lightning_modules.mend_module import VAL_METRICS, _has_label, _join, _split
from lightning_modules.models import BaseDtype

SELECTOR_VAL_METRICS = VAL_METRICS + ("params_changed",)


class SelectorModule(EditorModule):
    """Wraps a frozen base model (``self.model``) and a trainable :class:`Selector` (``self.editor``).

    Checkpoints hold the selector only (plus optimizer state for resuming) and a fingerprint of the
    base model; loading one against another base model fails with both names. At the end the
    selector is written to ``output_dir/editor.safetensors``: the best one by a checkpoint callback
    that monitors a ``val/`` metric, else the last one.
    """

    step_size_param = "log_edit_lrs"

    def __init__(self, base_model: str = "runs/base_zsre_gpt2_tiny/model", family: Family = "causal",
                 edit_params: list[str] | None = None, n_params: int = 1000, hidden: int = 16,
                 init_edit_lr: float = 1.0, tau: float = 1.0, until_right_steps: int = 0,
                 lr: float = 1e-2, edit_lr_lr: float = 1e-2, c_edit: float = 0.1, c_loc: float = 1.0,
                 cosine_decay: bool = False, output_dir: str = "runs/default",
                 base_dtype: BaseDtype | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._load_base(base_model, family, base_dtype)
        self.editor = Selector.for_model(self.model, edit_params, n_params=n_params, hidden=hidden,
                                         init_edit_lr=init_edit_lr, tau=tau, until_right_steps=until_right_steps)
        self.val = torch.nn.ModuleDict({k: MeanMetric() for k in SELECTOR_VAL_METRICS})

    # -- the meta-training objective, shared by training and validation
    def _step(self, batch: dict) -> dict[str, Any]:
        fam, inner, outer, loc = self.hparams.family, batch["edit_inner"], batch["edit_outer"], batch["loc"]
        P = batch["n_problems"]
        with torch.no_grad():
            pre_loc = forward_logits(self.model, loc, fam)
        deltas = self.editor.batched_deltas(self.model, inner, fam, P)
        # all problems' paraphrases and locality inputs (in validation also the edit inputs) in one
        # forward pass, each problem's rows seeing only its own change
        parts = [outer, loc] if self.training else [outer, loc, inner]
        with dense_edit(self.model, self.editor.layers, deltas):
            post = _split(forward_logits(self.model, _join(parts, P), fam), parts, P, fam)
        l_edit = nll(post[0], outer["labels"], fam)  # mean over problems (each has the same rows)
        kl = kl_pre_post(pre_loc, post[1], loc, fam)
        loss = self.hparams.c_edit * l_edit + self.hparams.c_loc * kl.mean()
        out = {"loss": loss, "l_edit": l_edit, "kl": kl, "pre_loc": pre_loc, "post_loc": post[1],
               "post_outer": post[0]}
        if not self.training:
            out["post_inner"], out["deltas"] = post[2], deltas
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        self.log_dict({"train/loss": out["loss"], "train/edit_nll": out["l_edit"], "train/loc_kl": out["kl"].mean(),
                       "train/edit_lr": self.editor.log_edit_lrs.detach().exp().mean()},
                      prog_bar=True, batch_size=batch["n_problems"])
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        fam = self.hparams.family
        # the edit needs autograd (its gradient pieces); `trainer.validate` runs under inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v for k, v in batch.items()}
            out = self._step(batch)
        inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
        with torch.no_grad():
            es, es_tok = scores(out["post_inner"], inner["labels"], fam)
            gs, gs_tok = scores(out["post_outer"], outer["labels"], fam)
            pre_acc, _ = scores(out["pre_loc"], loc["labels"], fam)
            post_acc, _ = scores(out["post_loc"], loc["labels"], fam)
            labelled = _has_label(loc["labels"], fam)
            params = dict(self.model.named_parameters())
            changed = sum(((params[k] + d.to(params[k].dtype)) != params[k]).flatten(1).sum(1)
                          for k, d in out["deltas"].items())
        m = self.val
        m["edit_success"].update(es)
        m["edit_success_token_acc"].update(es_tok)
        m["generality"].update(gs)
        m["generality_token_acc"].update(gs_tok)
        m["loc_agreement"].update(top1_agreement(out["pre_loc"], out["post_loc"], loc, fam))
        m["loc_kl"].update(out["kl"])
        m["drawdown"].update((pre_acc - post_acc)[labelled])
        m["loss"].update(out["loss"].detach(), weight=es.shape[0])
        m["params_changed"].update(changed.float())
