"""The lifelong editor: its stream objective, the two-pass meta-gradient, backtracking, meta-training
through train.py (DDP, resume), its files and refusals."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

import train
from editors.base import EditorContext, build_editor
from editors.io import EditorFileError
from editors.layers import dense_edit
from editors.losses import forward_logits, kl_pre_post, nll
from editors.malmen import MALMEN
from editors.mend import MEND
from editors.rledit import RLEdit
from lightning_modules.editor_module import join_problems, split_problems
from lightning_modules.rledit_module import backtrack_rows, run_stream, step_rows, stream_meta_gradients
from test_malmen import PROMPTS, TARGETS, _batch, bases  # noqa: F401 (bases: the shared tiny base fixture)
from test_malmen import _trained_looking as _trained_looking_malmen_nets
from test_train import QUIET, ROOT, assert_runs_equal, check_resume_equals_unbroken, csv_logger, start_train

pytestmark = pytest.mark.usefixtures("one_thread")

LOC_Q = ["What is the capital of Zed?", "Who wrote Yon?", "Where is Mount Ox?", "What colour is Teal?"]
COEFS = {"edit": 0.1, "back": 0.3, "kl": 1.0, "norm": 0.05, "gamma": 0.8, "n_back": 2}


def _stream_batch(tokenizer, model, family: str, P: int = 2) -> dict:
    """``P`` streams of ``6 / P`` edits (rows grouped by stream), one paraphrase and 2 locality inputs per edit."""
    inner = _batch(tokenizer, model, family, PROMPTS, TARGETS)
    outer = _batch(tokenizer, model, family, [p.replace("Where", "In which place") for p in PROMPTS], TARGETS)
    loc = _batch(tokenizer, model, family, LOC_Q * 3, ["Arvenna", "painter", "Orvic", "farmer"] * 3)
    return {"n_problems": P, "edit_inner": inner, "edit_outer": outer, "loc": loc, "family": family}


def _trained_looking(editor: RLEdit, model, batch) -> RLEdit:
    """Non-identity networks, input statistics and a step size that changes answers."""
    torch.manual_seed(1)
    with torch.no_grad():
        for net in editor.nets:
            for p in (net.U, net.b, net.scale, net.shift):
                p.add_(0.2 * torch.randn_like(p))
        editor.edit_lrs.fill_(0.05)
    editor.fold_statistics(editor.pieces(model, batch["edit_inner"], batch["family"]), 1)
    return editor


@pytest.fixture(params=["causal", "classifier"])
def setup(tiny_models, tokenizer, request):
    model = tiny_models[request.param].double()
    batch = _stream_batch(tokenizer, model, request.param)
    editor = _trained_looking(RLEdit.for_model(model, rank=8, precondition_ridge=1.0).double(), model, batch)
    return model, batch, editor


def _trained_looking_malmen(model, batch) -> MALMEN:
    """A MALMEN stream editor: non-identity networks and statistics, key statistics, a key memory that
    counts (mu 3) and step sizes that change answers."""
    fam = batch["family"]
    editor = MALMEN.for_model(model, rank=8, key_cov_weight=100.0, memory_weight=3.0).double()
    editor = _trained_looking_malmen_nets(editor, model, batch["edit_inner"], fam)
    editor.fold_keys(model, batch["loc"], fam)
    with torch.no_grad():
        editor.edit_lrs.fill_(1.0)
    return editor


@pytest.fixture(params=[("causal", "rledit"), ("classifier", "rledit"), ("causal", "malmen"), ("classifier", "malmen")],
                ids="-".join)
def stream_setup(tiny_models, tokenizer, request):
    """Either stream editor (MEND's networks, or MALMEN's least-squares change with a key memory)."""
    family, kind = request.param
    model = tiny_models[family].double()
    batch = _stream_batch(tokenizer, model, family)
    if kind == "malmen":
        return model, batch, _trained_looking_malmen(model, batch)
    return model, batch, _trained_looking(RLEdit.for_model(model, rank=8, precondition_ridge=1.0).double(), model, batch)


def test_each_step_edits_the_model_the_earlier_steps_left(stream_setup):
    """Step t's pieces are those of the base with steps 1..t-1 merged in (recomputed here stream by stream,
    the changes written into a copy of the model), which differ from the base's own; the stream's final
    change is the sum of the merged ones (MALMEN's steps each solved with the stream's own key memory)."""
    model, batch, editor = stream_setup
    P, T, fam = 2, 3, batch["family"]
    a = run_stream(editor, model, batch, fam, T, COEFS, seeds=[0, 1])
    inner = batch["edit_inner"]
    for b in range(P):
        work = copy.deepcopy(model)
        params = dict(work.named_parameters())
        memory = None
        for t in range(T):
            mine = {k: v[b:b + 1] for k, v in step_rows(inner, P, T, t).items()}
            p = editor.pieces(work, mine, fam)
            for k, (u, d) in p.items():
                n = u.shape[0]
                torch.testing.assert_close(a["pieces"][t][k][0][b * n:(b + 1) * n], u)
                torch.testing.assert_close(a["pieces"][t][k][1][b * n:(b + 1) * n], d)
            if t:
                k = editor.layers[0].name
                assert not torch.allclose(editor.pieces(model, mine, fam)[k][1], p[k][1]), \
                    "a later step's gradient must be the edited model's, not the base's"
            with torch.no_grad():
                for k, v in editor.step_deltas(p, 1, memory).items():
                    params[k].add_(v[0])
            memory = editor.remember(p, 1, memory)
        base = dict(model.named_parameters())
        for k, v in a["D"].items():
            torch.testing.assert_close(base[k] + v[b], params[k])


@pytest.mark.parametrize("polyak", [0.0, 2.0])
@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_malmen_stream_steps_are_evaluations_edits_with_the_key_memory(tiny_models, tokenizer, family, polyak):
    """A MALMEN training stream makes, step by step, the edits evaluation makes: ``MALMEN.make_edit`` (under
    ``PolyakStep`` with ``polyak``) on a working copy, merged in, so that the copy's key memory grows as a
    deployed stream's does. Without the memory the stream's changes differ."""
    from editors.until_right import PolyakStep

    model = tiny_models[family].double()
    batch = _stream_batch(tokenizer, model, family)
    editor = _trained_looking_malmen(model, batch).eval()
    P, T = 2, 3
    coefs = {**COEFS, "polyak": polyak, "polyak_max": 1.0}
    a = run_stream(editor, model, batch, family, T, coefs, seeds=[0, 1], with_grad=False)
    rule = PolyakStep(editor, fraction=polyak, max_scale=1.0) if polyak else editor
    base = dict(model.named_parameters())
    for b in range(P):
        work = copy.deepcopy(model)
        for t in range(T):
            mine = {k: v[b:b + 1] for k, v in step_rows(batch["edit_inner"], P, T, t).items()}
            rule.make_edit(work, mine, family).merge_(work)
        params = dict(work.named_parameters())
        for k, v in a["D"].items():
            torch.testing.assert_close(base[k] + v[b], params[k])
    editor.memory_weight = 0.0
    forgetful = run_stream(editor, model, batch, family, T, coefs, seeds=[0, 1], with_grad=False)["D"]
    assert any(not torch.allclose(forgetful[k], a["D"][k]) for k in a["D"]), "the key memory changes later steps"


def test_a_malmen_stream_of_one_step_is_malmens_objective(tiny_models, tokenizer):
    """T = 1, no norm penalty: the loss and gradient of MALMEN's memory-decoupled meta-training objective
    (each problem's edits solved together; nothing remembered yet)."""
    from lightning_modules.malmen_module import decoupled_meta_gradients

    model = tiny_models["causal"].double()
    batch = _stream_batch(tokenizer, model, "causal")
    editor = _trained_looking_malmen(model, batch)
    coefs = {**COEFS, "norm": 0.0, "gamma": 1.0}
    grads, logs = stream_meta_gradients(editor, model, batch, "causal", 1, coefs, seeds=[0, 0], update_statistics=False)
    ref, ref_logs = decoupled_meta_gradients(editor, model, batch, "causal", c_edit=0.1, c_loc=1.0, update_statistics=False)
    assert float(logs["loss"]) == pytest.approx(float(ref_logs["loss"]), rel=1e-6)  # the reference logs in float32
    for (name, _), g, r in zip(editor.named_parameters(), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-10, msg=name)
    assert max(float(g.abs().max()) for g in grads) > 0


def test_backtracking_draws_only_earlier_steps_of_the_same_stream():
    P, T, k = 3, 4, 2
    n = T * k
    inner = {"input_ids": torch.arange(P * n).unsqueeze(1), "labels": torch.arange(P * n).unsqueeze(1)}
    assert backtrack_rows(inner, P, T, 0, 4, [5, 6, 7]) is None
    for t in range(1, T):
        rows = backtrack_rows(inner, P, T, t, 3, [5, 6, 7])["input_ids"].view(P, -1)
        assert rows.shape[1] == min(3, t * k)
        for b in range(P):
            assert all(b * n <= int(r) < b * n + t * k for r in rows[b]), (t, b, rows[b])
            assert len(set(rows[b].tolist())) == rows.shape[1], "without replacement"
    again = backtrack_rows(inner, P, T, 3, 3, [5, 6, 7])["input_ids"]
    assert torch.equal(again, backtrack_rows(inner, P, T, 3, 3, [5, 6, 7])["input_ids"]), "seeded"


@pytest.mark.parametrize("max_scale", [1.0, 1e9])
def test_polyak_streams_train_the_rule_evaluation_applies(setup, max_scale):
    """With ``polyak`` set, each stream step's change is the one evaluation's ``rledit_polyak`` makes on the
    model the earlier steps left (``PolyakStep`` around the editor, applied stream by stream on a merged
    copy): the scale from the step's edit loss and pieces equals the one from plain autograd there."""
    from editors.until_right import PolyakStep

    model, batch, editor = setup
    P, T, fam = 2, 3, batch["family"]
    coefs = {**COEFS, "polyak": 2.0, "polyak_max": max_scale}
    a = run_stream(editor.eval(), model, batch, fam, T, coefs, seeds=[0, 1])
    plain = run_stream(editor, model, batch, fam, T, COEFS, seeds=[0, 1])
    assert plain["scales"] == [None] * T
    rule = PolyakStep(editor, fraction=2.0, max_scale=max_scale)
    for b in range(P):
        work = copy.deepcopy(model)
        params = dict(work.named_parameters())
        for t in range(T):
            mine = {k: v[b:b + 1] for k, v in step_rows(batch["edit_inner"], P, T, t).items()}
            change = rule.deltas(work, mine, fam)
            assert rule.last_scale == pytest.approx(float(a["scales"][t][b]), rel=1e-6)
            with torch.no_grad():
                for k, v in change.items():
                    params[k].add_(v)
        base = dict(model.named_parameters())
        for k, v in a["D"].items():
            torch.testing.assert_close(base[k] + v[b], params[k])
    scales = torch.stack(a["scales"])
    assert bool((scales <= max_scale).all()) and bool((scales != 1).any()), "the rule rescaled some steps"


@pytest.mark.parametrize("first,polyak", [(0, 0.0), (1, 0.0), (0, 2.0)])
def test_two_pass_meta_gradient_equals_autograd_through_the_whole_stream(stream_setup, first, polyak):
    """Passes A and B (stream without the editor's graph, then one step's graph at a time with the
    summed later-step gradients) equal autograd through one graph over the whole discounted stream
    objective (pieces constants, as in MEND), for 2 streams of 3 steps with backtracking and the norm;
    with a burn-in (``first`` 1), step 1 edits the model as a constant and is not scored; with ``polyak``
    each step's change is scaled by its Polyak scale, a constant of the step. MALMEN: through every
    step's solve (its ridges included), the earlier steps' keys in it as constants."""
    model, batch, editor = stream_setup
    P, T, fam = 2, 3, batch["family"]
    ref = copy.deepcopy(editor)
    coefs = {**COEFS, "polyak": polyak, "polyak_max": 1e9}
    grads, logs = stream_meta_gradients(editor, model, batch, fam, T, coefs, seeds=[3, 4], update_statistics=False,
                                        steps=range(first, T))
    scales = run_stream(copy.deepcopy(ref), model, batch, fam, T, coefs, seeds=[3, 4], with_grad=False)["scales"]

    inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
    w = torch.tensor([COEFS["gamma"] ** t for t in range(T - first)], dtype=torch.float64)
    w = w / w.sum()
    D, total, memory = None, torch.zeros((), dtype=torch.float64), None
    for t in range(T):
        i_t, o_t, l_t = step_rows(inner, P, T, t), step_rows(outer, P, T, t), step_rows(loc, P, T, t)
        if D is None:
            p = ref.pieces(model, i_t, fam)
        else:
            with dense_edit(model, ref.layers, {k: v.detach() for k, v in D.items()}):
                p = ref.pieces(model, i_t, fam)
        dW = ref.step_deltas(p, P, memory)
        memory = ref.remember(p, P, memory)
        if polyak:
            dW = {k: v * scales[t].view(-1, 1, 1).to(v.dtype) for k, v in dW.items()}
        if t < first:
            dW = {k: v.detach() for k, v in dW.items()}
        D = dW if D is None else {k: D[k] + dW[k] for k in D}
        if t < first:
            continue
        back = backtrack_rows(inner, P, T, t, 2, [3, 4])
        parts = [o_t, l_t] + ([back] if back is not None else [])
        with dense_edit(model, ref.layers, D):
            post = split_problems(forward_logits(model, join_problems(parts, P), fam), parts, P, fam)
        with torch.no_grad():
            pre = forward_logits(model, l_t, fam)
        loss = 0.1 * nll(post[0], o_t["labels"], fam) + kl_pre_post(pre, post[1], l_t, fam).mean()
        loss = loss + 0.05 * sum((d ** 2).sum() for d in D.values()) / P
        if back is not None:
            loss = loss + 0.3 * nll(post[2], back["labels"], fam)
        total = total + w[t - first] * loss
    total.backward()
    assert float(logs["loss"]) == pytest.approx(float(total), rel=1e-9)
    assert float(logs["back"]) > 0 and float(logs["norm"]) > 0
    for (name, p), g in zip(ref.named_parameters(), grads):
        assert p.grad is not None, name
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-12, msg=name)
    assert max(float(g.abs().max()) for g in grads) > 0


