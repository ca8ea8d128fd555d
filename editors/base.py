"""The one interface every editor implements, and the only one evaluation sees.

An :class:`Editor` turns an edit batch (inputs labelled with their new targets) into an
:class:`Edit`. An edit is a value, not a side effect: the base model is never modified by
computing it. Evaluation then uses the edit in one of two ways:

- ``edit.apply(model)``: ``model`` seen with the edit, functionally (single and batch protocols);
- ``model = edit.merge_(model)``: the edit written permanently into a working copy (the
  sequential protocol). It may return a different module (an edit that adds neurons wraps layers).

``edit.params_changed(model)`` counts the scalar weights that differ from ``model``'s (changed
entries plus added ones), measured on the edit itself, never assumed from a budget.

Most editors (MEND, FT, the surgery selectors) compute additive weight changes: they subclass
:class:`DeltaEditor` and implement only :meth:`DeltaEditor.deltas`.

Configured editors (``eval.py --editors``) are specs ``{class_path: module.Class, init_args: {...}}``:
:func:`build_editor` imports the class and calls :meth:`Editor.for_evaluation` with the init args and
an :class:`EditorContext` (the base model and what else only the evaluation knows).
"""
from __future__ import annotations

import copy
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from datamodules.atomic import atomic_path
from datamodules.encoding import Family
from editors.layers import LayerSpec, select_layers


class Edit(ABC):
    """One computed edit, applicable to the model it was computed for."""

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` seen with the edit applied; ``model``'s tensors are not modified."""

    @abstractmethod
    def merge_(self, model: nn.Module) -> nn.Module:
        """Write the edit into ``model`` permanently; returns the module to use from now on."""

    @abstractmethod
    def params_changed(self, model: nn.Module) -> int:
        """Scalar weights of the edited model that differ from ``model``'s (changed + added)."""

    def merged(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` with the edit written in (``model`` untouched)."""
        return self.merge_(copy.deepcopy(model))


class EditedModel(nn.Module):
    """A base model seen through weight changes: ``forward`` runs it with ``W + dW`` functionally."""

    def __init__(self, model: nn.Module, deltas: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.model, self.deltas = model, dict(deltas)

    def edited_params(self) -> dict[str, Tensor]:
        params = dict(self.model.named_parameters())
        return {k: params[k] + d.to(params[k].dtype) for k, d in self.deltas.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.edited_params(), args=args, kwargs=kwargs, strict=False)

    def merged(self) -> nn.Module:
        """A deep copy of the base model with the edit written into its weights."""
        return merge_deltas_(copy.deepcopy(self.model), self.deltas)


@torch.no_grad()
def merge_deltas_(model: nn.Module, deltas: Mapping[str, Tensor]) -> nn.Module:
    """Write weight changes into ``model`` in place (a permanent edit); returns ``model``."""
    params = dict(model.named_parameters())
    for k, d in deltas.items():
        params[k].add_(d.to(params[k].dtype))
    return model


class WeightDelta(Edit):
    """An additive change to some of the model's weights, by parameter name."""

    def __init__(self, deltas: Mapping[str, Tensor]) -> None:
        self.deltas = {k: v.detach() for k, v in deltas.items()}

    def apply(self, model: nn.Module) -> EditedModel:
        return EditedModel(model, self.deltas)

    def with_deltas(self, deltas: Mapping[str, Tensor]) -> "WeightDelta":
        """The same kind of edit with other weight changes (a step rule rescales or sums them)."""
        return WeightDelta(deltas)

    def merge_(self, model: nn.Module) -> nn.Module:
        return merge_deltas_(model, self.deltas)

    @torch.no_grad()
    def params_changed(self, model: nn.Module) -> int:
        # entries whose value actually changes in the model's dtype (a delta below its resolution changes nothing)
        params = dict(model.named_parameters())
        return int(sum(int((params[k] + d.to(params[k].dtype) != params[k]).sum()) for k, d in self.deltas.items()))


@dataclass
class EditorContext:
    """What an editor built for an evaluation may need beyond its own settings.

    ``model``: the frozen base model. ``edit_params``: the config's edited-matrix patterns
    (``model.init_args.edit_params``; None: the default ones). ``seed``: the evaluation's seed.
    ``until_right_scales``: the config's stopping-rule grid (None: the default).
    ``training_inputs(n)``: up to ``n`` seeded training-split inputs, collated, never an evaluated
    input (None when the config has no training split)."""

    model: nn.Module
    edit_params: list[str] | None = None
    seed: int = 0
    until_right_scales: Sequence[float] | None = None
    training_inputs: Callable[[int], Mapping[str, Tensor]] | None = None

    def layers(self) -> list[LayerSpec]:
        """The base model's edited matrices under this config (:func:`editors.layers.select_layers`)."""
        return select_layers(self.model, self.edit_params)


