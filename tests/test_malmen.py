"""MALMEN: the least-squares aggregation, its memory-decoupled meta-gradient, meta-training through
train.py (DDP, resume) and its refusals."""
from __future__ import annotations

import copy
import weakref
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

import train
from datamodules.encoding import collate, encode
from editors.base import EditedModel
from editors.io import load_editor_file
from editors.layers import dense_edit, gradient_pieces
from editors.losses import forward_logits, kl_pre_post, nll, scores
from editors.malmen import MALMEN
from lightning_modules.malmen_module import decoupled_meta_gradients, problem_rows
from lightning_modules.models import decoder_start_id, load_model
from test_train import QUIET, ROOT, assert_runs_equal, base_args, check_resume_equals_unbroken, csv_logger, start_train

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Where was Foo born?", "What is the occupation of Bar?", "Which language does Baz speak?",
           "Where was Qux born?", "What is the occupation of Foo?", "Which language does Bar speak?"]
TARGETS = ["Arvenna", "painter", "Orvic", "New Ember", "farmer", "Orvic"]


def _batch(tokenizer, model, family: str, prompts: list[str], targets: list[str]) -> dict:
    if family == "classifier":
        targets = ["SUPPORTS" if i % 2 else "REFUTES" for i in range(len(prompts))]
    return collate(encode(tokenizer, family, prompts, targets), tokenizer.pad_token_id, family, decoder_start_id(model))


def _trained_looking(editor: MALMEN, model, batch, family: str) -> MALMEN:
    """The editor with non-identity networks and input statistics (an untrained one is too special a case)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for net in editor.nets:
            for p in (net.U, net.b, net.scale, net.shift):
                p.add_(0.2 * torch.randn_like(p))
    editor.update_statistics([editor.token_pieces(model, batch, family)])
    return editor


def _step_batch(tokenizer, model, fam: str, P: int = 2) -> dict:
    """A meta-training batch of ``P`` problems of ``6 / P`` edits, their paraphrases and 12 locality inputs."""
    inner = _batch(tokenizer, model, fam, PROMPTS, TARGETS)
    outer = _batch(tokenizer, model, fam, [p.replace("Where", "In which place") for p in PROMPTS], TARGETS)
    loc_q = ["What is the capital of Zed?", "Who wrote Yon?", "Where is Mount Ox?", "What colour is Teal?"] * 3
    loc = _batch(tokenizer, model, fam, loc_q, ["Arvenna", "painter", "Orvic", "farmer"] * 3)
    return {"n_problems": P, "edit_inner": inner, "edit_outer": outer, "loc": loc}


def _cached_and_streamed(model, inner, family: str, **kw) -> tuple[MALMEN, MALMEN]:
    """Two float64 editors in the same (trained-looking) state, caching the pieces and recomputing them."""
    cached = _trained_looking(MALMEN.for_model(model, **kw, cache_pieces=True).double(), model, inner, family)
    streamed = MALMEN.for_model(model, **kw).double()  # the default
    streamed.load_state_dict(cached.state_dict())
    assert cached.cache_pieces and not streamed.cache_pieces and streamed.config["cache_pieces"] is False
    return cached, streamed


@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_aggregated_change_solves_the_normal_equation(tiny_models, tokenizer, family):
    """Chunked accumulation of U^T U and U^T V and the Cholesky solve give the ridge solution of a direct
    solve over all tokens of all edits at once, in the layer's own weight layout (Conv1D and Linear)."""
    model = tiny_models[family].double()
    batch = _batch(tokenizer, model, family, PROMPTS[:3], TARGETS[:3])
    editor = MALMEN.for_model(model, rank=8, init_ridge=0.3, init_edit_lr=0.1, edit_chunk=2, token_chunk=2).double()
    editor = _trained_looking(editor, model, batch, family)
    got = editor.deltas(model, batch, family)
    rows = batch["input_ids"].shape[0]
    pieces = gradient_pieces(model, editor.layers, lambda: nll(forward_logits(model, batch, family), batch["labels"], family) * rows)
    real = {k: (u[(u != 0).any(-1) & (d != 0).any(-1)], d[(u != 0).any(-1) & (d != 0).any(-1)]) for k, (u, d) in pieces.items()}
    with torch.no_grad():
        V = editor.value_shifts(real)
    lam = editor.ridges()
    for i, l in enumerate(editor.layers):
        U = real[l.name][0]
        assert U.shape[0] > editor.token_chunk, "the test needs several token chunks"
        A = U.T @ U + lam[i] * torch.eye(l.d_in, dtype=U.dtype)
        S = torch.linalg.solve(A, U.T @ V[l.name])
        torch.testing.assert_close(got[l.name], S if l.kind == "conv1d" else S.T)
        S_got = got[l.name] if l.kind == "conv1d" else got[l.name].T
        torch.testing.assert_close(A @ S_got, U.T @ V[l.name])  # the normal equation itself


