"""Readers for the edit-data files researchers already have (REFERENCE.md section 5).

Every reader returns plain :class:`EditRecord` / :class:`LocalityPair` lists. A malformed line or
a record missing a required field raises :class:`DataFormatError` naming the file, the line and
the field; records that are valid but unusable (no alternative, no rephrase) are skipped and
counted in one log line, as the reference data pipelines do.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

FEVER_LABELS = ("REFUTES", "SUPPORTS")  # index = class id: SUPPORTS is the positive logit


class DataFormatError(ValueError):
    """A data file that does not follow its declared format."""


@dataclass
class EditRecord:
    """One edit: make the model answer ``target`` on ``prompt``, and on its ``rephrases`` too."""

    prompt: str
    target: str
    rephrases: list[str]
    gold: str
    prediction: str
    subject: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalityPair:
    """An unrelated input whose behaviour an edit must not change (``answer`` may be unknown)."""

    prompt: str
    answer: str | None = None


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _need(obj: dict, key: str, typ: type | tuple, path: Path, where: int | str) -> Any:
    if key not in obj:
        raise DataFormatError(f"{path}:{where}: missing required field '{key}'")
    val = obj[key]
    if not isinstance(val, typ):
        raise DataFormatError(f"{path}:{where}: field '{key}' should be {getattr(typ, '__name__', typ)}, got {type(val).__name__}")
    return val


def _one_of(val: str, key: str, labels: tuple[str, ...], path: Path, where: int) -> str:
    if val not in labels:
        raise DataFormatError(f"{path}:{where}: field '{key}' should be one of {labels}, got {val!r}")
    return val


def _gold(obj: dict, path: Path, where: int) -> str:
    out = _need(obj, "output", list, path, where)
    if not out or not isinstance(out[0], dict) or not isinstance(out[0].get("answer"), str):
        raise DataFormatError(f"{path}:{where}: field 'output' should be a list of {{\"answer\": str}}")
    return out[0]["answer"]


def _log_skipped(path: Path, kept: int, skipped: dict[str, int]) -> None:
    if any(skipped.values()):
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        log.info("%s: kept %d records, skipped %s", path, kept, why)


def _read_released_jsonl(path: str | Path, labels: tuple[str, ...] | None = None) -> list[EditRecord]:
    """The KnowledgeEditor/MEND JSON-lines schema that zsRE and FEVER share: ``input``,
    ``prediction``, ``alternatives``, ``filtered_rephrases``, ``output``. The edit target is the first
    alternative that differs from the prediction; ``labels``, when given, are the only valid answers."""
    path = Path(path)
    recs, skipped = [], {"without alternatives": 0, "without rephrases": 0}
    for ln, obj in _iter_json_lines(path):
        prompt = _need(obj, "input", str, path, ln)
        pred = _need(obj, "prediction", str, path, ln)
        alts = _need(obj, "alternatives", list, path, ln)
        reph = _need(obj, "filtered_rephrases", list, path, ln)
        gold = _gold(obj, path, ln)
        if labels is not None:
            _one_of(pred, "prediction", labels, path, ln)
            _one_of(gold, "output", labels, path, ln)
        alts = [a for a in alts if isinstance(a, str) and a and a != pred and (labels is None or a in labels)]
        if not alts:
            skipped["without alternatives"] += 1
            continue
        if not reph:
            skipped["without rephrases"] += 1
            continue
        recs.append(EditRecord(prompt, alts[0], [str(r) for r in reph], gold, pred, obj.get("subject"),
                               {"alternatives": alts}))
    _log_skipped(path, len(recs), skipped)
    return recs


def read_zsre_jsonl(path: str | Path) -> list[EditRecord]:
    """zsRE as released with KnowledgeEditor/MEND (``structured_zeroshot-*.jsonl``): the target is the
    base model's runner-up answer, the equivalent inputs are the filtered rephrases."""
    return _read_released_jsonl(path)


def read_zsre_toolkit(path: str | Path) -> tuple[list[EditRecord], list[LocalityPair]]:
    """zsRE in the large-scale toolkit format: one JSON list of ``{subject, src, pred, rephrase, alt, loc, loc_ans}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records")
    recs, locs, skipped = [], [], {"without alternatives": 0, "without rephrases": 0}
    for i, obj in enumerate(data):
        where = f"record {i}"
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{where}: expected a JSON object")
        src = _need(obj, "src", str, path, where)
        alt = _need(obj, "alt", str, path, where)
        reph = _need(obj, "rephrase", str, path, where)
        pred = obj.get("pred", "")
        answers = obj.get("answers") or [pred]
        loc = obj.get("loc")
        if loc:
            q = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
            locs.append(LocalityPair(q, obj.get("loc_ans")))
        if not alt or alt == pred:
            skipped["without alternatives"] += 1
            continue
        if not reph:
            skipped["without rephrases"] += 1
            continue
        recs.append(EditRecord(src, alt, [reph], str(answers[0]), str(pred), obj.get("subject"),
                               {"portability": obj.get("portability")}))
    _log_skipped(path, len(recs), skipped)
    return recs, locs


def read_fever_jsonl(path: str | Path) -> list[EditRecord]:
    """FEVER as released with KnowledgeEditor/MEND (``fever-*-kilt.jsonl``): the target is the flipped label."""
    return _read_released_jsonl(path, FEVER_LABELS)


def read_nq(path: str | Path) -> list[LocalityPair]:
    """Natural-Questions locality pairs: JSON (or JSON lines) objects ``{"questions": [...], "answers": [...]}``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:  # one JSON document with the two parallel lists
        objs = [(1, json.loads(text))]
    except json.JSONDecodeError:
        objs = list(_iter_json_lines(path))
    pairs = []
    for ln, obj in objs:
        qs = _need(obj, "questions", list, path, ln)
        ans = _need(obj, "answers", list, path, ln)
        if len(qs) != len(ans):
            raise DataFormatError(f"{path}:{ln}: 'questions' and 'answers' have different lengths ({len(qs)} vs {len(ans)})")
        for q, a in zip(qs, ans):
            a = a[0] if isinstance(a, list) and a else a
            pairs.append(LocalityPair(str(q), str(a)))
    return pairs


def read_fever_locality(path: str | Path) -> list[LocalityPair]:
    """Claims used as unrelated inputs for a FEVER editor, labelled with their gold verdict."""
    path = Path(path)
    return [LocalityPair(_need(o, "input", str, path, ln), _one_of(_gold(o, path, ln), "output", FEVER_LABELS, path, ln))
            for ln, o in _iter_json_lines(path)]


def detect_task(path: str | Path) -> str:
    """Guess which task a data file holds ("zsre" or "fever") from its first record."""
    path = Path(path)
    if path.suffix == ".json":
        return "zsre"
    for ln, obj in _iter_json_lines(path):
        out = obj.get("output")  # locality claims carry only their gold verdict, edit rows a prediction too
        gold = out[0].get("answer") if isinstance(out, list) and out and isinstance(out[0], dict) else None
        return "fever" if obj.get("prediction", gold) in FEVER_LABELS else "zsre"
    raise DataFormatError(f"{path}: empty file")
