"""Evaluation: metric functions on hand-made cases, the FT baselines, every protocol end to end on a
very small world (tiny random GPT-2 / BERT, untrained MEND), the report schema, and refusals."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.encoding import collate, encode
from editors.ft import FineTune
from editors.layers import select_layers
from editors.losses import forward_logits, scores
from editors.base import EditedModel, merge_deltas_
from editors.mend import MEND
from editors.until_right import UntilRight
from lightning_modules.evaluation import (DEFINITIONS, EditMetrics, drawdown, flip_counts, retention, select_rows,
                                          stream_checkpoints)
from lightning_modules.models import build_tiny

eval_cli = importlib.import_module("eval")
ROOT = Path(__file__).resolve().parents[1]

REPORT_KEYS = ("editor", "base_model", "dataset", "split", "mode", "n_edits", "edits_per_step", "edit_success",
               "edit_success_token_acc", "generality", "locality_agreement", "locality_kl", "drawdown",
               "drawdown_stderr", "flips_right_to_wrong", "flips_wrong_to_right", "seconds_per_edit", "params_changed_fraction")
SEQUENTIAL_KEYS = ("checkpoints", "sr", "gr", "er", "train_r", "test_r")
TINY = {"tiny-gpt2": dict(n_layer=2, n_embd=32, n_head=2),
        "tiny-bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads
    only wait on each other: one thread keeps these tests fast whatever else runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- metric functions
def test_flips_drawdown_retention_and_checkpoints_hand_made():
    pre = torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool)
    post = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert flip_counts(pre, post) == (2, 1)
    assert drawdown(pre, post) == pytest.approx(4 / 6 - 3 / 6)
    assert retention(0.45, 0.9) == pytest.approx(0.5)
    assert retention(0.3, 0.0) is None
    assert stream_checkpoints(250) == [1, 10, 100, 250]
    assert stream_checkpoints(10) == [1, 10]
    assert stream_checkpoints(1) == [1]


def test_edit_metrics_aggregate_hand_made_steps():
    t, f = True, False
    m = EditMetrics()
    m.update_step({"edit_success": torch.tensor([1.0, 0.0]), "edit_success_token_acc": torch.tensor([1.0, 0.5]),
                   "generality": torch.tensor([0.5, 0.0]), "generality_token_acc": torch.tensor([0.5, 0.5]),
                   "agreement": torch.tensor([1.0, 0.5, 1.0]), "kl": torch.tensor([0.0, 0.3, 0.0]),
                   "pre_right": torch.tensor([t, t, f]), "post_right": torch.tensor([f, t, t]),
                   "labelled": torch.tensor([t, t, t])}, seconds=1.0, params_changed=10)
    m.update_step({"edit_success": torch.tensor([1.0]), "edit_success_token_acc": torch.tensor([1.0]),
                   "generality": torch.tensor([1.0]), "generality_token_acc": torch.tensor([1.0]),
                   "agreement": torch.tensor([0.0, 1.0]), "kl": torch.tensor([0.6, 0.0]),
                   "pre_right": torch.tensor([t, t]), "post_right": torch.tensor([f, f]),
                   "labelled": torch.tensor([t, f])}, seconds=3.0, params_changed=30)
    out = m.compute(n_base_params=100)
    assert out["edit_success"] == pytest.approx(2 / 3)
    assert out["generality"] == pytest.approx(0.5)
    assert out["locality_agreement"] == pytest.approx(3.5 / 5)
    assert out["locality_kl"] == pytest.approx(0.9 / 5)
    # labelled inputs only: before right [1, 1, 0, 1], after right [0, 1, 1, 0]
    assert (out["flips_right_to_wrong"], out["flips_wrong_to_right"], out["n_locality_labelled"]) == (2, 1, 4)
    assert out["flips_right_to_wrong_share"] == pytest.approx(0.5)
    assert out["drawdown"] == pytest.approx(3 / 4 - 2 / 4)
    assert out["seconds_per_edit"] == pytest.approx((0.5 + 3.0) / 2)  # median of per-edit times 1.0/2 and 3.0/1
    assert out["params_changed_fraction"] == pytest.approx(0.2)
    assert (out["n_edits"], out["n_steps"]) == (3, 2)


def test_select_rows_trims_padding_without_changing_scores(tiny_models, tokenizer):
    model = tiny_models["causal"]
    feats = encode(tokenizer, "causal", ["Where was Foo born?", "What is the occupation of the old Bar Baz?"],
                   ["Arvenna", "painter"])
    batch = collate(feats, tokenizer.pad_token_id, "causal")
    one = select_rows(batch, [0])
    assert one["input_ids"].shape[1] == len(feats[0]["input_ids"]) < batch["input_ids"].shape[1]
    alone = collate(feats[:1], tokenizer.pad_token_id, "causal")
    for a, b in zip(scores(forward_logits(model, one, "causal"), one["labels"], "causal"),
                    scores(forward_logits(model, alone, "causal"), alone["labels"], "causal")):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- baselines
@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_ft_edits_until_right_and_leaves_base_untouched(tiny_models, tokenizer, family):
    model = tiny_models[family]
    target = "Arvenna" if family == "causal" else "SUPPORTS"
    batch = collate(encode(tokenizer, family, ["Where was Foo born?"], [target]), tokenizer.pad_token_id, family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ft = FineTune.for_model(model, lr=1e-2, max_steps=50)
    deltas = ft.deltas(model, batch, family)
    assert set(deltas) == {l.name for l in select_layers(model)}
    assert scores(forward_logits(EditedModel(model, deltas), batch, family), batch["labels"], family)[0].item() == 1.0
    assert ft.last_steps <= 50
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # an edit the model already gets right takes no step and changes nothing
    merged = merge_deltas_(EditedModel(model, deltas).merged(), {})
    merge_deltas_(merged, deltas)
    again = ft.deltas(merged, batch, family)
    assert ft.last_steps == 0 and all(not d.any() for d in again.values())


def test_ft_kl_uses_its_locality_inputs(tiny_models, tokenizer):
    model = tiny_models["causal"]
    batch = collate(encode(tokenizer, "causal", ["Where was Foo born?"], ["Arvenna"]), tokenizer.pad_token_id, "causal")
    loc = collate(encode(tokenizer, "causal", ["Which language does Baz speak?"], ["Orvic"]), tokenizer.pad_token_id, "causal")
    kw = dict(lr=1e-2, max_steps=3)
    ft = FineTune.for_model(model, **kw).deltas(model, batch, "causal")
    ftkl = FineTune.for_model(model, c_loc=10.0, **kw)
    assert ftkl.name == "ft_kl" and ftkl.uses_locality
    no_loc = ftkl.deltas(model, batch, "causal")
    with_loc = ftkl.deltas(model, batch, "causal", loc_batch=loc)
    assert all(torch.equal(ft[k], no_loc[k]) for k in ft)
    assert any(not torch.allclose(ft[k], with_loc[k]) for k in ft)


class _Fixed:
    """A one-step editor that always proposes the same weight changes."""

    def __init__(self, layers, deltas) -> None:
        self.layers, self.full = layers, deltas

    def deltas(self, model, batch, family):
        return self.full


@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_until_right_keeps_the_smallest_scale_that_makes_the_edit_right(tiny_models, tokenizer, family):
    model = tiny_models[family]
    target = "Arvenna"
    if family == "classifier":  # the verdict the model does not give yet
        probe = collate(encode(tokenizer, family, ["Where was Foo born?"], ["SUPPORTS"]), tokenizer.pad_token_id, family)
        target = "REFUTES" if forward_logits(model, probe, family).item() > 0 else "SUPPORTS"
    batch = collate(encode(tokenizer, family, ["Where was Foo born?"], [target]), tokenizer.pad_token_id, family)
    full = FineTune.for_model(model, lr=1e-2, max_steps=50).deltas(model, batch, family)  # right at scale 1

    def right(s: float) -> bool:
        edited = EditedModel(model, {k: s * d for k, d in full.items()})
        return bool(scores(forward_logits(edited, batch, family), batch["labels"], family)[0].all())

    assert not right(0.0) and right(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = UntilRight(_Fixed(select_layers(model), full), scales=(4.0, 1.0, 0.5, 1e-3))
    got = editor.deltas(model, batch, family)
    assert editor.last_scale == next(s for s in (1e-3, 0.5, 1.0) if right(s)), "the first right scale, in increasing order"
    assert all(torch.equal(got[k], editor.last_scale * full[k]) for k in full)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the base model is untouched"
    none_right = UntilRight(_Fixed(select_layers(model), full), scales=(1e-6, 2e-6))
    none_right.deltas(model, batch, family)
    assert none_right.last_scale == 2e-6, "no scale is right: the largest is kept"
    with pytest.raises(ValueError, match="positive"):
        UntilRight(_Fixed([], {}), scales=(0.5, 0.0))


# ---------------------------------------------------------------- end to end on a very small world
def _write_config(path: Path, base: Path, world: Path, task: str, family: str, test_file: str | None = None) -> Path:
    loc = "nq-loc.jsonl" if task == "zsre" else "fever-loc.jsonl"
    module = "ZsreDataModule" if task == "zsre" else "FeverDataModule"
    cfg = {"seed_everything": 0,
           "model": {"class_path": "lightning_modules.mend_module.MENDModule",
                     "init_args": {"base_model": str(base), "family": family}},
           "data": {"class_path": f"datamodules.edit_data.{module}",
                    "init_args": {"train_path": str(world / f"{task}-train.jsonl"),
                                  "val_path": str(world / f"{task}-val.jsonl"),
                                  "test_path": str(world / (test_file or f"{task}-test.jsonl")),
                                  "loc_path": str(world / loc), "tokenizer": str(base), "family": family}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def setup_eval(small_world, tokenizer, tmp_path_factory):
    """Tiny base models saved like trained ones, configs for zsRE (GPT-2) and FEVER (BERT), editors."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    out = {"root": root}
    for name, task, family in (("tiny-gpt2", "zsre", "causal"), ("tiny-bert", "fever", "classifier")):
        model = build_tiny(name, tokenizer, TINY[name]).eval()
        base = root / f"base-{task}"
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        out[f"{task}_config"] = _write_config(root / f"{task}.yaml", base, small_world, task, family)
        out[f"{task}_model"] = model
    gpt2 = out["zsre_model"]
    MEND.for_model(gpt2, rank=8, init_edit_lr=1e-2).save(root / "editor.safetensors", gpt2)
    other = type(gpt2)(gpt2.config)  # same architecture, different weights
    MEND.for_model(other, rank=8).save(root / "other.safetensors", other)
    out["wrong_task_config"] = _write_config(root / "wrong.yaml", root / "base-zsre", small_world, "zsre", "causal",
                                             test_file="fever-test.jsonl")
    return out


