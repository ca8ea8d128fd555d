"""A user's own model and own files, end to end, with no synthetic world anywhere: hand-made zsRE
(released JSON lines and the toolkit's JSON list), NQ, FEVER and locality-claim files; a tiny
Hugging Face model saved to a directory with an offline tokenizer; base training on the files through
train.py, annotated by it (zsRE) or by ``python -m lightning_modules.base_task annotate`` (FEVER);
MEND meta-training from the shipped config with the user's paths; eval.py's report on the user's test
split (the README recipe)."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import train
from datamodules.base_data import BaseTaskDataModule
from datamodules.encoding import build_word_tokenizer
from datamodules.formats import DataFormatError, read_fever_jsonl, read_zsre_jsonl, read_zsre_toolkit
from editors.io import LocalityOverlapError, load_editor_file
from lightning_modules import base_task

eval_cli = importlib.import_module("eval")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only wait on each other
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]",
         "--trainer.enable_checkpointing", "false"]
SUBJECTS = ["Quorvat", "Belnise", "Tamrith", "Oskel", "Fenwirra", "Dalvoe", "Ushmere", "Kelbrand", "Morwick",
            "Zentara", "Pyrrel", "Holgast", "Vinmoor", "Ebbleth"]
RELATIONS = {  # relation -> (answers, question, rephrases, claim)
    "city": (["Lumbria", "Corvale", "Stennis", "Ardwyn"], "Where does {s} live?",
             ["In which town does {s} live?", "{s} lives in which town?"], "{s} lives in {o}."),
    "job": (["glazier", "cartwright", "falconer", "tanner"], "What is the job of {s}?",
            ["What does {s} work as?", "Which trade does {s} have?"], "{s} works as a {o}."),
}


def _facts(subjects: list[str]) -> list[tuple[str, str, str]]:
    """(subject, relation, answer), answers spread over each relation's set."""
    return [(s, r, objs[(i + j) % len(objs)]) for i, s in enumerate(subjects) for j, (r, (objs, *_)) in
            enumerate(RELATIONS.items())]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _write_zsre(d: Path) -> dict[str, str]:
    """The user's zsRE files, not yet annotated by any model: no prediction, no alternatives."""
    def row(s, r, o):
        _, q, reph, _ = RELATIONS[r]
        return {"input": q.format(s=s), "output": [{"answer": o}], "filtered_rephrases": [p.format(s=s) for p in reph],
                "relation": r}

    def record(s, r, o):  # the toolkit's format: one rephrase, a target chosen by the data's authors
        objs, q, reph, _ = RELATIONS[r]
        return {"subject": s, "src": q.format(s=s), "rephrase": reph[0].format(s=s), "answers": [o],
                "alt": objs[(objs.index(o) + 1) % len(objs)], "loc": "", "loc_ans": ""}

    d.mkdir()
    (d / "val.json").write_text(json.dumps([record(*f) for f in _facts(SUBJECTS[6:8])]))
    loc = _facts(SUBJECTS[10:])
    # every wording: locality pools are drawn by hash, and 8 questions may leave one empty
    (d / "nq.json").write_text(json.dumps({"questions": [t.format(s=s) for s, r, _ in loc for t in (RELATIONS[r][1], *RELATIONS[r][2])],
                                           "answers": [[o] for *_, o in loc for _ in range(3)]}))
    return {"train": _jsonl(d / "train.jsonl", [row(*f) for f in _facts(SUBJECTS[:6])]), "val": str(d / "val.json"),
            "test": _jsonl(d / "test.jsonl", [row(*f) for f in _facts(SUBJECTS[8:10])]), "loc": str(d / "nq.json")}


