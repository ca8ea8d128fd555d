"""Readers for the edit-data files researchers already have.

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


def _open_error(path: Path, e: OSError) -> DataFormatError:
    return DataFormatError(f"{path}: cannot read ({e.strerror or e})")


def _iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; an empty file is an error."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _open_error(path, e) from None
    seen = False
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            seen = True
            yield lineno, obj
    if not seen:
        raise DataFormatError(f"{path}: empty file (no records)")


def _read_text(path: Path) -> str:
    """A whole file as UTF-8, with the line of the first undecodable byte named."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _open_error(path, e) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{path}:{line}: not valid UTF-8") from None


def _str_list(obj: dict, key: str, path: Path, where: int | str) -> list[str]:
    val = _need(obj, key, list, path, where)
    if not all(isinstance(v, str) for v in val):
        raise DataFormatError(f"{path}:{where}: field '{key}' should be a list of strings")
    return val


def _optional_str(obj: dict, key: str, path: Path, where: int | str) -> str | None:
    val = obj.get(key)
    if val is not None and not isinstance(val, str):
        raise DataFormatError(f"{path}:{where}: field '{key}' should be a string, got {type(val).__name__}")
    return val


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
        reph = _str_list(obj, "filtered_rephrases", path, ln)
        subject = _optional_str(obj, "subject", path, ln)
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
        recs.append(EditRecord(prompt, alts[0], reph, gold, pred, subject, {"alternatives": alts}))
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
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataFormatError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, list) or not data:
        raise DataFormatError(f"{path}: expected a non-empty JSON list of records")
    recs, locs, skipped = [], [], {"without alternatives": 0, "without rephrases": 0}
    for i, obj in enumerate(data):
        where = f"record {i}"
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:{where}: expected a JSON object")
        src = _need(obj, "src", str, path, where)
        alt = _need(obj, "alt", str, path, where)
        reph = _need(obj, "rephrase", str, path, where)
        pred = _optional_str(obj, "pred", path, where) or ""
        answers = obj.get("answers") or [pred]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(f"{path}:{where}: field 'answers' should be a list of strings")
        subject = _optional_str(obj, "subject", path, where)
        loc = _optional_str(obj, "loc", path, where)
        if loc:
            q = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
            locs.append(LocalityPair(q, _optional_str(obj, "loc_ans", path, where)))
        if not alt or alt == pred:
            skipped["without alternatives"] += 1
            continue
        if not reph:
            skipped["without rephrases"] += 1
            continue
        recs.append(EditRecord(src, alt, [reph], answers[0], pred, subject,
                               {"portability": obj.get("portability")}))
    _log_skipped(path, len(recs), skipped)
    return recs, locs


def read_fever_jsonl(path: str | Path) -> list[EditRecord]:
    """FEVER as released with KnowledgeEditor/MEND (``fever-*-kilt.jsonl``): the target is the flipped label."""
    return _read_released_jsonl(path, FEVER_LABELS)


def read_nq(path: str | Path) -> list[LocalityPair]:
    """Natural-Questions locality pairs: JSON (or JSON lines) objects ``{"questions": [...], "answers": [...]}``."""
    path = Path(path)
    text = _read_text(path)
    try:  # one JSON document with the two parallel lists
        objs = [(1, json.loads(text))]
    except (json.JSONDecodeError, RecursionError):
        objs = list(_iter_json_lines(path))
    if not isinstance(objs[0][1], dict):
        raise DataFormatError(f"{path}:1: expected a JSON object with 'questions' and 'answers'")
    pairs = []
    for ln, obj in objs:
        qs = _need(obj, "questions", list, path, ln)
        ans = _need(obj, "answers", list, path, ln)
        if len(qs) != len(ans):
            raise DataFormatError(f"{path}:{ln}: 'questions' and 'answers' have different lengths ({len(qs)} vs {len(ans)})")
        for q, a in zip(qs, ans):
            a = a[0] if isinstance(a, list) and a else a  # NQ lists several acceptable answers: keep the first
            if not isinstance(q, str) or not isinstance(a, str):
                raise DataFormatError(f"{path}:{ln}: 'questions' should hold strings and 'answers' strings "
                                      "(or lists of strings)")
            pairs.append(LocalityPair(q, a))
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