def _run(*args: str) -> dict:
    return eval_cli.main([*map(str, args), "--no_progress"])


@pytest.fixture(scope="module")
def all_modes_ft(setup_eval):
    """One --mode all run of the FT baseline on 12 held-out edits, with its report files."""
    report = setup_eval["root"] / "all" / "report.json"
    _run("--config", setup_eval["zsre_config"], "--editor", "ft", "--mode", "all", "--n_edits", 12,
         "--report", report)
    return json.loads(report.read_text()), report


def test_single_mode_mend_report_schema(setup_eval, tmp_path):
    path = tmp_path / "single.json"
    _run("--config", setup_eval["zsre_config"], "--ckpt_path", setup_eval["root"] / "editor.safetensors",
         "--mode", "single", "--report", path)
    rep = json.loads(path.read_text())
    for key in REPORT_KEYS + ("config", "seed", "definitions", "entries"):
        assert key in rep, key
    assert (rep["editor"], rep["mode"], rep["dataset"], rep["split"]) == ("mend", "single", "zsre", "test")
    assert rep["n_edits"] == rep["n_edits_available"] == 20  # 4 held-out subjects x 5 relations
    assert rep["config"]["data"]["class_path"].endswith("ZsreDataModule") and rep["seed"] == 0
    assert rep["base_model_unchanged"] is True and 0 < rep["params_changed_fraction"] <= 1
    pool = rep["n_locality_inputs"] // 20  # the default --loc_per_edit all: the whole test pool for every edit
    assert rep["n_locality_inputs"] == 20 * pool and pool > 20 and rep["drawdown_stderr"] is not None
    metrics = [k for k in REPORT_KEYS if k not in ("editor", "base_model", "dataset", "split", "mode", "n_edits",
                                                   "edits_per_step")]
    assert all(k in rep["definitions"] for k in metrics)
    assert path.with_suffix(".md").exists() and (tmp_path / "tensorboard" / "single").is_dir()


