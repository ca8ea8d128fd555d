"""A lifelong hypernetwork editor: MEND's networks meta-trained over streams of edits (RLEdit,
Li et al., ICML 2025).

A MEND editor (:mod:`editors.mend`) is meta-trained to edit the *base* model. In a stream every edit
lands on a model that earlier edits already changed: its gradient pieces drift away from the ones the
networks were trained on, the updates stop fitting, and they overwrite earlier edits. This editor has
the same networks and the same edit (a descent step ``-alpha_l * sum_t delta~_t u~_t^T`` computed from
the *current* model's gradient), but it is meta-trained by
:class:`lightning_modules.rledit_module.RLEditModule` over whole streams: each step's change is computed
on the model the earlier steps left, and the objective also rewards keeping the earlier edits and
keeping the accumulated change small (docs/methods.md).

Its files are its own (class ``RLEdit``): an RLEdit file is not loaded as a MEND editor, nor the reverse.
Plain torch: no Lightning here. Typical use, a stream::

    editor = RLEdit.load("runs/rledit/editor.safetensors", model)   # refuses a different base model
    for batch in edits:                                             # each step edits the current model
        model = editor.make_edit(model, batch, family="causal").merge_(model)

Meta-training can leave a layer's step size negative: that layer then takes a gradient *ascent* step
on every edit. Over a short stream the other layers make up for it; over a long one the ascent feeds
itself (a larger loss, a larger gradient, a larger step) until the model breaks. ``descent_only``, an
evaluation option on by default (the file is unchanged), stops editing those layers.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from editors.base import EditorContext
from editors.layers import LayerSpec
from editors.mend import MEND


class RLEdit(MEND):
    """:class:`editors.mend.MEND`'s networks and step sizes, trained for streams (see the module docstring)."""

    def __init__(self, layers: Sequence[LayerSpec | Mapping[str, Any]], rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-4, precondition_ridge: float | None = None) -> None:
        super().__init__(layers, rank, n_hidden, init_edit_lr, precondition_ridge)
        self.name = "rledit"

    @classmethod
    def for_evaluation(cls, context: EditorContext, path: str, descent_only: bool = True) -> "RLEdit":
        """The trained editor in file ``path``; with ``descent_only`` (default, chosen on validation
        streams) its negative step sizes are set to 0 (those layers are left unedited: see the module
        docstring); ``descent_only=False`` evaluates the file as trained."""
        editor = cls.load(path, context.model)
        if descent_only:
            editor.descent_only_()
        return editor

    @torch.no_grad()
    def descent_only_(self) -> None:
        """Set the negative step sizes to 0 (in place): no layer takes an ascent step."""
        self.edit_lrs.clamp_(min=0)

    def step_deltas(self, pieces: Mapping[str, tuple[Tensor, Tensor]], n_problems: int,
                    memory: None = None) -> dict[str, Tensor]:
        """The dense change ``[n_problems, *weight.shape]`` of one stream step from its :meth:`pieces`,
        with the statistics as they are (a stream step is computed twice in meta-training, and both
        passes must see the same normalisation). ``memory``: MEND's change keeps none (see :meth:`remember`)."""
        return self.to_deltas(self.factors(pieces, n_problems, update=False))

    def remember(self, pieces: Mapping[str, tuple[Tensor, Tensor]], n_problems: int, memory: None) -> None:
        """What a stream keeps of its steps for the next one's change: nothing (MALMEN keeps its keys)."""
        return None
