"""Key memory: what a stream's working model remembers about the edits written into it.

A least-squares editor (:mod:`editors.malmen`) fits each change to the keys ``u`` (layer inputs) of its
own edit's tokens only. In a stream, the change for edit t is free to move the layer's outputs at the
keys of edits 1..t-1, and that is how a stream forgets. With a key memory the working model carries,
per edited layer, ``M_l = sum u u^T`` over every token of every edit merged into it so far, and the
next solve adds ``mu * M_l`` to its normal equations: the new change is also asked to leave the outputs
at those keys where they are, each remembered token weighing ``mu`` times one of the new edit's
tokens. It is recursive least squares with the earlier edits' targets held fixed, at the cost of a
``d_in x d_in`` matrix per layer, whatever the stream's length.

The memory belongs to the working model, not to the editor: an edit that remembers
(:class:`RememberedDelta`) adds its keys' moment when it is merged, a fresh copy of the base model has
none (each stream of a multi-fold evaluation starts empty), and a saved stream state carries it
(:func:`memory_tensors`, :func:`restore_memory_`). Plain torch: no Lightning here.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from editors.base import WeightDelta

ATTR = "hypedit_key_memory"  # the working model's attribute: {layer (parameter) name: M [d_in, d_in] float64}
PREFIX = "key_memory/"  # the memory's tensor names in a saved stream state (no parameter name starts so)


def key_memory(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s key memory (empty: no remembered edit)."""
    return getattr(model, ATTR, {})


@torch.no_grad()
def remember_(model: nn.Module, moments: Mapping[str, Tensor]) -> None:
    """Add the per-layer key moments ``sum u u^T`` of a merged edit to ``model``'s memory (float64)."""
    memory = model.__dict__.setdefault(ATTR, {})
    for name, m in moments.items():
        m = m.detach().double()
        memory[name] = memory[name] + m if name in memory else m.clone()


class RememberedDelta(WeightDelta):
    """An additive change that, when merged into a working model, also records its edit's key moments
    there (:func:`remember_`). Applied functionally it is a plain :class:`WeightDelta`."""

    def __init__(self, deltas: Mapping[str, Tensor], moments: Mapping[str, Tensor]) -> None:
        super().__init__(deltas)
        self.moments = {k: v.detach() for k, v in moments.items()}

    def with_deltas(self, deltas: Mapping[str, Tensor]) -> "RememberedDelta":
        return RememberedDelta(deltas, self.moments)

    def merge_(self, model: nn.Module) -> nn.Module:
        super().merge_(model)
        remember_(model, self.moments)
        return model


def memory_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s memory as named tensors for a safetensors file (none without memory)."""
    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in key_memory(model).items()}


def restore_memory_(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Set ``model``'s memory from the :func:`memory_tensors` among ``tensors``; returns the others."""
    dev = next(model.parameters()).device
    memory = {k[len(PREFIX):]: v.to(dev) for k, v in tensors.items() if k.startswith(PREFIX)}
    if memory:
        model.__dict__[ATTR] = memory
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