def test_loc_per_edit_all_scores_every_held_out_locality_input_for_every_edit(setup_eval):
    args = ("--config", setup_eval["zsre_config"], "--editor", "ft", "--mode", "single", "--n_edits", 3, "--ft_steps", 1)
    rep = _run(*args, "--loc_per_edit", "all")["entries"][0]
    pool = rep["n_locality_inputs"] // 3
    assert rep["n_locality_inputs"] == 3 * pool and pool > 20, "every edit scored on the whole held-out pool"
    with pytest.raises(eval_cli.EvalError, match=f"more than the {pool} held-out locality inputs"):
        _run(*args, "--loc_per_edit", pool + 1)


def test_mend_until_right_runs_beside_mend_on_the_same_checkpoint(setup_eval):
    rep = _run("--config", setup_eval["zsre_config"], "--ckpt_path", setup_eval["root"] / "editor.safetensors",
               "--mode", "single", "--editor", "mend", "mend_until_right")
    mend, under_rule = rep["entries"]
    assert under_rule["editor"] == "mend_until_right" and under_rule["n_edits"] == mend["n_edits"] == 20
    assert under_rule["editor_config"]["scales"] == [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    assert under_rule["editor_config"]["editor"] == mend["editor_config"], "it wraps the same MEND"
    assert under_rule["base_model_unchanged"] is True


def test_until_right_scales_default_to_the_configs_validation_grid(setup_eval, tmp_path):
    """A config that validates under the rule (model.init_args.until_right_scales) is evaluated under
    the same grid unless --until_right_scales says otherwise."""
    cfg = yaml.safe_load(Path(setup_eval["zsre_config"]).read_text())
    cfg["model"].setdefault("init_args", {})["until_right_scales"] = [1.0, 0.5]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ("--config", path, "--ckpt_path", setup_eval["root"] / "editor.safetensors", "--mode", "single",
            "--editor", "mend_until_right", "--n_edits", 2, "--loc_per_edit", 1)
    assert _run(*args)["entries"][0]["editor_config"]["scales"] == [0.5, 1.0]
    assert _run(*args, "--until_right_scales", 2, 3)["entries"][0]["editor_config"]["scales"] == [2.0, 3.0]


def test_single_mode_data_parallel_equals_one_process(setup_eval, tmp_path, child_env):
    """--devices 2 (DDP, gloo) scores every held-out edit once, as one process does: the same report
    figures over an odd number of edits (timings aside)."""
    args = ["--config", setup_eval["zsre_config"], "--ckpt_path", setup_eval["root"] / "editor.safetensors",
            "--mode", "single", "--n_edits", 19, "--accelerator", "cpu"]
    _run(*args, "--report", tmp_path / "one.json")
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args), "--devices", "2", "--strategy",
                           "ddp", "--report", str(tmp_path / "two.json"), "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=child_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["n_edits"] == two["n_edits"] == 19 and one["n_locality_inputs"] == two["n_locality_inputs"]
    assert one["n_locality_inputs"] % 19 == 0 and one["n_locality_inputs"] > 19 * 20
    for k in ("edit_success", "edit_success_token_acc", "generality", "generality_token_acc", "locality_agreement",
              "locality_kl", "drawdown", "drawdown_stderr", "flips_right_to_wrong", "flips_wrong_to_right", "params_changed"):
        assert one[k] == pytest.approx(two[k], rel=1e-4, abs=1e-6), k


