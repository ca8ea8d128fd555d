"""Evaluation: metric functions on hand-made cases, the FT baselines, every protocol end to end on a
very small world (tiny random GPT-2 / BERT, untrained MEND), the report schema, and refusals."""
from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.encoding import collate, encode
from datamodules.formats import read_nq
from editors.ft import FineTune
from editors.layers import select_layers
from editors.losses import forward_logits, nll, scores, top1_agreement
from editors.base import DeltaEditor, EditedModel, WeightDelta, merge_deltas_
from editors.malmen import MALMEN
from editors.mend import MEND
from editors.until_right import PolyakStep, UntilRight
from lightning_modules.evaluation import (DEFINITIONS, BaseLocality, EditData, EditMetrics, drawdown, flip_counts,
                                          greedy_answers, locality_scores, retention, run_sequential, select_rows,
                                          stream_checkpoints)
from lightning_modules.models import build_tiny, decoder_start_id

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
    assert stream_checkpoints(250) == [1, 10, 100, 200, 250]
    assert stream_checkpoints(1138)[-3:] == [1000, 1100, 1138]
    assert stream_checkpoints(10) == [1, 10]
    assert stream_checkpoints(1) == [1]


def test_edit_metrics_aggregate_hand_made_steps():
    t, f = True, False
    m = EditMetrics()
    m.update_step({"edit_success": torch.tensor([1.0, 0.0]), "edit_success_token_acc": torch.tensor([1.0, 0.5]),
                   "generality": torch.tensor([0.5, 0.0]), "generality_token_acc": torch.tensor([0.5, 0.5]),
                   "agreement": torch.tensor([1.0, 0.5, 1.0]), "kl": torch.tensor([0.0, 0.3, 0.0]),
                   "pre_right": torch.tensor([t, t, f]), "post_right": torch.tensor([f, t, t]),
                   "labelled": torch.tensor([t, t, t]), "base_agreement": torch.tensor([1.0, 0.0, 1.0])},
                  seconds=1.0, params_changed=10)
    m.update_step({"edit_success": torch.tensor([1.0]), "edit_success_token_acc": torch.tensor([1.0]),
                   "generality": torch.tensor([1.0]), "generality_token_acc": torch.tensor([1.0]),
                   "agreement": torch.tensor([0.0, 1.0]), "kl": torch.tensor([0.6, 0.0]),
                   "pre_right": torch.tensor([t, t]), "post_right": torch.tensor([f, f]),
                   "labelled": torch.tensor([t, f]), "base_agreement": torch.tensor([0.0, 1.0])},
                  seconds=3.0, params_changed=30)
    out = m.compute(n_base_params=100)
    assert out["edit_success"] == pytest.approx(2 / 3)
    assert out["generality"] == pytest.approx(0.5)
    assert out["locality_agreement"] == pytest.approx(3.5 / 5)
    assert out["locality_base_agreement"] == pytest.approx(3 / 5)
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


# ---------------------------------------------------------------- what the scores count
def _collate_for(tokenizer, family):
    start = tokenizer.bos_token_id if family == "seq2seq" else None
    return lambda feats: collate(feats, tokenizer.pad_token_id, family, start)


