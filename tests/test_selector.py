"""The meta-trained surgery selector (editors/selector.py, lightning_modules/selector_module.py): the budget
holds (counted on the merged model), the straight-through relaxation's gradient reaches the scorer, the
per-problem dense edit equals the merged model, editor files round-trip and refuse what they must, the
untrained selector is built for evaluation without a file, and train.py meta-trains it: a smoke run that
writes the editor, training that lowers the validation meta-loss and raises validation edit success, 2 DDP
processes equal to 1 process on the same global batch, and a resumed run equal to an unbroken one."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import train
from datamodules.encoding import collate, encode
from editors.base import EditorContext, WeightDelta
from editors.io import CHECKPOINT_KEY, EditorFileError, load_editor_file
from editors.losses import forward_logits, kl_pre_post, nll
from editors.layers import dense_edit
from editors.mend import MEND
from editors.selector import Selector
from lightning_modules.models import decoder_start_id
from test_train import _val_metrics as val_metrics
from test_train import assert_runs_equal, base_args, check_resume_equals_unbroken, csv_logger, start_train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
PROMPTS = ["Where was Foo born?", "What is the occupation of Bar?", "Which language does Baz speak?",
           "Where was Qux born?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def edit_batch(model, tokenizer, family: str, k: int = 2):
    targets = ["Arvenna", "painter", "Orvic", "Bellmoor"] if family != "classifier" else ["SUPPORTS", "REFUTES"] * 2
    return collate(encode(tokenizer, family, PROMPTS[:k], targets[:k]), tokenizer.pad_token_id, family,
                   decoder_start_id(model))


def n_differ(a, b) -> int:
    """Scalar weights of ``a`` that differ from ``b``'s, over every parameter (counted, not assumed)."""
    pb = dict(b.named_parameters())
    return sum(int((p != pb[k]).sum()) for k, p in a.named_parameters())


def scrambled(selector: Selector, seed: int = 0) -> Selector:
    """The selector with random scorer parameters, as a trained one could have (any scores at all)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in selector.named_parameters():
            if name != "log_edit_lrs":
                p.add_(torch.randn(p.shape, generator=g))
    return selector


# -- the editor
@pytest.mark.parametrize("family,n,until_right,rule", [("causal", 37, 0, "gradient"), ("causal", 1000, 4, "gradient"),
                                                       ("causal", 1000, 4, "polyak"), ("seq2seq", 50, 0, "polyak"),
                                                       ("classifier", 25, 2, "gradient")])
def test_never_changes_more_than_n_weights(tiny_models, tokenizer, family, n, until_right, rule):
    model = tiny_models[family]
    batch = edit_batch(model, tokenizer, family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(n_params=n, init_edit_lr=5.0 if rule == "gradient" else 0.5, until_right_steps=until_right, step_rule=rule)
    for sel in (Selector.for_model(model, **kw), scrambled(Selector.for_model(model, **kw))):
        edit = sel.eval().make_edit(model, batch, family)
        changed = n_differ(WeightDelta(edit.deltas).merged(model), model)
        assert 0 < changed <= n, changed
        assert edit.params_changed(model) == changed
        assert sum(int((d != 0).sum()) for d in edit.deltas.values()) <= n
        if until_right:
            assert sel.last_steps > 0, "the extra masked steps ran"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the base model was modified: {k}"


def test_untrained_selector_picks_the_largest_gradients(tiny_models, tokenizer):
    """With the scorer at its initial state (all but ``log|G|`` near zero) the selection is close to
    the paper's "largest |gradient|" rule, and the change is a masked descent step."""
    model = tiny_models["causal"]
    batch = edit_batch(model, tokenizer, "causal")
    sel = Selector.for_model(model, n_params=100, init_edit_lr=1.0).eval()
    with torch.no_grad():
        for net in (sel.row_net, sel.col_net):
            net[2].weight.zero_()
    deltas = sel.deltas(model, batch, "causal")
    model.zero_grad()
    (2 * nll(forward_logits(model, batch, "causal"), batch["labels"], "causal")).backward()
    params = dict(model.named_parameters())
    grads = torch.cat([params[k].grad.flatten() for k in deltas])
    model.zero_grad(set_to_none=True)
    got = torch.cat([d.flatten() for d in deltas.values()])
    top = grads.abs().topk(100).indices
    torch.testing.assert_close(got[top], -grads[top], rtol=1e-4, atol=1e-7)
    assert int((got != 0).sum()) == 100


