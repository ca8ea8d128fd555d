"""Meta-training of a MEND editor around a frozen base model (Mitchell et al., ICLR 2022; docs/methods.md).

One step, per batch from :mod:`datamodules.edit_data`:

1. the unedited model's logits on the locality inputs (no grad; computed once per batch);
2. the edit: gradient pieces of the edit loss on ``edit_inner``, transformed by the editor;
3. the edited model (base weights + deltas, functionally) on the paraphrases and locality inputs;
4. ``loss = c_edit * NLL(paraphrase, new target) + c_loc * KL(pre || post on locality)``;
5. backprop into the editor only (``u``/``delta`` are constants: no second-order terms).

Adam with two parameter groups (the networks at ``lr``, the step sizes at ``edit_lr_lr``), both
optionally decayed to zero along a half cosine over ``trainer.max_steps`` (``cosine_decay``).

Validation logs, on the validation edits: ``val/edit_success`` (exact match on the edit input)
and ``val/edit_success_token_acc``, ``val/generality`` and ``val/generality_token_acc`` (on
paraphrases), ``val/loc_agreement`` (top-1 agreement with the unedited model), ``val/loc_kl``
(KL(unedited || edited)), ``val/drawdown`` (exact-match accuracy on labelled locality inputs,
unedited minus edited) and ``val/loss``. With ``until_right_scales`` it also logs the same edits
under FT's stopping rule (:mod:`editors.until_right`: each edit's step scaled by the smallest of
those scales that makes its edit input right): ``val/until_right_edit_success`` (the share of edits
some scale makes right), ``val/until_right_generality``, ``val/until_right_drawdown``,
``val/until_right_loc_kl``, ``val/until_right_scale`` (mean kept scale) and ``val/until_right_loss``
(the objective at the kept scales), for selecting an editor that will be used under the rule.
All are torchmetrics means, exact under DDP.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.layers import low_rank_edit
from editors.losses import forward_logits, kl_pre_post, nll, scores
from editors.mend import MEND
from lightning_modules.editor_module import VAL_METRICS, EditorModule, has_label, join_problems, split_problems
from lightning_modules.models import BaseDtype

RULE_METRICS = tuple(f"until_right_{k}" for k in ("edit_success", "generality", "drawdown", "loc_kl", "scale", "loss"))


class MENDModule(EditorModule):
    """Wraps a frozen base model (``self.model``) and a trainable :class:`MEND` (``self.editor``).

    Checkpoints hold the editor only (plus optimizer state for resuming) and a fingerprint of the
    base model; loading one against another base model fails with both names. ``base_dtype``
    ("bf16", "fp16", "fp32"; default: the loader's) loads the base in that dtype, e.g. a 6-7B base
    in bf16 under ``bf16-mixed``; the editor stays fp32, and an editor is tied to the dtype its base
    was loaded in (the fingerprint hashes the loaded values).
    """

    def __init__(self, base_model: str = "runs/base_zsre_gpt2_tiny/model", family: Family = "causal",
                 edit_params: list[str] | None = None, rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-4, lr: float = 1e-6, edit_lr_lr: float = 1e-4,
                 c_edit: float = 0.1, c_loc: float = 1.0, cosine_decay: bool = False,
                 precondition_ridge: float | None = None, until_right_scales: list[float] | None = None,
                 output_dir: str = "runs/default", base_dtype: BaseDtype | None = None) -> None:
        super().__init__()
        # Adam checks only its default rate, not a group's: a negative one would train uphill unnoticed,
        # and rank 0 leaves the editor networks nothing to train
        if rank < 1 or min(lr, edit_lr_lr) < 0:
            raise ValueError(f"rank must be at least 1 and lr, edit_lr_lr not negative; got rank {rank}, "
                             f"lr {lr}, edit_lr_lr {edit_lr_lr}")
        self.save_hyperparameters()
        self._load_base(base_model, family, base_dtype)
        self.editor = MEND.for_model(self.model, edit_params, rank=rank, n_hidden=n_hidden, init_edit_lr=init_edit_lr,
                                    precondition_ridge=precondition_ridge)
        if until_right_scales is not None and (not until_right_scales or min(until_right_scales) <= 0):
            raise ValueError(f"until_right_scales must be positive and non-empty, got {until_right_scales}")
        self.rule_scales = sorted(until_right_scales) if until_right_scales else []
        self.val = torch.nn.ModuleDict({k: MeanMetric() for k in VAL_METRICS + (RULE_METRICS if self.rule_scales else ())})
        self.decoder_start_id = getattr(self.model.config, "decoder_start_token_id", None)

    # -- the edit of a batch's problems, and what validation adds to the shared metrics
    def _edit(self, inner: dict, n_problems: int) -> tuple[Any, contextlib.AbstractContextManager]:
        # each problem's edit applied in low-rank form (no d_in x d_out per problem)
        factors = self.editor.batched_factors(self.model, inner, self.hparams.family, n_problems)
        return factors, low_rank_edit(self.model, self.editor.layers, factors)

    def _validate_more(self, batch: dict, out: dict[str, Any]) -> None:
        if self.rule_scales:
            self._validate_until_right(batch, out)

    @torch.no_grad()
    def _validate_until_right(self, batch: dict, out: dict[str, Any]) -> None:
        """The validation edits under FT's stopping rule, all problems at once: problem ``b``'s step is
        scaled by the smallest scale under which all its edit inputs are right (the largest if none is),
        as :class:`editors.until_right.UntilRight` does for one edit at a time."""
        fam, P, layers = self.hparams.family, batch["n_problems"], self.editor.layers
        inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
        factors = {k: (u.detach(), d.detach()) for k, (u, d) in out["edit"].items()}
        kept = torch.full((P,), self.rule_scales[-1], device=self.device)
        done = torch.zeros(P, dtype=torch.bool, device=self.device)
        for s in self.rule_scales:
            with low_rank_edit(self.model, layers, _scaled(factors, torch.full((P,), s, device=self.device))):
                right = scores(forward_logits(self.model, inner, fam), inner["labels"], fam)[0].view(P, -1).all(1)
            kept[right & ~done] = s
            done |= right
            if bool(done.all()):
                break
        parts = [outer, loc]
        with low_rank_edit(self.model, layers, _scaled(factors, kept)):
            post_outer, post_loc = split_problems(forward_logits(self.model, join_problems(parts, P), fam), parts, P, fam)
        kl = kl_pre_post(out["pre_loc"], post_loc, loc, fam)
        labelled = has_label(loc["labels"], fam)
        drawdown = scores(out["pre_loc"], loc["labels"], fam)[0] - scores(post_loc, loc["labels"], fam)[0]
        m = self.val
        m["until_right_edit_success"].update(done.float())
        m["until_right_generality"].update(scores(post_outer, outer["labels"], fam)[0])
        m["until_right_drawdown"].update(drawdown[labelled])
        m["until_right_loc_kl"].update(kl)
        m["until_right_scale"].update(kept)
        loss = self.hparams.c_edit * nll(post_outer, outer["labels"], fam) + self.hparams.c_loc * kl.mean()
        m["until_right_loss"].update(loss, weight=P)


def _scaled(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Low-rank edit factors with problem ``b``'s weight change scaled by ``s[b]``."""
    return {k: (u, d * s.to(d.dtype).view(-1, 1, 1)) for k, (u, d) in factors.items()}
