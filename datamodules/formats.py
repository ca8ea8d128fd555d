"""Readers for the edit-data files researchers already have.

Every reader returns plain :class:`EditRecord` / :class:`LocalityPair` lists. A malformed line or
a record missing a required field raises :class:`DataFormatError` naming the file, the line and
the field; records that are valid but unusable (no alternative, no rephrase the model answers
alike) are skipped and counted in one log line, as the reference data pipelines do, and in the
``skipped`` dict a caller passes (the DataModules report the counts).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datamodules.atomic import write_text

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
    """An unrelated input whose behaviour an edit must not change (``answer`` may be unknown;
    ``subject`` where the file names one: related inputs then share a locality pool)."""

    prompt: str
    answer: str | None = None
    subject: str | None = None


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


def _log_skipped(path: Path, kept: int, skipped: dict[str, int], into: dict[str, int] | None) -> None:
    if into is not None:
        for k, n in skipped.items():
            into[k] = into.get(k, 0) + n
    if any(skipped.values()):
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        log.info("%s: kept %d records, skipped %s", path, kept, why)


def _read_released_jsonl(path: str | Path, labels: tuple[str, ...] | None = None,
                         into: dict[str, int] | None = None) -> list[EditRecord]:
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
    _log_skipped(path, len(recs), skipped, into)
    return recs


def read_zsre_jsonl(path: str | Path, skipped: dict[str, int] | None = None) -> list[EditRecord]:
    """zsRE as released with KnowledgeEditor/MEND (``structured_zeroshot-*.jsonl``): the target is the
    base model's runner-up answer, the equivalent inputs are the filtered rephrases (the released
    file has no ``subject``; one given is read). ``skipped`` receives the counts of skipped rows."""
    return _read_released_jsonl(path, None, skipped)


def _iter_json_list(path: Path) -> Iterator[tuple[str, dict]]:
    """``("record i", object)`` for every record of a file holding one non-empty JSON list of objects."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataFormatError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, list) or not data:
        raise DataFormatError(f"{path}: expected a non-empty JSON list of records")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataFormatError(f"{path}:record {i}: expected a JSON object")
        yield f"record {i}", obj


def _toolkit_answers(obj: dict, path: Path, where: str) -> list[str]:
    """A toolkit record's gold answers: ``answers``, else its ``pred``."""
    answers = obj.get("answers") or [_optional_str(obj, "pred", path, where) or ""]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataFormatError(f"{path}:{where}: field 'answers' should be a list of strings")
    return answers


def read_zsre_toolkit(path: str | Path, skipped: dict[str, int] | None = None
                      ) -> tuple[list[EditRecord], list[LocalityPair]]:
    """zsRE in the large-scale toolkit format: one JSON list of ``{subject, src, pred, rephrase, alt, loc, loc_ans}``
    (``loc`` is an NQ question unrelated to ``subject``: it carries no subject of its own)."""
    path = Path(path)
    recs, locs, skipped_here = [], [], {"without alternatives": 0, "without rephrases": 0}
    for where, obj in _iter_json_list(path):
        src = _need(obj, "src", str, path, where)
        alt = _need(obj, "alt", str, path, where)
        reph = _need(obj, "rephrase", str, path, where)
        pred = _optional_str(obj, "pred", path, where) or ""
        answers = _toolkit_answers(obj, path, where)
        subject = _optional_str(obj, "subject", path, where)
        loc = _optional_str(obj, "loc", path, where)
        if loc:
            q = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
            locs.append(LocalityPair(q, _optional_str(obj, "loc_ans", path, where)))
        if not alt or alt == pred:
            skipped_here["without alternatives"] += 1
            continue
        if not reph:
            skipped_here["without rephrases"] += 1
            continue
        recs.append(EditRecord(src, alt, [reph], answers[0], pred, subject,
                               {"portability": obj.get("portability")}))
    _log_skipped(path, len(recs), skipped_here, skipped)
    return recs, locs


def read_fever_jsonl(path: str | Path, skipped: dict[str, int] | None = None) -> list[EditRecord]:
    """FEVER as released with KnowledgeEditor/MEND (``fever-*-kilt.jsonl``): the target is the flipped label.
    ``skipped`` receives the counts of skipped rows."""
    return _read_released_jsonl(path, FEVER_LABELS, skipped)


def read_nq(path: str | Path) -> list[LocalityPair]:
    """Natural-Questions locality pairs: JSON (or JSON lines) objects ``{"questions": [...], "answers": [...]}``,
    with an optional ``"subject"`` that all the object's questions are about (the built-in world names it)."""
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
        subject = _optional_str(obj, "subject", path, ln)
        for q, a in zip(qs, ans):
            a = a[0] if isinstance(a, list) and a else a  # NQ lists several acceptable answers: keep the first
            if not isinstance(q, str) or not isinstance(a, str):
                raise DataFormatError(f"{path}:{ln}: 'questions' should hold strings and 'answers' strings "
                                      "(or lists of strings)")
            pairs.append(LocalityPair(q, a, subject))
    return pairs


