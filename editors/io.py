"""Files editors are shared in, and how every output is written.

An editor file is a safetensors file: the editor's tensors plus one JSON header (class, format
version, config, base-model fingerprint and, from meta-training, the fingerprint of its data with the
ids of the locality inputs it saw) in the safetensors metadata. Loading reads tensors and
JSON only, so a file someone sent you cannot run code (a pickle can). It is written atomically
(:mod:`datamodules.atomic`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from torch import Tensor, nn

from datamodules.atomic import atomic_path
from editors.layers import check_fingerprint, fingerprint, select_layers

if TYPE_CHECKING:
    from editors.base import EditorContext

FORMAT = 2  # editor file format; 1 was a pickled dict (hypedit 0.1), refused on load
HEADER_KEY = "hypedit"
CHECKPOINT_KEY = "hypedit_editor"  # the entry of a meta-training checkpoint that holds the editor's export
DATA_KEY = "data"  # the header entry of the data an editor was meta-trained on (EditDataModule.data_record)

log = logging.getLogger(__name__)


class EditorFileError(ValueError):
    """A file that is not a loadable editor (wrong format, truncated, another class)."""


class LocalityOverlapError(EditorFileError):
    """An editor file evaluated on locality inputs its meta-training or validation used."""


def save_editor_file(path: str | Path, tensors: Mapping[str, Tensor], header: Mapping[str, Any]) -> Path:
    """Write an editor's tensors and JSON header as one safetensors file, atomically."""
    from safetensors.torch import save_file

    meta = {HEADER_KEY: json.dumps({**header, "format": FORMAT})}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def editor_file_class(path: str | Path) -> str | None:
    """The editor class an editor file holds (None when it is not a readable one)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get(HEADER_KEY, "{}")).get("class")
    except (SafetensorError, OSError, ValueError):
        return None


def load_editor_file(path: str | Path, expect_class: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An editor file's (tensors, header); refuses anything else with a message saying what it is."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"editor file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # a torch.save zip archive or a raw pickle
            raise EditorFileError(
                f"{path} is a pickle-based checkpoint (a hypedit 0.1 editor or a Lightning training checkpoint). "
                f"hypedit does not unpickle editor files, because unpickling can run code. If you trust its origin, "
                f"convert it once: python -m editors.convert {path} {path.with_suffix('.safetensors')}") from None
        raise EditorFileError(f"{path} is not a readable editor file (truncated or not safetensors): {e}") from None
    if HEADER_KEY not in meta:
        raise EditorFileError(f"{path} is a safetensors file without a hypedit header: not an editor file")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise EditorFileError(f"{path} has a damaged hypedit header: {e}") from None
    if header.get("format") != FORMAT:
        raise EditorFileError(f"{path} has editor file format {header.get('format')}; this hypedit reads {FORMAT}")
    if header.get("class") != expect_class:
        raise EditorFileError(f"{path} holds a {header.get('class')} editor, not {expect_class}")
    return tensors, header


def save_blob(path: str | Path, blob: Mapping[str, Any]) -> Path:
    """Write an editor's plain-data export (class, config, fingerprint, state_dict) as an editor file."""
    return save_editor_file(path, blob["state_dict"], {k: v for k, v in blob.items() if k != "state_dict"})


class FileEditor:
    """Editor files for a trainable editor (an ``nn.Module`` built from its ``config``, editing
    ``layers``): its export as plain data, and files that refuse a base model other than its own."""

    config: dict[str, Any]
    layers: list

    def export(self, model: nn.Module, base_fingerprint: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The editor as plain data (class, config, fingerprint, tensors): what an editor file holds and
        what meta-training checkpoints carry under :data:`CHECKPOINT_KEY` (``base_fingerprint``:
        ``model``'s, when already computed)."""
        fp = dict(base_fingerprint) if base_fingerprint is not None else fingerprint(model, self.layers)
        return {"class": type(self).__name__, "config": self.config, "fingerprint": fp,
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def for_model(cls, model: nn.Module, edit_params: list[str] | None = None, **kw: Any):
        """An untrained editor for ``model``'s default (or given) edited matrices."""
        return cls(select_layers(model, edit_params), **kw)

    @classmethod
    def for_evaluation(cls, context: "EditorContext", path: str):
        """The trained editor in file ``path`` (refused unless trained for ``context.model``)."""
        return cls.load(path, context.model)

    def save(self, path: str | Path, model: nn.Module) -> Path:
        """Write the editor file (safetensors + JSON header, atomically)."""
        return save_blob(path, self.export(model))

    @classmethod
    def from_blob(cls, blob: Mapping[str, Any], model: nn.Module, source: str, check: bool = True):
        """An editor from :meth:`export`'s data; refuses a base model other than the one it was trained for."""
        editor = cls(**blob["config"])
        if check:
            check_fingerprint(blob["fingerprint"], model, editor.layers, source)
        editor.load_state_dict(blob["state_dict"])
        return editor.to(next(model.parameters()).device).eval()

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, check: bool = True):
        """Load an editor file written by :meth:`save` (tensors and JSON only); verify the base model."""
        tensors, header = load_editor_file(path, cls.__name__)
        editor = cls.from_blob({**header, "state_dict": tensors}, model, f"editor file {path}", check)
        # for check_pool_overlap: None in files written before data were recorded
        editor.source_file, editor.data_record = str(path), header.get(DATA_KEY)
        return editor


def check_pool_overlap(editors: Iterable[Any], split: str, pool_ids: Iterable[str]) -> None:
    """Refuse to score ``split``'s locality pool (the ids of its inputs,
    :meth:`datamodules.edit_data.EditDataModule.loc_ids`) with an editor loaded from a file whose
    meta-training or validation locality pool held one of them (another ``loc_path`` or ``loc_shares``
    than at meta-training): its locality figures would not be held out. An editor wrapping one
    (``mend_until_right``) is checked through it; a file from before data were recorded is evaluated
    with a warning."""
    ids = set(pool_ids)
    for editor in editors:
        for part in editor.modules() if isinstance(editor, nn.Module) else [editor]:
            if not hasattr(part, "data_record"):
                continue  # not loaded from a file
            if part.data_record is None:
                log.warning("%s records no meta-training data: cannot check that its %s locality inputs are held out",
                            part.source_file, split)
                continue
            for seen_split, seen in part.data_record["loc_ids"].items():
                both = ids.intersection(seen) if seen_split != split else set()
                if both:
                    raise LocalityOverlapError(
                        f"{len(both)} of the {len(ids)} {split} locality inputs were in the {seen_split} locality pool "
                        f"{part.source_file} was meta-trained with (another loc_path or loc_shares?): its figures would not "
                        "be held out")