@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_polyak_step_removes_the_fraction_lr_of_each_problems_loss_to_first_order(tiny_models, tokenizer, family):
    """``step_rule="polyak"``: each problem's change ``D`` satisfies ``<D, G> = -lr * L`` (``G``: the gradient of
    the problem's edit loss ``L``, computed here by plain autograd), whatever the size of ``G``; the gradient
    rule's change is ``-lr * M * G``, so its first-order decrease grows with ``|G|^2``."""
    model = tiny_models[family]
    batch = edit_batch(model, tokenizer, family, k=4)
    lr = 0.7
    rules = {r: scrambled(Selector.for_model(model, n_params=300, init_edit_lr=lr, step_rule=r)).eval()
             for r in ("polyak", "gradient")}
    with torch.no_grad():
        deltas = {r: sel.batched_deltas(model, batch, family, 2) for r, sel in rules.items()}
    params = dict(model.named_parameters())
    for b in range(2):
        rows = {k: v[2 * b:2 * b + 2] for k, v in batch.items()}
        model.zero_grad()
        loss = 2 * nll(forward_logits(model, rows, family), rows["labels"], family)  # the sum over its 2 edits
        loss.backward()
        inner = {r: sum(float((d[k][b] * params[k].grad).sum()) for k in d) for r, d in deltas.items()}
        masked_norm2 = sum(float(params[k].grad[deltas["gradient"][k][b] != 0].pow(2).sum()) for k in deltas["gradient"])
        assert inner["polyak"] == pytest.approx(-lr * float(loss), rel=1e-3)
        assert inner["gradient"] == pytest.approx(-lr * masked_norm2, rel=1e-3)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="step_rule must be one of"):
        Selector.for_model(model, step_rule="newton")


def meta_loss(sel: Selector, model, tokenizer, P: int = 2):
    """MEND's meta-objective on ``P`` problems: NLL of the edited model on the edits' other wording
    (here the edit batch itself) + KL on unrelated inputs, the edit applied per problem."""
    fam = "causal"
    batch = edit_batch(model, tokenizer, fam, k=2 * P)
    loc = collate(encode(tokenizer, fam, ["Who wrote Zed?", "Where is Lum?"] * P, ["Arvenna", "Orvic"] * P),
                  tokenizer.pad_token_id, fam)
    with torch.no_grad():
        pre = forward_logits(model, loc, fam)
    deltas = sel.batched_deltas(model, batch, fam, P)
    with dense_edit(model, sel.layers, deltas):
        post_edit, post_loc = forward_logits(model, batch, fam), forward_logits(model, loc, fam)
    return 0.1 * nll(post_edit, batch["labels"], fam) + kl_pre_post(pre, post_loc, loc, fam).mean(), deltas


def test_relaxation_gradient_reaches_every_selector_parameter(tiny_models, tokenizer):
    model = tiny_models["causal"].requires_grad_(False)  # frozen, as in meta-training
    sel = Selector.for_model(model, n_params=200, init_edit_lr=5.0).train()
    loss, deltas = meta_loss(sel, model, tokenizer)
    loss.backward()
    for name, p in sel.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters()), "no gradient on the base model"
    # straight-through: the value is the hard top-n edit, exactly what the editor applies at evaluation
    with torch.no_grad():
        hard = sel.batched_deltas(model, edit_batch(model, tokenizer, "causal", k=4), "causal", 2)
    for k in deltas:
        assert torch.equal(deltas[k].detach(), hard[k]), k
        assert int((hard[k] != 0).flatten(1).sum(1).max()) <= 200


def test_dense_edit_per_problem_equals_the_merged_model(tiny_models, tokenizer):
    model = tiny_models["causal"]
    sel = scrambled(Selector.for_model(model, n_params=300, init_edit_lr=5.0)).eval()
    batch = edit_batch(model, tokenizer, "causal", k=4)
    with torch.no_grad():
        deltas = sel.batched_deltas(model, batch, "causal", 2)
        with dense_edit(model, sel.layers, deltas):
            together = forward_logits(model, batch, "causal")
        for b in range(2):
            rows = {k: v[2 * b:2 * b + 2] for k, v in batch.items()}
            merged = WeightDelta({k: v[b] for k, v in deltas.items()}).merged(model)
            alone = forward_logits(merged, rows, "causal")
            torch.testing.assert_close(together[2 * b:2 * b + 2], alone, rtol=1e-5, atol=1e-5)
            # problem b's edit computed alone is the same edit
            single = sel.deltas(model, rows, "causal")
            for k in single:
                torch.testing.assert_close(single[k], deltas[k][b], rtol=1e-5, atol=1e-7)