def _loc_pairs(small_world, n: int = 24) -> tuple[list[str], list[str]]:
    pairs = read_nq(small_world / "nq-loc.jsonl")[:n]
    return [p.prompt for p in pairs], [p.answer for p in pairs]


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_teacher_forced_exact_match_is_greedy_generation(tiny_models, tokenizer, small_world, family):
    """Exact match under teacher forcing (every target token, end-of-answer included, is the argmax)
    is 'greedy decoding gives the target': the greedy answers built from the padded teacher-forced
    forward equal `generate()`'s (one prompt at a time, KV cache, no padding), the model's exact match
    on them is 1, and on any other answer 0. What `generate()` needs for this: plain greedy settings
    (a model's generation config may force an end token at the length cap, as BART's
    forced_eos_token_id does, or forbid repeats), a cap longer than the target, and no exact tie
    between the two top logits (rounding differs between the two forwards)."""
    from transformers import GenerationConfig

    model = tiny_models[family]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts, gold = _loc_pairs(small_world)
    feats = encode(tokenizer, family, prompts, gold)
    col = _collate_for(tokenizer, family)
    # make the end-of-answer token the first answer token of a quarter of the inputs, so that answers of
    # several lengths end with it
    logits = forward_logits(model, col(feats), family)
    first = [f["labels"].count(-100) - 1 if family == "causal" else 0 for f in feats]
    at = logits[torch.arange(len(feats)), torch.tensor(first)]
    eos_bias = torch.zeros(logits.shape[-1])
    eos_bias[eos] = float((at.max(-1).values - at[:, eos]).quantile(0.25))
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + eos_bias)
    cap = 5
    model.generation_config.forced_eos_token_id = None  # BART's: the end token forced at the cap, not greedy
    answers = greedy_answers(model, feats, family, col, eos, max_tokens=cap)
    plain = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=cap, eos_token_id=eos, pad_token_id=pad,
                             decoder_start_token_id=tokenizer.bos_token_id)
    ends = set()
    for f, a in zip(feats, answers):
        prompt = f["input_ids"][:f["labels"].count(-100)] if family == "causal" else f["input_ids"]
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=plain)[0].tolist()
        generated = out[len(prompt):] if family == "causal" else out[1:]
        answer = [t for t in a["labels"] if t != -100]
        assert answer == generated, "teacher-forced greedy answer == generate()"
        ends.add((len(answer), answer[-1] == eos))
    assert len({n for n, _ in ends}) > 1 and any(e for _, e in ends), "several lengths, some ending with the end token"
    em = scores(forward_logits(model, col(answers), family), col(answers)["labels"], family)[0]
    assert em.tolist() == [1.0] * len(answers)
    # any other answer (its last token changed) is not the greedy one: exact match 0
    other = []
    for a in answers:
        bad = (a["labels"][-1] + 1) % len(tokenizer)
        ids = a["input_ids"][:-1] + [bad] if family == "causal" else a["input_ids"]
        other.append({"input_ids": ids, "labels": a["labels"][:-1] + [bad]})
    assert scores(forward_logits(model, col(other), family), col(other)["labels"], family)[0].sum() == 0


def test_locality_agreement_counts_answer_positions_only():
    """Top-1 agreement on a causal locality input counts the positions that predict its answer tokens (as
    MEND's retain rate), not its prompt; an input without an answer counts all its real positions."""
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, -100, -100, -100]])
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": labels}
    pre = torch.zeros(2, 5, 10)
    pre[..., 1] = 1.0
    post = pre.clone()
    post[:, 0, 2] = 2.0  # disagree at a prompt position
    assert top1_agreement(pre, post, batch, "causal").tolist() == pytest.approx([1.0, 0.8])
    post[0, 2, 3] = 2.0  # disagree where the first answer token is predicted
    assert top1_agreement(pre, post, batch, "causal")[0].item() == 0.5


def test_base_agreement_is_informative_where_gold_accuracy_is_zero(tokenizer, small_world):
    """A random GPT-2 never gives a gold answer, so drawdown is 0 for any edit; agreement with its own
    greedy answers is 1 for an edit that changes nothing and falls for one that changes a lot. The
    base's outputs are computed once per input: scoring again runs only the edited model, and a cache
    with no room (the base run again for the KL) gives the same figures."""
    from lightning_modules.models import build_tiny

    torch.manual_seed(0)
    model = build_tiny("tiny-gpt2", tokenizer, TINY["tiny-gpt2"]).eval()
    prompts, gold = _loc_pairs(small_world)
    feats = encode(tokenizer, "causal", prompts, gold)
    col = _collate_for(tokenizer, "causal")
    base = BaseLocality(model, "causal", col, tokenizer.eos_token_id)
    same, broken = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.transformer.h[-1].mlp.parameters():
            p.add_(torch.randn_like(p))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    noop = locality_scores(base, same, feats, chunk=8)
    n_base_calls = len(calls)
    assert n_base_calls > 0 and not noop["pre_right"].any() and not noop["post_right"].any(), "gold accuracy 0"
    assert noop["base_agreement"].tolist() == [1.0] * len(feats)
    assert noop["agreement"].tolist() == [1.0] * len(feats) and noop["kl"].abs().max() < 1e-6
    hit = locality_scores(base, broken, feats, chunk=8)
    assert len(calls) == n_base_calls, "the base model ran once per input, not once per edit"
    assert hit["base_agreement"].mean() < 0.9 and not hit["post_right"].any()
    answers = col([r["answer"] for r in base.rows(feats)])  # scored directly, without the gold forward's help
    direct = scores(forward_logits(broken, answers, "causal"), answers["labels"], "causal")[0]
    assert hit["base_agreement"].tolist() == direct.tolist()
    assert drawdown(hit["pre_right"], hit["post_right"]) == 0.0, "the gold figure cannot see this edit"
    again = locality_scores(BaseLocality(model, "causal", col, tokenizer.eos_token_id, max_bytes=0), broken, feats, 8)
    for k, v in hit.items():
        torch.testing.assert_close(again[k].float(), v.float(), rtol=1e-5, atol=1e-6, msg=k)
    assert base.cached_bytes > 0