def test_a_stream_of_one_step_is_mends_objective(setup):
    """T = 1, no norm penalty: the same loss and gradient as MEND's meta-training objective (c_edit NLL on
    the paraphrases + c_loc KL on the locality inputs, each problem edited by its own change)."""
    model, batch, editor = setup
    fam, P = batch["family"], 2
    coefs = {**COEFS, "norm": 0.0, "gamma": 1.0}
    grads, logs = stream_meta_gradients(editor, model, batch, fam, 1, coefs, seeds=[0, 0], update_statistics=False)
    mend = MEND(editor.layers, rank=8, precondition_ridge=1.0).double()
    mend.load_state_dict(editor.state_dict())
    mend.eval()  # the statistics as they are (the stream folds them after its step)
    inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
    deltas = mend.to_deltas(mend.batched_factors(model, inner, fam, P))
    with torch.no_grad():
        pre = forward_logits(model, loc, fam)
    with dense_edit(model, mend.layers, deltas):
        post = split_problems(forward_logits(model, join_problems([outer, loc], P), fam), [outer, loc], P, fam)
    loss = 0.1 * nll(post[0], outer["labels"], fam) + kl_pre_post(pre, post[1], loc, fam).mean()
    loss.backward()
    assert float(logs["loss"]) == pytest.approx(float(loss), rel=1e-9)
    for (name, p), g in zip(mend.named_parameters(), grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-12, msg=name)