def test_single_edit_with_vanishing_ridge_fits_its_value_shifts_and_is_right(tiny_models, tokenizer):
    """K = 1, lambda -> 0: the change moves the edit's own tokens' outputs by exactly their value shifts
    (the edit's keys are fewer than the layer's inputs, so an exact fit exists), and with an untrained
    (identity) network, a descent step on the last block's output, the edit input becomes right."""
    model = tiny_models["causal"].double()
    batch = _batch(tokenizer, model, "causal", PROMPTS[:1], TARGETS[:1])
    editor = MALMEN.for_model(model, [r"transformer\.h\.2\.mlp\.c_proj\.weight"], rank=8, init_ridge=1e-10,
                              init_edit_lr=100.0).double()
    (layer,) = editor.layers
    assert not scores(forward_logits(model, batch, "causal"), batch["labels"], "causal")[0].bool().any()
    pieces = editor.token_pieces(model, batch, "causal")
    u = pieces[layer.name][0]
    with torch.no_grad():
        v = editor.value_shifts(pieces)[layer.name]
    dw = editor.deltas(model, batch, "causal")[layer.name]
    torch.testing.assert_close(u @ dw, v, rtol=1e-6, atol=1e-8)
    post = forward_logits(EditedModel(model, {layer.name: dw}), batch, "causal")
    assert scores(post, batch["labels"], "causal")[0].bool().all()


def test_decoupled_meta_gradient_equals_end_to_end(tiny_models, tokenizer):
    """The four-pass gradient (micro-batched base model and networks, the solve without a graph,
    dL/dS backpropagated through the solve by hand) equals autograd through one graph from the
    editor's parameters to the meta-loss, for 2 problems of 3 edits."""
    model = tiny_models["causal"].double()
    P, fam = 2, "causal"
    batch = _step_batch(tokenizer, model, fam, P)
    inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
    editor = MALMEN.for_model(model, rank=8, init_ridge=0.5, init_edit_lr=0.1, edit_chunk=2, token_chunk=5).double()
    editor = _trained_looking(editor, model, inner, fam)
    ref = copy.deepcopy(editor)
    grads, logs = decoupled_meta_gradients(editor, model, batch, fam, c_edit=0.1, c_loc=1.0)

    pieces = [ref.token_pieces(model, problem_rows(inner, b, P), fam) for b in range(P)]
    ref.update_statistics(pieces)
    loss = torch.zeros((), dtype=torch.float64)
    for b in range(P):
        v, lam = ref.value_shifts(pieces[b]), ref.ridges()
        deltas = {}
        for i, l in enumerate(ref.layers):
            U = pieces[b][l.name][0]
            S = torch.linalg.solve(U.T @ U + lam[i] * torch.eye(l.d_in, dtype=U.dtype), U.T @ v[l.name])
            deltas[l.name] = ref.to_weight(l, S).unsqueeze(0)
        o, lc = problem_rows(outer, b, P), problem_rows(loc, b, P)
        with dense_edit(model, ref.layers, deltas):
            post_o, post_l = forward_logits(model, o, fam), forward_logits(model, lc, fam)
        with torch.no_grad():
            pre_l = forward_logits(model, lc, fam)
        loss = loss + (0.1 * nll(post_o, o["labels"], fam) + kl_pre_post(pre_l, post_l, lc, fam).mean()) / P
    loss.backward()
    assert float(logs["loss"]) == pytest.approx(float(loss), rel=1e-9)
    for (name, p), g in zip(ref.named_parameters(), grads):
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-12, msg=name)
    for k, v in editor.state_dict().items():  # the same statistics update
        torch.testing.assert_close(v, ref.state_dict()[k], msg=k)