def test_editor_file_round_trip_and_refusals(tiny_models, tokenizer, tmp_path):
    model = tiny_models["causal"]
    sel = scrambled(Selector.for_model(model, n_params=64, until_right_steps=2))
    path = sel.save(tmp_path / "sel.safetensors", model)
    tensors, header = load_editor_file(path, "Selector")
    assert header["class"] == "Selector" and header["format"] >= 2 and header["config"]["n_params"] == 64
    assert header["fingerprint"]["edited_weights_sha256"]
    loaded = Selector.load(path, model)
    batch = edit_batch(model, tokenizer, "causal")
    a, b = sel.eval().deltas(model, batch, "causal"), loaded.deltas(model, batch, "causal")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # another base model: same architecture, different weights
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n == sel.layers[0].name).add_(0.01)
    with pytest.raises(ValueError, match="was trained for base model"):
        Selector.load(path, other)
    # a truncated file, and a file of another editor class
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(EditorFileError):
            Selector.load(bad, model)
    MEND.for_model(model, rank=4).save(tmp_path / "mend.safetensors", model)
    with pytest.raises(EditorFileError, match="holds a MEND editor, not Selector"):
        Selector.load(tmp_path / "mend.safetensors", model)


def test_the_untrained_selector_for_evaluation(tiny_models, tokenizer, tmp_path):
    """``path`` None: a fresh selector for the context's matrices, the same for the same seed, built without
    touching the global random state; a file's selector takes no settings but until_right_steps."""
    model = tiny_models["causal"]
    ctx = EditorContext(model, seed=5)
    a = Selector.for_evaluation(ctx, None, n_params=64, until_right_steps=2)
    state = torch.random.get_rng_state()
    b = Selector.for_evaluation(ctx, None, n_params=64, until_right_steps=2)
    assert torch.equal(torch.random.get_rng_state(), state), "the evaluation's random state is left alone"
    other = Selector.for_evaluation(EditorContext(model, seed=6), None, n_params=64)
    assert a.name == "selector_untrained" and a.n_params == 64
    assert a.until_right_steps == 2 and other.until_right_steps == 0
    assert [l.name for l in a.layers] == [l.name for l in Selector.for_model(model).layers]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.row_net[2].weight, other.row_net[2].weight), "seeded by the context's seed"
    batch = edit_batch(model, tokenizer, "causal")
    assert 0 < sum(int((d != 0).sum()) for d in a.eval().deltas(model, batch, "causal").values()) <= 64
    path = scrambled(Selector.for_model(model, n_params=64)).save(tmp_path / "sel.safetensors", model)
    loaded = Selector.for_evaluation(ctx, str(path), until_right_steps=3)
    assert loaded.name == "selector" and loaded.until_right_steps == 3 and loaded.config["until_right_steps"] == 3
    with pytest.raises(ValueError, match=r"settings are those of its file.*\['n_params'\]"):
        Selector.for_evaluation(ctx, str(path), n_params=10)


def test_bad_budgets_are_refused(tiny_models):
    model = tiny_models["causal"]
    total = sum(l.d_in * l.d_out for l in Selector.for_model(model).layers)
    for n in (0, -5, 2.5):
        with pytest.raises(ValueError, match="n_params must be a positive integer"):
            Selector.for_model(model, n_params=n)
    with pytest.raises(ValueError, match=f"more than the {total} entries"):
        Selector.for_model(model, n_params=total + 1)
    assert Selector.for_model(model, n_params=total).n_params == total  # every entry: allowed
    with pytest.raises(ValueError, match="until_right_steps"):
        Selector.for_model(model, until_right_steps=-1)


# -- meta-training through train.py
CONFIGS = {"causal": ("selector_zsre_gpt2_tiny", "zsre", "nq-loc.jsonl"),
           "classifier": ("selector_fever_bert_tiny", "fever", "fever-loc.jsonl")}


