"""Neural network surgery: edits that change at most ``n_params`` scalar weights.

After Zhang et al., NAACL 2021, "Neural Network Surgery: Injecting Data Patterns into Pre-trained
Models with Minimal Instance-wise Side Effects": the side effects of an edit on individual inputs
grow with *how many* weights it changes, so the change is restricted to a budget of ``n`` entries of
the candidate matrices (the family defaults of :func:`editors.layers.select_layers`, or the given
patterns). The budget is global: at most ``n`` nonzero entries over all candidate matrices together.
Methods (``method``):

- ``random``: ``n`` entries drawn at random, then tuned: one subset per editor (drawn at its first edit from
  ``seed``, :func:`random_subset`), the same for every edit;
- ``grad``: the ``n`` entries with the largest |gradient| of the edit loss at the base weights, then tuned;
- ``delta``: a short unconstrained probe fine-tune (``probe_steps``) that is then discarded; the ``n``
  entries it moved most are tuned from the base weights;
- ``dynamic`` (the paper's Dyn-Delta, its best): every candidate entry is tuned, and every
  ``shrink_every`` steps (or as soon as the edit is right) only the ``count`` entries with the largest
  |change| are kept, the others reset to their base values, with ``count`` shrinking geometrically
  (``shrink_factor``) down to ``n``; the ``n`` survivors are then tuned (Adam) until the edit is right,
  with ``max_steps`` of their own (the number of shrinks grows with the candidate count);
- ``l1``: the edit loss plus ``lambda * ||change||_1``, minimised by Adam followed after every step by a
  proximal soft-threshold in Adam's own per-entry metric (an entry whose gradient stays below
  ``lambda`` never leaves zero, so untouched weights keep exactly their base values); then the ``n``
  largest |changes| are kept and tuned further (masked) until the edit is right.

The dense phases (``delta``'s probe, ``dynamic`` before the budget holds) take gradient steps scaled
so that the largest entry moves by ``dense_lr`` by default: under Adam, every entry moves by about the
learning rate at first, and since an edit is often right after two or three steps, ranking by
|change| then picks almost at random. The selected entries are always tuned with Adam.

Every tuning phase follows FT's stopping rule (:mod:`editors.ft`): stop as soon as every edit input in
the batch is an exact match, or after a cap on the steps. Like FT, the trainable variables are the
weight changes, applied functionally, so the base model is never modified; the result is a dict of
changes to add to the weights, with at most ``n`` nonzero entries in total. Plain torch: no Lightning.

Cost: every step, the masked tuning of the ``n`` selected entries included, is as dense as fine-tuning
the candidate matrices (without Adam's moments): the change is a float32 vector over all ``N``
candidates, the forward adds it to a copy of the candidate matrices, and the backward computes their
whole gradient, of which the selected entries' part is kept. Per step that is about ``(8 + 2b) N``
bytes (``b``: the base's bytes per weight; 13 bytes per candidate measured under a bf16 base, 4.9 GiB
for LLaMA-2 7B's 406 M candidates) besides the base and its activations; ``l1`` adds its float32
Adam moments and scale, ``dense_optimizer="adam"`` its moments, ``dynamic`` a bool mask. The selections
(:func:`top_abs`, :func:`random_subset`) work chunk by chunk and hold no other vector of size ``N``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.base import DeltaEditor, EditorContext, WeightDelta
from editors.layers import LayerSpec, select_layers
from editors.losses import forward_logits, nll, scores

METHODS = ("random", "grad", "delta", "dynamic", "l1")
CHUNK = 1 << 22  # entries per chunk of a selection pass (its temporaries: a few times 4 MiB entries)


def random_subset(n: int, total: int, seed: int) -> Tensor:
    """``n`` distinct indices of ``range(total)``, uniformly at random for ``seed``, ascending, drawn in
    memory of order ``n`` (a ``randperm`` over LLaMA-2 7B's 406 M candidates took 3 GiB): uniform draws
    until ``n`` distinct values are seen. Which values a run of draws has seen depends only on how many it
    has seen, so they are a uniform subset of their size, and a uniform ``n`` of them a uniform ``n``-subset."""
    gen = torch.Generator().manual_seed(int(seed))
    if 2 * n > total:  # most of the range: a permutation is at most twice the subset, and draws would repeat
        return torch.randperm(total, generator=gen)[:n].sort().values
    seen = torch.empty(0, dtype=torch.long)
    while len(seen) < n:  # each draw is new with probability >= 1/2
        seen = torch.cat([seen, torch.randint(total, (2 * (n - len(seen)),), generator=gen)]).unique()
    return seen[torch.randperm(len(seen), generator=gen)[:n]].sort().values


def _abs_bits(x: Tensor, mask: Tensor | None, a: int) -> Tensor:
    """|x| over chunk ``[a, a + CHUNK)`` (0 outside ``mask``) as float32 bit patterns: for non-negative
    floats the integer order is the float order (NaN above infinity, as ``torch.topk`` ranks it)."""
    v = x[a:a + CHUNK].detach().abs().float()
    if mask is not None:
        v = v.masked_fill(~mask[a:a + CHUNK], 0)
    return v.view(torch.int32)


def _kth_abs_bits(x: Tensor, k: int, mask: Tensor | None) -> tuple[int, int]:
    """The bit pattern of the ``k``-th largest float32 |x| over the flat ``x``, and how many entries equal to
    it the top ``k`` hold. Radix select in two passes over the chunks: a histogram of the upper 16 bits,
    then one of the lower 16 bits of the entries whose upper half is the one found."""
    if not 0 < k <= x.numel():
        raise ValueError(f"cannot select {k} of {x.numel()} entries")
    prefix, need = 0, k  # the bits found so far; how many of the top k lie among the entries matching them
    for shift in (16, 0):
        hist = torch.zeros(1 << 16, dtype=torch.long, device=x.device)
        for a in range(0, x.numel(), CHUNK):
            bits = _abs_bits(x, mask, a)
            if shift == 0:
                bits = bits[(bits >> 16) == (prefix >> 16)]
            hist += torch.bincount((bits >> shift) & 0xFFFF, minlength=1 << 16)
        at_least = hist.flip(0).cumsum(0).flip(0)  # entries whose digit is >= d
        d = int((at_least >= need).nonzero().max())
        need -= int(at_least[d] - hist[d])  # those above digit d are all in the top k
        prefix |= d << shift
    return prefix, need


def kth_abs(x: Tensor, k: int) -> float:
    """The ``k``-th largest |x| over the flat ``x`` (in float32), chunk by chunk."""
    return torch.tensor(_kth_abs_bits(x, k, None)[0], dtype=torch.int32).view(torch.float32).item()


def top_abs(x: Tensor, k: int, mask: Tensor | None = None, as_mask: bool = False) -> Tensor:
    """The ``k`` entries of the flat ``x`` with the largest |x| in float32 (entries outside ``mask`` count as
    0), ties going to the lower index: their indices ascending, or (``as_mask``) a bool mask of ``x``'s size.

    ``torch.topk(x.abs().float(), k)``'s selection (which breaks ties arbitrarily), made ``CHUNK`` entries at a
    time: :func:`_kth_abs_bits`, then one more pass keeps what is above that value and its first ties. The
    whole-vector version took two float32 copies of the vector and, for ``dynamic``'s first cut (``k = N/2``),
    int64 indices of half of it and their sorted copy: about 6 GiB at 406 M candidates."""
    t, need = _kth_abs_bits(x, k, mask)
    keep = torch.zeros(x.numel(), dtype=torch.bool, device=x.device) if as_mask else None
    parts, left = [], need  # ties still to take
    for a in range(0, x.numel(), CHUNK):
        bits = _abs_bits(x, mask, a)
        sel = bits > t
        ties = (bits == t).nonzero().squeeze(1)[:left]
        sel[ties] = True
        left -= len(ties)
        if keep is not None:
            keep[a:a + len(sel)] = sel
        else:
            parts.append(sel.nonzero().squeeze(1) + a)
    return keep if keep is not None else torch.cat(parts)


class Surgery(DeltaEditor):
    """Edits under a budget of ``n_params`` changed scalar weights over the candidate matrices ``layers``.

    Args:
        layers: the candidate matrices.
        n_params: the budget: how many scalar weights may differ from the base model (global over ``layers``).
        method: how the entries are selected (see the module docstring): one of :data:`METHODS`.
        lr: Adam's learning rate for every tuning phase.
        max_steps: cap on the optimiser steps of the tuning phase, the last of every method (the selected
            entries; for ``l1``: the masked tuning after the L1 phase; for ``dynamic``: the ``n`` survivors,
            after a shrinking phase of its own, so that a long schedule never leaves them untuned).
        seed: the seed of ``random``'s selection (drawn once, the same subset for every edit of this editor).
        probe_steps, probe_lr: ``delta``'s probe fine-tune (``probe_lr`` defaults to ``dense_lr``).
        shrink_every, shrink_factor: ``dynamic``'s schedule: the active count is multiplied by
            ``shrink_factor`` every ``shrink_every`` steps (or when the edit is right), never below ``n_params``;
            :attr:`shrink_schedule` lists the counts, so shrinking takes at most ``shrink_every`` times its
            length in steps (19 shrinks, 57 steps, from 406 M candidates to 1,000 at the defaults).
        l1_lambda: the L1 weight (in units of the edit loss's gradient). ``None``: ``l1_scale`` times the
            ``n_params``-th largest |gradient| of the edit loss at the base weights.
        l1_scale: see ``l1_lambda``.
        l1_steps: cap on the steps of ``l1``'s penalised phase (it stops earlier once the edit is right).
        dense_optimizer, dense_lr: how the dense phases (``delta``'s probe, ``dynamic`` until the budget
            holds) step: ``"ngd"`` (default), the gradient scaled so that its largest entry moves by
            ``dense_lr``, which keeps |change| proportional to the accumulated gradient; or ``"adam"``
            (learning rate ``dense_lr``), whose first steps move every entry by about the learning rate,
            so that ranking by |change| after a few steps is close to random.
        name: the report name (default ``surgery_<method>``).
    """

    def __init__(self, layers: list[LayerSpec], n_params: int = 1000, method: str = "dynamic", lr: float = 1e-2,
                 max_steps: int = 50, seed: int = 0, probe_steps: int = 5, probe_lr: float | None = None,
                 shrink_every: int = 3, shrink_factor: float = 0.5, l1_lambda: float | None = None,
                 l1_scale: float = 0.5, l1_steps: int = 25, dense_optimizer: str = "ngd",
                 dense_lr: float = 0.1, name: str | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown surgery method {method!r}; choose one of {list(METHODS)}")
        if not layers:
            raise ValueError("surgery needs at least one candidate matrix")
        total = sum(l.d_in * l.d_out for l in layers)
        if int(n_params) != n_params or n_params <= 0:
            raise ValueError(f"n_params must be a positive integer (the number of weights allowed to change), "
                             f"got {n_params}")
        if n_params > total:
            raise ValueError(f"n_params={n_params} is more than the {total} entries of the candidate matrices "
                             f"({len(layers)} matrices)")
        if max_steps < 0 or probe_steps < 0 or l1_steps < 0:
            raise ValueError("max_steps, probe_steps and l1_steps must be >= 0")
        if shrink_every < 1 or not 0.0 < shrink_factor < 1.0:
            raise ValueError("shrink_every must be >= 1 and shrink_factor in (0, 1)")
        if dense_optimizer not in ("ngd", "adam"):
            raise ValueError(f"unknown dense_optimizer {dense_optimizer!r}; choose 'ngd' or 'adam'")
        if (l1_lambda is not None and l1_lambda < 0) or l1_scale < 0:
            raise ValueError("l1_lambda and l1_scale must be >= 0")
        self.layers = layers
        self.n_params, self.method, self.n_candidates = int(n_params), method, total
        # dynamic's active counts after each shrink, sized to the candidate count: at most shrink_every dense
        # steps per shrink, then max_steps to tune the n survivors whatever the number of shrinks
        self.shrink_schedule: list[int] = []
        count = total
        while method == "dynamic" and count > self.n_params:
            count = max(self.n_params, int(count * shrink_factor))
            self.shrink_schedule.append(count)
        self.name = name or f"surgery_{method}"
        self.config = {"class": "Surgery", "name": self.name, "method": method, "n_params": self.n_params,
                       "n_candidates": total, "lr": lr, "max_steps": max_steps, "seed": seed,
                       "probe_steps": probe_steps, "probe_lr": dense_lr if probe_lr is None else probe_lr,
                       "shrink_every": shrink_every, "shrink_factor": shrink_factor,
                       "shrinks": len(self.shrink_schedule), "l1_lambda": l1_lambda,
                       "l1_scale": l1_scale, "l1_steps": l1_steps,
                       "dense_optimizer": dense_optimizer, "dense_lr": dense_lr, "layers": [l.name for l in layers]}
        self.last_steps = 0     # optimiser steps the last edit took, all phases (0: it was already right)
        self.last_tune_steps = 0  # of which tuning the selected entries (the last phase of every method)
        self.last_changed = 0   # scalar weights the last edit changes, measured in the model's dtype
        self.last_right = False  # whether every edit input of the last batch was right under the returned change
        self.last_l1_nonzero: int | None = None  # l1: nonzero entries after the penalised phase, before the top-n cut
        self._subset: Tensor | None = None  # random: the subset, drawn at the first edit

    @classmethod
    def for_model(cls, model: nn.Module, edit_params: list[str] | None = None, **kw: Any) -> "Surgery":
        """A surgery editor over ``model``'s default (or given) candidate matrices."""
        return cls(select_layers(model, edit_params), **kw)

    @classmethod
    def for_evaluation(cls, context: EditorContext, **init_args: Any) -> "Surgery":
        """Surgery over the matrices the config edits; ``seed`` defaults to the evaluation's."""
        return cls(context.layers(), **{"seed": context.seed, **init_args})

    # ------------------------------------------------------------------ helpers
    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        """The flat change vector as per-matrix views in each weight's stored layout (by ``split``, whose
        backward writes the flat gradient once: a slice per matrix zero-filled a flat-sized one each)."""
        parts = flat.split([math.prod(shape) for shape in self._shapes.values()])
        return {name: p.view(shape) for (name, shape), p in zip(self._shapes.items(), parts)}

    def _forward(self, flat: Tensor) -> Tensor:
        params = dict(self._base)
        for k, d in self._split(flat).items():
            params[k] = self._base[k] + d.to(self._base[k].dtype)
        return forward_logits(self._model, self._batch, self._family, params)

    def _right(self, logits: Tensor) -> bool:
        right, _ = scores(logits.detach(), self._batch["labels"], self._family)
        return bool(right.all())

    def _loss(self, logits: Tensor) -> Tensor:
        return nll(logits, self._batch["labels"], self._family)

    def _zeros(self) -> Tensor:
        return torch.zeros(self.n_candidates, device=self._device, dtype=self._dtype)

    def _base_grad(self) -> Tensor:
        flat = self._zeros().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss(self._forward(flat)), flat)
        return g

    def _tune_entries(self, idx: Tensor, init: Tensor | None, max_steps: int) -> tuple[Tensor, int]:
        """Adam on the entries ``idx`` only (from ``init``, else 0) until right or ``max_steps``; the flat change
        (and :attr:`last_right`, read from the forward that decided to stop)."""
        values = (init.clone() if init is not None else torch.zeros(len(idx), device=self._device,
                                                                    dtype=self._dtype)).requires_grad_(True)
        opt = torch.optim.Adam([values], lr=self.config["lr"])
        steps = 0
        while True:
            flat = self._zeros().index_put_((idx,), values)
            logits = self._forward(flat)
            self.last_right = self._right(logits)
            if self.last_right or steps >= max_steps:
                return flat.detach(), steps
            opt.zero_grad(set_to_none=True)
            self._loss(logits).backward()
            opt.step()
            steps += 1

    # ------------------------------------------------------------------ methods
    def _static(self, select: Callable[[], tuple[Tensor, int]]) -> tuple[Tensor, int]:
        idx, pre_steps = select()
        flat, self.last_tune_steps = self._tune_entries(idx, None, self.config["max_steps"])
        return flat, pre_steps + self.last_tune_steps

    def _select_random(self) -> tuple[Tensor, int]:
        if self._subset is None:
            self._subset = random_subset(self.n_params, self.n_candidates, self.config["seed"])
        return self._subset.to(self._device), 0

    def _select_grad(self) -> tuple[Tensor, int]:
        return top_abs(self._base_grad(), self.n_params), 0

    def _dense_step(self, flat: Tensor, logits: Tensor, opt: torch.optim.Optimizer | None, lr: float) -> None:
        """One step on the dense change ``flat`` (``dynamic``'s forward reads ``flat * mask``, so entries
        outside the mask get a zero gradient). With ``dense_optimizer="ngd"`` the step is the gradient scaled
        so that its largest entry moves by ``lr``: |change| then keeps the gradient's proportions (Adam moves
        every entry by about ``lr`` at first, which makes |change| after a few steps nearly uninformative)."""
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            self._loss(logits).backward()
            opt.step()
            return
        (g,) = torch.autograd.grad(self._loss(logits), flat)
        with torch.no_grad():
            lo, hi = torch.aminmax(g)  # max |g| in one pass, without a copy of g
            top = float(torch.maximum(-lo, hi))
            if top > 0:
                flat.sub_(g, alpha=lr / top)

    def _dense_opt(self, flat: Tensor, lr: float) -> torch.optim.Optimizer | None:
        return torch.optim.Adam([flat], lr=lr) if self.config["dense_optimizer"] == "adam" else None

    def _select_delta(self) -> tuple[Tensor, int]:
        lr = self.config["probe_lr"]
        flat = self._zeros().requires_grad_(True)
        opt = self._dense_opt(flat, lr)
        for _ in range(self.config["probe_steps"]):
            self._dense_step(flat, self._forward(flat), opt, lr)
        # the probe itself is discarded: only which entries it moved most is kept
        return top_abs(flat.detach(), self.n_params), self.config["probe_steps"]

    def _dynamic(self) -> tuple[Tensor, int]:
        cfg = self.config
        lr = cfg["dense_lr"]
        flat = self._zeros().requires_grad_(True)
        mask = torch.ones_like(flat, dtype=torch.bool)
        opt = self._dense_opt(flat, lr)
        steps = 0
        for count in self.shrink_schedule:
            for _ in range(cfg["shrink_every"]):  # fewer steps when the edit is right already
                logits = self._forward(flat * mask)
                if self._right(logits):
                    break
                self._dense_step(flat, logits, opt, lr)
                steps += 1
            # keep the largest |change|; the rest go back to their base values (and lose Adam's memory)
            mask = top_abs(flat.detach(), count, mask, as_mask=True)
            with torch.no_grad():
                flat.mul_(mask)
                for st in (opt.state.get(flat, {}) if opt is not None else {}).values():
                    if isinstance(st, Tensor) and st.shape == flat.shape:
                        st.mul_(mask)
        # the budget holds: tune the n kept entries (Adam) until right, with a cap of their own
        idx = mask.nonzero().squeeze(1)
        out, self.last_tune_steps = self._tune_entries(idx, flat.detach()[idx], cfg["max_steps"])
        return out, steps + self.last_tune_steps

    def _l1(self) -> tuple[Tensor, int]:
        cfg, n = self.config, self.n_params
        lam = cfg["l1_lambda"]
        if lam is None:  # relative to the gradient scale of this edit at the base weights
            lam = cfg["l1_scale"] * kth_abs(self._base_grad(), n)
        lr, (b1, b2), eps = cfg["lr"], (0.9, 0.999), 1e-8
        w = self._zeros()
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        steps = 0
        while True:
            wg = w.clone().requires_grad_(True)
            logits = self._forward(wg)
            if self._right(logits) or steps >= cfg["l1_steps"]:
                break
            (g,) = torch.autograd.grad(self._loss(logits), wg)
            steps += 1
            with torch.no_grad():
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                s = (v / (1 - b2 ** steps)).sqrt_().add_(eps)
                w.addcdiv_(m, s, value=-lr / (1 - b1 ** steps))
                # proximal step of lam * ||w||_1 in Adam's metric: soft threshold lr * lam / s per entry
                w = w.sign() * (w.abs() - lr * lam / s).clamp_min(0)
        self.last_l1_nonzero = int((w != 0).sum())
        idx = top_abs(w, n)
        flat, self.last_tune_steps = self._tune_entries(idx, w[idx], cfg["max_steps"])
        return flat, steps + self.last_tune_steps

    # ------------------------------------------------------------------ the edit
    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Weight changes (to add to the weights), at most ``n_params`` nonzero entries in all, that make
        ``model`` produce ``batch``'s labels (within the step caps)."""
        # detached base weights: no .grad is ever written on the model, only on the changes
        self._base = {k: v.detach() for k, v in model.named_parameters()}
        first = self._base[self.layers[0].name]
        self._shapes = {l.name: tuple(self._base[l.name].shape) for l in self.layers}
        # the change and Adam's state stay in float32 under an fp16/bf16 base: Adam's eps (1e-8) is 0 in
        # fp16, so a zero gradient gave 0/0 = NaN, and ngd's step scale overflowed fp16
        self._device, self._dtype = first.device, torch.promote_types(first.dtype, torch.float32)
        self._model, self._batch, self._family = model, batch, family
        self.last_l1_nonzero, self.last_tune_steps = None, 0
        try:
            with torch.enable_grad():
                with torch.no_grad():
                    already = self._right(self._forward(self._zeros()))
                if already:  # FT's rule: an edit the model already gets right changes nothing
                    flat, steps, self.last_right = self._zeros(), 0, True
                elif self.method == "dynamic":
                    flat, steps = self._dynamic()
                elif self.method == "l1":
                    flat, steps = self._l1()
                else:
                    flat, steps = self._static({"random": self._select_random, "grad": self._select_grad,
                                                "delta": self._select_delta}[self.method])
        finally:
            del self._base, self._model, self._batch
        nz = int((flat != 0).sum())
        if nz > self.n_params:  # cannot happen by construction; never return an edit over budget
            raise RuntimeError(f"surgery produced {nz} nonzero changes, over the budget {self.n_params}")
        out = {k: d.clone() for k, d in self._split(flat).items()}
        self.last_steps = steps
        self.last_changed = WeightDelta(out).params_changed(model)
        return out