def test_streamed_pieces_give_the_cached_meta_gradient_and_statistics(tiny_models, tokenizer):
    """cache_pieces False (every pass recomputes the pieces, 2 edits at a time, 4 tokens a chunk) gives the
    meta-gradient, the logged loss terms and the updated input and key statistics that cached pieces give."""
    model = tiny_models["causal"].double()
    batch = _step_batch(tokenizer, model, "causal")
    cached, streamed = _cached_and_streamed(model, batch["edit_inner"], "causal", rank=8, init_ridge=0.5,
                                            init_edit_lr=0.1, edit_chunk=2, token_chunk=4, key_cov_weight=1.0)
    one_problem = problem_rows(batch["edit_inner"], 0, batch["n_problems"])
    assert len(list(streamed.piece_chunks(model, one_problem, "causal")())) > 3, "the test needs several chunks"
    before = copy.deepcopy(cached.state_dict())
    (g_c, logs_c), (g_s, logs_s) = (decoupled_meta_gradients(e, model, batch, "causal", c_edit=0.1, c_loc=1.0)
                                    for e in (cached, streamed))
    for (name, _), a, b in zip(cached.named_parameters(), g_c, g_s):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-14, msg=name)
    for k, v in logs_c.items():
        torch.testing.assert_close(logs_s[k], v, rtol=1e-12, atol=0, msg=k)
    state = streamed.state_dict()
    for k, v in cached.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-12, atol=1e-15, msg=k)
    assert not torch.equal(before["norms.0.mean"], state["norms.0.mean"]) and state["key_count"].min() > 0


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_streamed_edit_equals_cached_edit(tiny_models, tokenizer, family):
    """K = 6 edits at once (evaluation's ``deltas``) with the pieces recomputed 4 edits at a time give the
    cached edit; the recomputed pieces are the cached ones bit for bit (a frozen base), also where layers
    of one shape see different numbers of tokens (the encoder-decoder's)."""
    model = tiny_models[family].double()
    batch = _batch(tokenizer, model, family, PROMPTS, TARGETS)
    cached, streamed = _cached_and_streamed(model, batch, family, rank=8, init_ridge=0.3, init_edit_lr=0.1,
                                            edit_chunk=4, token_chunk=5)
    chunks = list(streamed.piece_chunks(model, batch, family)())
    for k, (u, d) in cached.token_pieces(model, batch, family).items():
        assert torch.equal(torch.cat([c[k][0] for c in chunks]), u) and torch.equal(torch.cat([c[k][1] for c in chunks]), d), k
    got, want = streamed.deltas(model, batch, family), cached.deltas(model, batch, family)
    for k, w in want.items():
        assert w.abs().max() > 0, k
        torch.testing.assert_close(got[k], w, rtol=1e-9, atol=1e-14, msg=k)