def _write_fever(d: Path) -> dict[str, str]:
    """The user's FEVER files (kilt-style JSON lines, gold verdicts only) and locality claims."""
    def row(s, r, o, true):
        objs, *_, claim = RELATIONS[r]
        obj = o if true else objs[(objs.index(o) + 1) % len(objs)]
        other = s + " indeed" if true else s + " really"
        return {"id": f"{s}-{r}", "input": claim.format(s=s, o=obj),
                "output": [{"answer": "SUPPORTS" if true else "REFUTES"}],
                "filtered_rephrases": [claim.format(s=other, o=obj), f"It is said that {claim.format(s=s, o=obj)}"]}

    d.mkdir()
    rows = [row(*f, true=i % 2 == 0) for i, f in enumerate(_facts(SUBJECTS))]
    loc = [{"input": r["input"], "output": r["output"]} for r in rows[20:]]
    return {"train": _jsonl(d / "train.jsonl", rows[:12]), "val": _jsonl(d / "dev.jsonl", rows[12:16]),
            "test": _jsonl(d / "test.jsonl", rows[16:20]), "loc": _jsonl(d / "loc.jsonl", loc)}


def _own_model(d: Path, files: dict[str, str], family: str) -> str:
    """A user's model directory: random tiny weights and an offline word-level tokenizer, as save_pretrained writes them."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    tok = build_word_tokenizer([Path(f).read_text() for f in files.values()], d)
    torch.manual_seed(0)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "causal":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=3, n_embd=32, n_head=2, n_positions=64, **ids))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), num_labels=1, num_hidden_layers=3, hidden_size=32,
                                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                                         pad_token_id=tok.pad_token_id))
    model.save_pretrained(d)
    return str(d)


def _meta_train_and_evaluate(config: str, paths: dict[str, str], run: Path) -> dict:
    """The README recipe: the shipped config with the user's paths, meta-training and eval.py from it."""
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    model.update(base_model=paths["model"], output_dir=str(run), rank=16)
    data.update(tokenizer=paths["model"], **{f"{s}_path": paths[s] for s in ("train", "val", "test", "loc")},
                batch_size=2, val_limit=4)
    cfg["trainer"].update(max_steps=4, val_check_interval=2, default_root_dir=str(run), callbacks=[],
                          enable_checkpointing=False, enable_progress_bar=False, logger=False)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(path)])
    assert (run / "editor.safetensors").exists()
    report = eval_cli.main(["--config", str(path), "--editor_path", str(run / "editor.safetensors"), "--mode", "single",
                            "--editor", "mend", "--report", str(run / "report.json")])
    assert json.loads((run / "report.json").read_text())["entries"], "the report was written"
    return report


def _no_world(tmp_path: Path) -> None:
    """Nothing generated the synthetic world, here or under a default path (the test runs in tmp_path)."""
    assert not (tmp_path / "runs").exists()
    assert not [p for n in ("world.json", "base-qa.jsonl", "base-claims.jsonl") for p in tmp_path.rglob(n)]


def _train_base(config: str, model: str, files: dict[str, str], run_dir: Path, epochs: int, *extra: str) -> dict:
    """The README's step 1: the shipped base config on the user's model and files (the config's
    world_dir is left as it is: training files replace the built-in world)."""
    return train.main(["--config", str(ROOT / "configs" / config), "--run_dir", str(run_dir),
                       "--model.init_args.model_name_or_path", model, "--model.init_args.tokenizer", model,
                       "--model.init_args.warmup_steps", "1", "--data.init_args.tokenizer", model,
                       "--data.init_args.train_files", json.dumps(list(files.values())),
                       "--trainer.max_epochs", str(epochs), *QUIET, *extra])


