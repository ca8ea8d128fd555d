"""Memory-decoupled meta-training of a MALMEN editor (Tan, Zhang and Fu, ICLR 2024; docs/methods.md).

The objective is MEND's (:mod:`lightning_modules.editor_module`): ``c_edit * NLL(paraphrase, new
target) + c_loc * KL(pre || post on locality)``, mean over the batch's problems, each problem being
``n_edits`` = K edits applied together. Its gradient is computed in four passes, so no pass holds
more than one micro-batch of the base model's activations or of the hypernetwork's, whatever K:

1. the base model on the edit inputs, ``edit_chunk`` edits at a time: each edit token's key ``u``
   and output gradient ``delta`` (:meth:`editors.malmen.MALMEN.piece_chunks`); fold them into the
   input statistics (once per step, all problems and processes together);
2. the hypernetwork on those tokens, ``token_chunk`` at a time, accumulating ``U^T U`` and
   ``U^T V``; solve for ``S`` per layer, no graph kept;
3. the edited model (``S`` a leaf) on the paraphrases and locality inputs, ``edit_chunk`` rows at a
   time, each micro-batch's loss backpropagated to ``S`` only: ``dL/dS``;
4. through the solve: with ``G = (U^T U + lambda I)^-1 dL/dS``, ``dL/dV = U G`` and
   ``dL/dlambda = -<G, S>``; the hypernetwork is re-run chunk by chunk and ``dL/dV`` backpropagated
   into its parameters and the step sizes.

Passes 2 and 4 read pass 1's pieces: recomputed by each pass ``edit_chunk`` edits at a time (the
default: two more base forward+backward passes over the edit inputs per step, for memory that does
not grow with K), or cached (``cache_pieces``: the cache grows with K).

This needs its own optimisation step (manual optimisation): gradients are accumulated by hand,
averaged over data-parallel processes with one all-reduce, clipped (``grad_clip``), then Adam
steps (the networks at ``lr``; step sizes and log ridges at ``edit_lr_lr``) with the shared
warm-up/cosine schedule. Validation and checkpoints are :class:`EditorModule`'s.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.layers import dense_edit
from editors.losses import forward_logits, kl_pre_post, nll
from editors.malmen import MALMEN
from lightning_modules.editor_module import VAL_METRICS, EditorModule
from lightning_modules.models import BaseDtype


def problem_rows(batch: dict[str, Tensor], b: int, n_problems: int) -> dict[str, Tensor]:
    """Problem ``b``'s rows of a sub-batch (rows in ``n_problems`` equal consecutive groups)."""
    n = batch["input_ids"].shape[0] // n_problems
    return {k: v[b * n:(b + 1) * n] for k, v in batch.items()}


def _row_chunks(batch: dict[str, Tensor], size: int):
    n = batch["input_ids"].shape[0]
    for a in range(0, n, size):
        yield {k: v[a:a + size] for k, v in batch.items()}, n