def test_streamed_pieces_are_never_held_for_more_than_two_edit_chunks(tiny_models, tokenizer, monkeypatch):
    """Memory constant in K: with cache_pieces False, a meta-training step and an edit of K = 6 edits, one
    edit a chunk, never hold the pieces of more than two edit chunks at once (the one being read and the
    next being computed) and keep none; cached, the step holds all six at once."""
    model = tiny_models["causal"].double()
    batch = _step_batch(tokenizer, model, "causal", P=1)
    cached, streamed = _cached_and_streamed(model, batch["edit_inner"], "causal", rank=8, edit_chunk=1, token_chunk=4)
    live, peak, sizes = [0], [0], []
    compute = MALMEN.edit_chunk_pieces

    def freed(n: int) -> None:
        live[0] -= n

    def tracked(self, *args):  # the bytes of every edit chunk's pieces alive, until the last view of them is gone
        for p in compute(self, *args):
            sizes.append(sum(t.nbytes for ud in p.values() for t in ud))
            live[0] += sizes[-1]
            peak[0] = max(peak[0], live[0])
            for t in (t for ud in p.values() for t in ud):
                weakref.finalize(t, freed, t.nbytes)
            yield p

    monkeypatch.setattr(MALMEN, "edit_chunk_pieces", tracked)
    # a step reads the pieces in three passes (statistics, normal equations, back through the solve), an edit in one
    for run, passes in ((lambda: decoupled_meta_gradients(streamed, model, batch, "causal", c_edit=0.1, c_loc=1.0), 3),
                        (lambda: streamed.deltas(model, batch["edit_inner"], "causal"), 1)):
        peak[0], sizes[:] = 0, []
        run()
        assert len(sizes) == 6 * passes and live[0] == 0 and peak[0] <= sum(sorted(sizes)[-2:])
    peak[0], sizes[:] = 0, []
    decoupled_meta_gradients(cached, model, batch, "causal", c_edit=0.1, c_loc=1.0)
    assert len(sizes) == 6 and peak[0] == sum(sizes) > 2 * max(sizes)


def test_singular_system_without_ridge_is_refused(tiny_models, tokenizer):
    model = tiny_models["causal"]
    batch = _batch(tokenizer, model, "causal", PROMPTS[:1], TARGETS[:1])
    editor = MALMEN.for_model(model, rank=8, init_ridge=0.0)
    with pytest.raises(ValueError, match="singular.*use a positive ridge"):
        editor.deltas(model, batch, "causal")
    with pytest.raises(ValueError, match="init_ridge, key_cov_weight and memory_weight must not be negative"):
        MALMEN.for_model(model, init_ridge=-1.0)


def test_a_system_past_float32_precision_names_the_cause(tiny_models):
    # a wide layer's key moments (here 1e12 along one direction) can swamp a ridge of 1 in float32; the
    # error must not blame a missing ridge
    model = tiny_models["causal"]
    editor = MALMEN.for_model(model, rank=8, init_ridge=1.0)
    d = editor.layers[0].d_in
    v = torch.randn(d, 1)
    uu = (1e12 * v @ v.T + torch.randn(d, d) * 1e5).float()
    with pytest.raises(ValueError, match=r"not positive definite in torch.float32 \(ridge 1,.*raise init_ridge"):
        editor._factor(0, (uu + uu.T) / 2)


def test_editor_file_round_trip_and_refuses_another_base(tiny_models, tokenizer, tmp_path):
    model = tiny_models["causal"]
    editor = MALMEN.for_model(model, rank=8, init_ridge=0.3)
    torch.nn.init.normal_(editor.nets[0].U)
    path = editor.save(tmp_path / "editor.safetensors", model)
    loaded = MALMEN.load(path, model)
    assert loaded.config == editor.config
    for k, v in editor.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(ValueError, match="was trained for base model"):
        MALMEN.load(path, type(model)(model.config))
    with pytest.raises(ValueError, match="holds a MALMEN editor, not MEND"):
        from editors.mend import MEND
        MEND.load(path, model)
    from editors.base import EditorContext, build_editor  # what eval.py builds from a spec
    built = build_editor({"class_path": "editors.malmen.MALMEN", "init_args": {"path": str(path)}}, EditorContext(model))
    assert isinstance(built, MALMEN) and torch.equal(built.log_ridges, editor.log_ridges)