def test_editor_file_is_its_own_and_refuses_another_base(setup, tiny_models, tmp_path):
    model, _, editor = setup
    path = editor.save(tmp_path / "rledit.safetensors", model)
    loaded = build_editor({"class_path": "editors.rledit.RLEdit", "init_args": {"path": str(path)}}, EditorContext(model))
    assert isinstance(loaded, RLEdit) and torch.equal(loaded.edit_lrs, editor.edit_lrs.float())
    with pytest.raises(EditorFileError, match="holds a RLEdit editor, not MEND"):
        MEND.load(path, model)
    other = copy.deepcopy(model)
    with torch.no_grad():
        dict(other.named_parameters())[editor.layers[0].name].add_(1.0)
    with pytest.raises(ValueError, match="was trained for base model"):
        RLEdit.load(path, other)


def test_descent_only_leaves_layers_with_a_negative_step_size_unedited(setup, tmp_path):
    """``descent_only`` (an evaluation option): a layer whose learned step size is negative gets no change,
    the others the same change as without it."""
    model, batch, editor = setup
    with torch.no_grad():
        editor.edit_lrs[0] = -0.05
    path = editor.save(tmp_path / "rledit.safetensors", model)
    ctx = EditorContext(model)
    plain, descent = (build_editor({"class_path": "editors.rledit.RLEdit", "init_args": {"path": str(path), **kw}}, ctx)
                      for kw in ({"descent_only": False}, {}))  # the default is descent_only
    a, b = (e.double().deltas(model, batch["edit_inner"], batch["family"]) for e in (plain, descent))
    first = editor.layers[0].name
    assert a[first].abs().max() > 0 and torch.count_nonzero(b[first]) == 0
    for k in a.keys() - {first}:
        torch.testing.assert_close(a[k], b[k])


