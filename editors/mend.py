"""MEND: Model Editor Networks with gradient Decomposition (Mitchell et al., ICLR 2022).

For each edited layer the gradient of the edit loss is ``sum_t delta_t u_t^T``. MEND maps every
token's ``(u, delta)`` through a small network ``g`` to ``(u~, delta~)`` and edits the layer with a
*descent* step ``W - alpha_l * sum_t delta~_t u~_t^T`` (so an untrained, identity ``g`` is one plain
gradient step with step size ``alpha_l``; the reference code adds instead and must first learn to
flip the sign).

``g``, its running input normalisation and the optional input preconditioner (``precondition_ridge``,
not in the published method) are :mod:`editors.hypernet`'s, shared with MALMEN (:mod:`editors.malmen`).

Plain torch: no Lightning here. Typical use::

    editor = MEND.load("runs/default/editor.safetensors", model)       # refuses a different base model
    edit = editor.make_edit(model, batch, family="causal")      # an editors.base.Edit; model is untouched
    logits = edit.apply(model)(**inputs).logits                  # functional
    permanent = edit.merged(model)                               # a copy with the edit written in
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.base import DeltaEditor
from editors.hypernet import PieceNetworks
from editors.io import FileEditor
from editors.layers import LayerSpec, weight_update


class MEND(FileEditor, PieceNetworks, nn.Module, DeltaEditor):
    """The editor (a :class:`editors.base.DeltaEditor`): :class:`editors.hypernet.PieceNetworks` (one network
    and normalisation per distinct (d_in, d_out)) and one learned step size per edited layer."""

    def __init__(self, layers: Sequence[LayerSpec | Mapping[str, Any]], rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-4, precondition_ridge: float | None = None) -> None:
        super().__init__()
        self.name = "mend"
        self.layers = [l if isinstance(l, LayerSpec) else LayerSpec(**l) for l in layers]
        self.config = {"layers": [asdict(l) for l in self.layers], "rank": rank, "n_hidden": n_hidden,
                       "init_edit_lr": init_edit_lr, "precondition_ridge": precondition_ridge}
        self._build_networks(rank, n_hidden, precondition_ridge)
        self.edit_lrs = nn.Parameter(torch.full((len(self.layers),), float(init_edit_lr)))

    # -- the edit
    def transform(self, pieces: Mapping[str, tuple[Tensor, Tensor]], n_problems: int = 1) -> dict[str, Tensor]:
        """Per-layer pseudo-gradients ``sum_t delta~_t u~_t^T`` (stored weight layout, before the step
        size), shape ``[n_problems, *weight.shape]``: the tokens are split into ``n_problems`` equal,
        consecutive groups, each an independent edit problem (one meta-training example)."""
        t = self._transformed(pieces, n_problems)
        return {l.name: weight_update(l, *t[l.name]) for l in self.layers}

    def batched_factors(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                        n_problems: int = 1) -> dict[str, tuple[Tensor, Tensor]]:
        """:meth:`batched_deltas` in low-rank form: per layer ``(u [P, n, d_in], d [P, n, d_out])`` (the
        step size folded into ``d``) with problem ``b``'s weight change ``weight_update(layer, u[b], d[b])``.
        :func:`editors.layers.low_rank_edit` applies them without materialising ``d_in x d_out`` per problem."""
        rows = batch["input_ids"].shape[0]
        if rows % n_problems:
            raise ValueError(f"{rows} edit rows cannot be split into {n_problems} equal problems")
        return self.factors(self.pieces(model, batch, family), n_problems)

    def factors(self, pieces: Mapping[str, tuple[Tensor, Tensor]], n_problems: int = 1,
                update: bool | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """:meth:`batched_factors` from already computed :meth:`pieces` (``update``: see ``_transformed``)."""
        t = self._transformed(pieces, n_problems, update)
        return {l.name: (t[l.name][0], -self.edit_lrs[i] * t[l.name][1]) for i, l in enumerate(self.layers)}

    def to_deltas(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Dense weight changes ``[P, *weight.shape]`` from :meth:`batched_factors`."""
        return {l.name: weight_update(l, *factors[l.name]) for l in self.layers}

    def batched_deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                       n_problems: int = 1) -> dict[str, Tensor]:
        """Weight changes (to add) for ``n_problems`` independent edit problems whose edits are the
        consecutive, equal-sized row groups of ``batch``; each value is ``[n_problems, *weight.shape]``.
        The edits within one problem are applied together (their per-token pieces are summed)."""
        return self.to_deltas(self.batched_factors(model, batch, family, n_problems))

    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The weight changes (to add to the weights) that edit ``model`` towards ``batch``'s labels,
        all edits of the batch at once (MEND reads no locality inputs: ``loc_batch`` is ignored)."""
        return {k: v[0] for k, v in self.batched_deltas(model, batch, family, 1).items()}