def selector_args(bases: Path, out: Path, *extra: str, family: str = "causal") -> list[str]:
    cfg, task, loc = CONFIGS[family]
    data, base = bases / f"base_{family}" / "data", bases / f"base_{family}" / "model"
    return ["--config", str(ROOT / "configs" / f"{cfg}.yaml"),
            "--model.init_args.base_model", str(base), "--model.init_args.n_params", "300",
            "--model.init_args.output_dir", str(out),
            "--data.init_args.train_path", str(data / f"{task}-train.jsonl"),
            "--data.init_args.val_path", str(data / f"{task}-val.jsonl"),
            "--data.init_args.test_path", str(data / f"{task}-test.jsonl"),
            "--data.init_args.loc_path", str(data / loc), "--data.init_args.tokenizer", str(base),
            "--trainer.default_root_dir", str(out), "--trainer.callbacks", "[]",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--data.init_args.val_limit", "5",
            "--trainer.enable_checkpointing", "false", *QUIET, *extra]




@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """A tiny GPT-2 QA model and a tiny BERT claim classifier (one epoch on a 30-subject world) through
    train.py, as test_train builds them."""
    tmp = tmp_path_factory.mktemp("bases")
    for family in CONFIGS:
        train.main(base_args(family, tmp))
    return tmp


