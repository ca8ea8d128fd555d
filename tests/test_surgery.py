"""Neural network surgery (Zhang et al., NAACL 2021): every selector makes the edit right on tiny
random models while changing at most ``n_params`` weights, counted on the merged model; the L1
method leaves exact base values outside its selection; the base model is untouched; random
selection is deterministic per seed; bad budgets and methods are refused."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from datamodules.encoding import collate, encode
from editors.base import EditedModel, WeightDelta
from editors.layers import select_layers
from editors.losses import forward_logits, scores
from editors.surgery import METHODS, Surgery
from lightning_modules.models import decoder_start_id

PROMPT = "Where was Foo born?"


pytestmark = pytest.mark.usefixtures("one_thread")


def edit_batch(model, tokenizer, family: str, prompt: str = PROMPT, target: str = "Arvenna"):
    """One edit; for the classifier the verdict the model does not give yet."""
    if family == "classifier":
        probe = collate(encode(tokenizer, family, [prompt], ["SUPPORTS"]), tokenizer.pad_token_id, family)
        target = "REFUTES" if forward_logits(model, probe, family).item() > 0 else "SUPPORTS"
    return collate(encode(tokenizer, family, [prompt], [target]), tokenizer.pad_token_id, family,
                   decoder_start_id(model))


def right(model, batch, family) -> bool:
    with torch.no_grad():
        return bool(scores(forward_logits(model, batch, family), batch["labels"], family)[0].all())


def n_differ(a, b) -> int:
    """Scalar weights of ``a`` that differ from ``b``'s, over every parameter (counted, not assumed)."""
    pb = dict(b.named_parameters())
    return sum(int((p != pb[k]).sum()) for k, p in a.named_parameters())


CASES = [(m, "causal") for m in METHODS] + [("dynamic", "classifier"), ("dynamic", "seq2seq")]


@pytest.mark.parametrize("method,family", CASES)
def test_edit_is_right_within_budget_and_base_untouched(tiny_models, tokenizer, method, family):
    model = tiny_models[family]
    batch = edit_batch(model, tokenizer, family)
    assert not right(model, batch, family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = 1000
    ed = Surgery.for_model(model, n_params=n, method=method)
    assert ed.name == f"surgery_{method}" and ed.config["method"] == method and ed.config["n_params"] == n
    d = ed.deltas(model, batch, family)
    assert set(d) == {l.name for l in select_layers(model)}
    assert sum(int((x != 0).sum()) for x in d.values()) <= n, "the budget is global over the candidates"
    merged = WeightDelta(d).merged(model)
    changed = n_differ(merged, model)
    assert 0 < changed <= n
    assert changed == ed.last_changed == WeightDelta(d).params_changed(model)
    assert right(merged, batch, family) and right(EditedModel(model, d), batch, family) and ed.last_right
    assert 0 < ed.last_steps
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the base model is untouched"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method,dense", [(m, "ngd") for m in METHODS] + [("delta", "adam"), ("dynamic", "adam")])
def test_tiny_budget_holds_for_every_method(tiny_models, tokenizer, method, dense):
    """n=3: the edit need not become right, but at most 3 weights change, whatever the step caps."""
    model = tiny_models["causal"]
    batch = edit_batch(model, tokenizer, "causal")
    ed = Surgery.for_model(model, n_params=3, method=method, max_steps=4, l1_steps=4, probe_steps=2,
                           dense_optimizer=dense)
    d = ed.deltas(model, batch, "causal")
    assert n_differ(WeightDelta(d).merged(model), model) == ed.last_changed <= 3
    # probe / L1 phase (dynamic: at most shrink_every steps per shrink), then tuning
    assert ed.last_steps - ed.last_tune_steps <= max(4, ed.config["shrink_every"] * len(ed.shrink_schedule))
    assert ed.last_tune_steps <= 4