def test_zsre_own_model_own_files_base_training_annotation_mend_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default relative path (runs/world ...) would land here and be caught
    files = _write_zsre(tmp_path / "mine")
    model = _own_model(tmp_path / "my-gpt2", files, "causal")
    base = tmp_path / "base"
    summary = _train_base("base_zsre_gpt2_tiny.yaml", model, files, base, 20,
                          "--data.init_args.annotate", json.dumps({s: files[s] for s in ("train", "val", "test")}))
    assert (base / "model" / "config.json").exists()
    assert 0.0 <= summary["zsre_test_prediction_accuracy"] <= 1.0
    data = base / "data"
    assert sorted(p.name for p in data.iterdir()) == ["zsre-test.jsonl", "zsre-train.jsonl", "zsre-val.json"]

    # annotated in the released formats: the edit readers take them as they are
    answers = {r: set(objs) for r, (objs, *_) in RELATIONS.items()}
    rows = [json.loads(l) for l in (data / "zsre-train.jsonl").read_text().splitlines()]
    original = [json.loads(l) for l in Path(files["train"]).read_text().splitlines()]
    assert [r["input"] for r in rows] == [r["input"] for r in original]
    for r, o in zip(rows, original):
        # the model's answer and runner-ups, taken from the gold answers of the same relation in the files
        assert r["prediction"] in answers[r["relation"]] and r["prediction"] not in r["alternatives"]
        assert r["alternatives"] and set(r["alternatives"]) <= answers[r["relation"]]
        assert set(r["filtered_rephrases"]) <= set(o["filtered_rephrases"])
    assert read_zsre_jsonl(data / "zsre-train.jsonl")
    toolkit = json.loads((data / "zsre-val.json").read_text())
    assert isinstance(toolkit, list) and all({"pred", "alt", "rephrase"} <= set(r) for r in toolkit)
    read_zsre_toolkit(data / "zsre-val.json")

    report = _meta_train_and_evaluate("mend_zsre_gpt2_tiny.yaml", {
        "model": str(base / "model"), "train": str(data / "zsre-train.jsonl"), "val": str(data / "zsre-val.json"),
        "test": str(data / "zsre-test.jsonl"), "loc": files["loc"]}, tmp_path / "run")
    (entry,) = report["entries"]
    assert report["data_file"] == str(data / "zsre-test.jsonl") and report["dataset"] == "zsre"
    assert entry["n_edits"] == len(read_zsre_jsonl(data / "zsre-test.jsonl")) > 0
    for k in ("edit_success", "generality", "drawdown", "locality_kl"):
        assert math.isfinite(entry[k]), k
    # the report says what data it scored: the editor file's record of meta-training's data, grouping
    # by subject in the toolkit's file only, and the rows left without an agreeing rephrase
    _, header = load_editor_file(tmp_path / "run" / "editor.safetensors", "MEND")
    trained = header["data"]
    assert set(trained["loc_ids"]) == {"train", "val"} and all(trained["loc_ids"].values())
    assert report["data_fingerprint"]["loc_pools"]["test"] == trained["loc_pools"]["test"]
    assert report["data_fingerprint"]["edits"]["test"] == trained["edits"]["test"]
    assert entry["data_fingerprint"] == report["data_fingerprint"]
    assert report["grouping"] == {"edits": "mixed", "locality": "prompt"}
    test_rows = [json.loads(l) for l in (data / "zsre-test.jsonl").read_text().splitlines()]
    assert report["rows_dropped"]["test"]["without rephrases"] == sum(not r["filtered_rephrases"] for r in test_rows)
    # other pool shares at evaluation: test inputs meta-training or validation saw, refused before any edit
    with pytest.raises(LocalityOverlapError, match="locality inputs were in the (train|val) locality pool"):
        eval_cli.main(["--config", str(tmp_path / "run.yaml"), "--editor_path", str(tmp_path / "run" / "editor.safetensors"),
                       "--mode", "single", "--editor", "mend", "--data.init_args.loc_shares", "[0.1, 0.1, 0.8]"])
    _no_world(tmp_path)


