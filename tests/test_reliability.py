"""Nothing is lost: outputs appear complete or not at all."""
from __future__ import annotations

import pytest

from datamodules.atomic import atomic_dir, atomic_path, write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "report.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_a_directory_appears_whole_or_not_at_all_and_never_replaces_one(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed before the weights")
    assert list(tmp_path.iterdir()) == [], "no half directory, no temporary"
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights").write_text("w")
    model = tmp_path / "model"
    assert (model / "sub" / "weights").read_text() == "w" and model.stat().st_mode & 0o777 != 0o700
    with pytest.raises(FileExistsError, match="not replaced"):
        with atomic_dir(model) as tmp:
            (tmp / "config.json").write_text("new")
    assert (model / "config.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["model"]


# ------------------------------------------------------------------ bad input, fuzzed
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datamodules.formats import (FEVER_LABELS, DataFormatError, read_fever_jsonl, read_fever_locality,  # noqa: E402
                                 read_nq, read_training_pairs, read_zsre_jsonl, read_zsre_toolkit)

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
# base training on the user's own files reads every kind (the classifier's with its labels)
READERS.update({f"training_pairs_{k}": (read_training_pairs, *READERS[k][1:]) for k in ("zsre_jsonl", "toolkit_json", "nq")})
READERS["training_pairs_fever"] = (lambda path: read_training_pairs(path, FEVER_LABELS), *READERS["fever_jsonl"][1:])
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


# ------------------------------------------------------------------ unusable output directories
import errno  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import yaml  # noqa: E402

from datamodules.atomic import OutputNotWritable, check_writable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _fails(code: int):
    def f(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return f


def test_an_unwritable_output_directory_is_refused_naming_it(tmp_path, monkeypatch):
    """Read-only (a real chmod where it binds, i.e. not as root), full (the probe's data write or its
    fsync fails with ENOSPC), a read-only file system, a file where the directory should be: each is
    an OutputNotWritable naming the directory and the reason, and no probe file is left behind."""
    assert check_writable(tmp_path / "new" / "dir").is_dir(), "a missing directory is created"
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputNotWritable, match=f"{ro}: Permission denied"):
            check_writable(ro)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputNotWritable, match=f"{tmp_path / 'file' / 'run'}: Not a directory"):
        check_writable(tmp_path / "file" / "run")
    full = tmp_path / "full"
    for name, code in (("write", errno.ENOSPC), ("fsync", errno.ENOSPC), ("fsync", errno.EIO)):
        with monkeypatch.context() as m:
            m.setattr(os, name, _fails(code))
            with pytest.raises(OutputNotWritable, match=f"output directory {full}: {os.strerror(code)}"):
                check_writable(full)
        assert list(full.iterdir()) == [], "the probe is removed"
    monkeypatch.setattr("datamodules.atomic.tempfile.mkstemp", _fails(errno.EROFS))
    with pytest.raises(OutputNotWritable, match=f"{full}: Read-only file system"):
        check_writable(full)


@pytest.fixture(scope="module")
def tiny_base(small_world, tokenizer, tmp_path_factory) -> Path:
    """A randomly initialised tiny GPT-2 saved with the small world's tokenizer: enough for the MEND
    config to build its module and data and take a step (nothing here needs a trained base)."""
    import torch

    from lightning_modules.models import build_tiny

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_base")
    build_tiny("tiny-gpt2", tokenizer, {"n_layer": 2, "n_embd": 32, "n_head": 2}).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _mend_config(tiny_base: Path, world: Path, out: Path) -> dict:
    """configs/mend_zsre_gpt2_tiny.yaml reading the small world and writing under ``out``: one step,
    no validation, no logger."""
    cfg = yaml.safe_load(open(ROOT / "configs" / "mend_zsre_gpt2_tiny.yaml"))
    cfg["model"]["init_args"].update(base_model=str(tiny_base), output_dir=str(out))
    cfg["data"]["init_args"].update(train_path=str(world / "zsre-train.jsonl"), val_path=str(world / "zsre-val.jsonl"),
                                    test_path=str(world / "zsre-test.jsonl"), loc_path=str(world / "nq-loc.jsonl"),
                                    tokenizer=str(tiny_base))
    cfg["trainer"].update(max_steps=1, limit_val_batches=0, default_root_dir=str(out), logger=False,
                          enable_progress_bar=False)
    for cb in cfg["trainer"]["callbacks"]:
        if "dirpath" in cb.get("init_args", {}):
            cb["init_args"]["dirpath"] = str(out / "ck")
    return cfg