def read_fever_locality(path: str | Path) -> list[LocalityPair]:
    """Claims used as unrelated inputs for a FEVER editor, labelled with their gold verdict (and their
    ``subject`` where given)."""
    path = Path(path)
    return [LocalityPair(_need(o, "input", str, path, ln), _one_of(_gold(o, path, ln), "output", FEVER_LABELS, path, ln),
                         _optional_str(o, "subject", path, ln))
            for ln, o in _iter_json_lines(path)]


@dataclass
class SourceRow:
    """A row of a zsRE/FEVER file as its author wrote it, before a model annotated it: what base
    training and annotation read (``alternatives`` may be empty), and the row itself to write back."""

    prompt: str
    rephrases: list[str]
    gold: str
    alternatives: list[str]
    relation: str | None
    raw: dict
    toolkit: bool  # from the toolkit's JSON list (one rephrase and one target per record)

    def annotated(self, prediction: str, alternatives: list[str], rephrases: list[str]) -> dict:
        """The row in its own format, with a model's answer, its runner-ups and the rephrases it answers alike."""
        if self.toolkit:  # an emptied rephrase or target makes the reader skip the record, as it skips released rows
            return {**self.raw, "pred": prediction, "alt": (alternatives or [""])[0], "rephrase": (rephrases or [""])[0]}
        return {**self.raw, "prediction": prediction, "alternatives": alternatives, "filtered_rephrases": rephrases}


def read_source_rows(path: str | Path, labels: tuple[str, ...] | None = None) -> list[SourceRow]:
    """Every row of a zsRE/FEVER file in either released format (``.json``: the toolkit's list, else
    KnowledgeEditor/MEND JSON lines), needing only the input and its gold answer (``output``; toolkit:
    ``answers``, else ``pred``). Rephrases (``filtered_rephrases`` / ``rephrase``), alternatives and
    ``relation`` are read when present; ``labels``, when given, are the only valid gold answers."""
    path = Path(path)
    rows = []
    if path.suffix == ".json":
        for where, obj in _iter_json_list(path):
            answers = _toolkit_answers(obj, path, where)
            if not answers[0]:
                raise DataFormatError(f"{path}:{where}: field 'answers' (or 'pred') should give the gold answer")
            reph, alt = _optional_str(obj, "rephrase", path, where), _optional_str(obj, "alt", path, where)
            rows.append(SourceRow(_need(obj, "src", str, path, where), [reph] if reph else [], answers[0],
                                  [alt] if alt else [], _optional_str(obj, "relation", path, where), obj, True))
        return rows
    for ln, obj in _iter_json_lines(path):
        gold = _gold(obj, path, ln)
        if labels is not None:
            _one_of(gold, "output", labels, path, ln)
        reph = _str_list(obj, "filtered_rephrases", path, ln) if "filtered_rephrases" in obj else []
        alts = _need(obj, "alternatives", list, path, ln) if "alternatives" in obj else []
        rows.append(SourceRow(_need(obj, "input", str, path, ln), reph, gold, [a for a in alts if isinstance(a, str) and a],
                              _optional_str(obj, "relation", path, ln), obj, False))
    return rows


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write rows atomically in the format the file name says: ``.json`` one JSON list, else JSON lines."""
    path = Path(path)
    text = json.dumps(rows, indent=1) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    return write_text(path, text)


def _is_nq(path: Path) -> bool:
    """Whether a file holds NQ locality pairs (``questions``/``answers``) rather than edit rows."""
    try:  # one JSON document (or a one-line file)
        first = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError):
        if path.suffix == ".json":
            return False  # a damaged toolkit list: its reader names the fault
        first = next(_iter_json_lines(path))[1]
    return isinstance(first, dict) and "questions" in first


def read_training_pairs(path: str | Path, labels: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """What a base model learns from a file: ``(input, gold answer)`` for every wording of every row of a
    zsRE/FEVER file (:func:`read_source_rows`; FEVER locality claims too), or every pair of an NQ file."""
    path = Path(path)
    if _is_nq(path):
        if labels is not None:
            raise DataFormatError(f"{path}: NQ question/answer pairs cannot train a classifier of {labels}")
        return [(p.prompt, p.answer) for p in read_nq(path)]
    return [(t, r.gold) for r in read_source_rows(path, labels) for t in (r.prompt, *r.rephrases)]


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