class _NoEdit(DeltaEditor):
    """An editor whose edits change nothing."""

    def deltas(self, model, batch, family, loc_batch=None):
        return {}


def test_sequential_scores_the_edits_made_and_counts_the_skipped(setup_eval, tokenizer):
    """Under only_when_wrong, items the model already answers are skipped: SR / GR / ER are over the edits
    made (here none succeeds: 0, where averaging over all items would credit the skipped ones), and the
    skipped ones are counted."""
    from datamodules.edit_data import FeverDataModule

    init = yaml.safe_load(Path(setup_eval["fever_config"]).read_text())["data"]["init_args"]
    dm = FeverDataModule(**init)
    dm.setup("test")
    data = EditData(dm, "test", n_train_probe=10)
    model = setup_eval["fever_model"]
    ids = list(range(12))
    right = scores(forward_logits(model, data.edits(ids), "classifier"), data.edits(ids)["labels"], "classifier")[0]
    n_right = int(right.sum())
    assert 0 < n_right < 12, "the random classifier gets some edits right already"
    seq = run_sequential(_NoEdit(), model, data, ids, only_when_wrong=True, n_test_probe=20, progress=False)
    assert (seq["n_edits_skipped"], seq["n_edits_applied"]) == (n_right, 12 - n_right)
    assert seq["sr"] == seq["er"] == [0.0] * len(seq["checkpoints"]) and seq["edit_success"] == 0.0
    assert seq["test_r"][-1] == seq["test_r_base"][-1] == 1.0, "nothing changed"
    every = run_sequential(_NoEdit(), model, data, ids, n_test_probe=20, progress=False)
    assert every["n_edits_skipped"] == 0 and every["edit_success"] == pytest.approx(n_right / 12)


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


@pytest.mark.parametrize("family", ["causal", "classifier"])
def test_polyak_step_removes_the_fraction_of_the_edit_loss_to_first_order(tiny_models, tokenizer, family):
    """``<s * D, G> = -fraction * L`` for any proposed change ``D`` that descends (``G``: the gradient of the
    edit loss ``L``, the sum over the batch's edits, by plain autograd); ``D`` of either length gives the
    same change; the scale is capped at ``max_scale``; a change that does not descend is kept as proposed."""
    model = tiny_models[family]
    targets = ["Arvenna", "painter"] if family != "classifier" else ["SUPPORTS", "REFUTES"]
    batch = collate(encode(tokenizer, family, ["Where was Foo born?", "What does Bar do?"], targets),
                    tokenizer.pad_token_id, family)
    full = FineTune.for_model(model, lr=1e-3, max_steps=3).deltas(model, batch, family)
    params = dict(model.named_parameters())
    model.zero_grad()
    loss = 2 * nll(forward_logits(model, batch, family), batch["labels"], family)
    loss.backward()
    slope = sum(float((full[k] * params[k].grad).sum()) for k in full)
    model.zero_grad(set_to_none=True)
    assert slope < 0
    for length in (1.0, 10.0):
        rule = PolyakStep(_Fixed(select_layers(model), {k: length * d for k, d in full.items()}), fraction=0.5,
                          max_scale=1e9)
        got = rule.deltas(model, batch, family)
        assert rule.last_scale * length * slope == pytest.approx(-0.5 * float(loss), rel=1e-4)
        for k in full:  # the same change whatever the proposed length
            torch.testing.assert_close(got[k], (-0.5 * float(loss) / slope) * full[k], rtol=1e-4, atol=1e-9)
    wanted = -0.5 * float(loss) / slope  # the uncapped scale of the proposed change
    capped = PolyakStep(_Fixed(select_layers(model), full), fraction=0.5, max_scale=wanted / 4)
    capped.deltas(model, batch, family)
    assert capped.last_scale == wanted / 4, "the cap binds: at most max_scale"
    ascent = PolyakStep(_Fixed(select_layers(model), {k: -d for k, d in full.items()}))
    ascent.deltas(model, batch, family)
    assert ascent.last_scale == 1.0
    for bad in ({"fraction": 0.0}, {"max_scale": -1.0}):
        with pytest.raises(ValueError, match="positive"):
            PolyakStep(_Fixed([], {}), **bad)