def test_an_edit_already_right_changes_nothing(tiny_models, tokenizer):
    model = tiny_models["causal"]
    batch = edit_batch(model, tokenizer, "causal")
    ed = Surgery.for_model(model, n_params=500, method="dynamic")
    merged = WeightDelta(ed.deltas(model, batch, "causal")).merged(model)
    again = ed.deltas(merged, batch, "causal")
    assert ed.last_steps == 0 and ed.last_changed == 0 and all(not x.any() for x in again.values())


def test_l1_leaves_exact_base_values_outside_its_selection(tiny_models, tokenizer):
    model = tiny_models["causal"]
    batch = edit_batch(model, tokenizer, "causal")
    params = dict(model.named_parameters())
    n = 1000
    # no masked tuning after the cut: what is returned is the proximal solution's top n
    ed = Surgery.for_model(model, n_params=n, method="l1", max_steps=0, l1_steps=10)
    d = ed.deltas(model, batch, "causal")
    merged = dict(WeightDelta(d).merged(model).named_parameters())
    kept = 0
    for k, x in d.items():
        outside = x == 0
        kept += int((~outside).sum())
        assert torch.equal(merged[k][outside], params[k][outside]), "untouched weights keep their exact base values"
    assert 0 < kept <= n and ed.last_changed == kept
    # the soft threshold itself keeps most candidates exactly at zero change (before the top-n cut)
    assert ed.last_l1_nonzero is not None and 0 < ed.last_l1_nonzero < ed.n_candidates // 2
    # a penalty above every gradient moves nothing at all
    frozen = Surgery.for_model(model, n_params=n, method="l1", l1_lambda=1e6, max_steps=0, l1_steps=5)
    assert all(not x.any() for x in frozen.deltas(model, batch, "causal").values())
    assert frozen.last_l1_nonzero == 0 and frozen.last_changed == 0


def test_random_selection_is_deterministic_per_seed(tiny_models, tokenizer):
    model = tiny_models["causal"]
    batch = edit_batch(model, tokenizer, "causal")
    kw = dict(n_params=200, method="random", max_steps=3)

    def pattern(seed: int) -> tuple[dict, dict]:
        d = Surgery.for_model(model, seed=seed, **kw).deltas(model, batch, "causal")
        return d, {k: x != 0 for k, x in d.items()}

    (d1, p1), (d2, p2), (_, p3) = pattern(0), pattern(0), pattern(1)
    assert all(torch.equal(d1[k], d2[k]) and torch.equal(p1[k], p2[k]) for k in d1)
    assert any(not torch.equal(p1[k], p3[k]) for k in p1), "another seed draws another subset"
    # the subset is spread over the candidate matrices (one global draw, not per matrix)
    assert sum(bool(p.any()) for p in p1.values()) > 1


def test_refusals(tiny_models):
    model = tiny_models["causal"]
    layers = select_layers(model)
    total = sum(l.d_in * l.d_out for l in layers)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="positive"):
            Surgery(layers, n_params=bad)
    with pytest.raises(ValueError, match=f"more than the {total} entries"):
        Surgery(layers, n_params=total + 1)
    with pytest.raises(ValueError, match="unknown surgery method"):
        Surgery(layers, method="prune")
    with pytest.raises(ValueError, match="unknown dense_optimizer"):
        Surgery(layers, dense_optimizer="sgd")
    assert Surgery(layers, n_params=total).n_candidates == total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases_get_finite_float32_changes(tiny_models, tokenizer, dtype):
    """Adam's eps is 0 in fp16 (a zero gradient gave 0/0 = NaN) and ngd's step scale overflowed it: the
    changes and the optimiser state are float32 whatever the base's dtype, for every method and for FT."""
    from editors.ft import FineTune

    model = tiny_models["causal"].to(dtype)
    batch = edit_batch(model, tokenizer, "causal")
    editors = [Surgery.for_model(model, n_params=1000, method=m) for m in METHODS]
    for ed in editors + [FineTune.for_model(model, lr=1e-2)]:
        d = ed.deltas(model, batch, "causal")
        assert all(x.dtype == torch.float32 and bool(torch.isfinite(x).all()) for x in d.values()), ed.name
        assert right(EditedModel(model, d), batch, "causal"), ed.name


