"""eval.py's command line: editors declared as class path + init args (a user's own Editor with no change
to hypedit), the short names as aliases, settings that are used or refused (trainer section, data
settings evaluation sets, --ckpt_path), and reports told apart by label."""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.models import build_tiny
from lightning_modules.report import merge_reports

eval_cli = importlib.import_module("eval")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def config(small_world, tokenizer, tmp_path_factory) -> Path:
    """A meta-training config on a tiny random GPT-2 saved like a trained base; its trainer section asks
    for a precision evaluation must honour."""
    root = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(0)
    base = root / "base"
    build_tiny("tiny-gpt2", tokenizer, dict(n_layer=2, n_embd=32, n_head=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = {"seed_everything": 3,
           "model": {"class_path": "lightning_modules.mend_module.MENDModule",
                     "init_args": {"base_model": str(base), "family": "causal"}},
           "data": {"class_path": "datamodules.edit_data.ZsreDataModule",
                    "init_args": {**{f"{s}_path": str(small_world / f"zsre-{s}.jsonl") for s in ("train", "val", "test")},
                                  "loc_path": str(small_world / "nq-loc.jsonl"), "tokenizer": str(base),
                                  "family": "causal", "n_edits": 20, "batch_size": 4, "loc_per_edit": 7,
                                  "shuffle": True, "seed": 11}},
           "trainer": {"max_steps": 10, "accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}}
    path = root / "mend.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def user_editor(tmp_path, monkeypatch) -> str:
    """A module of the user's, outside hypedit, defining its own Editor subclass."""
    (tmp_path / "my_editors.py").write_text(textwrap.dedent('''
        from editors.base import DeltaEditor

        class ScaledGradient(DeltaEditor):
            """One gradient step of size ``step`` on the config's edited matrices."""
            name = "scaled_gradient"

            def __init__(self, layers, step: float = 1.0):
                self.layers, self.step = layers, step
                self.config = {"step": step, "layers": [l.name for l in layers]}

            @classmethod
            def for_evaluation(cls, context, step: float = 1.0):
                return cls(context.layers(), step)

            def deltas(self, model, batch, family, loc_batch=None):
                import torch
                from editors.losses import forward_logits, nll
                params = dict(model.named_parameters())
                with torch.enable_grad():
                    ws = [params[l.name] for l in self.layers]
                    for w in ws:
                        w.requires_grad_(True)
                    grads = torch.autograd.grad(nll(forward_logits(model, batch, family), batch["labels"], family), ws)
                    for w in ws:
                        w.requires_grad_(False)
                return {l.name: -self.step * g for l, g in zip(self.layers, grads)}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_editors", None)
    return "my_editors.ScaledGradient"


def _run(config: Path, *args) -> dict:
    return eval_cli.main(["--config", str(config), *map(str, args), "--no_progress"])


def _print_config(config: Path, capsys, *args) -> dict:
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--config", str(config), *map(str, args), "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_a_users_editor_is_evaluated_by_class_path_with_its_init_args(config, user_editor, tmp_path):
    spec = f"{{class_path: {user_editor}, init_args: {{step: 0.5}}}}"
    rep = _run(config, "--editors+", spec, "--editor", "ft", "--n_edits", 2, "--loc_per_edit", 2,
               "--report", tmp_path / "r.json")
    got = {e["label"]: e for e in rep["entries"]}
    assert set(got) == {"ft", "scaled_gradient"}, "--editor names come first, then the specs"
    assert got["scaled_gradient"]["editor_config"]["step"] == 0.5
    assert got["scaled_gradient"]["params_changed"] > 0, "the user's editor computed the edits"
    with pytest.raises(eval_cli.EvalError, match="ScaledGradient.*no_such"):
        _run(config, "--editors+", f"{{class_path: {user_editor}, init_args: {{no_such: 1}}}}", "--n_edits", 1)
    with pytest.raises(eval_cli.EvalError, match="OrderedDict.*not an importable editors.base.Editor"):
        eval_cli.parse_args(["--config", str(config), "--editors+", "{class_path: collections.OrderedDict}"])


def test_print_config_shows_the_resolved_editors(config, user_editor, capsys, tmp_path):
    printed = _print_config(config, capsys, "--editor", "mend_until_right", "mend_polyak", "rledit_polyak",
                            "malmen_stream", "surgery_grad@5", "--editor_path", tmp_path / "e.safetensors", "--editors+",
                            f"{{class_path: {user_editor}, label: mine}}")
    ur, polyak, rl_polyak, stream, surgery, mine = printed["editors"]
    mend = {"class_path": "editors.mend.MEND", "init_args": {"path": str(tmp_path / "e.safetensors")}}
    assert ur == {"class_path": "editors.until_right.UntilRight", "init_args": {"editor": mend}}
    assert polyak == {"class_path": "editors.until_right.PolyakStep", "init_args": {"editor": mend}}
    assert rl_polyak["init_args"]["editor"] == {**mend, "class_path": "editors.rledit.RLEdit"}
    assert stream["init_args"] == {"max_steps": 5, "name": "malmen_stream", "editor": {
        "class_path": "editors.malmen.MALMEN", "init_args": {"path": str(tmp_path / "e.safetensors"), "memory_weight": 10.0}}}
    assert surgery == {"class_path": "editors.surgery.Surgery", "init_args": {"method": "grad", "n_params": 5},
                       "label": "surgery_grad@5"}
    assert mine["class_path"] == user_editor and mine["label"] == "mine"
    assert printed["editor"] is None, "the printed config runs the same editors again"


def test_aliases_expand_and_refuse_with_one_line(config):
    assert eval_cli.expand_spec("ft_kl", None) == {"class_path": "editors.ft.FineTune", "init_args": {"c_loc": 1.0}}
    over = eval_cli.expand_spec({"class_path": "ft_kl", "init_args": {"c_loc": 2.0, "max_steps": 1}}, None)
    assert over["init_args"] == {"c_loc": 2.0, "max_steps": 1}, "given init args override the alias's"
    with pytest.raises(eval_cli.EvalError, match="rome"):
        eval_cli.expand_spec("rome", None)
    with pytest.raises(eval_cli.EvalError, match="needs --editor_path"):
        eval_cli.expand_spec("selector", None)
    with pytest.raises(eval_cli.EvalError, match="budget"):
        eval_cli.expand_spec("surgery_grad@lots", None)


def test_budgets_and_duplicate_labels(config):
    specs = "[{class_path: surgery_grad, init_args: {n_params: 5}}, {class_path: surgery_grad, init_args: {n_params: 50}}]"
    rep = _run(config, "--editors", specs, "--n_edits", 2, "--loc_per_edit", 2)
    assert [e["label"] for e in rep["entries"]] == ["surgery_grad@5", "surgery_grad@50"]
    assert all(e["editor"] == "surgery_grad" for e in rep["entries"])
    with pytest.raises(eval_cli.EvalError, match="two editors are labelled 'ft'"):
        _run(config, "--editor", "ft", "ft", "--n_edits", 1)
    rep = _run(config, "--editors", "[{class_path: ft, label: a}, {class_path: ft, init_args: {lr: 0.1}, label: b}]",
               "--n_edits", 1, "--loc_per_edit", 2)
    assert [e["label"] for e in rep["entries"]] == ["a", "b"]


def test_the_untrained_selector_is_evaluated_beside_the_trained_one(config, tmp_path):
    """selector_untrained needs no file: the selector before meta-training, the baseline of the trained one."""
    from editors.selector import Selector
    from lightning_modules.models import load_model

    base = load_model(yaml.safe_load(config.read_text())["model"]["init_args"]["base_model"], "causal")
    trained = Selector.for_model(base, n_params=40)
    trained.save(tmp_path / "sel.safetensors", base)
    rep = _run(config, "--editor", "selector", "selector_untrained@40", "--editor_path", tmp_path / "sel.safetensors",
               "--n_edits", 2, "--loc_per_edit", 2)
    got = {e["label"]: e for e in rep["entries"]}
    assert set(got) == {"selector", "selector_untrained@40"}
    assert [got[k]["editor"] for k in sorted(got)] == ["selector", "selector_untrained"]
    for e in got.values():
        assert e["editor_config"]["n_params"] == 40 and 0 < e["params_changed"] <= 40
    with pytest.raises(eval_cli.EvalError, match="settings are those of its file"):
        _run(config, "--editors+", "{class_path: selector, init_args: {n_params: 5}}", "--editor_path",
             tmp_path / "sel.safetensors", "--n_edits", 1)


def test_print_config_shows_the_data_and_trainer_settings_evaluation_uses(config, capsys):
    printed = _print_config(config, capsys, "--loc_per_edit", 3, "--seed", 5)
    data = printed["data"]["init_args"]
    assert (data["n_edits"], data["batch_size"], data["loc_per_edit"], data["shuffle"], data["seed"]) == (8, 1, 3, False, 5)
    assert (printed["accelerator"], printed["devices"], printed["precision"]) == ("cpu", 1, "bf16-mixed")
    printed = _print_config(config, capsys, "--accelerator", "auto", "--precision", "32")
    assert (printed["accelerator"], printed["precision"], printed["seed"]) == ("auto", "32", 3)
    assert "every held-out locality input" in _print_config_text(config, capsys)


def _print_config_text(config: Path, capsys) -> str:
    with pytest.raises(SystemExit):
        eval_cli.main(["--config", str(config), "--print_config"])
    return capsys.readouterr().out


def test_trainer_precision_is_used_or_refused(config, capsys):
    rep = _run(config, "--editor", "ft", "--n_edits", 1, "--loc_per_edit", 2, "--mode", "batch",
               "--edits_per_step", 1)
    assert rep["eval_args"]["precision"] == "bf16-mixed" and rep["eval_args"]["accelerator"] == "cpu"
    with pytest.raises(eval_cli.EvalError, match="precision 64-true"):
        eval_cli.parse_args(["--config", str(config), "--precision", "64-true"])


def test_autocast_reaches_the_editors(config, monkeypatch):
    """trainer.precision bf16-mixed: the edits are computed under autocast, not in full precision."""
    from editors.ft import FineTune

    seen = []
    deltas = FineTune.deltas
    monkeypatch.setattr(FineTune, "deltas", lambda self, *a, **k: (seen.append(torch.is_autocast_enabled("cpu")),
                                                                    deltas(self, *a, **k))[1])
    _run(config, "--editor", "ft", "--n_edits", 1, "--loc_per_edit", 2, "--mode", "batch", "--edits_per_step", 1)
    _run(config, "--editor", "ft", "--n_edits", 1, "--loc_per_edit", 2, "--mode", "batch", "--edits_per_step", 1,
         "--precision", "32")
    assert seen == [True, False]


def test_ckpt_path_is_a_deprecated_name_of_editor_path(config, capsys, tmp_path):
    missing = tmp_path / "nothing.safetensors"
    printed = _print_config(config, capsys, "--ckpt_path", missing, "--editor", "mend")
    assert printed["editors"][0]["init_args"]["path"] == str(missing)
    with pytest.raises(eval_cli.EvalError, match="once"):
        eval_cli.parse_args(["--config", str(config), "--ckpt_path", "a", "--editor_path", "b"])
    saved = yaml.safe_load(config.read_text())  # train.py's saved config holds its own resume checkpoint: not an editor
    saved["ckpt_path"] = "last"
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(saved))
    assert _print_config(tmp_path / "saved.yaml", capsys)["editors"] == [{"class_path": "editors.ft.FineTune",
                                                                          "init_args": {}}]


def test_mode_all_help_names_the_editors_it_runs(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "every available" not in text and "--mode all: mend, mend_until_right, ft, ft_kl" in text


# ---------------------------------------------------------------- --save_model: a stream's model, plain
def test_save_model_writes_each_streams_working_model_as_a_plain_hugging_face_model(config, tmp_path, monkeypatch,
                                                                                     capsys):
    """The patcher's working model widened, FT's as it is: each loads with from_pretrained alone, with
    the working model's logits and the patched edits right; a directory there already stops the job."""
    import lightning_modules.evaluation as evaluation
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editors.losses import forward_logits, scores
    from editors.patcher import installed_patches

    works, edits = {}, []
    plain, compute = eval_cli.plain_model, evaluation.compute_edit

    def keep_work(work, original):
        works["patcher" if installed_patches(work) else "ft"] = work
        return plain(work, original)

    def keep_edit(editor, model, batch, *a):
        change, secs = compute(editor, model, batch, *a)
        if getattr(change, "n_neurons", 0):  # a patch kept (not rolled back)
            edits.append(batch)
        return change, secs

    monkeypatch.setattr(eval_cli, "plain_model", keep_work)
    monkeypatch.setattr(evaluation, "compute_edit", keep_edit)
    out = tmp_path / "models"
    rep = _run(config, "--editor", "patcher", "ft", "--mode", "sequential", "--n_edits", 4, "--loc_per_edit", 2,
               "--precision", "32", "--save_model", out)
    assert {e["label"]: e["saved_models"] for e in rep["entries"]} == {"patcher": [str(out / "patcher")],
                                                                      "ft": [str(out / "ft")]}
    assert sorted(p.name for p in out.iterdir()) == ["ft", "patcher"], "no temporary left beside them"
    assert edits and set(works) == {"patcher", "ft"}
    vocab = AutoTokenizer.from_pretrained(yaml.safe_load(config.read_text())["model"]["init_args"]["base_model"]).get_vocab()
    backs = {label: AutoModelForCausalLM.from_pretrained(out / label).eval() for label in works}
    with torch.no_grad():
        for label, work in works.items():
            assert AutoTokenizer.from_pretrained(out / label).get_vocab() == vocab
            for b in edits:
                torch.testing.assert_close(forward_logits(backs[label], b, "causal"), forward_logits(work, b, "causal"))
        assert all(bool(scores(forward_logits(backs["patcher"], b, "causal"), b["labels"], "causal")[0].all())
                   for b in edits)
    (patch,) = installed_patches(works["patcher"]).values()
    assert backs["patcher"].config.n_inner == 4 * 32 + patch.n_neurons and backs["ft"].config.n_inner is None
    with pytest.raises(eval_cli.EvalError, match="patcher exists already"):
        _run(config, "--editor", "patcher", "--mode", "sequential", "--n_edits", 1, "--save_model", out)
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--config", str(config), "--mode", "single", "--save_model", str(out)])
    assert "--save_model writes the working model of a stream" in capsys.readouterr().err


def test_save_model_is_a_config_key_like_the_other_options(config, capsys, tmp_path):
    cfg = {**yaml.safe_load(config.read_text()), "save_model": str(tmp_path / "m"), "mode": "all"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert _print_config(tmp_path / "c.yaml", capsys)["save_model"] == str(tmp_path / "m")
    assert _print_config(config, capsys, "--mode", "sequential", "--save_model", "x")["save_model"] == "x"


def test_a_working_model_that_is_no_plain_model_is_reported_not_written(tokenizer, tmp_path, capsys):
    small = dict(n_layer=1, n_embd=16, n_head=2)
    base, work = build_tiny("tiny-gpt2", tokenizer, small), build_tiny("tiny-gpt2", tokenizer, small)
    work.extra = torch.nn.Linear(2, 2)  # an editor's own module: from_pretrained would drop it
    assert eval_cli.save_plain_model(tmp_path / "m", work, base, tokenizer) is None
    assert "--save_model" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- reports
def _entry(editor: str, label: str, mode: str = "sequential", **kw) -> dict:
    e = {"editor": editor, "label": label, "mode": mode, "edits_per_step": 1, "n_edits": 2, "edit_success": 1.0,
         "generality": 1.0, "locality_agreement": 1.0, "locality_kl": 0.0, "drawdown": 0.0, "folds": 1,
         "n_edits_applied": 2, "checkpoints": [1, 2], "editor_config": {"rank": 8}, **kw}
    for k in ("sr", "gr", "er", "train_r", "test_r", "locality_agreement_curve", "locality_kl_curve", "drawdown_curve"):
        e[k] = [1.0, 1.0]
    return e


def _report(entries: list[dict], **over) -> dict:
    return {"command": "python eval.py", "base_model": "b", "dataset": "zsre", "data_file": "t.jsonl", "split": "test",
            "seed": 0, "n_edits_available": 10, "family": "causal", "definitions": {},
            "eval_args": {"n_edits": None, "loc_per_edit": "all", "n_test_probe": 1000}, "entries": entries, **over}


def test_reports_tell_editors_apart_by_label(tmp_path):
    from lightning_modules.report import write_report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = _report([_entry("mend", "mend_a"), _entry("mend", "mend_b")])
    written = write_report(rep, tmp_path / "r.json")
    md = written["markdown"].read_text()
    assert "**mend_a**" in md and "**mend_b**" in md, "one line per label in the editors list"
    assert "## Sequential stream: mend_a" in md and "## Sequential stream: mend_b" in md
    tags = EventAccumulator(str(written["tensorboard"])).Reload().Tags()["scalars"]
    assert "mend_a/sequential/sr" in tags and "mend_b/sequential/sr" in tags


def test_merge_refuses_reports_of_other_locality_settings_edits_or_data(tmp_path):
    def save(name: str, label: str = "ft", **over) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(_report([_entry("ft", label, mode="single")], **over)))
        return path

    a = save("a.json", data_fingerprint="x")
    for name, over, key in (("n.json", {"eval_args": {"n_edits": 5, "loc_per_edit": "all", "n_test_probe": 1000}}, "n_edits"),
                            ("l.json", {"eval_args": {"n_edits": None, "loc_per_edit": 3, "n_test_probe": 1000}}, "loc_per_edit"),
                            ("p.json", {"eval_args": {"n_edits": None, "loc_per_edit": "all", "n_test_probe": 9}}, "n_test_probe"),
                            ("f.json", {"data_fingerprint": "y"}, "data_fingerprint")):
        with pytest.raises(ValueError, match=f"differs.*{key}"):
            merge_reports([a, save(name, label="other", **over)], tmp_path / "m.json")
    merge_reports([a, save("b.json", label="ft_lr")], tmp_path / "m.json")  # b has no fingerprint: not compared
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [e["label"] for e in merged["entries"]] == ["ft", "ft_lr"]
    assert merged["eval_args"]["loc_per_edit"] == "all", "a merged report can be merged again"
    assert "data_fingerprint" not in merged, "b's data is unknown: the merge claims no fingerprint"
    with pytest.raises(ValueError, match="two entries labelled 'ft'"):
        merge_reports([a, a], tmp_path / "twice.json")


def test_a_sharded_training_config_evaluates_with_the_whole_base(capsys):
    """The sharded base is a meta-training strategy: eval.py, given that config, uses the default one."""
    printed = _print_config(Path(__file__).parents[1] / "configs" / "mend_zsre_llama_sharded.yaml", capsys)
    assert printed["strategy"] == "auto"
