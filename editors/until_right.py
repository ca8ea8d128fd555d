"""Step-length rules for a one-step editor: the editor proposes a weight change, the rule picks its length.

MEND takes one step whose size was meta-trained for the paraphrases too, and a larger step moves
unrelated inputs more (docs/experiments.md: at full size the default editor breaks 10% of the
questions that share the edit's old answer). Two rules rescale the proposed change per edit, looking
only at the edit inputs and their targets, never at paraphrases or locality inputs:

- ``UntilRight``: FT's stopping rule. FT (:mod:`editors.ft`) stops as soon as every edit in the
  batch is an exact match; this tries the change at ``scales`` in increasing order and keeps the
  first under which every edit is right (the largest if none is). Each scale tried costs one
  forward pass of the edit inputs.
- ``PolyakStep``: Polyak's step size for a target loss of 0 (Polyak 1987). The change ``D`` is scaled
  so that, to first order, it removes the fraction ``fraction`` of the edit loss ``L``:
  ``s = fraction * L / -<D, G>`` with ``G`` the loss's gradient at the unedited weights. An edit the
  model nearly has gets a short step, one it is far from a long one, whatever length the editor
  proposed. It costs one forward+backward of the edit inputs.

Plain torch: no Lightning here.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.losses import forward_logits, nll, scores
from editors.base import DeltaEditor, EditedModel, Editor, EditorContext, WeightDelta, build_editor, merge_deltas_

DEFAULT_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def polyak_scale(loss: Tensor, slope: Tensor, fraction: float, max_scale: float) -> Tensor:
    """:class:`PolyakStep`'s scale (elementwise, e.g. per problem) from the edit loss ``L`` and the slope
    ``<D, G>`` of the proposed change along the loss's gradient: ``min(fraction * L / -slope, max_scale)``,
    and 1 where the change does not descend (``slope >= 0``)."""
    scale = (fraction * loss / -slope.clamp(max=-1e-30)).clamp(max=max_scale)
    return torch.where(slope < 0, scale, torch.ones_like(scale))


class _StepRule(nn.Module, DeltaEditor):
    """A one-step editor (anything with ``layers`` and ``deltas(model, batch, family)``) whose change is
    rescaled per edit by :meth:`scale`. A module, so moving it to a device moves a wrapped MEND too."""

    def __init__(self, editor: Any, name: str, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.editor, self.name, self.layers = editor, name, editor.layers
        self.config = {"class": type(self).__name__, "name": name, **config,
                       "editor": getattr(editor, "config", type(editor).__name__)}
        self.last_scale: float | None = None  # the scale the last edit kept

    @staticmethod
    def _inner(context: EditorContext, editor: Mapping[str, Any] | None) -> Any:
        """``editor`` (a spec; default a MEND spec without its file) built for ``context``."""
        return build_editor(editor or {"class_path": "editors.mend.MEND"}, context)

    def scale(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family, full: Mapping[str, Tensor]) -> float:
        raise NotImplementedError

    def make_edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                  loc_batch: Mapping[str, Tensor] | None = None) -> WeightDelta:
        """The wrapped editor's edit (of its own kind: a MALMEN edit keeps its key memory), its weight
        changes scaled by the rule's scale for ``batch``."""
        inner = self.editor
        edit = (inner.make_edit(model, batch, family) if isinstance(inner, Editor)
                else WeightDelta(inner.deltas(model, batch, family)))
        self.last_scale = self.scale(model, batch, family, edit.deltas)
        return edit.with_deltas({k: self.last_scale * d for k, d in edit.deltas.items()})

    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return self.make_edit(model, batch, family).deltas