def test_fever_own_classifier_base_training_then_annotate_command_mend_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _write_fever(tmp_path / "mine")
    own = _own_model(tmp_path / "my-bert", files, "classifier")
    base = tmp_path / "base"
    summary = _train_base("base_fever_bert_tiny.yaml", own, files, base, 5)
    assert 0.0 <= summary["exact_match_on_training_questions"] <= 1.0
    assert not (base / "data").exists(), "nothing to annotate without data.init_args.annotate"
    # the annotate command, on the trained model (any model directory works the same)
    model, data = str(base / "model"), tmp_path / "data"
    stats = base_task.main(["annotate", "--model", model, "--family", "classifier", "--train", files["train"],
                            "--val", files["val"], "--test", files["test"], "--out", str(data)])
    assert set(stats) == {f"fever_{s}_{k}" for s in ("train", "val", "test") for k in ("prediction_accuracy", "rephrases_kept")}
    for split in ("train", "val", "test"):
        rows = [json.loads(l) for l in (data / f"fever-{split}.jsonl").read_text().splitlines()]
        assert all(r["alternatives"] == [{"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS"}[r["prediction"]]] for r in rows)
        assert all((r["logit"] > 0) == (r["prediction"] == "SUPPORTS") for r in rows)
    # the verdicts are the trained model's own
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok, clf = AutoTokenizer.from_pretrained(model), AutoModelForSequenceClassification.from_pretrained(model).eval()
    with torch.no_grad():
        logit = clf(**tok(rows[0]["input"], return_tensors="pt")).logits[0, 0].item()
    assert logit == pytest.approx(rows[0]["logit"], abs=1e-4)
    assert read_fever_jsonl(data / "fever-train.jsonl")

    report = _meta_train_and_evaluate("mend_fever_bert_tiny.yaml", {
        "model": model, **{s: str(data / f"fever-{s}.jsonl") for s in ("train", "val", "test")}, "loc": files["loc"]},
        tmp_path / "run")
    (entry,) = report["entries"]
    assert report["dataset"] == "fever" and entry["n_edits"] > 0
    assert all(math.isfinite(entry[k]) for k in ("edit_success", "generality", "drawdown"))
    _no_world(tmp_path)


def test_own_training_files_errors_name_file_and_line(tmp_path):
    files = _write_fever(tmp_path / "mine")
    tok = _own_model(tmp_path / "m", files, "classifier")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"input": "a", "output": [{"answer": "SUPPORTS"}]},
                                          {"input": "b", "output": [{"answer": "MAYBE"}]}])
    dm = BaseTaskDataModule(world_dir=None, tokenizer=tok, family="classifier", train_files=[files["train"], bad])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: field 'output' should be one of"):
        dm.setup()
    nq = tmp_path / "nq.json"
    nq.write_text(json.dumps({"questions": ["q"], "answers": [["a"]]}))
    with pytest.raises(DataFormatError, match="NQ question/answer pairs cannot train a classifier"):
        BaseTaskDataModule(world_dir=None, tokenizer=tok, family="classifier", train_files=[str(nq)]).setup()
    with pytest.raises(FileNotFoundError, match="annotate.test"):
        BaseTaskDataModule(world_dir=None, tokenizer=tok, family="classifier", train_files=[files["train"]],
                           annotate={"test": str(tmp_path / "missing.jsonl")}).setup()


class NoTraining(Callback):
    def on_train_start(self, *args) -> None:
        raise AssertionError("the job started training")


def test_base_job_missing_a_file_its_export_needs_fails_before_training(small_world, tmp_path, monkeypatch):
    """A world directory with the base corpus but not the files annotation reads at the end of the job
    (world.json: the world's kind): refused with one line before the first step, nothing exported."""
    monkeypatch.chdir(tmp_path)
    world = tmp_path / "world"
    world.mkdir()
    (world / "base-qa.jsonl").write_bytes((small_world / "base-qa.jsonl").read_bytes())
    args = ["--config", str(ROOT / "configs" / "base_zsre_gpt2_tiny.yaml"), "--world_dir", "null",
            "--run_dir", str(tmp_path / "base"), "--model.init_args.tokenizer", str(small_world / "tokenizer"),
            "--model.init_args.tiny_config", '{"n_layer": 1, "n_embd": 8, "n_head": 1}',
            "--data.init_args.world_dir", str(world), "--data.init_args.tokenizer", str(small_world / "tokenizer"),
            *QUIET, "--trainer.callbacks", json.dumps([{"class_path": "test_own_data.NoTraining"}])]
    with pytest.raises(FileNotFoundError, match=r"world\.json not found: the export annotates the world"):
        train.main(args)
    assert not (tmp_path / "base" / "model").exists()
