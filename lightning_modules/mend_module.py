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

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.layers import low_rank_edit
from editors.losses import forward_logits, model_inputs, kl_pre_post, nll, scores, top1_agreement
from editors.mend import MEND
from lightning_modules.editor_module import EditorModule
from lightning_modules.models import BaseDtype

VAL_METRICS = ("edit_success", "edit_success_token_acc", "generality", "generality_token_acc",
               "loc_agreement", "loc_kl", "drawdown", "loss")
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

    # -- the meta-training objective, shared by training and validation
    def _step(self, batch: dict) -> dict[str, Any]:
        fam, inner, outer, loc = self.hparams.family, batch["edit_inner"], batch["edit_outer"], batch["loc"]
        P = batch["n_problems"]
        with torch.no_grad():  # the unedited model's locality logits, once per batch
            pre_loc = forward_logits(self.model, loc, fam)
        factors = self.editor.batched_factors(self.model, inner, fam, P)
        # paraphrases and locality inputs (and, in validation, the edit inputs) of all problems in one
        # forward pass of the edited model, each problem's rows seeing only its own edit, applied in
        # low-rank form (no d_in x d_out per problem)
        parts = [outer, loc] if self.training else [outer, loc, inner]
        with low_rank_edit(self.model, self.editor.layers, factors):
            post = _split(forward_logits(self.model, _join(parts, P), fam), parts, P, fam)
        # per problem: mean NLL over its paraphrases; batch: mean over problems (= mean over rows)
        l_edit = nll(post[0], outer["labels"], fam)
        kl = kl_pre_post(pre_loc, post[1], loc, fam)
        loss = self.hparams.c_edit * l_edit + self.hparams.c_loc * kl.mean()
        out = {"loss": loss, "l_edit": l_edit, "kl": kl, "pre_loc": pre_loc, "post_loc": post[1],
               "post_outer": post[0]}
        if not self.training:
            out["post_inner"], out["factors"] = post[2], factors
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        self.log_dict({"train/loss": out["loss"], "train/edit_nll": out["l_edit"], "train/loc_kl": out["kl"].mean()},
                      prog_bar=True, batch_size=batch["n_problems"])
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        fam = self.hparams.family
        # an edit needs autograd (its gradient pieces), and `trainer.validate` runs this under
        # inference_mode: step out of it, with ordinary copies of the batch's inference tensors
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v for k, v in batch.items()}
            inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
            out = self._step(batch)
        with torch.no_grad():
            es, es_tok = scores(out["post_inner"], inner["labels"], fam)
            gs, gs_tok = scores(out["post_outer"], outer["labels"], fam)
            pre_acc, _ = scores(out["pre_loc"], loc["labels"], fam)
            post_acc, _ = scores(out["post_loc"], loc["labels"], fam)
            labelled = _has_label(loc["labels"], fam)
        m = self.val
        m["edit_success"].update(es)
        m["edit_success_token_acc"].update(es_tok)
        m["generality"].update(gs)
        m["generality_token_acc"].update(gs_tok)
        m["loc_agreement"].update(top1_agreement(out["pre_loc"], out["post_loc"], loc, fam))
        m["loc_kl"].update(out["kl"])
        m["drawdown"].update((pre_acc - post_acc)[labelled])  # may be empty: unlabelled locality inputs
        m["loss"].update(out["loss"].detach(), weight=es.shape[0])
        if self.rule_scales:
            self._validate_until_right(batch, out)

    @torch.no_grad()
    def _validate_until_right(self, batch: dict, out: dict[str, Any]) -> None:
        """The validation edits under FT's stopping rule, all problems at once: problem ``b``'s step is
        scaled by the smallest scale under which all its edit inputs are right (the largest if none is),
        as :class:`editors.until_right.UntilRight` does for one edit at a time."""
        fam, P, layers = self.hparams.family, batch["n_problems"], self.editor.layers
        inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
        factors = {k: (u.detach(), d.detach()) for k, (u, d) in out["factors"].items()}
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
            post_outer, post_loc = _split(forward_logits(self.model, _join(parts, P), fam), parts, P, fam)
        kl = kl_pre_post(out["pre_loc"], post_loc, loc, fam)
        labelled = _has_label(loc["labels"], fam)
        drawdown = scores(out["pre_loc"], loc["labels"], fam)[0] - scores(post_loc, loc["labels"], fam)[0]
        m = self.val
        m["until_right_edit_success"].update(done.float())
        m["until_right_generality"].update(scores(post_outer, outer["labels"], fam)[0])
        m["until_right_drawdown"].update(drawdown[labelled])
        m["until_right_loc_kl"].update(kl)
        m["until_right_scale"].update(kept)
        loss = self.hparams.c_edit * nll(post_outer, outer["labels"], fam) + self.hparams.c_loc * kl.mean()
        m["until_right_loss"].update(loss, weight=P)


def _join(parts: list[dict[str, torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """The model inputs of several sub-batches (rows in ``n`` equal consecutive problem groups) as one
    batch whose problem ``b`` rows are those of every part, right-padded to common lengths: the
    padding is masked and follows every real token, so no real position's output changes."""
    out = {}
    for k in model_inputs(parts[0]):
        width = max(p[k].shape[1] for p in parts)
        out[k] = torch.cat([F.pad(p[k], (0, width - p[k].shape[1])).view(n, -1, width) for p in parts], 1).flatten(0, 1)
    return out


def _split(logits: torch.Tensor, parts: list[dict[str, torch.Tensor]], n: int, family: Family) -> list[torch.Tensor]:
    """Undo :func:`_join` on its logits: each part's rows in their own order and length."""
    sizes = [p["input_ids"].shape[0] // n for p in parts]
    out = []
    for g, p in zip(logits.view(n, -1, *logits.shape[1:]).split(sizes, 1), parts):
        g = g.flatten(0, 1)
        if family != "classifier":  # cut the padding positions off again
            g = g[:, :p["decoder_input_ids" if family == "seq2seq" else "input_ids"].shape[1]]
        out.append(g)
    return out


def _scaled(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Low-rank edit factors with problem ``b``'s weight change scaled by ``s[b]``."""
    return {k: (u, d * s.to(d.dtype).view(-1, 1, 1)) for k, (u, d) in factors.items()}


def _has_label(labels: torch.Tensor, family: Family) -> torch.Tensor:
    if family == "classifier":
        return labels >= 0
    return (labels != -100).any(1)