def test_batch_mode_caps_k_and_k1_equals_single(setup_eval, all_modes_ft):
    rep, _ = all_modes_ft
    (single,) = [e for e in rep["entries"] if e["mode"] == "single"]
    batch = {e["edits_per_step"]: e for e in rep["entries"] if e["mode"] == "batch"}
    assert sorted(batch) == [1, 5, 12]
    assert batch[12]["requested_edits_per_step"] == [25, 125] and "capped" in batch[12]["note"]
    assert (batch[5]["n_edits"], batch[5]["n_edits_left_out"]) == (10, 2)
    assert batch[12]["n_steps"] == 1
    assert "single" in batch[1]["note"]  # --mode all reuses the single run for K = 1
    assert single["edit_success"] > 0.9  # FT steps until the edit is right
    # K = 1 is the single protocol: the plain loop and the LightningModule must agree
    (k1,) = _run("--config", setup_eval["zsre_config"], "--editor", "ft", "--mode", "batch", "--edits_per_step", 1,
                 "--n_edits", 12)["entries"]
    for key in ("edit_success", "edit_success_token_acc", "generality", "locality_agreement", "locality_kl",
                "drawdown", "flips_right_to_wrong", "params_changed_fraction"):
        assert k1[key] == pytest.approx(single[key], abs=1e-6), key