def test_dynamic_tunes_its_survivors_however_long_the_shrinking(tiny_models, tokenizer):
    """24,576 candidates down to 10 take 12 shrinks: their steps used to eat the whole cap, so the
    survivors were returned untuned (and wrong); now they get ``max_steps`` of their own."""
    model = tiny_models["causal"]
    batch = edit_batch(model, tokenizer, "causal")
    ed = Surgery.for_model(model, n_params=10, method="dynamic", lr=0.05, max_steps=6)
    sched = ed.shrink_schedule
    assert sched[-1] == 10 and sched == sorted(set(sched), reverse=True) and ed.config["shrinks"] == len(sched) == 12
    d = ed.deltas(model, batch, "causal")
    shrink_steps = ed.last_steps - ed.last_tune_steps
    assert shrink_steps >= ed.config["max_steps"], "the shrinking alone outlasts the cap (old code: 0 tuning steps)"
    assert shrink_steps <= ed.config["shrink_every"] * len(sched)
    assert 0 < ed.last_tune_steps <= ed.config["max_steps"] and ed.last_right
    assert right(EditedModel(model, d), batch, "causal") and ed.last_changed <= 10


def known_entries_model(model, live: int):
    """``model`` with all but ``live`` hidden units of its last FFN dead (zero pre-activation, gelu 0 = 0):
    only the ``live`` input rows of that FFN's output matrix can change the output."""
    with torch.no_grad():
        fc = model.transformer.h[-1].mlp.c_fc
        fc.weight[:, live:] = 0
        fc.bias[live:] = 0
    return model


@pytest.mark.parametrize("method", ["grad", "delta", "dynamic", "l1"])
def test_selection_finds_the_entries_that_matter_and_beats_random(tiny_models, tokenizer, method):
    """A problem whose right entries are known: of the 4,096 entries of the last c_proj only the 4 live
    rows (128 entries) act on the output. Each selector spends its whole budget there and lowers the
    edit loss more than ``random`` at the same budget and steps (~31 of whose 32 entries are dead)."""
    from editors.losses import nll

    model = known_entries_model(tiny_models["causal"], live=4)
    batch = edit_batch(model, tokenizer, "causal")
    kw = dict(n_params=32, lr=0.1, max_steps=5, l1_steps=5, probe_steps=2)
    layers = select_layers(model, [r"transformer\.h\.2\.mlp\.c_proj\.weight"])

    def edit(m: str) -> tuple[Tensor, float]:
        (change,) = Surgery(layers, method=m, **kw).deltas(model, batch, "causal").values()
        with torch.no_grad():
            return change, float(nll(forward_logits(EditedModel(model, {layers[0].name: change}), batch, "causal"),
                                     batch["labels"], "causal"))

    rand, rand_loss = edit("random")
    assert int((rand != 0).sum()) <= 4, "the problem discriminates: random's dead entries never move"
    change, loss = edit(method)
    assert change.shape == (128, 32) and not change[4:].any(), "only entries of the live rows change"
    assert int((change != 0).sum()) == 32, "the whole budget goes to entries that act on the output"
    assert loss < rand_loss - 0.3


