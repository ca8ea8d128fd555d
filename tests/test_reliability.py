"""Nothing is lost: outputs appear complete or not at all."""
from __future__ import annotations

import pytest

from datamodules.atomic import atomic_path, write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and oct(path.stat().st_mode & 0o777) != oct(0o600)


# ------------------------------------------------------------------ bad input, fuzzed
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datamodules.formats import (DataFormatError, read_fever_jsonl, read_fever_locality, read_nq,  # noqa: E402
                                 read_zsre_jsonl, read_zsre_toolkit)

ZSRE = {"input": "Where was Ada born?", "prediction": "Paris", "alternatives": ["Lyon", "Nice"],
        "filtered_rephrases": ["What is Ada's birthplace?"], "output": [{"answer": "Paris"}], "subject": "Ada"}
FEVER = {"input": "Ada was born in Paris.", "prediction": "SUPPORTS", "alternatives": ["REFUTES"],
         "filtered_rephrases": ["Paris is where Ada was born."], "output": [{"answer": "SUPPORTS"}]}
TOOLKIT = {"subject": "Ada", "src": "Where was Ada born?", "pred": "Paris", "rephrase": "Ada's birthplace?",
           "alt": "Lyon", "answers": ["Paris"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
NQ = {"questions": ["who wrote hamlet", "capital of france"], "answers": [["Shakespeare"], "Paris"]}
FEVER_LOC = {"input": "Bob works for Acme.", "output": [{"answer": "REFUTES"}]}
# reader -> (file name, how a list of valid records is laid out in a file)
READERS = {
    "zsre_jsonl": (read_zsre_jsonl, "zsre.jsonl", lambda rows: "\n".join(json.dumps(r) for r in rows), ZSRE),
    "fever_jsonl": (read_fever_jsonl, "fever.jsonl", lambda rows: "\n".join(json.dumps(r) for r in rows), FEVER),
    "toolkit_json": (read_zsre_toolkit, "zsre.json", lambda rows: json.dumps(rows, indent=1), TOOLKIT),
    "nq": (read_nq, "nq.jsonl", lambda rows: "\n".join(json.dumps(r) for r in rows), NQ),
    "fever_locality": (read_fever_locality, "fever-loc.jsonl", lambda rows: "\n".join(json.dumps(r) for r in rows),
                       FEVER_LOC),
}
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5),
                       st.just(float("nan")), st.just("NOT ENOUGH INFO"), st.lists(st.integers(), max_size=2),
                       st.just({"answer": 3}), st.just([{"answer": None}]), st.just([]), st.just("x" * 100_000))


@st.composite
def corrupted(draw, name: str) -> bytes:
    """A valid file of reader ``name`` with one or more random corruptions."""
    _, _, layout, good = READERS[name]
    rows = [dict(good) for _ in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(1, 3))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        kind = draw(st.sampled_from(["drop", "retype", "retype_item", "add"]))
        key = draw(st.sampled_from(sorted(row))) if row else "input"
        if kind == "drop":
            row.pop(key, None)
        elif kind == "retype":
            row[key] = draw(ODD_VALUES)
        elif kind == "retype_item" and isinstance(row.get(key), list) and row[key]:
            row[key] = [draw(ODD_VALUES)] + row[key][1:]
        else:
            row[draw(st.text(max_size=4))] = draw(ODD_VALUES)
    data = layout(rows).encode("utf-8", "surrogatepass")
    byte_kind = draw(st.sampled_from(["none", "truncate", "invalid_utf8", "empty", "garbage_line", "not_object"]))
    if byte_kind == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif byte_kind == "invalid_utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe" + data[at:]
    elif byte_kind == "empty":
        data = draw(st.sampled_from([b"", b"\n\n", b"   "]))
    elif byte_kind == "garbage_line":
        data += b"\n" + draw(st.binary(max_size=20))
    elif byte_kind == "not_object":
        data += b"\n" + draw(st.sampled_from([b"[1, 2]", b"3", b"null", b'"text"', b"[" * 5000]))
    return data


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_reader_refuses_corrupted_files_with_a_data_format_error(name, tmp_path_factory):
    """Random corruptions of valid files (wrong types, missing fields, NaN, unknown labels, empty files,
    huge values, invalid UTF-8, truncation, non-object lines): each read either succeeds (the damage
    was in an ignored field, or the record was skipped and counted) or raises DataFormatError naming
    the file, never another exception."""
    reader, fname, layout, good = READERS[name]
    tmp = tmp_path_factory.mktemp(name)
    path = tmp / fname
    path.write_bytes(layout([good]).encode())
    assert reader(path), "the uncorrupted file reads"
    outcomes = {"read": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(corrupted(name))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            reader(path)
            outcomes["read"] += 1
        except DataFormatError as e:
            assert str(path) in str(e), f"the error names the file: {e}"
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] > 0
    print(f"{name}: {sum(outcomes.values())} corrupted files, {outcomes['refused']} refused, {outcomes['read']} read")


def test_progress_lines_go_to_logs_but_not_to_terminals():
    import io
    from types import SimpleNamespace

    import torch

    from lightning_modules.callbacks import ProgressLog

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    trainer = SimpleNamespace(global_step=7, max_steps=100, current_epoch=1, is_global_zero=True,
                              callback_metrics={"train/loss": torch.tensor(0.25), "val/loss": torch.tensor(1.0)})
    for stream, printed in ((io.StringIO(), True), (Terminal(), False)):
        cb = ProgressLog(every_seconds=0, stream=stream)
        cb.on_train_start(trainer, None)
        cb.on_train_batch_end(trainer)
        assert ("step 7/100 epoch 1" in stream.getvalue() and "train/loss 0.25" in stream.getvalue()) is printed
        assert "val/loss" not in stream.getvalue()