def test_sequential_mode_curves_and_report_files(all_modes_ft):
    rep, path = all_modes_ft
    (seq,) = [e for e in rep["entries"] if e["mode"] == "sequential"]
    assert all(k in seq for k in SEQUENTIAL_KEYS)
    assert seq["checkpoints"] == [1, 10, 12]
    assert all(len(seq[k]) == 3 for k in SEQUENTIAL_KEYS)
    assert seq["er"][0] == seq["sr"][0]  # one edit: re-scoring it is scoring it right after
    assert seq["sr"][-1] == pytest.approx(seq["edit_success"])
    assert seq["n_edits_applied"] == 12 and seq["base_model_unchanged"]
    assert seq["params_changed"] > 0
    for name in ("report.md", "report_retention.png", "report_locality_drift.png", "report_batch.png"):
        assert (path.parent / name).stat().st_size > 0, name
    assert list((path.parent / "tensorboard" / "report").glob("events.out.tfevents.*"))
    md = (path.parent / "report.md").read_text()
    assert "| ft | sequential |" in md and "## Definitions" in md


def test_sequential_classifier_folds_only_when_wrong_and_retention(setup_eval):
    rep = _run("--config", setup_eval["fever_config"], "--editor", "ft_kl", "--mode", "sequential",
               "--n_edits", 13, "--folds", 2, "--edit_only_when_wrong", "--n_train_probe", 40)
    (seq,) = rep["entries"]
    assert (seq["folds"], seq["n_edits"], seq["n_edits_left_out"]) == (2, 12, 1)
    assert seq["checkpoints"] == [1, 6]
    assert seq["n_edits_applied"] <= 12
    # a random classifier gets about half of the labels right: retention ratios are defined
    assert seq["initial_train_accuracy"] > 0 and seq["initial_test_accuracy"] > 0
    assert all(r is not None and r >= 0 for r in seq["train_r"] + seq["test_r"])
    assert seq["dataset"] == "fever"


# ---------------------------------------------------------------- refusals
def test_refuses_checkpoint_of_another_base_model(setup_eval):
    with pytest.raises(eval_cli.EvalError, match="was trained for base model"):
        _run("--config", setup_eval["zsre_config"], "--ckpt_path", setup_eval["root"] / "other.safetensors")


def test_refuses_missing_checkpoint_and_mend_without_one(setup_eval):
    with pytest.raises(eval_cli.EvalError, match="does not exist"):
        _run("--config", setup_eval["zsre_config"], "--ckpt_path", setup_eval["root"] / "missing.ckpt")
    with pytest.raises(eval_cli.EvalError, match="need --ckpt_path"):
        _run("--config", setup_eval["zsre_config"], "--editor", "mend")