@pytest.mark.parametrize("which", ["output_dir", "default_root_dir", "checkpoint dirpath", "logger save_dir"])
def test_train_py_refuses_an_unwritable_output_directory_before_training(tiny_base, small_world, tmp_path,
                                                                         monkeypatch, which):
    """Each place a job writes (the export, Lightning's root, a checkpoint callback's directory, a
    logger's) is probed before training: a read-only one (simulated: the tests may run as root) stops
    the job with the directory's name, and nothing trains."""
    import lightning as L

    import train

    ro = tmp_path / "ro"
    cfg = _mend_config(tiny_base, small_world, tmp_path / "out")
    if which == "output_dir":
        cfg["model"]["init_args"]["output_dir"] = str(ro)
    elif which == "default_root_dir":
        cfg["trainer"]["default_root_dir"] = str(ro)
    elif which == "checkpoint dirpath":
        cfg["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(ro)
    else:
        cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(ro)}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    mkstemp = tempfile.mkstemp

    def read_only_below_ro(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr("datamodules.atomic.tempfile.mkstemp", read_only_below_ro)
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(OutputNotWritable, match=f"cannot write to output directory {ro}: Read-only file system"):
        train.main(["--config", str(tmp_path / "cfg.yaml")])


# ------------------------------------------------------------------ bad configs through train.py
# `python SCRIPT ARGS` for each line of ARGS (JSON lists) on stdin: one Python process imports the
# project once and forks a fresh copy per run, which runs SCRIPT as its main script and ends as the
# interpreter would (an uncaught exception prints its traceback and exits 1), so a run costs what its
# failure costs, not the ~10 s of imports. Prints each run's exit status.
FORK_RUNNER = """
import importlib, json, os, runpy, sys, traceback
import train
importlib.import_module("eval")
script = sys.argv[2]
for i, line in enumerate(sys.stdin):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{sys.argv[1]}/{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [script, *json.loads(line)]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # a status, or a message printed on stderr and status 1
            code = e.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _run_script(script: str, runs: list[list[str]], out: Path, timeout: float = 300) -> list[tuple[int, str]]:
    """(exit status, stderr) of ``python SCRIPT ARGS`` for each ARGS, through FORK_RUNNER."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", FORK_RUNNER, str(out), script], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        codes, _ = proc.communicate("".join(json.dumps(a) + "\n" for a in runs), timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a run that outlived the timeout, or was left behind
        except ProcessLookupError:
            pass
        proc.wait()
    return [(int(c), (out / f"{i}.err").read_text()) for i, c in enumerate(codes.split())]


def _set(cfg: dict, key: str, value) -> dict:
    """A copy of ``cfg`` with the dotted ``key`` (list items by index) set to ``value``."""
    cfg = json.loads(json.dumps(cfg))
    *parents, last = key.split(".")
    node = cfg
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[last] = value
    return cfg


def _base_config(world: Path, out: Path) -> dict:
    """configs/base_zsre_gpt2_tiny.yaml generating a 30-subject world in ``world`` and writing under
    ``out``: a one-layer model, one step, no validation, no logger."""
    cfg = yaml.safe_load(open(ROOT / "configs" / "base_zsre_gpt2_tiny.yaml"))
    cfg["world_dir"] = str(world)
    cfg["world"]["n_subjects"] = 30
    cfg["model"]["init_args"].update(tokenizer=str(world / "tokenizer"), output_dir=str(out),
                                     tiny_config={"n_layer": 1, "n_embd": 16, "n_head": 2})
    cfg["data"]["init_args"].update(world_dir=str(world), tokenizer=str(world / "tokenizer"))
    cfg["trainer"].update(max_steps=1, limit_val_batches=0, default_root_dir=str(out), logger=False,
                          enable_progress_bar=False, callbacks=[])
    return cfg


# (dotted key, corrupted value, what the error message must name); "{tmp}" is the test's directory
MEND_CORRUPTIONS = [
    ("modle", 3, "modle"),  # unknown keys
    ("model.init_args.rnak", 3, "rnak"),
    ("trainer.callbacks.0.init_args.monitr", "val/loss", "monitr"),
    ("model.init_args.rank", "many", "many"),  # wrong types and values
    ("trainer.max_steps", "ten", "ten"),
    ("data.init_args.hard_loc_by", "colour", "colour"),
    ("trainer.precision", "17", "17"),
    ("trainer.devices", "lots", "devices"),
    ("trainer.max_steps", -5, "max_steps"),
    ("model.init_args.rank", 0, "rank"),
    ("model.init_args.lr", -1.0, "lr"),
    ("data.init_args.batch_size", -1, "batch_size"),
    ("model.init_args.edit_params", ["nothing"], "nothing"),
    ("model.class_path", "lightning_modules.mend_module.NoSuchModule", "NoSuchModule"),  # bad class paths
    ("data.class_path", "datamodules.edit_data.NoSuchData", "NoSuchData"),
    ("trainer.callbacks.0.class_path", "lightning.pytorch.callbacks.NoSuchCallback", "NoSuchCallback"),
    ("model.init_args.base_model", "{tmp}/no-model", "no-model"),  # missing, unreadable or unwritable files
    ("data.init_args.train_path", "{tmp}/missing.jsonl", "missing.jsonl"),
    ("data.init_args.loc_path", "{tmp}/missing-loc.jsonl", "missing-loc.jsonl"),
    ("data.init_args.train_path", "{tmp}/not-json.jsonl", "not-json.jsonl:1: not valid JSON"),
    ("data.init_args.train_path", "{tmp}/long-target.jsonl", "long-target.jsonl: target"),
    ("model.init_args.output_dir", "{tmp}/a-file/out", "a-file/out: Not a directory"),
]
BASE_CORRUPTIONS = [
    ("world.seeed", 1, "seeed"),
    ("world.split_fractions", [0.5], "split_fractions"),
    ("world.n_subjects", -3, "n_subjects -3"),
    ("world.n_subjects", 2, "n_subjects 2"),
    ("model.init_args.tiny_config", "big", "big"),
    ("model.init_args.model_name_or_path", "tiny-nothing", "tiny-nothing"),
    ("trainer.max_epochs", "x", "x"),
    ("model.init_args.lr", -1.0, "lr"),
    ("data.init_args.batch_size", 0, "batch_size"),
    ("data.init_args.world_dir", "{tmp}/no-world", "no-world"),
]


def test_train_py_refuses_corrupted_configs_with_one_error_line(tiny_base, small_world, tmp_path):
    """Corruptions of the two default configs (unknown keys, wrong types, out-of-range values, bad
    class paths, missing or unreadable files, an unwritable output directory, a target too long for
    max_length), and config files missing or not YAML, run through `python train.py --config`: each
    exits non-zero with an error naming what is wrong (one line, or jsonargparse's usage and its
    message), never a Python traceback; the uncorrupted configs run."""
    (tmp_path / "not-json.jsonl").write_text("{not json\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "not-yaml.yaml").write_text("model: [unclosed\n")
    rows = [json.loads(line) for line in open(small_world / "zsre-train.jsonl")]
    rows[0]["alternatives"] = [" ".join(["Velorian"] * 70)]
    (tmp_path / "long-target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = {"mend": (_mend_config(tiny_base, small_world, tmp_path / "out"), MEND_CORRUPTIONS),
               "base": (_base_config(tmp_path / "world", tmp_path / "base"), BASE_CORRUPTIONS)}
    cases = []  # (what, train.py arguments, what the error must name; None: the run must succeed)
    for name, (cfg, corruptions) in configs.items():
        for key, value, expected in [(None, None, None), *corruptions]:  # the uncorrupted config first
            if key is not None:
                cfg = _set(configs[name][0], key, value.format(tmp=tmp_path) if isinstance(value, str) else value)
            path = tmp_path / f"{len(cases)}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            cases.append((f"{name} config, {key} = {value!r}", ["--config", str(path)], expected))
    cases += [("missing config file", ["--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
              ("config file not YAML", ["--config", str(tmp_path / "not-yaml.yaml")], "line 1, column 8")]
    _check_refusals("train.py", cases, tmp_path / "runs")


def _check_refusals(script: str, cases: list[tuple[str, list[str], str | None]], out: Path) -> None:
    """Run each case's arguments through ``script``: those expecting None must succeed; the others
    exit non-zero without a traceback, with an error (one line of ours, or jsonargparse's usage and
    message) naming what each case expects."""
    results = _run_script(script, [args for _, args, _ in cases], out)
    assert len(results) == len(cases)
    for (case, _, expected), (code, err) in zip(cases, results):
        if expected is None:
            assert code == 0, f"{case}: {err[-3000:]}"
            continue
        lines = err.strip().splitlines()
        assert code != 0 and "Traceback" not in err, f"{case}: {err[-3000:]}"
        start = next(i for i, l in enumerate(lines) if l.startswith(("error:", f"{script}: error:")))
        assert expected in "\n".join(lines[start:]), f"{case}: {err[-3000:]}"
        if lines[start].startswith(f"{script}: error:"):
            assert start == len(lines) - 1, f"{case}: one line, nothing after it: {err[-3000:]}"


# (extra eval.py arguments, what the error must name); "{tmp}" is the test's directory
EVAL_CORRUPTIONS = [
    (["--data.init_args.tset_path", "x"], "tset_path"),  # unknown keys and options
    (["--modle", "single"], "modle"),
    (["--mode", "everything"], "everything"),  # wrong values
    (["--editor", "rome"], "rome"),
    (["--n_edits", "0"], "n_edits"),
    (["--loc_per_edit", "many"], "many"),
    (["--editor", "surgery_grad@lots"], "lots"),
    (["--data.class_path", "datamodules.edit_data.NoSuchData"], "NoSuchData"),
    (["--model.init_args.base_model", "{tmp}/no-model"], "no-model"),  # missing or unusable files
    (["--data.init_args.test_path", "{tmp}/missing.jsonl"], "missing.jsonl"),
    (["--data.init_args.test_path", "{tmp}/not-json.jsonl"], "not-json.jsonl:1"),
    (["--data.init_args.loc_path", "{tmp}/missing-loc.jsonl"], "missing-loc.jsonl"),
    (["--data.init_args.test_path", "{tmp}/long-target.jsonl"], "long-target.jsonl"),
    (["--editor", "mend"], "needs --editor_path"),
    (["--editor", "mend", "--editor_path", "{tmp}/missing.safetensors"], "missing.safetensors"),
    (["--editor", "mend", "--editor_path", "{tmp}/not-json.jsonl"], "not-json.jsonl"),
    (["--editor", "selector"], "needs --editor_path"),
    (["--report", "{tmp}/a-file/report.json"], "cannot write to output directory {tmp}/a-file"),
    (["--split", "val", "--data.init_args.val_path", None], "no val split"),
]


def test_eval_py_refuses_bad_configs_and_options_with_one_error_line(tiny_base, small_world, tmp_path):
    """The same for eval.py: corrupted keys, values, class paths and files in the config or on the
    command line end in one error line naming the problem; the uncorrupted command runs."""
    (tmp_path / "not-json.jsonl").write_text("{not json\n")
    (tmp_path / "a-file").write_text("")
    rows = [json.loads(line) for line in open(small_world / "zsre-test.jsonl")]
    rows[0]["alternatives"] = [" ".join(["Velorian"] * 70)]
    (tmp_path / "long-target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_mend_config(tiny_base, small_world, tmp_path / "out")))
    ok = ["--config", str(tmp_path / "cfg.yaml"), "--editor", "ft", "--n_edits", "1", "--loc_per_edit", "2",
          "--editors", "[{class_path: ft, init_args: {max_steps: 1}, label: ft1}]", "--no_progress"]
    cases = [("uncorrupted", ok, None)]
    for extra, expected in EVAL_CORRUPTIONS:
        extra = [("null" if a is None else a.format(tmp=tmp_path)) for a in extra]
        cases.append((" ".join(extra), [*ok, *extra], expected.format(tmp=tmp_path)))
    _check_refusals("eval.py", cases, tmp_path / "runs")


# ------------------------------------------------------------------ inputs the models cannot hold
def test_a_target_too_long_for_max_length_is_refused_never_cut(tokenizer, small_world, tmp_path):
    """A target is kept whole (a causal sequence keeps at least one prompt token) or refused, naming
    it, its length and max_length; a DataModule names the file it came from: the edit files, the
    alternatives that redraw turns into targets, the locality file."""
    from datamodules.edit_data import ZsreDataModule
    from datamodules.encoding import TargetTooLong, encode

    target, prompt = " ".join(["Velorian"] * 9), "Where was Ada born ?"  # 9 tokens, 10 with end-of-sequence
    (c,) = encode(tokenizer, "causal", [prompt], [target], max_length=11)
    assert len(c["input_ids"]) == 11 and sum(l != -100 for l in c["labels"]) == 10
    (s,) = encode(tokenizer, "seq2seq", [prompt], [target], max_length=10)
    assert len(s["labels"]) == 10
    for family, max_length in (("causal", 10), ("seq2seq", 9)):
        with pytest.raises(TargetTooLong, match=f"target '{target}' is 10 tokens .*max_length {max_length}"):
            encode(tokenizer, family, [prompt], [target], max_length=max_length)

    rows = [json.loads(line) for line in open(small_world / "zsre-train.jsonl")]
    tok, loc = str(small_world / "tokenizer"), str(small_world / "nq-loc.jsonl")
    rows[0]["alternatives"] = [target]
    long_target = tmp_path / "long-target.jsonl"
    long_target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError, match=f"{long_target}: target '{target}' is 10 tokens"):
        ZsreDataModule(train_path=str(long_target), loc_path=loc, tokenizer=tok, max_length=10).setup("fit")
    rows[0]["alternatives"] = ["Velorian", target]  # the edit's own target fits; a redrawn one would not
    long_alt = tmp_path / "long-alternative.jsonl"
    long_alt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ZsreDataModule(train_path=str(long_alt), loc_path=loc, tokenizer=tok, max_length=10).setup("fit")
    with pytest.raises(DataFormatError, match=f"{long_alt}: target '{target}'"):
        ZsreDataModule(train_path=str(long_alt), loc_path=loc, tokenizer=tok, max_length=10, redraw=True).setup("fit")
    long_loc = tmp_path / "nq-long.jsonl"
    long_loc.write_text(json.dumps({"questions": ["who wrote hamlet"], "answers": [target]}) + "\n")
    with pytest.raises(DataFormatError, match=f"{long_loc}: target '{target}'"):
        ZsreDataModule(train_path=str(small_world / "zsre-train.jsonl"), loc_path=str(long_loc), tokenizer=tok,
                       max_length=10).setup("fit")


def test_fever_locality_claims_labelled_not_enough_info_are_refused(tmp_path):
    """A FEVER locality claim needs a verdict the binary classifier can be held to: the third FEVER
    label, NOT ENOUGH INFO, is refused naming the file and line (not read as REFUTES, not dropped)."""
    path = tmp_path / "fever-loc.jsonl"
    path.write_text(json.dumps(FEVER_LOC) + "\n" + json.dumps({"input": "Bob is tall.",
                                                               "output": [{"answer": "NOT ENOUGH INFO"}]}) + "\n")
    with pytest.raises(DataFormatError, match=f"{path}:2: field 'output' should be one of .*'NOT ENOUGH INFO'"):
        read_fever_locality(path)