# -- meta-training through train.py
def rledit_args(bases: Path, out: Path, *extra: str, config: str = "rledit_zsre_gpt2_tiny.yaml") -> list[str]:
    data, base = bases / "base_causal" / "data", bases / "base_causal" / "model"
    return ["--config", str(ROOT / "configs" / config),
            "--model.init_args.base_model", str(base), "--model.init_args.rank", "16",
            "--model.init_args.init_editor", "null", "--model.init_args.output_dir", str(out),
            "--data.init_args.train_path", str(data / "zsre-train.jsonl"),
            "--data.init_args.val_path", str(data / "zsre-val.jsonl"),
            "--data.init_args.test_path", str(data / "zsre-test.jsonl"),
            "--data.init_args.loc_path", str(data / "nq-loc.jsonl"), "--data.init_args.tokenizer", str(base),
            "--data.init_args.n_edits", "3", "--data.init_args.batch_size", "1", "--data.init_args.loc_per_edit", "2",
            "--model.init_args.init_edit_lr", "0.01", "--model.init_args.c_norm", "0.01", "--model.init_args.window", "2",
            "--trainer.default_root_dir", str(out), "--trainer.callbacks", "[]",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--data.init_args.val_limit", "6",
            "--trainer.enable_checkpointing", "false", *QUIET, *extra]