# -- meta-training through train.py
def malmen_args(bases: Path, out: Path, *extra: str) -> list[str]:
    data, base = bases / "base_causal" / "data", bases / "base_causal" / "model"
    return ["--config", str(ROOT / "configs" / "malmen_zsre_gpt2_tiny.yaml"),
            "--model.init_args.base_model", str(base), "--model.init_args.rank", "16",
            "--model.init_args.edit_chunk", "2", "--model.init_args.token_chunk", "16",
            "--model.init_args.output_dir", str(out),
            "--data.init_args.train_path", str(data / "zsre-train.jsonl"),
            "--data.init_args.val_path", str(data / "zsre-val.jsonl"),
            "--data.init_args.test_path", str(data / "zsre-test.jsonl"),
            "--data.init_args.loc_path", str(data / "nq-loc.jsonl"), "--data.init_args.tokenizer", str(base),
            "--data.init_args.n_edits", "3", "--data.init_args.loc_per_edit", "2",
            "--trainer.default_root_dir", str(out), "--trainer.callbacks", "[]",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--data.init_args.val_limit", "6",
            "--trainer.enable_checkpointing", "false", *QUIET, *extra]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """A tiny GPT-2 QA model (one epoch on a 30-subject world) through train.py, as test_train builds it."""
    tmp = tmp_path_factory.mktemp("bases")
    train.main(base_args("causal", tmp))
    return tmp