class UntilRight(_StepRule):
    """The smallest of ``scales`` under which every edit of the batch is right (FT's stopping rule)."""

    def __init__(self, editor: Any, scales: Sequence[float] = DEFAULT_SCALES, name: str = "mend_until_right") -> None:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive and non-empty, got {list(scales)}")
        self.scales = sorted(float(s) for s in scales)
        super().__init__(editor, name, {"scales": self.scales})

    @classmethod
    def for_evaluation(cls, context: EditorContext, editor: Mapping[str, Any] | None = None,
                       scales: Sequence[float] | None = None, name: str | None = None) -> "UntilRight":
        """``editor`` under the rule; ``scales`` default to the config's grid (``context.until_right_scales``),
        else :data:`DEFAULT_SCALES`."""
        inner = cls._inner(context, editor)
        if scales is None:
            scales = context.until_right_scales or DEFAULT_SCALES
        return cls(inner, scales, name or f"{inner.name}_until_right")

    @torch.no_grad()
    def scale(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family, full: Mapping[str, Tensor]) -> float:
        for s in self.scales:
            edited = EditedModel(model, {k: s * d for k, d in full.items()})
            right, _ = scores(forward_logits(edited, batch, family), batch["labels"], family)
            if bool(right.all()):
                break
        return s


class PolyakStep(_StepRule):
    """Polyak's step length: the change removes, to first order, ``fraction`` of the edit loss (the sum over
    the batch's edits of each one's NLL), scaled by at most ``max_scale`` (a far-off edit, or a model
    that earlier edits of a stream have worn, asks for a long step that first order cannot predict). A
    change that is not a descent direction to first order (``<D, G> >= 0``) is kept as proposed (scale 1).

    ``max_steps`` > 1: while some edit of the batch is still wrong, the editor proposes another change on
    the model as the steps so far left it, scaled by the same rule, up to ``max_steps`` changes in all;
    the edit is their sum. The steps are written into ``model``'s edited weights meanwhile and the
    weights restored bit for bit before returning. Each extra step costs the editor's step plus a
    forward+backward and a forward of the edit inputs."""

    def __init__(self, editor: Any, fraction: float = 2.0, max_scale: float = 1.0, name: str = "mend_polyak",
                 max_steps: int = 1) -> None:
        if fraction <= 0 or max_scale <= 0 or max_steps < 1:
            raise ValueError(f"fraction and max_scale must be positive and max_steps at least 1, got {fraction}, "
                             f"{max_scale} and {max_steps}")
        self.fraction, self.max_scale, self.max_steps = float(fraction), float(max_scale), int(max_steps)
        super().__init__(editor, name, {"fraction": self.fraction, "max_scale": self.max_scale,
                                        **({"max_steps": self.max_steps} if max_steps > 1 else {})})
        self.last_steps = 0  # the changes the last edit summed

    @classmethod
    def for_evaluation(cls, context: EditorContext, editor: Mapping[str, Any] | None = None, fraction: float = 2.0,
                       max_scale: float = 1.0, name: str | None = None, max_steps: int = 1) -> "PolyakStep":
        inner = cls._inner(context, editor)
        return cls(inner, fraction, max_scale, name or f"{inner.name}_polyak", max_steps)

    def make_edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                  loc_batch: Mapping[str, Tensor] | None = None) -> WeightDelta:
        first = super().make_edit(model, batch, family)
        self.last_steps = 1
        if self.max_steps == 1:
            return first
        total = dict(first.deltas)
        params = dict(model.named_parameters())
        kept = {k: params[k].detach().clone() for k in total}
        try:
            step = first
            while self.last_steps < self.max_steps:
                merge_deltas_(model, step.deltas)
                with torch.no_grad():
                    right, _ = scores(forward_logits(model, batch, family), batch["labels"], family)
                if bool(right.all()):
                    break
                step = super().make_edit(model, batch, family)
                total = {k: total[k] + d for k, d in step.deltas.items()}
                self.last_steps += 1
        finally:
            with torch.no_grad():
                for k, w in kept.items():
                    params[k].copy_(w)
        return first.with_deltas(total)

    def scale(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family, full: Mapping[str, Tensor]) -> float:
        params = dict(model.named_parameters())
        w = {k: params[k].detach().requires_grad_(True) for k in full}  # the edited weights only
        with torch.enable_grad():
            loss = nll(forward_logits(model, batch, family, w), batch["labels"], family) * batch["input_ids"].shape[0]
            grads = torch.autograd.grad(loss, list(w.values()))
        slope = sum((full[k].double() * g.double()).sum() for k, g in zip(w, grads))
        return float(polyak_scale(loss.detach().double(), slope, self.fraction, self.max_scale))