# streams of 3 edits are dealt to the processes whole (the sampler's blocks), so the 2-process run
# sees the streams the 1-process run sees
DDP_COMMON = ["--data.init_args.shuffle", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0"]


# the MALMEN stream module's job: key statistics folded each step, a key memory, a step that moves answers
MALMEN_STREAM = {"config": "malmen_stream_zsre_gpt2_tiny.yaml",
                 "extra": ["--model.init_args.key_cov_weight", "1000", "--model.init_args.memory_weight", "3",
                           "--model.init_args.init_edit_lr", "0.5"], "class": "MALMEN"}
KINDS = {"rledit": {"config": "rledit_zsre_gpt2_tiny.yaml", "extra": [], "class": "RLEdit"}, "malmen": MALMEN_STREAM}


def kind_args(bases: Path, kind: str):
    """``rledit_args`` for the module of ``kind`` (``rledit``: RLEdit; ``malmen``: MALMEN over streams)."""
    k = KINDS[kind]
    return lambda out, *extra: rledit_args(bases, out, *k["extra"], *extra, config=k["config"])


@pytest.fixture(scope="module", params=list(KINDS))
def ddp_run(bases, tmp_path_factory, child_env, request):
    out = tmp_path_factory.mktemp("ddp")
    proc = start_train(kind_args(bases, request.param)(out, *DDP_COMMON, "--trainer.devices", "2", "--trainer.strategy",
                                                       "ddp", *csv_logger(out)), out, child_env)
    yield request.param, out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ddp_two_processes_equal_one_process_same_global_batch(bases, ddp_run, tmp_path):
    """2 CPU processes (gloo) x 1 stream per step == 1 process x 2 streams: the same editor after 3 steps
    (networks, step sizes, input statistics; MALMEN's ridges and key statistics) and the same validation
    metrics (streams of 3 edits)."""
    kind, ddp, proc = ddp_run
    single = tmp_path / "single"
    train.main(kind_args(bases, kind)(single, *DDP_COMMON, "--data.init_args.batch_size", "2", "--trainer.devices", "1",
                                      *csv_logger(single)))
    assert proc.wait(timeout=600) == 0, (ddp / "train.log").read_text()[-3000:]
    a = assert_runs_equal(single, ddp, KINDS[kind]["class"], "val/edit_retention")
    assert a["nets.0.U"].abs().max() > 0 and a["norms.0.count"].min() > 0, "the networks and statistics moved"
    if kind == "malmen":
        assert a["key_count"].min() > 0 and not torch.equal(a["log_ridges"], torch.zeros_like(a["log_ridges"]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_equals_uninterrupted_run(bases, tmp_path, kind):
    check_resume_equals_unbroken(kind_args(bases, kind), tmp_path, KINDS[kind]["class"], "edit_lrs")


def test_malmen_stream_training_starts_from_a_malmen_file_and_writes_one_with_its_memory(bases, tmp_path):
    """The module starts from a MALMEN file of the same shape (not from one without key statistics) and
    writes a MALMEN file that evaluation loads with the module's ``memory_weight``."""
    from editors.io import load_editor_file

    model = train_model(bases)
    layers = yaml.safe_load((ROOT / "configs" / MALMEN_STREAM["config"]).read_text())["model"]["init_args"]["edit_params"]
    for cov, name in ((1000.0, "cov"), (0.0, "plain")):
        start = MALMEN.for_model(model, layers, rank=16, key_cov_weight=cov, init_edit_lr=0.123)
        start.save(tmp_path / f"{name}.safetensors", model)
    out = tmp_path / "out"
    train.main(kind_args(bases, "malmen")(out, "--model.init_args.init_editor", str(tmp_path / "cov.safetensors")))
    trained = MALMEN.load(out / "editor.safetensors", model)
    assert trained.memory_weight == 3.0 and trained.key_cov_weight == 1000.0
    assert load_editor_file(out / "editor.safetensors", "MALMEN")[1]["config"]["memory_weight"] == 3.0
    with pytest.raises(ValueError, match="hold different tensors: .*key_count"):
        train.main(kind_args(bases, "malmen")(tmp_path / "b", "--model.init_args.init_editor",
                                              str(tmp_path / "plain.safetensors")))
    with pytest.raises(ValueError, match="holds a MEND editor; this module starts from MALMEN"):
        mend = MEND.for_model(model, layers, rank=16)
        train.main(kind_args(bases, "malmen")(tmp_path / "c", "--model.init_args.init_editor",
                                              str(mend.save(tmp_path / "mend.safetensors", model))))


def test_refusals(bases, tmp_path):
    with pytest.raises(MisconfigurationException, match="not a multiple of edits_per_step"):
        train.main(rledit_args(bases, tmp_path / "a", "--model.init_args.edits_per_step", "2"))
    with pytest.raises(MisconfigurationException, match="window 4 is longer than the streams' 3 steps"):
        train.main(rledit_args(bases, tmp_path / "w", "--model.init_args.window", "4"))
    with pytest.raises(MisconfigurationException, match="shorten the streams"):
        train.main(rledit_args(bases, tmp_path / "b", "--data.init_args.n_edits", "100000"))
    mend = MEND.for_model(train_model(bases), rank=8)
    path = mend.save(tmp_path / "mend.safetensors", train_model(bases))
    with pytest.raises(ValueError, match=r"another shape than this editor: .*'rank'"):
        train.main(rledit_args(bases, tmp_path / "c", "--model.init_args.init_editor", str(path)))


def train_model(bases: Path):
    from lightning_modules.models import load_model
    return load_model(str(bases / "base_causal" / "model"), "causal")


@pytest.mark.parametrize("start", [MEND, RLEdit])
def test_meta_training_starts_from_a_mend_or_a_lifelong_editor_file(bases, tmp_path, start):
    from lightning_modules.rledit_module import RLEditModule

    model = train_model(bases)
    layers = [r"transformer\.h\.[0-2]\.mlp\.c_(fc|proj)\.weight"]
    editor = start.for_model(model, layers, rank=16, precondition_ridge=1.0)
    with torch.no_grad():
        editor.edit_lrs.fill_(0.123)
    path = editor.save(tmp_path / "start.safetensors", model)
    module = RLEditModule(base_model=str(bases / "base_causal" / "model"), edit_params=layers, rank=16,
                          precondition_ridge=1.0, init_editor=str(path))
    assert torch.equal(module.editor.edit_lrs, editor.edit_lrs) and module.editor.name == "rledit"


def test_descent_only_meta_training_keeps_the_step_sizes_non_negative(bases, tmp_path):
    """With ``descent_only`` an optimizer step that takes a step size below 0 leaves it at 0; without, the
    step sizes of an editor started negative stay negative over the same 3 steps."""
    from editors.io import load_editor_file

    model = train_model(bases)
    layers = yaml.safe_load((ROOT / "configs" / "rledit_zsre_gpt2_tiny.yaml").read_text())["model"]["init_args"]["edit_params"]
    start = RLEdit.for_model(model, layers, rank=16, precondition_ridge=1.0)  # the shape the config trains
    with torch.no_grad():
        start.edit_lrs.fill_(-0.05)
    path = start.save(tmp_path / "start.safetensors", model)
    lrs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        train.main(rledit_args(bases, out, "--model.init_args.init_editor", str(path),
                               "--model.init_args.descent_only", flag))
        lrs[flag] = load_editor_file(out / "editor.safetensors", "RLEdit")[0]["edit_lrs"]
    assert float(lrs["false"].max()) < 0 and float(lrs["true"].min()) >= 0


def test_validation_scores_a_short_last_stream(bases):
    """A split's last problem may be shorter than the training streams (kept whole by the loader):
    validation runs it as a stream of its own length."""
    from datamodules.encoding import load_tokenizer
    from lightning_modules.rledit_module import RLEditModule

    base = str(bases / "base_causal" / "model")
    module = RLEditModule(base_model=base, rank=16, precondition_ridge=1.0)
    batch = _stream_batch(load_tokenizer(base), module.model, "causal", P=1)
    batch = {**{k: v for k, v in batch.items() if k != "family"}, "index": list(range(6))}
    module._validate(batch)  # 6 edits, while no training stream length is known: a stream of 6 steps
    assert module.val["edit_retention"].compute().isfinite()