# problems of K = 3 edits are dealt to the processes whole (the sampler's blocks), so the 2-process run
# forms the problems the 1-process run forms
DDP_COMMON = ["--data.init_args.shuffle", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0"]


@pytest.fixture(scope="module")
def ddp_run(bases, tmp_path_factory, child_env):
    """The 2-process run (1 problem of 3 edits each per step; pieces cached, not recomputed by each pass), in the
    background while the 1-process run trains."""
    out = tmp_path_factory.mktemp("ddp")
    proc = start_train(malmen_args(bases, out, *DDP_COMMON, "--data.init_args.batch_size", "1", "--trainer.devices",
                                   "2", "--trainer.strategy", "ddp", "--model.init_args.cache_pieces", "true",
                                   *csv_logger(out)), out, child_env)
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ddp_two_processes_equal_one_process_same_global_batch(bases, ddp_run, tmp_path):
    """2 CPU processes (gloo) x 1 problem of K = 3 edits per step == 1 process x 2 problems: the same editor after 3
    steps (networks, step sizes, ridges, input statistics: the gradient all-reduce and the statistics
    fold) and the same validation metrics; the 2-process run caches the pieces (``cache_pieces`` true), the
    1-process run recomputes them (the default)."""
    single = tmp_path / "single"
    train.main(malmen_args(bases, single, *DDP_COMMON, "--data.init_args.batch_size", "2", "--trainer.devices", "1",
                           *csv_logger(single)))
    ddp, proc = ddp_run
    assert proc.wait(timeout=600) == 0, (ddp / "train.log").read_text()[-3000:]
    a = assert_runs_equal(single, ddp, "MALMEN", "val/edit_success")
    assert a["nets.0.U"].abs().max() > 0 and a["norms.0.count"].min() > 0, "the networks and statistics moved"
    assert not torch.equal(a["log_ridges"], torch.zeros_like(a["log_ridges"])), "the ridges trained"
    assert load_editor_file(ddp / "editor.safetensors", "MALMEN")[1]["config"]["cache_pieces"] is True


def test_resume_equals_uninterrupted_run(bases, tmp_path):
    """Killed and resumed: the same editor as an unbroken run (manual optimisation: Adam state, schedule
    and data order restored)."""
    check_resume_equals_unbroken(lambda out, *extra: malmen_args(bases, out, *extra), tmp_path, "MALMEN", "edit_lrs")


def test_more_edits_per_step_than_the_training_split_holds_is_refused(bases, tmp_path):
    with pytest.raises(MisconfigurationException, match="edits per step, but the training split has only"):
        train.main(malmen_args(bases, tmp_path / "big", "--data.init_args.n_edits", "100000"))


def test_the_editor_file_carries_the_evaluation_key_covariance_weight(bases, tmp_path):
    """Meta-trained at one key covariance weight, written with the one chosen for evaluation: the file
    loads with it (the trained weights are unchanged); without key statistics the option is refused."""
    out = tmp_path / "run"
    train.main(malmen_args(bases, out, "--model.init_args.key_cov_weight", "10.0",
                           "--model.init_args.eval_key_cov_weight", "3.0", "--trainer.max_steps", "1"))
    editor = MALMEN.load(out / "editor.safetensors", load_model(bases / "base_causal" / "model", "causal"))
    assert editor.key_cov_weight == 3.0 and editor.key_count.min() > 0, "the statistics were folded"
    with pytest.raises(ValueError, match="eval_key_cov_weight needs key statistics"):
        train.main(malmen_args(bases, tmp_path / "none", "--model.init_args.key_cov_weight", "0.0",
                               "--model.init_args.eval_key_cov_weight", "3.0"))


def test_key_covariance_penalty_solves_the_memit_style_normal_equation(tiny_models, tokenizer):
    """With ``key_cov_weight`` w, the change solves (U^T U + lambda I + w C) S = U^T V, C the mean u u^T
    over all real tokens of the other inputs folded in (here: three other questions), and differs from
    the plain ridge solution; the statistics travel with the editor's state."""
    model = tiny_models["causal"].double()
    batch = _batch(tokenizer, model, "causal", PROMPTS[:3], TARGETS[:3])
    other = _batch(tokenizer, model, "causal", PROMPTS[3:], TARGETS[3:])
    editor = MALMEN.for_model(model, rank=8, init_ridge=0.3, init_edit_lr=0.1, edit_chunk=2, key_cov_weight=5.0).double()
    editor = _trained_looking(editor, model, batch, "causal")
    editor.fold_keys(model, other, "causal")
    got = editor.deltas(model, batch, "causal")
    rows = batch["input_ids"].shape[0]
    pieces = gradient_pieces(model, editor.layers, lambda: nll(forward_logits(model, batch, "causal"), batch["labels"], "causal") * rows)
    real = {k: (u[(u != 0).any(-1) & (d != 0).any(-1)], d[(u != 0).any(-1) & (d != 0).any(-1)]) for k, (u, d) in pieces.items()}
    keys = gradient_pieces(model, editor.layers, lambda: nll(forward_logits(model, other, "causal"), other["labels"], "causal"))
    mask = other["attention_mask"].flatten().bool()
    with torch.no_grad():
        V = editor.value_shifts(real)
    plain = MALMEN.for_model(model, rank=8, init_ridge=0.3, init_edit_lr=0.1).double()
    plain.load_state_dict({k: v for k, v in editor.state_dict().items() if not k.startswith("key_")})
    ridge_only = plain.deltas(model, batch, "causal")
    for i, l in enumerate(editor.layers):
        U, Uo = real[l.name][0], keys[l.name][0][mask]
        A = U.T @ U + editor.ridges()[i] * torch.eye(l.d_in, dtype=U.dtype) + 5.0 * Uo.T @ Uo / Uo.shape[0]
        torch.testing.assert_close(got[l.name], torch.linalg.solve(A, U.T @ V[l.name]))
        assert not torch.allclose(got[l.name], ridge_only[l.name])
    assert int(editor.key_count[0]) == int(mask.sum())
    with pytest.raises(ValueError, match="key_cov_weight and memory_weight must not be negative"):
        MALMEN.for_model(model, key_cov_weight=-1.0)


def _real_keys(editor: MALMEN, model, batch) -> dict:
    """Per layer the keys ``U`` of ``batch``'s real tokens (those with gradient), by plain autograd."""
    rows = batch["input_ids"].shape[0]
    p = gradient_pieces(model, editor.layers, lambda: nll(forward_logits(model, batch, "causal"), batch["labels"], "causal") * rows)
    return {k: u[(u != 0).any(-1) & (d != 0).any(-1)] for k, (u, d) in p.items()}


def test_key_memory_solves_with_the_earlier_edits_keys_and_keeps_their_outputs(tiny_models, tokenizer):
    """A stream of two edits with ``memory_weight`` mu: merging the first records its keys' moment U1^T U1 in
    the working model (a fresh copy of the base has none); the second change solves
    (U2^T U2 + lambda I + mu U1^T U1) S = U2^T V2 on the working model, and moves the layer outputs at
    the first edit's keys less than the same editor without memory; mu = 0 gives a plain change."""
    from editors.base import WeightDelta
    from editors.key_memory import RememberedDelta, key_memory

    base = tiny_models["causal"].double()
    first = _batch(tokenizer, base, "causal", PROMPTS[:1], TARGETS[:1])
    second = _batch(tokenizer, base, "causal", PROMPTS[1:2], TARGETS[1:2])
    editor = _trained_looking(MALMEN.for_model(base, rank=8, init_ridge=0.3, init_edit_lr=0.1).double(), base, first, "causal")
    plain = type(editor.make_edit(base, first, "causal"))
    assert plain is WeightDelta and not editor.config["memory_weight"]
    editor.memory_weight = 50.0
    work = copy.deepcopy(base)
    edit1 = editor.make_edit(work, first, "causal")
    assert isinstance(edit1, RememberedDelta) and not key_memory(work)
    work = edit1.merge_(work)
    U1 = _real_keys(editor, base, first)
    for l in editor.layers:
        torch.testing.assert_close(key_memory(work)[l.name], U1[l.name].T @ U1[l.name])
    assert not key_memory(copy.deepcopy(base)) and key_memory(copy.deepcopy(work)).keys() == key_memory(work).keys()
    got = editor.make_edit(work, second, "causal").deltas
    pieces = editor.token_pieces(work, second, "causal")
    with torch.no_grad():
        V = editor.value_shifts(pieces)
    editor.memory_weight = 0.0
    forgetful = editor.make_edit(work, second, "causal").deltas
    for i, l in enumerate(editor.layers):
        U2 = pieces[l.name][0]
        A = U2.T @ U2 + editor.ridges()[i] * torch.eye(l.d_in, dtype=U2.dtype) + 50.0 * key_memory(work)[l.name]
        S = torch.linalg.solve(A, U2.T @ V[l.name])
        torch.testing.assert_close(got[l.name], S if l.kind == "conv1d" else S.T)
        on_first = lambda d: (U1[l.name] @ (d if l.kind == "conv1d" else d.T)).norm()
        assert on_first(got[l.name]) < 0.5 * on_first(forgetful[l.name])


def test_stream_state_with_key_memory_resumes_exactly(tiny_models, tokenizer, tmp_path):
    """``save_working`` / ``load_working`` carry the working model's key memory: a stream saved after its
    second edit and continued from the file ends with the weights and memory of the unbroken stream;
    the Polyak rule around MALMEN, several steps each, keeps the memory of its edits too."""
    from editors.base import EditorContext
    from editors.key_memory import key_memory
    from editors.until_right import PolyakStep

    base = tiny_models["causal"].double()
    batches = [_batch(tokenizer, base, "causal", PROMPTS[i:i + 1], TARGETS[i:i + 1]) for i in range(3)]
    editor = _trained_looking(MALMEN.for_model(base, rank=8, init_ridge=0.3, init_edit_lr=0.1).double(), base,
                              batches[0], "causal")
    path = editor.save(tmp_path / "editor.safetensors", base)
    loaded = MALMEN.for_evaluation(EditorContext(base), str(path), memory_weight=10.0)
    assert loaded.memory_weight == loaded.config["memory_weight"] == 10.0
    rule = PolyakStep(loaded, fraction=0.5, max_steps=3)

    def stream(work, bs):
        for b in bs:
            work = rule.make_edit(work, b, "causal").merge_(work)
        return work

    unbroken = stream(copy.deepcopy(base), batches)
    assert len(key_memory(unbroken)) == len(editor.layers)
    half = stream(copy.deepcopy(base), batches[:2])
    rule.save_working(tmp_path / "work.safetensors", half, base)
    resumed = stream(rule.load_working(tmp_path / "work.safetensors", base), batches[2:])
    for (k, a), b in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), k
    for k, m in key_memory(unbroken).items():
        assert torch.equal(m, key_memory(resumed)[k]), k
    with pytest.raises(ValueError, match="needs a file trained with one"):
        MALMEN.for_evaluation(EditorContext(base), str(path), key_cov_weight=1.0)