class Editor(ABC):
    """Computes edits. ``uses_locality``: whether :meth:`make_edit` wants sampled locality inputs
    (never the ones locality is scored on), ``n_loc_inputs`` of them per step; ``config``: what the
    report records about the editor."""

    name: str = "editor"
    uses_locality: bool = False
    n_loc_inputs: int = 4
    config: dict[str, Any] = {}
    # why the last make_edit gave up and returned an edit that changes nothing (empty when it did not):
    # evaluation counts such edits (n_edits_rolled_back) beside the ones that stayed wrong
    last_failure: dict[str, Any] = {}

    @classmethod
    def for_evaluation(cls, context: EditorContext, **init_args: Any) -> "Editor":
        """The editor an evaluation runs, from its spec's ``init_args`` (plain settings from YAML or the
        command line) and ``context``. This default is ``cls(**init_args)``; an editor built on the
        model (its matrices, a trained file) overrides it and takes what it needs from ``context``."""
        return cls(**init_args)

    @abstractmethod
    def make_edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                  loc_batch: Mapping[str, Tensor] | None = None) -> Edit:
        """The edit that makes ``model`` produce ``batch``'s labels (``model`` is not modified)."""

    def save_working(self, path: str | Path, work: nn.Module, original: nn.Module) -> None:
        """Save a stream's working model (``original`` plus merged edits) so that :meth:`load_working`
        rebuilds it exactly: the parameters that differ from ``original``'s and its key memory
        (:mod:`editors.key_memory`), as safetensors. Editors whose edits add parameters override both methods."""
        from safetensors.torch import save_file

        from editors.key_memory import memory_tensors

        orig = dict(original.named_parameters())
        params = dict(work.named_parameters())
        if set(params) != set(orig):
            raise NotImplementedError(f"{type(self).__name__} edits add parameters: it must override save_working")
        changed = {k: p.detach().cpu().contiguous() for k, p in params.items() if not torch.equal(p, orig[k])}
        changed.update(memory_tensors(work))
        with atomic_path(path) as tmp:
            save_file(changed, str(tmp))

    def load_working(self, path: str | Path, original: nn.Module) -> nn.Module:
        """The working model saved by :meth:`save_working` (a copy; ``original`` untouched)."""
        from safetensors.torch import load_file

        from editors.key_memory import restore_memory_

        work = copy.deepcopy(original)
        params = dict(work.named_parameters())
        with torch.no_grad():
            for k, v in restore_memory_(work, load_file(str(path))).items():
                params[k].copy_(v)
        return work

    def edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
             loc_batch: Mapping[str, Tensor] | None = None) -> nn.Module:
        """Shorthand for inference: the edited model, applied functionally (editors enable grad where they need it)."""
        with torch.no_grad():
            return self.make_edit(model, batch, family, loc_batch).apply(model)


class DeltaEditor(Editor):
    """An editor whose edits are additive weight changes: implement :meth:`deltas`."""

    @abstractmethod
    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Weight changes (by parameter name, to add to the weights) for ``batch``."""

    def make_edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                  loc_batch: Mapping[str, Tensor] | None = None) -> WeightDelta:
        return WeightDelta(self.deltas(model, batch, family, loc_batch))


def editor_class(path: str) -> type[Editor]:
    """The :class:`Editor` subclass named ``module.Class`` (any importable module); ValueError otherwise."""
    module, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError as e:
        raise ValueError(f"cannot import editor class {path!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise ValueError(f"class_path {path!r} is not an importable editors.base.Editor subclass (module.Class)")
    return cls


def build_editor(spec: Mapping[str, Any], context: EditorContext) -> Editor:
    """The editor of a spec ``{class_path: module.Class, init_args: {...}}`` (an :class:`Editor` subclass
    from any importable module), built by its :meth:`Editor.for_evaluation`. Bad specs raise ValueError."""
    path = spec.get("class_path")
    cls = editor_class(path)
    unknown = set(spec) - {"class_path", "init_args", "label"}
    if unknown:
        raise ValueError(f"editor spec {path}: unknown keys {sorted(unknown)} (class_path, init_args, label)")
    try:
        return cls.for_evaluation(context, **(spec.get("init_args") or {}))
    except TypeError as e:  # an init arg the class does not take
        raise ValueError(f"{path}: {e}") from None
