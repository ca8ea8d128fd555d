"""FT's stopping rule for a one-step editor: the smallest scale of its weight change that makes the edit right.

FT (:mod:`editors.ft`) stops as soon as every edit in the batch is an exact match, so it changes
the model no more than the edit input needs. MEND takes one step whose size was meta-trained for
the paraphrases too, and a larger step moves unrelated inputs more (docs/experiments.md: at full size
the default editor breaks 10% of the questions that share the edit's old answer). ``UntilRight``
gives a one-step editor FT's rule: it computes the change once, tries it at ``scales`` in
increasing order, and keeps the first scaled change under which every edit in the batch is right
(the largest scale if none is). Like FT it looks only at the edit inputs and their targets, never
at paraphrases or locality inputs; each scale tried costs one forward pass of the edit inputs.
Plain torch: no Lightning here.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.losses import forward_logits, scores
from editors.base import DeltaEditor, EditedModel, EditorContext, build_editor

DEFAULT_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


class UntilRight(nn.Module, DeltaEditor):
    """A one-step editor (anything with ``layers`` and ``deltas(model, batch, family)``) under FT's
    stopping rule. A module, so moving it to a device moves a wrapped MEND too."""

    def __init__(self, editor: Any, scales: Sequence[float] = DEFAULT_SCALES, name: str = "mend_until_right") -> None:
        super().__init__()
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive and non-empty, got {list(scales)}")
        self.editor, self.scales, self.name = editor, sorted(float(s) for s in scales), name
        self.layers = editor.layers
        self.config = {"class": "UntilRight", "name": name, "scales": self.scales,
                       "editor": getattr(editor, "config", type(editor).__name__)}
        self.last_scale: float | None = None  # the scale the last edit kept

    @classmethod
    def for_evaluation(cls, context: EditorContext, editor: Mapping[str, Any] | None = None,
                       scales: Sequence[float] | None = None, name: str | None = None) -> "UntilRight":
        """``editor`` (a spec, default a MEND spec without its file) under the rule; ``scales`` default
        to the config's grid (``context.until_right_scales``), else :data:`DEFAULT_SCALES`."""
        inner = build_editor(editor or {"class_path": "editors.mend.MEND"}, context)
        if scales is None:
            scales = context.until_right_scales or DEFAULT_SCALES
        return cls(inner, scales, name or f"{inner.name}_until_right")

    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The wrapped editor's weight changes, scaled by the smallest scale that makes ``batch`` right."""
        full = self.editor.deltas(model, batch, family)
        for s in self.scales:
            scaled = {k: s * d for k, d in full.items()}
            with torch.no_grad():
                right, _ = scores(forward_logits(EditedModel(model, scaled), batch, family), batch["labels"], family)
            if bool(right.all()):
                break
        self.last_scale = s
        return scaled