# DDP comparison: 2 processes x 1 problem per step == 1 process x 2 problems per step
DDP_COMMON = ["--data.init_args.shuffle", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0"]


@pytest.fixture(scope="module")
def ddp_run(bases, tmp_path_factory, child_env):
    """The 2-process run, started in the background (a child process: DDP relaunches its command) while
    the single-process run trains in this one."""
    out = tmp_path_factory.mktemp("ddp")
    proc = start_train(selector_args(bases, out, *DDP_COMMON, "--data.init_args.batch_size", "1", "--trainer.devices",
                                     "2", "--trainer.strategy", "ddp", *csv_logger(out)), out, child_env)
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def single_run(bases, ddp_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single")
    summary = train.main(selector_args(bases, out, *DDP_COMMON, "--data.init_args.batch_size", "2",
                                       "--trainer.devices", "1", *csv_logger(out)))
    return out, summary


def test_meta_training_smoke_run_writes_the_editor(bases, single_run):
    out, summary = single_run
    assert summary["editor"] == str(out / "editor.safetensors")
    tensors, header = load_editor_file(out / "editor.safetensors", "Selector")
    assert not any(k.startswith("model.") for k in tensors), "the selector only, no base weights"
    assert header["config"]["n_params"] == 300
    init = Selector(**header["config"]).state_dict()
    for k in ("unit_prior", "layer_bias", "log_edit_lrs"):  # the parameters with a fixed initial value
        assert not torch.equal(tensors[k], init[k]), f"{k} never trained"
    from lightning_modules.models import load_model

    base = load_model(bases / "base_causal" / "model", "causal")
    assert Selector.load(out / "editor.safetensors", base).n_params == 300
    m = val_metrics(out)
    for k in ("edit_success", "generality", "drawdown", "loss", "params_changed", "loc_kl"):
        assert f"val/{k}" in m, k
    assert 0 < m["val/params_changed"] <= 300
    # exact match counts an answer right only if all its tokens are: never above token accuracy
    assert m["val/edit_success"] <= m["val/edit_success_token_acc"]
    assert m["val/generality"] <= m["val/generality_token_acc"]


@pytest.mark.parametrize("lr,edit_lr_lr", [(1e-2, 2e-2), (1e-2, 0.0), (0.0, 0.0)],
                         ids=["config_rates", "step_sizes_frozen", "lr_0"])
def test_meta_training_lowers_the_meta_loss_and_raises_validation_es(bases, tmp_path, lr, edit_lr_lr):
    """Validation (the tiny world's 11 validation edits with a paraphrase) before and after 60 steps of
    meta-training through train.py's CLI (the config's step rule and rates): the meta-loss falls and edit
    success rises, also with the step sizes frozen, so the learned selection itself helps; at learning
    rate 0 nothing changes, so the comparison measures the training, not the data."""
    from lightning_modules.cli import HypeditCLI

    # validate, fit (with its sanity validation), validate: the metric states reset by the first
    # validation, under inference mode, must still take the fit's validation updates
    cli = HypeditCLI(args=selector_args(bases, tmp_path, "--trainer.max_steps", "60", "--trainer.val_check_interval",
                                        "1000", "--data.init_args.val_limit",
                                        "15", "--model.init_args.lr", str(lr), "--model.init_args.edit_lr_lr",
                                        str(edit_lr_lr)))
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 60
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    if lr == 0:
        assert after == before
        return
    assert after["val/loss"] < before["val/loss"], (before, after)
    assert after["val/edit_success"] > before["val/edit_success"], (before, after)
    lrs = cli.model.editor.log_edit_lrs.detach()
    start = torch.full_like(lrs, math.log(cli.model.hparams.init_edit_lr))
    assert torch.equal(lrs, start) == (edit_lr_lr == 0)


def test_fever_config_meta_trains_the_classifier(bases, tmp_path):
    out = tmp_path / "fever"
    train.main(selector_args(bases, out, *csv_logger(out), family="classifier"))
    from lightning_modules.models import load_model

    base = load_model(bases / "base_classifier" / "model", "classifier")
    sel = Selector.load(out / "editor.safetensors", base)
    assert [l.name.split(".")[-3] for l in sel.layers] == ["intermediate", "output"] * 2  # the family default
    m = val_metrics(out)
    assert 0 < m["val/params_changed"] <= 300 and m["val/loc_kl"] > -1e-6
    # a verdict is one label: exact match and token accuracy are the same label accuracy
    assert m["val/edit_success"] == m["val/edit_success_token_acc"]
    assert m["val/generality"] == m["val/generality_token_acc"]


def test_ddp_two_processes_equal_one_process_same_global_batch(single_run, ddp_run):
    (single, _), (ddp, proc) = single_run, ddp_run
    assert proc.wait(timeout=600) == 0, (ddp / "train.log").read_text()[-3000:]
    a = assert_runs_equal(single, ddp, "Selector", "val/params_changed")
    assert a["unit_prior"].abs().max() > 0, "the scorer trained (the comparison is not of untouched zeros)"


def test_resume_equals_uninterrupted_run(bases, tmp_path):
    """Killed and resumed: the same selector as an unbroken run (editor, Adam state, cosine schedule and data order)."""
    check_resume_equals_unbroken(lambda out, *extra: selector_args(bases, out, *extra), tmp_path, "Selector",
                                 "unit_prior")


def test_export_writes_the_best_monitored_editor(bases, tmp_path):
    """With the config's own callbacks (best by val/loss, latest as last.ckpt, early stopping), the
    exported editor is the best validation's, read from this run's checkpoint."""
    out = tmp_path / "best"
    cbs = yaml.safe_load(open(ROOT / "configs" / "selector_zsre_gpt2_tiny.yaml"))["trainer"]["callbacks"]
    for c in cbs:
        if "dirpath" in c["init_args"]:
            c["init_args"]["dirpath"] = str(out / "checkpoints")
    summary = train.main(selector_args(bases, out, "--trainer.enable_checkpointing", "true", "--trainer.callbacks",
                                       json.dumps(cbs), "--trainer.max_steps", "4", "--trainer.val_check_interval", "1",
                                       "--data.init_args.val_limit", "3"))
    assert summary["monitor"] == "val/loss" and summary["best_checkpoint"]
    best = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
    kept = load_editor_file(out / "editor.safetensors", "Selector")[0]
    for k, v in best["state_dict"].items():
        assert torch.equal(kept[k], v), k
    assert (out / "checkpoints" / "last.ckpt").exists()


def test_checkpoint_for_another_base_is_refused(bases, tiny_models):
    from lightning_modules.selector_module import SelectorModule

    module = SelectorModule(base_model=str(bases / "base_causal" / "model"), n_params=50)
    blob = Selector.for_model(tiny_models["causal"], n_params=50).export(tiny_models["causal"])
    with pytest.raises(ValueError, match="was trained for base model"):
        module.on_load_checkpoint({"state_dict": {}, CHECKPOINT_KEY: blob})
    with pytest.raises(ValueError, match="not a hypedit Selector checkpoint"):
        module.on_load_checkpoint({"state_dict": {}})


@pytest.mark.parametrize("name", ["selector_zsre_gpt2_tiny", "selector_fever_bert_tiny"])
def test_configs_parse_and_monitor_validation_metrics_only(name, capsys):
    cfg = yaml.safe_load(open(ROOT / "configs" / f"{name}.yaml"))
    assert cfg["model"]["class_path"] == "lightning_modules.selector_module.SelectorModule"
    assert cfg["model"]["init_args"]["n_params"] == 1000
    for cb in cfg["trainer"]["callbacks"]:
        mon = cb.get("init_args", {}).get("monitor")
        assert mon is None or mon.startswith("val/"), cb
    with pytest.raises(SystemExit):
        train.main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert "n_params: 1000" in capsys.readouterr().out