@pytest.mark.parametrize("family", ["causal", "seq2seq"])  # a random classifier flips in one step
def test_polyak_steps_repeat_on_the_stepped_model_until_right(tiny_models, tokenizer, family):
    """``max_steps``: each further step is one Polyak step of the editor on the model as the steps so far
    left it, taken while the edit is wrong; the edit is their sum; the model is left bit for bit as it
    was; ``max_steps`` 1 is the one-step rule."""
    model = tiny_models[family]
    batch = collate(encode(tokenizer, family, ["Where was Foo born?"], ["Arvenna"]), tokenizer.pad_token_id, family,
                    decoder_start_id(model))
    ft = FineTune.for_model(model, lr=1e-2, max_steps=2)  # proposes its change on whatever model it is given
    F = 0.05  # small enough that one step does not do it

    def right(m) -> bool:
        return bool(scores(forward_logits(m, batch, family), batch["labels"], family)[0].all())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = PolyakStep(ft, fraction=F, max_steps=1)
    torch.testing.assert_close(one.deltas(model, batch, family), PolyakStep(ft, fraction=F).deltas(model, batch, family))
    work, total, n = copy.deepcopy(model), None, 0  # the rule by hand: one-step edits merged until right
    while n < 20 and (n == 0 or not right(work)):
        d = one.deltas(work, batch, family)
        total = d if total is None else {k: total[k] + v for k, v in d.items()}
        work, n = WeightDelta(d).merge_(work), n + 1
    assert 1 < n < 20 and right(work), "the test needs an edit that takes a few steps"
    rule = PolyakStep(ft, fraction=F, max_steps=20)
    got = rule.deltas(model, batch, family)
    assert rule.last_steps == n and rule.config["max_steps"] == 20
    for k in total:
        torch.testing.assert_close(got[k], total[k], rtol=1e-4, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model is restored"
    with pytest.raises(ValueError, match="max_steps at least 1"):
        PolyakStep(ft, max_steps=0)


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
    MALMEN.for_model(gpt2, rank=8, init_edit_lr=1.0).save(root / "malmen.safetensors", gpt2)
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
    _run("--config", setup_eval["zsre_config"], "--editor_path", setup_eval["root"] / "editor.safetensors",
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
    args = ("--config", setup_eval["zsre_config"], "--mode", "single", "--n_edits", 3, "--editors+", "{class_path: ft, init_args: {max_steps: 1}}")
    rep = _run(*args, "--loc_per_edit", "all")["entries"][0]
    pool = rep["n_locality_inputs"] // 3
    assert rep["n_locality_inputs"] == 3 * pool and pool > 20, "every edit scored on the whole held-out pool"
    with pytest.raises(eval_cli.EvalError, match=f"more than the {pool} held-out locality inputs"):
        _run(*args, "--loc_per_edit", pool + 1)


def test_mend_until_right_runs_beside_mend_on_the_same_checkpoint(setup_eval):
    rep = _run("--config", setup_eval["zsre_config"], "--editor_path", setup_eval["root"] / "editor.safetensors",
               "--mode", "single", "--editor", "mend", "mend_until_right")
    mend, under_rule = rep["entries"]
    assert under_rule["editor"] == "mend_until_right" and under_rule["n_edits"] == mend["n_edits"] == 20
    assert under_rule["editor_config"]["scales"] == [0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    assert under_rule["editor_config"]["editor"] == mend["editor_config"], "it wraps the same MEND"
    assert under_rule["base_model_unchanged"] is True


def test_until_right_scales_default_to_the_configs_validation_grid(setup_eval, tmp_path):
    """A config that validates under the rule (model.init_args.until_right_scales) is evaluated under
    the same grid unless the editor's own scales say otherwise."""
    cfg = yaml.safe_load(Path(setup_eval["zsre_config"]).read_text())
    cfg["model"].setdefault("init_args", {})["until_right_scales"] = [1.0, 0.5]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ("--config", path, "--editor_path", setup_eval["root"] / "editor.safetensors", "--mode", "single",
            "--editor", "mend_until_right", "--n_edits", 2, "--loc_per_edit", 1)
    assert _run(*args)["entries"][0]["editor_config"]["scales"] == [0.5, 1.0]
    assert _run(*args[:-6], "--editors+", "{class_path: mend_until_right, init_args: {scales: [2, 3]}}",
                *args[-4:])["entries"][0]["editor_config"]["scales"] == [2.0, 3.0]


def test_single_mode_data_parallel_equals_one_process(setup_eval, tmp_path, child_env):
    """--devices 2 (DDP, gloo) scores every held-out edit once, as one process does: the same report
    figures over an odd number of edits (timings aside)."""
    args = ["--config", setup_eval["zsre_config"], "--editor_path", setup_eval["root"] / "editor.safetensors",
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
    # each step scores the locality pool once (not once per edit of the step): counts are per step
    pool = single["n_locality_inputs"] // 12
    for k, e in batch.items():
        assert e["n_locality_inputs"] == e["n_steps"] * pool, k
        assert e["n_locality_labelled"] == e["n_steps"] * single["n_locality_labelled"] // 12, k
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
    assert seq["sr"] == [1.0, 1.0, 1.0], "FT steps until each edit is right"
    assert seq["er"][0] == 1.0 and seq["er"][-1] < 0.5, "later fine-tuning undoes earlier edits"
    assert seq["sr"][-1] == pytest.approx(seq["edit_success"])
    assert (seq["n_edits_applied"], seq["n_edits_skipped"]) == (12, 0) and seq["base_model_unchanged"]
    # a random GPT-2 gives no gold locality answer: TestR is undefined, its own answers are not kept
    assert seq["initial_test_accuracy"] == 0.0 and seq["test_r"] == [None] * 3
    assert seq["test_r_base"][-1] < 0.5 and seq["test_retention_base"] == seq["test_r_base"][-1]
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
    # a random classifier gets about half of the edits right already: those are skipped, not scored
    assert seq["n_edits_applied"] + seq["n_edits_skipped"] == 12 and 0 < seq["n_edits_skipped"] < 12
    # ... and about half of the labels: retention ratios are defined, and agree with the flip counts
    init, lab = seq["initial_test_accuracy"], seq["n_locality_labelled"]
    r2w, w2r = seq["flips_right_to_wrong"], seq["flips_wrong_to_right"]
    assert seq["initial_train_accuracy"] > 0 and init > 0 and all(r is not None for r in seq["train_r"])
    assert seq["test_r"][-1] == pytest.approx((init - (r2w - w2r) / lab) / init)
    assert seq["test_r_base"][-1] == pytest.approx(1 - (r2w + w2r) / lab), "a flipped label is a changed answer"
    assert seq["dataset"] == "fever"


# ---------------------------------------------------------------- refusals
def test_refuses_checkpoint_of_another_base_model(setup_eval):
    with pytest.raises(eval_cli.EvalError, match="was trained for base model"):
        _run("--config", setup_eval["zsre_config"], "--editor_path", setup_eval["root"] / "other.safetensors")


def test_refuses_missing_checkpoint_and_mend_without_one(setup_eval):
    with pytest.raises(eval_cli.EvalError, match="does not exist"):
        _run("--config", setup_eval["zsre_config"], "--editor_path", setup_eval["root"] / "missing.ckpt")
    with pytest.raises(eval_cli.EvalError, match="needs --editor_path"):
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
    args = ("--config", setup_eval["zsre_config"], "--mode", "single", "--editors+", "{class_path: ft, init_args: {max_steps: 1}}")
    val = _run(*args, "--split", "val")["entries"][0]
    test = _run(*args, "--n_edits", 3)["entries"][0]
    assert val["split"] == "val" and test["split"] == "test"
    assert val["n_edits"] == val["n_edits_available"] == 20  # 4 validation subjects x 5 relations
    assert val["n_locality_inputs"] % 20 == 0 and val["n_locality_inputs"] > 20 * 20  # the whole validation pool


def test_surgery_and_patcher_run_under_every_protocol(setup_eval):
    """The new editors through eval.py: a surgery selector never reports more changed weights than its
    budget; the patcher adds neurons (counted as added parameters) and keeps a stream."""
    args = ("--config", setup_eval["zsre_config"], "--n_edits", 4, "--loc_per_edit", 3)
    rep = _run(*args, "--editor", "surgery_dynamic@50", "surgery_l1@50", "patcher", "--mode", "single")
    by = {e["editor"]: e for e in rep["entries"]}
    for name in ("surgery_dynamic", "surgery_l1"):
        assert 0 < by[name]["params_changed"] <= 50 and by[name]["edit_success"] > 0
    assert by["patcher"]["edit_success"] == 1.0 and by["patcher"]["params_changed"] > 0
    seq = _run(*args, "--editor", "patcher", "--mode", "sequential", "--edit_only_when_wrong")["entries"][0]
    assert seq["edit_retention"] == 1.0 and seq["params_changed"] > 0


@pytest.mark.parametrize("editor,cls", [("ft", "editors.ft.FineTune"), ("patcher", "editors.patcher.Patcher"),
                                        ("malmen_stream", "editors.until_right.PolyakStep")])
def test_an_interrupted_stream_resumes_from_its_saved_state(setup_eval, tmp_path, monkeypatch, editor, cls):
    """A stream killed after its 5th edit continues from the state saved at edit 4, not from zero, and
    ends with the figures of an unbroken stream (timings aside); ``malmen_stream``'s key memory is part
    of the saved state."""
    import importlib

    args = ("--config", setup_eval["zsre_config"], "--editor", editor, "--mode", "sequential", "--n_edits", 8,
            "--n_test_probe", 10, "--n_train_probe", 10, "--save_every", 2,
            "--editor_path", setup_eval["root"] / "malmen.safetensors")
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
    rep = _run("--config", setup_eval["zsre_config"], "--n_edits", 2, "--editors+", "{class_path: ft, init_args: {max_steps: 1}}",
               "--run_dir", tmp_path / "job", "--split", "val")
    assert rep["split"] == "val" and (tmp_path / "job" / "report_val.json").exists()


def test_surgery_budget_sweep_reports_each_budget_and_plots_it(setup_eval, tmp_path):
    rep = _run("--config", setup_eval["zsre_config"], "--editor", "surgery_grad@5", "surgery_grad@50",
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

    args = ("--config", setup_eval["zsre_config"], "--n_edits", 2, "--loc_per_edit", 3)
    for n in (5, 50):
        _run(*args, "--editor", f"surgery_grad@{n}", "--report", tmp_path / f"n{n}.json")
    _run(*args, "--editor", "surgery_grad@5", "--split", "val", "--report", tmp_path / "val.json")
    merge_reports([tmp_path / "n5.json", tmp_path / "n50.json"], tmp_path / "merged.json")
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [e["label"] for e in merged["entries"]] == ["surgery_grad@5", "surgery_grad@50"]
    assert (tmp_path / "merged_budget.png").exists()
    with pytest.raises(ValueError, match="differs.*split"):
        merge_reports([tmp_path / "n5.json", tmp_path / "val.json"], tmp_path / "bad.json")


def test_patcher_options_reach_the_editor_and_unknown_ones_are_refused(setup_eval):
    args = ("--config", setup_eval["zsre_config"], "--n_edits", 1, "--loc_per_edit", 2)
    rep = _run(*args, "--editors+", "{class_path: patcher, init_args: {top_k: 4, memory_margin: -5}}")
    (entry,) = rep["entries"]
    assert entry["editor_config"]["top_k"] == 4 and entry["editor_config"]["memory_margin"] == -5
    with pytest.raises(eval_cli.EvalError, match="Patcher.*no_such"):
        _run(*args, "--editors+", "{class_path: patcher, init_args: {no_such: 1}}")


def test_edits_an_editor_gave_up_on_are_counted_in_every_protocol(setup_eval):
    """A patcher with no training steps leaves every edit wrong and rolls it back: evaluation counts them
    (n_edits_rolled_back) in single mode and in the stream, where they count as made and failed."""
    args = ("--config", setup_eval["zsre_config"], "--n_edits", 3, "--loc_per_edit", 2,
            "--editors+", "{class_path: patcher, init_args: {max_steps: 0}}")
    single = _run(*args, "--mode", "single")["entries"][0]
    assert single["n_edits_rolled_back"] == 3 and single["edit_success"] == 0 and single["params_changed"] == 0
    seq = _run(*args, "--mode", "sequential", "--edit_only_when_wrong")["entries"][0]
    assert seq["n_edits_rolled_back"] == seq["n_edits_applied"] == 3 and seq["sr"][-1] == 0