def test_refuses_data_file_of_another_task(setup_eval):
    with pytest.raises(eval_cli.EvalError, match="holds fever data.*reads zsre files"):
        _run("--config", setup_eval["wrong_task_config"], "--editor", "ft")


def test_cli_prints_refusal_without_traceback(setup_eval):
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--config", str(setup_eval["wrong_task_config"]),
                           "--editor", "ft"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "eval.py: error:" in proc.stderr and "holds fever data" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_definitions_cover_sequential_curves():
    assert all(k in DEFINITIONS for k in SEQUENTIAL_KEYS)


def test_split_val_scores_validation_edits_on_the_validation_pool(setup_eval):
    """Design choices are made with --split val: validation edits, validation locality inputs."""
    args = ("--config", setup_eval["zsre_config"], "--editor", "ft", "--mode", "single", "--ft_steps", 1)
    val = _run(*args, "--split", "val")["entries"][0]
    test = _run(*args, "--n_edits", 3)["entries"][0]
    assert val["split"] == "val" and test["split"] == "test"
    assert val["n_edits"] == val["n_edits_available"] == 20  # 4 validation subjects x 5 relations
    assert val["n_locality_inputs"] % 20 == 0 and val["n_locality_inputs"] > 20 * 20  # the whole validation pool


def test_surgery_and_patcher_run_under_every_protocol(setup_eval):
    """The new editors through eval.py: a surgery selector never reports more changed weights than its
    budget; the patcher adds neurons (counted as added parameters) and keeps a stream."""
    args = ("--config", setup_eval["zsre_config"], "--n_edits", 4, "--loc_per_edit", 3)
    rep = _run(*args, "--editor", "surgery_dynamic", "surgery_l1", "patcher", "--mode", "single",
               "--surgery_n_params", 50)
    by = {e["editor"]: e for e in rep["entries"]}
    for name in ("surgery_dynamic", "surgery_l1"):
        assert 0 < by[name]["params_changed"] <= 50 and by[name]["edit_success"] > 0
    assert by["patcher"]["edit_success"] == 1.0 and by["patcher"]["params_changed"] > 0
    seq = _run(*args, "--editor", "patcher", "--mode", "sequential", "--edit_only_when_wrong")["entries"][0]
    assert seq["edit_retention"] == 1.0 and seq["params_changed"] > 0


