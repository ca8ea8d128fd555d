"""A meta-trained surgery selector: edits that change at most ``n_params`` weights, chosen by a learned scorer.

Neural network surgery (Zhang et al., NAACL 2021) shows that an edit's instance-wise side effects
grow with *how many* weights it changes, and selects the changed entries by hand-made rules
(largest |gradient|, largest |change| after a probe fine-tune, ...). This editor *learns* the
selection across many edits, the way MEND (Mitchell et al., ICLR 2022) learns its weight change:

1. the edit's per-token gradient pieces ``(u, delta)`` of the candidate matrices (MEND's edited
   layers, :func:`editors.layers.gradient_pieces`; no full backward), and from them the gradient
   ``G = sum_t delta_t u_t^T`` of each candidate matrix;
2. a score for every entry, in factored form::

       score[i, j] = log|G[i, j]| + b_layer + r_i + c_j

   with ``r_i`` (output unit ``i``) from the deltas and ``c_j`` (input unit ``j``) from the u's:
   each is a learned per-unit prior plus a small network shared by all layers reading that unit's
   gradient statistics in the edit (log-norm of its row/column of ``G``, log-rms and log-|sum| of its
   pieces over the tokens, standardised over the layer's units). The learned terms start at or near
   0, so an untrained selector is the paper's "largest |gradient|" rule; the fixed unit weight of
   ``log|G|`` anchors the scores' scale (``tau`` below is in its units);
3. the top ``n_params`` scores over *all* candidate matrices (one global budget) form a hard mask
   ``M``, and the edit is one masked descent step ``W - lr_layer * M * G`` with a learned,
   log-parametrised step size per layer. With ``step_rule="polyak"`` the step is also scaled per
   edit by Polyak's step size for a target loss of 0, ``L / ||M * G||^2`` (``L``: the edit's NLL):
   to first order the step then removes the fraction ``lr_layer`` of the edit's loss whatever the
   size of its gradient, so an edit with a small gradient is not under-stepped and one with a large
   gradient is not over-stepped (the factor is a constant of the edit, not differentiated).
   Optionally (``until_right_steps``) further masked gradient steps on the same mask until every edit
   input is an exact match (FT's stopping rule), at edit time only. The returned changes have at most
   ``n_params`` nonzero entries.

Relaxation for meta-training: straight-through top-n. The forward pass uses the hard top-n mask,
so meta-training optimises exactly the edit that is applied at evaluation and the budget holds in
every training step; the backward pass uses ``sigmoid((score - threshold) / tau)``, with the
threshold between the n-th and (n+1)-th score (differentiated too, so a common shift of all scores
changes neither mask), whose gradient tells each entry near the threshold whether entering (or
leaving) the mask would lower the meta-loss (first order: ``-lr * G * dL/dW``).
Gumbel top-k would need ``n`` successive softmaxes over all candidate entries per edit (``n`` =
1000 here) and trains a noisy mask; hard-concrete with a budget penalty meets the budget only on
average, needs the penalty tuned, and still needs a hard top-n at evaluation, so training and
evaluation would see different edits.

Plain torch: no Lightning here. Editor files: safetensors plus a JSON header (class, format,
config, base-model fingerprint) via :mod:`editors.io`; loading never unpickles.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.base import DeltaEditor, EditorContext
from editors.io import FileEditor
from editors.layers import LayerSpec, gradient_pieces, real_tokens
from editors.losses import forward_logits, nll, nll_per_example, scores
from editors.until_right import polyak_scale

STEP_RULES = ("gradient", "polyak")
N_FEATURES = 3  # per unit: log-norm of its row/column of G, log-rms and log-|sum| of its pieces over tokens
_TINY = 1e-30  # floor under magnitudes before a log (exact zeros stay very unlikely to be selected)


class Selector(FileEditor, nn.Module, DeltaEditor):
    """Learned top-``n_params`` selection of the entries a one-step edit changes (see the module docstring).

    Args:
        layers: the candidate matrices (MEND's edited layers).
        n_params: the budget: how many scalar weights may change, over all candidate matrices together.
        hidden: width of the per-unit scoring networks.
        init_edit_lr: initial step size of every layer's masked gradient step.
        tau: temperature of the straight-through relaxation, in score units (``log|G|``: a factor
            ``e^tau`` in gradient magnitude).
        until_right_steps: at edit time, up to this many further masked gradient steps (same mask,
            same step sizes) until every edit input is right. 0: the one meta-trained step.
        step_rule: "gradient" (the masked gradient times the layer's step size) or "polyak" (also
            times ``L / ||M * G||^2``, see the module docstring).
    """

    def __init__(self, layers: Sequence[LayerSpec | Mapping[str, Any]], n_params: int = 1000, hidden: int = 16,
                 init_edit_lr: float = 1.0, tau: float = 1.0, until_right_steps: int = 0,
                 step_rule: str = "gradient") -> None:
        super().__init__()
        self.name = "selector"
        self.layers = [l if isinstance(l, LayerSpec) else LayerSpec(**l) for l in layers]
        if not self.layers:
            raise ValueError("the selector needs at least one candidate matrix")
        total = sum(l.d_in * l.d_out for l in self.layers)
        if isinstance(n_params, bool) or int(n_params) != n_params or n_params <= 0:
            raise ValueError(f"n_params must be a positive integer (the number of weights allowed to change), "
                             f"got {n_params}")
        if n_params > total:
            raise ValueError(f"n_params={n_params} is more than the {total} entries of the "
                             f"{len(self.layers)} candidate matrices")
        if tau <= 0 or init_edit_lr <= 0:
            raise ValueError(f"tau and init_edit_lr must be positive, got {tau} and {init_edit_lr}")
        if int(until_right_steps) != until_right_steps or until_right_steps < 0:
            raise ValueError(f"until_right_steps must be a non-negative integer, got {until_right_steps}")
        if step_rule not in STEP_RULES:
            raise ValueError(f"step_rule must be one of {STEP_RULES}, got {step_rule!r}")
        self.step_rule = step_rule
        self.n_params, self.tau, self.until_right_steps = int(n_params), float(tau), int(until_right_steps)
        self.total = total
        self.config = {"layers": [asdict(l) for l in self.layers], "n_params": self.n_params, "hidden": hidden,
                       "init_edit_lr": init_edit_lr, "tau": self.tau, "until_right_steps": self.until_right_steps,
                       "step_rule": step_rule}
        L = len(self.layers)
        # per-unit priors, all layers in one vector: layer l's output units, then its input units
        sizes = [n for l in self.layers for n in (l.d_out, l.d_in)]
        self._offsets = [0] + torch.tensor(sizes).cumsum(0).tolist()
        self.unit_prior = nn.Parameter(torch.zeros(self._offsets[-1]))
        self.layer_bias = nn.Parameter(torch.zeros(L))
        self.row_net = _unit_net(hidden)
        self.col_net = _unit_net(hidden)
        self.log_edit_lrs = nn.Parameter(torch.full((L,), math.log(init_edit_lr)))
        self.last_steps = 0  # masked gradient steps the last edit took after the first (until_right_steps)

    @classmethod
    def for_evaluation(cls, context: EditorContext, path: str | None, until_right_steps: int | None = None,
                       **settings: Any) -> "Selector":
        """The meta-trained selector in file ``path``; ``until_right_steps`` overrides the file's.

        ``path`` None: an untrained selector (close to the "largest |gradient|" rule, the baseline that
        meta-training is measured against) for ``context``'s edited matrices, its small random scorer
        weights seeded by ``context.seed``; ``settings`` are the constructor's (``n_params``, ...)."""
        if path is None:
            with torch.random.fork_rng(devices=[]):  # seeded without touching the evaluation's random state
                torch.manual_seed(context.seed)
                sel = cls(context.layers(), until_right_steps=until_right_steps or 0, **settings)
            sel.name = "selector_untrained"
            return sel
        if settings:
            raise ValueError(f"a trained selector's settings are those of its file {path}: {sorted(settings)} apply "
                             f"only to the untrained one (path: null, the short name selector_untrained)")
        sel = cls.load(path, context.model)
        if until_right_steps is not None:
            sel.until_right_steps = until_right_steps
            sel.config = {**sel.config, "until_right_steps": until_right_steps}
        return sel

    # -- scores and mask
    def _prior(self, i: int) -> tuple[Tensor, Tensor]:
        o = self._offsets
        return self.unit_prior[o[2 * i]:o[2 * i + 1]], self.unit_prior[o[2 * i + 1]:o[2 * i + 2]]

    def score_layer(self, i: int, G: Tensor, u: Tensor, d: Tensor) -> Tensor:
        """Scores ``[P, d_out, d_in]`` of layer ``i``'s entries from its gradient ``G [P, d_out, d_in]``
        (output x input orientation) and pieces ``u [P, n, d_in]``, ``d [P, n, d_out]`` (padding rows zero)."""
        with torch.no_grad():  # the features are constants of the edit
            tok = real_tokens(u, d).to(G.dtype).unsqueeze(-1)  # [P, n, 1]
            cnt = tok.sum(1).clamp_min(1)
            fr = torch.stack([G.norm(dim=2), ((d * d * tok).sum(1) / cnt).sqrt(), (d * tok).sum(1).abs()], -1)
            fc = torch.stack([G.norm(dim=1), ((u * u * tok).sum(1) / cnt).sqrt(), (u * tok).sum(1).abs()], -1)
            fr, fc = _standardised(fr.clamp_min(_TINY).log()), _standardised(fc.clamp_min(_TINY).log())
            logg = G.abs().clamp_min(_TINY).log()
        prior_r, prior_c = self._prior(i)
        r = self.row_net(fr.to(prior_r.dtype)).squeeze(-1) + prior_r  # [P, d_out]
        c = self.col_net(fc.to(prior_c.dtype)).squeeze(-1) + prior_c  # [P, d_in]
        return logg + self.layer_bias[i] + r.unsqueeze(-1) + c.unsqueeze(-2)

    def mask(self, scores: Sequence[Tensor]) -> list[Tensor]:
        """The top-``n_params`` mask over all layers' scores (each ``[P, ...]``), per problem. Its value is
        the hard 0/1 mask; where the scores carry a gradient, the backward pass is that of
        ``sigmoid((score - threshold) / tau)`` (straight-through)."""
        flat = torch.cat([s.flatten(1) for s in scores], 1)
        n, N = self.n_params, flat.shape[1]
        top = flat.detach().topk(min(n + 1, N), dim=1)
        hard = torch.zeros_like(flat).scatter_(1, top.indices[:, :n], 1.0)
        if flat.requires_grad:
            # the threshold is the order statistic itself (differentiable through the two entries that
            # set it), not a constant: a common shift of all scores then leaves the relaxed mask as it
            # is, as it leaves the hard one (a detached threshold reads a shift as "select more", and the
            # scorer drifted along that direction, which the budget makes meaningless)
            thr = flat.gather(1, top.indices[:, n - 1:n + 1]).mean(1) if n < N else flat.gather(
                1, top.indices[:, n - 1:n]).squeeze(1) - self.tau
            soft = torch.sigmoid((flat - thr.unsqueeze(1)) / self.tau)
            hard = hard + (soft - soft.detach())  # exactly the hard mask in value
        return [m.view_as(s) for m, s in zip(hard.split([s[0].numel() for s in scores], 1), scores)]

    # -- the edit
    def _gradients(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family, n_problems: int,
                   params: Mapping[str, Tensor] | None = None, stash: dict | None = None
                   ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Per layer the edit loss's gradient ``[P, d_out, d_in]`` (output x input orientation) and the
        pieces ``(u [P, n, d_in], d [P, n, d_out])``, at ``model``'s weights or at ``params``."""
        rows = batch["input_ids"].shape[0]
        if rows % n_problems:
            raise ValueError(f"{rows} edit rows cannot be split into {n_problems} equal problems")

        def loss() -> Tensor:
            logits = forward_logits(model, batch, family, params)
            if stash is not None:
                stash["logits"] = logits.detach()
            # the sum over edits of each edit's mean NLL: every edit's gradient at the scale it has alone
            return nll(logits, batch["labels"], family) * rows

        pieces = gradient_pieces(model, self.layers, loss)
        grads, split = {}, {}
        for l in self.layers:
            u, d = pieces[l.name]
            u, d = u.view(n_problems, -1, l.d_in), d.view(n_problems, -1, l.d_out)
            u, d = u.to(self.log_edit_lrs.dtype), d.to(self.log_edit_lrs.dtype)
            grads[l.name], split[l.name] = d.transpose(1, 2) @ u, (u, d)
        return grads, split

    def batched_deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                       n_problems: int = 1) -> dict[str, Tensor]:
        """Weight changes (to add) ``[n_problems, *weight.shape]`` for ``n_problems`` independent edit
        problems, the consecutive equal row groups of ``batch``; each problem changes at most
        ``n_params`` entries. Differentiable in the selector's parameters where grad is enabled
        (straight-through mask, see :meth:`mask`)."""
        stash: dict = {}
        grads, pieces = self._gradients(model, batch, family, n_problems, stash=stash)
        sc = [self.score_layer(i, grads[l.name], *pieces[l.name]) for i, l in enumerate(self.layers)]
        masks = self.mask(sc)
        factor = self._step_factor(stash["logits"], batch["labels"], family,
                                   [m.detach() * grads[l.name] for l, m in zip(self.layers, masks)])
        out = {}
        for i, (l, m) in enumerate(zip(self.layers, masks)):
            step = -self.log_edit_lrs[i].exp() * factor * m * grads[l.name]
            out[l.name] = _stored(l, step)
        return out

    @torch.no_grad()
    def _step_factor(self, logits: Tensor, labels: Tensor, family: Family, masked: Sequence[Tensor]) -> Tensor:
        """Per problem ``[P, 1, 1]``, the factor on the masked gradient step besides the step sizes: 1, or
        for ``step_rule="polyak"`` the problem's edit loss (the sum over its edits of each one's NLL, whose
        gradient ``G`` is) over ``||M * G||^2`` (``masked``: per layer ``M * G [P, d_out, d_in]``)."""
        P = masked[0].shape[0]
        if self.step_rule == "gradient":
            return masked[0].new_ones(P, 1, 1)
        loss = nll_per_example(logits, labels, family).view(P, -1).sum(1)
        slope = -sum(g.pow(2).flatten(1).sum(1) for g in masked)  # of the step -M*G along G
        return polyak_scale(loss.to(slope.dtype), slope, 1.0, math.inf).view(P, 1, 1)

    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The weight changes (to add) that edit ``model`` towards ``batch``'s labels, all edits of the
        batch at once, at most ``n_params`` nonzero entries in all (``loc_batch`` is not read)."""
        with torch.no_grad():
            change = {k: v[0] for k, v in self.batched_deltas(model, batch, family, 1).items()}
        self.last_steps = 0
        if self.until_right_steps:
            change = self._until_right(model, batch, family, change)
        return change

    @torch.no_grad()
    def _until_right(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                     change: dict[str, Tensor]) -> dict[str, Tensor]:
        """FT's stopping rule on the selected entries: masked gradient steps at the edited weights (with
        the learned step sizes) until every edit input is an exact match, at most ``until_right_steps``."""
        # the first step's support, fixed; an entry with zero gradient there is left out too
        keep = {k: v != 0 for k, v in change.items()}
        base = {k: v.detach() for k, v in model.named_parameters()}
        for step in range(self.until_right_steps + 1):
            params = {k: base[k] + change[k].to(base[k].dtype) for k in change}
            stash: dict = {}
            grads, _ = self._gradients(model, batch, family, 1, params, stash)
            right, _ = scores(stash["logits"], batch["labels"], family)
            if bool(right.all()) or step == self.until_right_steps:
                break
            masked = [keep[l.name] * _stored(l, grads[l.name])[0] for l in self.layers]
            factor = self._step_factor(stash["logits"], batch["labels"], family, [g.unsqueeze(0) for g in masked])[0]
            for i, (l, g) in enumerate(zip(self.layers, masked)):
                change[l.name] = change[l.name] - self.log_edit_lrs[i].exp() * factor * g
            self.last_steps = step + 1
        return change


def _unit_net(hidden: int) -> nn.Sequential:
    """Per-unit features -> a score offset. The output layer starts small (not zero), so every
    parameter has a gradient from the first step while the untrained scores stay close to ``log|G|``.
    It has no bias: a constant added to every unit's score is a common shift of all scores, which
    changes no mask, so its gradient is rounding noise (and Adam would take full steps on it)."""
    net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1, bias=False))
    nn.init.normal_(net[2].weight, std=1e-2)
    return net


def _standardised(f: Tensor) -> Tensor:
    """Features ``[P, units, F]`` centred and scaled over the units (scale-free across edits and layers)."""
    return (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)


def _stored(spec: LayerSpec, x: Tensor) -> Tensor:
    """``[P, d_out, d_in]`` -> the layer's stored weight layout (GPT-2's Conv1D stores ``[d_in, d_out]``)."""
    return x.transpose(1, 2) if spec.kind == "conv1d" else x