def test_random_subset_is_drawn_once_per_editor_without_a_permutation_of_the_candidates(tiny_models, tokenizer,
                                                                                        monkeypatch):
    """The subset used to be a ``randperm`` over every candidate, drawn again at every edit (3 GiB of int64
    at LLaMA-2 7B's 406 M candidates): now it is drawn once per editor, in memory of order ``n``."""
    from editors import surgery

    model = tiny_models["causal"]
    ed = Surgery.for_model(model, n_params=200, method="random", max_steps=3)
    perms, draws = [], []
    real_perm, real_subset = torch.randperm, surgery.random_subset
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: perms.append(n) or real_perm(n, *a, **k))
    monkeypatch.setattr(surgery, "random_subset", lambda *a: draws.append(a) or real_subset(*a))
    subset = real_subset(200, ed.n_candidates, 0)
    perms.clear()
    for prompt, target in ((PROMPT, "Arvenna"), ("Who wrote Bar?", "Quillon Dors")):
        d = ed.deltas(model, edit_batch(model, tokenizer, "causal", prompt, target), "causal")
        changed = torch.cat([d[l.name].flatten() for l in ed.layers]).nonzero().squeeze(1)
        assert len(changed) > 0 and bool(torch.isin(changed, subset).all()), "every edit stays in the one subset"
    assert draws == [(200, ed.n_candidates, 0)], "drawn once, at the first edit"
    assert max(perms) < ed.n_candidates, "no permutation of all the candidates"


@pytest.mark.parametrize("n,total", [(2, 6), (4, 6)])  # by draws, and by a permutation when n > total / 2
def test_random_subset_is_a_uniform_draw_of_distinct_indices(n, total):
    from collections import Counter

    from editors.surgery import random_subset

    counts = Counter(tuple(random_subset(n, total, seed).tolist()) for seed in range(3000))
    assert len(counts) == 15 and all(140 < c < 260 for c in counts.values()), counts  # 200 each, sd 14
    big = random_subset(1000, 406_000_000, 7)
    assert len(big.unique()) == 1000 and torch.equal(big, big.sort().values) and 0 <= int(big.min())
    assert int(big.max()) < 406_000_000 and torch.equal(big, random_subset(1000, 406_000_000, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_abs_is_topk_chunk_by_chunk_with_ties_to_the_lower_index(monkeypatch, dtype):
    from editors import surgery
    from editors.surgery import kth_abs, top_abs

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        monkeypatch.setattr(surgery, "CHUNK", int(torch.randint(1, 40, (), generator=gen)))
        n = int(torch.randint(1, 200, (), generator=gen))
        k = int(torch.randint(1, n + 1, (), generator=gen))
        tied = trial % 2  # small integers: many ties at the threshold
        x = (torch.randint(-4, 5, (n,), generator=gen).float() if tied else torch.randn(n, generator=gen)).to(dtype)
        mask = torch.rand(n, generator=gen) > 0.3
        for m in (None, mask):
            a = x.float().abs() if m is None else (x.float() * m).abs()
            ref = torch.sort(a, descending=True, stable=True).indices[:k].sort().values  # ties: lower index first
            assert torch.equal(top_abs(x, k, m), ref)
            assert torch.equal(top_abs(x, k, m, as_mask=True).nonzero().squeeze(1), ref)
            if not tied and m is None and dtype == torch.float32:  # distinct values: exactly torch.topk's
                assert torch.equal(top_abs(x, k, m), torch.topk(a, k).indices.sort().values)
        assert kth_abs(x, k) == float(torch.topk(x.float().abs(), k).values[-1])
    with pytest.raises(ValueError, match="cannot select"):
        top_abs(torch.ones(3), 4)


def test_top_abs_holds_no_copy_of_the_whole_vector(monkeypatch):
    """The whole-vector ``torch.topk(score.abs().float(), k)`` allocated at least a copy of the scores (about 6
    GiB at 406 M for dynamic's first cut: two float32 copies, then int64 indices of half the candidates, sorted)."""
    from torch.profiler import ProfilerActivity, profile

    from editors import surgery

    def peak(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = top = 0
        for _, b in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                           if e.name() == "[memory]"):
            live += b
            top = max(top, live)
        return top

    monkeypatch.setattr(surgery, "CHUNK", 1 << 16)
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    assert peak(lambda: surgery.top_abs(x, 1000)) < x.nbytes // 4
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    # dynamic's cut: the new mask (1 byte per entry) and chunk temporaries only
    assert peak(lambda: surgery.top_abs(x, len(x) // 4, mask, as_mask=True)) < x.nbytes // 4 + mask.numel()