@pytest.mark.parametrize("editor,cls", [("ft", "editors.ft.FineTune"), ("patcher", "editors.patcher.Patcher")])
def test_an_interrupted_stream_resumes_from_its_saved_state(setup_eval, tmp_path, monkeypatch, editor, cls):
    """A stream killed after its 5th edit continues from the state saved at edit 4, not from zero, and
    ends with the figures of an unbroken stream (timings aside)."""
    import importlib

    args = ("--config", setup_eval["zsre_config"], "--editor", editor, "--mode", "sequential", "--n_edits", 8,
            "--n_test_probe", 10, "--n_train_probe", 10, "--save_every", 2)
    unbroken = _run(*args, "--stream_state", tmp_path / "a")["entries"][0]
    module, name = cls.rsplit(".", 1)
    klass = getattr(importlib.import_module(module), name)
    real, calls = klass.make_edit, []

    def dies_at_the_fifth(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(self, *a, **kw)

    monkeypatch.setattr(klass, "make_edit", dies_at_the_fifth)
    with pytest.raises(RuntimeError, match="killed"):
        _run(*args, "--stream_state", tmp_path / "b")
    saved = json.loads((tmp_path / "b" / editor / "stream.json").read_text())
    assert saved["start"] == 4 and len(list((tmp_path / "b" / editor).glob("work-*"))) == 1
    calls.clear()
    resumed = _run(*args, "--stream_state", tmp_path / "b")["entries"][0]
    assert len(calls) <= 4, "only the edits after the saved state were made again"
    for k in ("edit_success", "generality", "edit_retention", "train_retention", "test_retention", "locality_kl",
              "params_changed", "n_edits_applied", "er", "sr"):
        assert resumed[k] == (None if unbroken[k] is None else pytest.approx(unbroken[k], rel=1e-5, abs=1e-7)), k


def test_eval_cli_takes_dotted_overrides_print_config_and_run_dir(setup_eval, tmp_path, capsys):
    """eval.py parses the training config with train.py's machinery: dotted keys override it,
    --print_config shows the result, and --run_dir places the report."""
    moved = str(tmp_path / "elsewhere-test.jsonl")
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--config", str(setup_eval["zsre_config"]), "--data.init_args.test_path", moved, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["test_path"] == moved and printed["mode"] == "single"
    with pytest.raises(SystemExit):  # an unknown key is refused by the parser
        eval_cli.main(["--config", str(setup_eval["zsre_config"]), "--data.init_args.no_such_key", "1"])
    import train  # a config that train.py printed (or saved beside its run) is read as it is
    with pytest.raises(SystemExit):
        train.main(["--config", str(ROOT / "configs" / "mend_zsre_gpt2_tiny.yaml"), "--print_config"])
    (tmp_path / "saved.yaml").write_text(capsys.readouterr().out)
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--config", str(tmp_path / "saved.yaml"), "--print_config"])
    assert e.value.code == 0 and "run_dir" in capsys.readouterr().out
    rep = _run("--config", setup_eval["zsre_config"], "--editor", "ft", "--n_edits", 2, "--ft_steps", 1,
               "--run_dir", tmp_path / "job", "--split", "val")
    assert rep["split"] == "val" and (tmp_path / "job" / "report_val.json").exists()


def test_surgery_budget_sweep_reports_each_budget_and_plots_it(setup_eval, tmp_path):
    rep = _run("--config", setup_eval["zsre_config"], "--editor", "surgery_grad", "--surgery_n_params", 5, 50,
               "--n_edits", 2, "--loc_per_edit", 3, "--report", tmp_path / "sweep.json")
    got = {e["label"]: e for e in rep["entries"]}
    assert set(got) == {"surgery_grad@5", "surgery_grad@50"}
    for n in (5, 50):
        e = got[f"surgery_grad@{n}"]
        assert e["editor"] == "surgery_grad" and e["editor_config"]["n_params"] == n
        assert 0 < e["params_changed"] <= n, "the budget is counted on the edited model"
    assert (tmp_path / "sweep_budget.png").stat().st_size > 0


def test_reports_of_the_same_edits_merge_and_others_are_refused(setup_eval, tmp_path):
    from lightning_modules.report import merge_reports

    args = ("--config", setup_eval["zsre_config"], "--editor", "surgery_grad", "--n_edits", 2, "--loc_per_edit", 3)
    for n in (5, 50):
        _run(*args, "--surgery_n_params", n, "--report", tmp_path / f"n{n}.json")
    _run(*args, "--surgery_n_params", 5, "--split", "val", "--report", tmp_path / "val.json")
    merge_reports([tmp_path / "n5.json", tmp_path / "n50.json"], tmp_path / "merged.json")
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [e["label"] for e in merged["entries"]] == ["surgery_grad@5", "surgery_grad@50"]
    assert (tmp_path / "merged_budget.png").exists()
    with pytest.raises(ValueError, match="differs.*split"):
        merge_reports([tmp_path / "n5.json", tmp_path / "val.json"], tmp_path / "bad.json")


def test_patcher_options_reach_the_editor_and_unknown_ones_are_refused(setup_eval):
    args = ("--config", setup_eval["zsre_config"], "--editor", "patcher", "--n_edits", 1, "--loc_per_edit", 2)
    rep = _run(*args, "--patcher_options", "{top_k: 4, memory_margin: -5}")
    (entry,) = rep["entries"]
    assert entry["editor_config"]["top_k"] == 4 and entry["editor_config"]["memory_margin"] == -5
    with pytest.raises(eval_cli.EvalError, match="--patcher_options.*no_such"):
        _run(*args, "--patcher_options", "{no_such: 1}")
