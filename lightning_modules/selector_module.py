"""Meta-training of a surgery selector (:class:`editors.selector.Selector`) around a frozen base model.

The sibling of :mod:`lightning_modules.mend_module`, with the same objective and data. One step,
per batch of ``n_problems`` independent edit problems:

1. the unedited model's logits on the locality inputs (no grad);
2. the edit: gradient pieces of the edit loss on ``edit_inner``, entries scored by the selector,
   the top ``n_params`` kept (straight-through: hard mask forward, sigmoid backward), one masked
   descent step with the learned per-layer step sizes (times Polyak's factor with ``step_rule="polyak"``);
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

import contextlib
from typing import Any

import torch
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.layers import dense_edit
from editors.selector import Selector
from lightning_modules.editor_module import VAL_METRICS, EditorModule
from lightning_modules.models import BaseDtype

SELECTOR_VAL_METRICS = VAL_METRICS + ("params_changed",)


class SelectorModule(EditorModule):
    """Wraps a frozen base model (``self.model``) and a trainable :class:`Selector` (``self.editor``).

    Checkpoints hold the selector only (plus optimizer state for resuming) and a fingerprint of the
    base model; loading one against another base model fails with both names. At the end the
    selector is written to ``output_dir/editor.safetensors``: the best one by a checkpoint callback
    that monitors a ``val/`` metric, else the last one.
    """

    step_size_params = ("log_edit_lrs",)

    def __init__(self, base_model: str = "runs/base_zsre_gpt2_tiny/model", family: Family = "causal",
                 edit_params: list[str] | None = None, n_params: int = 1000, hidden: int = 16,
                 init_edit_lr: float = 1.0, tau: float = 1.0, until_right_steps: int = 0, step_rule: str = "gradient",
                 lr: float = 1e-2, edit_lr_lr: float = 1e-2, c_edit: float = 0.1, c_loc: float = 1.0,
                 cosine_decay: bool = False, output_dir: str = "runs/default",
                 base_dtype: BaseDtype | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._load_base(base_model, family, base_dtype)
        self.editor = Selector.for_model(self.model, edit_params, n_params=n_params, hidden=hidden,
                                         init_edit_lr=init_edit_lr, tau=tau, until_right_steps=until_right_steps,
                                         step_rule=step_rule)
        self.val = torch.nn.ModuleDict({k: MeanMetric() for k in SELECTOR_VAL_METRICS})

    # -- the edit of a batch's problems, and what validation adds to the shared metrics
    def _edit(self, inner: dict, n_problems: int) -> tuple[Any, contextlib.AbstractContextManager]:
        deltas = self.editor.batched_deltas(self.model, inner, self.hparams.family, n_problems)
        return deltas, dense_edit(self.model, self.editor.layers, deltas)

    def _train_logs(self) -> dict[str, torch.Tensor]:
        return {"train/edit_lr": self.editor.log_edit_lrs.detach().exp().mean()}

    @torch.no_grad()
    def _validate_more(self, batch: dict, out: dict[str, Any]) -> None:
        # weights of the edited model that differ from the base, counted in the model's dtype, per problem
        params = dict(self.model.named_parameters())
        changed = sum(((params[k] + d.to(params[k].dtype)) != params[k]).flatten(1).sum(1) for k, d in out["edit"].items())
        self.val["params_changed"].update(changed.float())