def decoupled_meta_gradients(editor: MALMEN, model: nn.Module, batch: dict, family: Family, c_edit: float,
                             c_loc: float, update_statistics: bool = True) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The meta-loss's gradient w.r.t. ``editor.parameters()`` (in that order), by the four passes of
    the module docstring, and the loss and its terms (means over problems)."""
    P, layers = batch["n_problems"], editor.layers
    inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
    pieces = [editor.piece_chunks(model, problem_rows(inner, b, P), family) for b in range(P)]  # pass 1
    if update_statistics:
        editor.update_statistics(c for chunks in pieces for c in chunks())
        if editor.key_cov_weight:  # the key statistics: all tokens of the training edits and locality inputs
            for part in (inner, loc):
                editor.fold_keys(model, part, family)
    params = list(editor.parameters())
    grads = [torch.zeros_like(p) for p in params]
    logs = {"loss": torch.zeros(()), "l_edit": torch.zeros(()), "kl": torch.zeros(())}

    def accumulate(out: Tensor) -> None:
        for g, d in zip(grads, torch.autograd.grad(out, params, allow_unused=True)):
            if d is not None:
                g += d

    for b in range(P):
        solved = editor.solve(editor.normal_equations(pieces[b]()))  # pass 2
        S = {k: s.detach().requires_grad_(True) for k, (s, _) in solved.items()}
        gS = {k: torch.zeros_like(s) for k, s in S.items()}  # pass 3 fills it
        for part, weight, is_loc in ((problem_rows(outer, b, P), c_edit, False), (problem_rows(loc, b, P), c_loc, True)):
            for mb, n in _row_chunks(part, editor.edit_chunk):
                deltas = {l.name: editor.to_weight(l, S[l.name]).unsqueeze(0) for l in layers}
                with dense_edit(model, layers, deltas):
                    post = forward_logits(model, mb, family)
                rows = mb["input_ids"].shape[0]
                if is_loc:
                    with torch.no_grad():
                        pre = forward_logits(model, mb, family)
                    term = kl_pre_post(pre, post, mb, family).sum() / n
                    logs["kl"] += term.detach().cpu() / P
                else:
                    term = nll(post, mb["labels"], family) * rows / n
                    logs["l_edit"] += term.detach().cpu() / P
                for k, d in zip(S, torch.autograd.grad(weight * term / P, list(S.values()))):
                    gS[k] += d
        # pass 4: through the solve. S = A^-1 U^T V with A = U^T U + lambda I symmetric, so
        # dL/d(U^T V) = A^-1 dL/dS = G, dL/dV = U G and dL/dlambda = -<G, S>
        G = {k: torch.cholesky_solve(gS[k], solved[k][1]) for k in S}
        dl_dlam = torch.stack([-(G[l.name] * solved[l.name][0]).sum() for l in layers])
        accumulate((editor.ridges() * dl_dlam.to(editor.log_ridges.dtype)).sum())
        for chunk in pieces[b]():
            v = editor.value_shifts(chunk)
            accumulate(sum((v[l.name] * (chunk[l.name][0].to(G[l.name].dtype) @ G[l.name]).to(v[l.name].dtype)).sum()
                           for l in layers))
    logs["loss"] = c_edit * logs["l_edit"] + c_loc * logs["kl"]
    return grads, logs


class MALMENModule(EditorModule):
    """Wraps a frozen base model (``self.model``) and a trainable :class:`MALMEN` (``self.editor``).

    ``n_edits`` (the DataModule's K per problem) may be far beyond what one forward pass holds:
    ``edit_chunk`` bounds the rows of every base-model pass, ``token_chunk`` the tokens of every
    hypernetwork pass; ``cache_pieces`` False keeps the edit tokens' pieces from growing with K (at
    the cost of two more base passes over the edit inputs per step; see the module docstring).
    ``eval_key_cov_weight``: the key covariance weight written into the editor file (default
    ``key_cov_weight``, the one meta-training edits with). Checkpoints hold the editor only, with the
    base model's fingerprint.
    """

    step_size_params = ("edit_lrs", "log_ridges")

    def __init__(self, base_model: str = "runs/base_zsre_gpt2_tiny/model", family: Family = "causal",
                 edit_params: list[str] | None = None, rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-3, init_ridge: float = 1.0, edit_chunk: int = 64, token_chunk: int = 4096,
                 key_cov_weight: float = 0.0, eval_key_cov_weight: float | None = None, cache_pieces: bool = False,
                 lr: float = 1e-4, edit_lr_lr: float = 1e-3, c_edit: float = 0.1, c_loc: float = 1.0,
                 cosine_decay: bool = False, grad_clip: float | None = 100.0, output_dir: str = "runs/malmen",
                 base_dtype: BaseDtype | None = None) -> None:
        super().__init__()
        if rank < 1 or min(lr, edit_lr_lr) < 0 or init_ridge <= 0:
            raise ValueError(f"rank must be at least 1, lr and edit_lr_lr not negative and init_ridge positive; got "
                             f"rank {rank}, lr {lr}, edit_lr_lr {edit_lr_lr}, init_ridge {init_ridge}")
        if eval_key_cov_weight is not None and (eval_key_cov_weight < 0 or not key_cov_weight):
            raise ValueError(f"eval_key_cov_weight needs key statistics (key_cov_weight > 0) and must not be "
                             f"negative; got {eval_key_cov_weight} with key_cov_weight {key_cov_weight}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # the step accumulates its own gradient (see the module docstring)
        self._load_base(base_model, family, base_dtype)
        self.editor = MALMEN.for_model(self.model, edit_params, rank=rank, n_hidden=n_hidden, init_edit_lr=init_edit_lr,
                                       init_ridge=init_ridge, edit_chunk=edit_chunk, token_chunk=token_chunk,
                                       key_cov_weight=key_cov_weight, cache_pieces=cache_pieces)
        self.val = torch.nn.ModuleDict({k: MeanMetric() for k in VAL_METRICS})

    def exported_config(self) -> dict[str, Any]:
        """``eval_key_cov_weight``, when set, is the weight the editor file carries: the networks are fitted
        at ``key_cov_weight``, and the weight to edit with is chosen afterwards on validation."""
        w = self.hparams.eval_key_cov_weight
        return {} if w is None else {"key_cov_weight": float(w)}

    def on_fit_start(self) -> None:
        hp = self.trainer.datamodule.hparams
        need, have = hp.n_edits * hp.batch_size * self.trainer.world_size, len(self.trainer.datamodule.dataset("train"))
        if need > have:
            raise MisconfigurationException(
                f"n_edits {hp.n_edits} x batch_size {hp.batch_size} x {self.trainer.world_size} process(es) = {need} "
                f"edits per step, but the training split has only {have}: lower n_edits (K)")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        grads, logs = decoupled_meta_gradients(self.editor, self.model, batch, hp.family, hp.c_edit, hp.c_loc)
        self.manual_step(grads, hp.grad_clip)
        self.log_dict({"train/loss": logs["loss"], "train/edit_nll": logs["l_edit"], "train/loc_kl": logs["kl"],
                       "train/ridge": self.editor.ridges().detach().mean()}, prog_bar=True, batch_size=batch["n_problems"])

    # -- validation: EditorModule's objective, each problem edited by its own solve
    def _edit(self, inner: dict, n_problems: int) -> tuple[Any, contextlib.AbstractContextManager]:
        fam, layers = self.hparams.family, self.editor.layers
        solved = [self.editor.solved(self.model, problem_rows(inner, b, n_problems), fam) for b in range(n_problems)]
        deltas = {l.name: torch.stack([self.editor.to_weight(l, s[l.name][0]) for s in solved]) for l in layers}
        return deltas, dense_edit(self.model, layers, deltas)
