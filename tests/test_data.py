"""Data layer: file-format readers, encoding/batching per model family, locality hygiene, the
synthetic world generator and DDP sharding (formats: docs/methods.md)."""
from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.edit_data import FeverDataModule, ZsreDataModule
from datamodules.formats import (DataFormatError, detect_task, read_fever_jsonl, read_fever_locality, read_nq,
                                 read_zsre_jsonl, read_zsre_toolkit)
from datamodules.world import RELATIONS, SPLITS, WorldConfig, generate_world, read_jsonl_plain, template_groups

FORMATS_LOGGER = "datamodules.formats"
ALL_TO_TRAIN = (1.0, 1e-12, 1e-12)  # loc_shares that leave (all but a 2e-12 chance) every input in the training pool


# --------------------------------------------------------------------------- helpers


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _zsre_row(q, pred, alts, reph, gold=None, **extra):
    return {"input": q, "prediction": pred, "alternatives": alts, "filtered_rephrases": reph,
            "output": [{"answer": gold if gold is not None else pred, "provenance": []}], **extra}


def _fever_row(claim, pred, reph, gold=None, alts=None, logit=0.5):
    flip = "REFUTES" if pred == "SUPPORTS" else "SUPPORTS"
    return {"input": claim, "prediction": pred, "alternatives": [flip] if alts is None else alts,
            "filtered_rephrases": reph, "output": [{"answer": gold or pred}], "logit": logit}


def _toolkit_row(subject, src, pred, alt, reph, loc, loc_ans, answers=None):
    return {"subject": subject, "src": src, "pred": pred, "rephrase": reph, "alt": alt,
            "answers": answers if answers is not None else [pred], "loc": loc, "loc_ans": loc_ans,
            "cond": f"{pred} >> {alt} || {src}"}


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _text(tok, ex: dict, labelled: bool) -> str:
    """The decoded prompt (``labelled=False``) or target (``True``) tokens of an encoded causal example."""
    return tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if (l != -100) == labelled]).strip()


def _world_paths(world: Path, task: str) -> dict:
    loc = "nq-loc.jsonl" if task == "zsre" else "fever-loc.jsonl"
    return {"train_path": str(world / f"{task}-train.jsonl"), "val_path": str(world / f"{task}-val.jsonl"),
            "test_path": str(world / f"{task}-test.jsonl"), "loc_path": str(world / loc),
            "tokenizer": str(world / "tokenizer")}


# --------------------------------------------------------------------------- 1. file formats


def test_zsre_mend_jsonl_fields(tmp_path):
    path = _write_jsonl(tmp_path / "structured_zeroshot-dev-new_annotated_final.jsonl", [
        _zsre_row("Where was Ada born?", "Paris", ["Paris", "Lyon", "Nice"],
                  ["Ada was born in which city?", "What is Ada's birthplace?"], gold="London"),
        _zsre_row("Who employs Bob?", "Acme", ["Globex"], ["Which company does Bob work for?"], subject="Bob"),
    ])
    recs = read_zsre_jsonl(path)
    assert len(recs) == 2
    a, b = recs
    assert a.prompt == "Where was Ada born?"
    assert a.target == "Lyon"  # the first alternative that differs from the prediction
    assert a.prediction == "Paris" and a.gold == "London"
    assert a.rephrases == ["Ada was born in which city?", "What is Ada's birthplace?"]
    assert a.extra["alternatives"] == ["Lyon", "Nice"]
    assert a.subject is None  # the released schema has no subject
    assert (b.target, b.gold, b.rephrases, b.subject) == ("Globex", "Acme", ["Which company does Bob work for?"], "Bob")


def test_zsre_toolkit_json_fields(tmp_path):
    path = tmp_path / "zsre_mend_eval.json"
    path.write_text(json.dumps([
        _toolkit_row("Ada Lovelace", "Where was Ada Lovelace born?", "London", "Paris",
                     "In which city was Ada Lovelace born?", "nq question: who wrote hamlet", "Shakespeare",
                     answers=["Marylebone"]),
        _toolkit_row("Bob", "Who employs Bob?", "Acme", "Globex", "Which firm does Bob work for?",
                     "where is the eiffel tower", "Paris"),
    ], indent=1), encoding="utf-8")
    recs, locs = read_zsre_toolkit(path)
    assert [(r.prompt, r.target, r.rephrases, r.gold, r.prediction, r.subject) for r in recs] == [
        ("Where was Ada Lovelace born?", "Paris", ["In which city was Ada Lovelace born?"], "Marylebone", "London",
         "Ada Lovelace"),
        ("Who employs Bob?", "Globex", ["Which firm does Bob work for?"], "Acme", "Acme", "Bob"),
    ]
    # the "nq question: " prefix is stripped; a loc without it is kept as is
    assert [(p.prompt, p.answer) for p in locs] == [("who wrote hamlet", "Shakespeare"),
                                                    ("where is the eiffel tower", "Paris")]


def test_fever_jsonl_fields(tmp_path):
    path = _write_jsonl(tmp_path / "fever-dev-kilt.jsonl", [
        _fever_row("Ada was born in Paris.", "SUPPORTS", ["Paris is Ada's birthplace."]),
        _fever_row("Bob works for Acme.", "REFUTES", ["Acme employs Bob.", "Bob is employed by Acme."],
                   gold="SUPPORTS", logit=-1.5),
    ])
    recs = read_fever_jsonl(path)
    assert [(r.prompt, r.prediction, r.target, r.gold, r.rephrases) for r in recs] == [
        ("Ada was born in Paris.", "SUPPORTS", "REFUTES", "SUPPORTS", ["Paris is Ada's birthplace."]),
        ("Bob works for Acme.", "REFUTES", "SUPPORTS", "SUPPORTS", ["Acme employs Bob.", "Bob is employed by Acme."]),
    ]
    loc = read_fever_locality(path)
    assert [(p.prompt, p.answer) for p in loc] == [("Ada was born in Paris.", "SUPPORTS"),
                                                  ("Bob works for Acme.", "SUPPORTS")]


def test_nq_locality_document_and_lines(tmp_path):
    doc = tmp_path / "nq-doc.json"
    doc.write_text(json.dumps({"questions": ["who wrote hamlet", "capital of france"],
                               "answers": [["Shakespeare", "William Shakespeare"], "Paris"]}, indent=2))
    lines = _write_jsonl(tmp_path / "nq-lines.jsonl", [
        {"questions": ["who wrote hamlet"], "answers": ["Shakespeare"]},
        {"questions": ["capital of france", "largest ocean"], "answers": ["Paris", ["Pacific", "Pacific Ocean"]]},
    ])
    assert [(p.prompt, p.answer) for p in read_nq(doc)] == [("who wrote hamlet", "Shakespeare"),
                                                            ("capital of france", "Paris")]
    assert [(p.prompt, p.answer) for p in read_nq(lines)] == [("who wrote hamlet", "Shakespeare"),
                                                              ("capital of france", "Paris"),
                                                              ("largest ocean", "Pacific")]
    bad = _write_jsonl(tmp_path / "nq-bad.jsonl", [{"questions": ["a"], "answers": ["x"]},
                                                   {"questions": ["b", "c"], "answers": ["y"]}])
    with pytest.raises(DataFormatError, match=r"nq-bad\.jsonl:2:.*different lengths"):
        read_nq(bad)


def test_zsre_datamodule_reads_jsonl_end_to_end(small_world, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [
        _zsre_row("Where was Ada born?", "Paris", ["Paris", "Lyon"], ["What is Ada's birthplace?", "Ada hails from?"]),
        _zsre_row("Who employs Bob?", "Acme", [], ["Which company does Bob work for?"]),  # skipped: no alternative
    ])
    nq = _write_jsonl(tmp_path / "nq.jsonl", [{"questions": ["who wrote hamlet"], "answers": ["Shakespeare"]}])
    dm = ZsreDataModule(train_path=str(train), loc_path=str(nq), tokenizer=str(small_world / "tokenizer"),
                        n_edits=1, shuffle=False, loc_shares=ALL_TO_TRAIN)
    dm.setup("fit")
    recs = dm.splits["train"].records
    assert [(r.prompt, r.target) for r in recs] == [("Where was Ada born?", "Lyon")]
    assert dm.splits["train"].items == [(0, 0), (0, 1)]  # train: every paraphrase once per epoch
    assert [(p.prompt, p.answer) for p in dm.loc_pairs] == [("who wrote hamlet", "Shakespeare")]
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and [b["index"] for b in batches] == [[0], [1]]


def test_zsre_datamodule_reads_toolkit_json_end_to_end(small_world, tmp_path):
    """The toolkit .json carries its own locality questions: no loc_path needed."""
    path = tmp_path / "zsre_toolkit_train.json"
    path.write_text(json.dumps([
        _toolkit_row("Ada", "Where was Ada born?", "London", "Paris", "What is Ada's birthplace?",
                     "nq question: who wrote hamlet", "Shakespeare"),
        _toolkit_row("Bob", "Who employs Bob?", "Acme", "Globex", "Which firm does Bob work for?",
                     "nq question: capital of france", "Paris"),
        _toolkit_row("Cy", "What does Cy play?", "harp", "harp", "Which instrument does Cy play?",  # alt == pred
                     "nq question: largest ocean", "Pacific"),
    ]))
    dm = ZsreDataModule(train_path=str(path), tokenizer=str(small_world / "tokenizer"),
                        n_edits=2, loc_per_edit=1, shuffle=False, loc_shares=ALL_TO_TRAIN)
    dm.setup("fit")
    assert [(r.prompt, r.target, r.rephrases) for r in dm.splits["train"].records] == [
        ("Where was Ada born?", "Paris", ["What is Ada's birthplace?"]),
        ("Who employs Bob?", "Globex", ["Which firm does Bob work for?"]),
    ]
    assert {(p.prompt, p.answer) for p in dm.loc_pairs} == {("who wrote hamlet", "Shakespeare"),
                                                            ("capital of france", "Paris"),
                                                            ("largest ocean", "Pacific")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["edit_inner"]["input_ids"].shape[0] == 2 and batch["loc"]["input_ids"].shape[0] == 2


# --------------------------------------------------------------------------- 2. batches per family


def _check_causal_rows(tok, sub: dict, expected: list[tuple[str, str | None]]):
    ids, mask, labels = sub["input_ids"], sub["attention_mask"], sub["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == len(expected)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for i, (prompt, target) in enumerate(expected):
        p = _ids(tok, prompt)
        t = _ids(tok, " " + target) + [eos] if target is not None else []
        n = len(p) + len(t)
        assert ids[i, :n].tolist() == p + t
        assert mask[i, :n].tolist() == [1] * n and mask[i, n:].eq(0).all()
        assert ids[i, n:].eq(pad).all()
        assert labels[i, :len(p)].eq(-100).all(), "prompt tokens must not be scored"
        assert labels[i, len(p):n].tolist() == t
        assert labels[i, n:].eq(-100).all(), "padding must not be scored"
    assert (labels != -100).sum() == sum(len(_ids(tok, " " + t)) + 1 for _, t in expected if t is not None)


def test_causal_batch_structure_and_masking(small_world, tokenizer):
    n_edits, k = 3, 2
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), family="causal", n_edits=n_edits, loc_per_edit=k)
    dm.setup("fit")
    split = dm.splits["train"]
    loc_by_prompt = {p.prompt: p.answer for p in dm.loc_pairs}
    for b, batch in zip(range(2), dm.train_dataloader()):
        assert {"edit_inner", "edit_outer", "loc", "index"} <= set(batch)
        rows = [split.items[i] for i in batch["index"]]
        recs = [split.records[r] for r, _ in rows]
        _check_causal_rows(tokenizer, batch["edit_inner"], [(r.prompt, r.target) for r in recs])
        _check_causal_rows(tokenizer, batch["edit_outer"],
                           [(split.records[r].rephrases[p], split.records[r].target) for r, p in rows])
        loc = batch["loc"]
        assert loc["input_ids"].shape[0] == n_edits * k
        # every loc row is some locality prompt followed by its known answer
        for i in range(n_edits * k):
            n = int(loc["attention_mask"][i].sum())
            scored = loc["labels"][i] != -100
            prompt = tokenizer.decode(loc["input_ids"][i, :n][~scored[:n]].tolist())
            matches = [q for q in loc_by_prompt if tokenizer.decode(_ids(tokenizer, q)) == prompt]
            assert matches, prompt
            _check_causal_rows(tokenizer, {key: v[i:i + 1] for key, v in loc.items()},
                               [(matches[0], loc_by_prompt[matches[0]])])
    # val/test: one item per record (first paraphrase), ragged tail kept
    val = dm.splits["val"]
    assert val.items == [(i, 0) for i in range(len(val.records))]
    assert sum(len(b["index"]) for b in dm.val_dataloader()) == len(val.records)


def test_causal_truncation_keeps_the_end_of_the_prompt(tokenizer):
    from datamodules.encoding import encode

    prompt = "What is the native language of the painter who works for Orbis Works ?"
    p, t = _ids(tokenizer, prompt), _ids(tokenizer, " Velorian") + [tokenizer.eos_token_id]
    assert len(p) > 8
    (e,) = encode(tokenizer, "causal", [prompt], ["Velorian"], max_length=8)
    assert e["input_ids"] == p[-(8 - len(t)):] + t  # cut from the left: the question mark stays next to the answer
    assert e["labels"] == [-100] * (8 - len(t)) + t
    (s2s,) = encode(tokenizer, "seq2seq", [prompt], ["Velorian"], max_length=8)
    assert len(s2s["input_ids"]) == 8 and s2s["labels"] == t


def test_seq2seq_batch_structure_and_shift(small_world, tokenizer):
    from transformers.models.bart.modeling_bart import shift_tokens_right

    start = tokenizer.bos_token_id
    n_edits, k = 2, 3
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), family="seq2seq", n_edits=n_edits, loc_per_edit=k,
                        decoder_start_id=start)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    split = dm.splits["train"]
    recs = [split.records[split.items[i][0]] for i in batch["index"]]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for name, rows in (("edit_inner", n_edits), ("edit_outer", n_edits), ("loc", n_edits * k)):
        sub = batch[name]
        assert set(sub) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}
        assert sub["input_ids"].shape[0] == sub["labels"].shape[0] == rows
        assert sub["decoder_input_ids"].shape == sub["labels"].shape == sub["decoder_attention_mask"].shape
        # decoder inputs are the labels shifted right behind the start id (HF's own shift as reference)
        assert torch.equal(sub["decoder_input_ids"], shift_tokens_right(sub["labels"], pad, start))
        assert sub["decoder_input_ids"][:, 0].eq(start).all()
        lab = sub["labels"]
        assert torch.equal(sub["decoder_attention_mask"], (lab != -100).long())
        # encoder input: the prompt with the tokenizer's special tokens; no prompt tokens in the labels
        for i in range(rows):
            n = int(sub["attention_mask"][i].sum())
            assert sub["input_ids"][i, n:].eq(pad).all()
            t = lab[i][lab[i] != -100].tolist()
            assert t[-1] == eos and lab[i, :len(t)].ne(-100).all()
    for i, r in enumerate(recs):
        sub = batch["edit_inner"]
        enc = tokenizer(r.prompt)["input_ids"]
        assert sub["input_ids"][i, :len(enc)].tolist() == enc
        t = _ids(tokenizer, " " + r.target) + [eos]
        assert sub["labels"][i, :len(t)].tolist() == t and sub["labels"][i, len(t):].eq(-100).all()
        assert batch["edit_outer"]["labels"][i, :len(t)].tolist() == t


def test_classifier_batch_labels_are_flipped_verdicts(small_world, tokenizer):
    n_edits, k = 4, 2
    paths = _world_paths(small_world, "fever")
    dm = FeverDataModule(**paths, n_edits=n_edits, loc_per_edit=k)
    dm.setup("fit")
    assert dm.hparams.family == "classifier"
    raw = {r["input"]: r for r in read_jsonl_plain(Path(paths["train_path"]))}
    loc_gold = {r["input"]: r["output"][0]["answer"] for r in read_jsonl_plain(Path(paths["loc_path"]))}
    split = dm.splits["train"]
    seen = set()
    for _, batch in zip(range(3), dm.train_dataloader()):
        for name, rows in (("edit_inner", n_edits), ("edit_outer", n_edits), ("loc", n_edits * k)):
            sub = batch[name]
            assert set(sub) == {"input_ids", "attention_mask", "labels"}
            assert sub["input_ids"].shape[0] == rows and sub["labels"].shape == (rows,)
            assert sub["labels"].dtype == torch.float32
            assert set(sub["labels"].tolist()) <= {0.0, 1.0}
        for i, idx in enumerate(batch["index"]):
            r, p = split.items[idx]
            rec = split.records[r]
            flipped = 0.0 if raw[rec.prompt]["prediction"] == "SUPPORTS" else 1.0
            assert batch["edit_inner"]["labels"][i].item() == flipped
            assert batch["edit_outer"]["labels"][i].item() == flipped
            assert batch["edit_inner"]["input_ids"][i, :len(tokenizer(rec.prompt)["input_ids"])].tolist() == \
                tokenizer(rec.prompt)["input_ids"]
            seen.add(flipped)
        for i in range(n_edits * k):  # locality claims keep their gold verdict
            n = int(batch["loc"]["attention_mask"][i].sum())
            claim_ids = batch["loc"]["input_ids"][i, :n].tolist()
            golds = {g for c, g in loc_gold.items() if tokenizer(c)["input_ids"] == claim_ids}
            assert golds and batch["loc"]["labels"][i].item() in {float(g == "SUPPORTS") for g in golds}
    assert seen == {0.0, 1.0}, "the sample should hold both verdicts"


# --------------------------------------------------------------------------- 3. locality disjointness


def test_locality_pool_disjoint_from_world_edits(small_world):
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"))
    dm.setup("fit")
    edit_text = {t for s in dm.splits.values() for r in s.records for t in [r.prompt, *r.rephrases]}
    subjects = {r["subject"] for sp in ("train", "val", "test")
                for r in read_jsonl_plain(small_world / f"zsre-{sp}.jsonl")}
    assert dm.loc_pairs and len(subjects) > 10
    for p in dm.loc_pairs:
        assert p.prompt not in edit_text
        words = set(re.findall(r"\w+", p.prompt))
        assert not subjects & words, p.prompt
    # the world's locality file itself only speaks of locality-only subjects
    nq = read_nq(small_world / "nq-loc.jsonl")
    assert len(dm.loc_pairs) == len(nq)


def test_hard_locality_inputs_are_worded_like_the_edit_and_only_in_training(small_world):
    """hard_loc: the last inputs of each training edit's locality set share the most words with the
    edit prompt (same wording, another subject); validation keeps random draws."""
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), loc_per_edit=3, hard_loc=2)
    dm.setup("fit")
    train, tok = dm.dataset("train"), dm.tokenizer
    pool_words = [set(re.findall(r"\w+", p.prompt.lower())) for p in dm.loc_train_pairs]

    def overlap(a: set, b: set) -> float:
        return len(a & b) / len(a | b)

    for i in range(0, len(train), 7):
        r, _ = train.split.items[i]
        w = set(re.findall(r"\w+", train.split.records[r].prompt.lower()))
        best = sorted((overlap(w, pw) for pw in pool_words), reverse=True)[7]  # the 8th best
        for loc in train[i]["loc"][1:]:
            text = _text(tok, loc, labelled=False)
            assert overlap(w, set(re.findall(r"\w+", text.lower()))) >= best - 1e-9, text
    val = dm.dataset("val")
    assert val.n_hard == 0


@pytest.mark.parametrize("redraw", [False, True])
def test_hard_locality_inputs_by_answer_share_the_edits_current_answer(small_world, redraw):
    """hard_loc_by="answer": the hard locality inputs of a training edit are other subjects' questions
    whose answer is the edit's current prediction (the facts an "old answer -> new answer" edit
    breaks), in every epoch; records without such an input fall back to the wording neighbours."""
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), loc_per_edit=3, hard_loc=2, hard_loc_by="answer",
                        redraw=redraw)
    dm.setup("fit")
    train = dm.dataset("train")
    pool = {id(f): p for f, p in zip(dm.loc_train_encoded, dm.loc_train_pairs)}
    answers = {p.answer for p in dm.loc_train_pairs}
    checked = 0
    for i in range(0, len(train), 5):
        rec = train.split.records[train.split.items[i][0]]
        if rec.prediction not in answers:
            continue
        for epoch in (0, 1):
            hard = train[(i, epoch) if redraw else i]["loc"][1:]
            assert [pool[id(f)].answer for f in hard] == [rec.prediction] * 2
            assert all(rec.subject not in pool[id(f)].prompt for f in hard)
        checked += 1
    assert checked > 10


def test_redraw_gives_each_training_edit_a_fresh_target_wording_and_locality_set_per_epoch(small_world):
    """redraw: item ``(i, epoch)`` is a deterministic draw (any process, any number of processes) of
    one of the record's alternatives as target, two distinct wordings of the record as edit input and
    paraphrase, and random locality inputs; other epochs draw differently; validation is fixed."""
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), loc_per_edit=2, redraw=True, seed=3)
    dm.setup("fit")
    train, tok = dm.dataset("train"), dm.tokenizer

    seen: dict[int, set] = {}
    for epoch in range(4):
        for i in range(0, len(train), 5):
            item = train[(i, epoch)]
            assert item == train[(i, epoch)]  # deterministic
            rec = train.split.records[train.split.items[i][0]]
            wordings = {" ".join(re.findall(r"\w+|\S", w)) for w in [rec.prompt, *rec.rephrases]}
            e, p = (" ".join(re.findall(r"\w+|\S", _text(tok, x, False))) for x in (item["edit"], item["rephrase"]))
            assert e in wordings and p in wordings and e != p
            target = _text(tok, item["edit"], True)
            assert target == _text(tok, item["rephrase"], True)
            assert target.replace(tok.eos_token, "").strip() in rec.extra["alternatives"]
            seen.setdefault(i, set()).add((e, p, target, tuple(tuple(l["input_ids"]) for l in item["loc"])))
    assert sum(len(v) > 1 for v in seen.values()) > 0.9 * len(seen)  # epochs redraw
    val = dm.dataset("val")
    assert val[(0, 0)] == val[(0, 5)] == val[0]  # evaluation items never change


def test_epoch_sampler_orders_the_same_for_one_process_and_two(small_world):
    """A step of one process with batch 4 holds the same edits as the same step of two processes with
    batch 2 each (DDP equals one process on the same global batch); the epoch reaches the dataset."""
    def steps(world: int, rank: int, batch: int) -> list[list[int]]:
        dm = ZsreDataModule(**_world_paths(small_world, "zsre"), batch_size=batch, redraw=True, seed=1)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(2)
        assert all(e == 2 for _, e in loader.sampler)
        return [b["index"] for b in loader]

    one, r0, r1 = steps(1, 0, 4), steps(2, 0, 2), steps(2, 1, 2)
    assert len(r0) == len(r1) and len(r0) >= len(one) - 1
    for s in range(len(r0)):
        assert sorted(one[s]) == sorted(r0[s] + r1[s])
    assert [i for b in one for i in b] != sorted(i for b in one for i in b)  # shuffled


def test_meta_training_validation_and_test_locality_inputs_are_disjoint(small_world):
    """Meta-training's KL inputs, validation's and test's locality inputs are three disjoint parts of the
    pool, and (pools are assigned by subject) share no subject."""
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), loc_per_edit=3, redraw=True, hard_loc=1)
    dm.setup("fit")
    ids = lambda ex: tuple(ex["input_ids"])
    drawn = {"train": {ids(l) for e in range(3) for i in range(len(dm.dataset("train")))
                       for l in dm.dataset("train")[(i, e)]["loc"]}}
    for split in ("val", "test"):
        drawn[split] = {ids(l) for i in range(len(dm.dataset(split))) for l in dm.dataset(split)[i]["loc"]}
    assert all(drawn.values())
    assert not drawn["train"] & drawn["val"] and not drawn["train"] & drawn["test"] and not drawn["val"] & drawn["test"]
    assert sum(len(v) for v in dm.loc_pools.values()) == len(dm.loc_pairs)
    names = lambda pairs: {w for p in pairs for w in re.findall(r"[A-Z]\w+", p.prompt)} - {"What", "Where", "Which", "Who", "In", "For", "By", "The"}
    subj = {k: names(v) for k, v in dm.loc_split_pairs.items()}
    assert not subj["train"] & subj["val"] and not subj["val"] & subj["test"] and not subj["train"] & subj["test"]


def test_locality_filter_drops_overlapping_inputs(small_world, tmp_path):
    """Locality inputs that repeat an edit text or name an edited subject (one or several words) are dropped."""
    path = tmp_path / "toolkit.json"
    path.write_text(json.dumps([
        _toolkit_row("Ada Lovelace", "Where was Ada Lovelace born?", "London", "Paris",
                     "In which city was Ada Lovelace born?", "nq question: what did Ada Lovelace write?", "notes"),
        _toolkit_row("Bob", "Who employs Bob?", "Acme", "Globex", "Which firm does Bob work for?",
                     "nq question: Who employs Bob?", "Acme"),
        _toolkit_row("Cy", "What does Cy play?", "harp", "flute", "Which instrument does Cy play?",
                     "nq question: In which city was Ada Lovelace born?", "London"),
        _toolkit_row("Dee", "What does Dee speak?", "Orvic", "Sereth", "Which language does Dee speak?",
                     "nq question: who wrote hamlet", "Shakespeare"),
        _toolkit_row("Eve", "Who employs Eve?", "Acme", "Globex", "Which firm does Eve work for?",
                     "nq question: is Bob's garden large?", "yes"),
        _toolkit_row("Fay", "Who employs Fay?", "Acme", "Globex", "Which firm does Fay work for?",
                     "nq question: who was Ada Byron's mother", "Anne"),  # 'Ada' alone is not the subject
    ]))
    dm = ZsreDataModule(train_path=str(path), tokenizer=str(small_world / "tokenizer"), loc_shares=ALL_TO_TRAIN)
    dm.setup("fit")
    assert sorted(p.prompt for p in dm.loc_pairs) == ["who was Ada Byron's mother", "who wrote hamlet"]

    # released MEND rows carry no subject: exact repeats of an edit input or paraphrase still go
    train = _write_jsonl(tmp_path / "train.jsonl", [
        _zsre_row("Where was Ada born?", "Paris", ["Lyon"], ["What is Ada's birthplace?"])])
    val = _write_jsonl(tmp_path / "val.jsonl", [
        _zsre_row("Who employs Bob?", "Acme", ["Globex"], ["Which firm does Bob work for?"])])
    nq = _write_jsonl(tmp_path / "nq.jsonl", [
        {"questions": ["Where was Ada born?", "who wrote hamlet", "What is Ada's birthplace?",
                       "Which firm does Bob work for?", "Where was Ada born"], "answers": ["a", "b", "c", "d", "e"]}])
    dm = ZsreDataModule(train_path=str(train), val_path=str(val), loc_path=str(nq),
                        tokenizer=str(small_world / "tokenizer"), loc_shares=(1.0, 1.0, 1e-12))
    dm.setup("fit")
    pools = {k: [p.prompt for p in v] for k, v in dm.loc_split_pairs.items()}
    # the meta-training pool loses what any split's edits say; validation's only what its own edits say
    assert set(pools["train"]) <= {"who wrote hamlet", "Where was Ada born"}
    assert set(pools["val"]) <= {"who wrote hamlet", "Where was Ada born", "Where was Ada born?",
                                 "What is Ada's birthplace?"}
    assert sorted(p.prompt for p in dm.loc_pairs) == sorted(pools["train"] + pools["val"])
    only_overlap = _write_jsonl(tmp_path / "nq-overlap.jsonl", [
        {"questions": ["Where was Ada born?"], "answers": ["Paris"]}])
    dm = ZsreDataModule(train_path=str(train), loc_path=str(only_overlap), tokenizer=str(small_world / "tokenizer"),
                        loc_shares=ALL_TO_TRAIN)
    with pytest.raises(ValueError, match="no train locality inputs"):
        dm.setup("fit")


# --------------------------------------------------------------------------- 4. generator


def _world_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.json*"))}


def test_world_is_deterministic(tmp_path):
    cfg = WorldConfig(n_subjects=30, seed=3)
    a = _world_files(generate_world(tmp_path / "a", cfg))
    b = _world_files(generate_world(tmp_path / "b", cfg))
    assert set(a) >= {f"{t}-{s}.jsonl" for t in ("zsre", "fever") for s in ("train", "val", "test")} | {
        "nq-loc.jsonl", "fever-loc.jsonl", "base-qa.jsonl", "base-claims.jsonl"}
    assert a == b
    c = _world_files(generate_world(tmp_path / "c", WorldConfig(n_subjects=30, seed=4)))
    for name in ("zsre-train.jsonl", "fever-train.jsonl", "base-qa.jsonl"):
        assert a[name] != c[name]


def test_subject_names_are_never_a_word_of_the_world(monkeypatch):
    """A generated name that spells an object or template word ("Lirren" is a birthplace) is skipped."""
    import datamodules.world as world

    monkeypatch.setattr(world, "_ONSETS", ["l", "r"])
    monkeypatch.setattr(world, "_NUCLEI", ["i", "e"])
    monkeypatch.setattr(world, "_CODAS", ["r", "n"])
    names = world._subject_names(300, random.Random(0))
    assert len(set(names)) == 300 and "Lirren" not in names
    assert not {n.lower() for n in names} & world._RESERVED


def test_world_splits_are_subject_disjoint(small_world):
    by_split: dict[str, set] = {sp: set() for sp in SPLITS}
    for r in read_jsonl_plain(small_world / "base-qa.jsonl"):
        by_split[r["split"]].add(r["subject"])
    for task in ("zsre", "fever"):
        for sp in ("train", "val", "test"):
            subs = {r["subject"] for r in read_jsonl_plain(small_world / f"{task}-{sp}.jsonl")}
            assert subs == by_split[sp]
    assert {r["subject"] for r in read_jsonl_plain(small_world / "fever-loc.jsonl")} == by_split["loc"]
    assert all(by_split.values())
    names = list(SPLITS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not by_split[a] & by_split[b], (a, b)
    # every NQ locality question names one subject, a locality-only one; all of them are asked about
    everyone = set().union(*by_split.values())
    named = [everyone & set(re.findall(r"\w+", p.prompt)) for p in read_nq(small_world / "nq-loc.jsonl")]
    assert all(len(n) == 1 for n in named)
    assert set().union(*named) == by_split["loc"]


def test_world_reserved_templates_only_in_test_rephrases(small_world):
    cfg = WorldConfig(**{k: tuple(v) if k == "split_fractions" else v
                         for k, v in json.loads((small_world / "world.json").read_text())["config"].items()})
    n_claim_eval = max(1, cfg.eval_templates // 2)
    claim_objs = {o for objs, _, _ in RELATIONS.values() for o in objs}

    def q_group(row, text):
        vis, res = template_groups(RELATIONS[row["relation"]][1], cfg.eval_templates)
        if text in {t.format(s=row["subject"]) for t in res}:
            return "reserved"
        assert text in {t.format(s=row["subject"]) for t in vis}, text
        return "visible"

    def c_group(row, text):
        vis, res = template_groups(RELATIONS[row["relation"]][2], n_claim_eval)
        fill = lambda ts: {t.format(s=row["subject"], o=o) for t in ts for o in claim_objs}  # noqa: E731
        if text in fill(res):
            return "reserved"
        assert text in fill(vis), text
        return "visible"

    for task, group in (("zsre", q_group), ("fever", c_group)):
        n_reserved_seen = 0
        reserved_used: dict[str, set] = {r: set() for r in RELATIONS}
        for sp in ("train", "val", "test"):
            rows = read_jsonl_plain(small_world / f"{task}-{sp}.jsonl")
            assert rows
            for row in rows:
                assert group(row, row["input"]) == "visible"
                kinds = {group(row, t) for t in row["filtered_rephrases"]}
                assert row["filtered_rephrases"]
                if sp == "test":
                    assert kinds == {"reserved"}, row
                    n_reserved_seen += len(row["filtered_rephrases"])
                    reserved_used[row["relation"]].add(len(set(row["filtered_rephrases"])))
                else:
                    assert kinds == {"visible"}, row
        assert n_reserved_seen > 0
        # every reserved wording is used: a test row is paraphrased in all of its relation's reserved templates
        n_res = cfg.eval_templates if task == "zsre" else n_claim_eval
        assert all(used == {n_res} for used in reserved_used.values()), reserved_used


# --------------------------------------------------------------------------- 5. errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(_zsre_row("q?", "a", ["b"], ["r?"]))
    path.write_text(good + "\n\n" + good + "\n" + '{"input": "q?", "prediction": \n')
    with pytest.raises(DataFormatError) as e:
        read_zsre_jsonl(path)
    assert str(path) in str(e.value) and ":4:" in str(e.value)
    fever = tmp_path / "broken-fever.jsonl"
    fever.write_text(json.dumps(_fever_row("c.", "SUPPORTS", ["c!"])) + "\n" + "not json\n")
    with pytest.raises(DataFormatError, match=r"broken-fever\.jsonl:2: not valid JSON"):
        read_fever_jsonl(fever)
    nq = tmp_path / "broken-nq.jsonl"
    nq.write_text('{"questions": ["a"], "answers": ["b"]}\n{"questions": ["a"], "answers": ["b"]}\n["x"]\n')
    with pytest.raises(DataFormatError, match=r"broken-nq\.jsonl:3: expected a JSON object"):
        read_nq(nq)
    toolkit = tmp_path / "broken.json"
    toolkit.write_text('[\n {"src": "q?",\n  "alt" "b"}\n]')
    with pytest.raises(DataFormatError, match=r"broken\.json:3:"):
        read_zsre_toolkit(toolkit)


@pytest.mark.parametrize("missing", ["input", "prediction", "alternatives", "filtered_rephrases", "output"])
def test_missing_field_names_field_and_line(tmp_path, missing):
    rows = [_zsre_row("q1?", "a", ["b"], ["r1?"]), _zsre_row("q2?", "a", ["b"], ["r2?"])]
    del rows[1][missing]
    path = _write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(DataFormatError) as e:
        read_zsre_jsonl(path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and f"'{missing}'" in msg


def test_toolkit_missing_field_names_field_and_record(tmp_path):
    rows = [_toolkit_row("A", "q?", "a", "b", "r?", "nq question: x", "y") for _ in range(3)]
    del rows[2]["rephrase"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=r"t\.json:record 2: missing required field 'rephrase'"):
        read_zsre_toolkit(path)


def test_unusable_records_are_skipped_and_counted(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "skips.jsonl", [
        _zsre_row("q1?", "a", ["b"], ["r1?"]),
        _zsre_row("q2?", "a", [], ["r2?"]),
        _zsre_row("q3?", "a", ["a"], ["r3?"]),  # the only alternative is the prediction itself
        _zsre_row("q4?", "a", ["b"], []),
    ])
    with caplog.at_level(logging.INFO, logger=FORMATS_LOGGER):
        recs = read_zsre_jsonl(path)
    assert [r.prompt for r in recs] == ["q1?"]
    msgs = [r.getMessage() for r in caplog.records if r.name == FORMATS_LOGGER]
    assert len(msgs) == 1
    assert "skips.jsonl" in msgs[0] and "kept 1" in msgs[0]
    assert "2 without alternatives" in msgs[0] and "1 without rephrases" in msgs[0]

    caplog.clear()
    fever = _write_jsonl(tmp_path / "fever-skips.jsonl", [
        _fever_row("c1.", "SUPPORTS", ["c1 again."]),
        _fever_row("c2.", "SUPPORTS", []),
        _fever_row("c3.", "REFUTES", ["c3 again."], alts=["REFUTES"]),
    ])
    with caplog.at_level(logging.INFO, logger=FORMATS_LOGGER):
        assert [r.prompt for r in read_fever_jsonl(fever)] == ["c1."]
    msgs = [r.getMessage() for r in caplog.records if r.name == FORMATS_LOGGER]
    assert len(msgs) == 1 and "1 without alternatives" in msgs[0] and "1 without rephrases" in msgs[0]

    caplog.clear()
    toolkit = tmp_path / "tk.json"
    toolkit.write_text(json.dumps([_toolkit_row("A", "q?", "a", "b", "r?", "x", "y"),
                                   _toolkit_row("B", "q?", "a", "a", "r?", "x", "y"),
                                   _toolkit_row("C", "q?", "a", "b", "", "x", "y")]))
    with caplog.at_level(logging.INFO, logger=FORMATS_LOGGER):
        assert len(read_zsre_toolkit(toolkit)[0]) == 1
    msgs = [r.getMessage() for r in caplog.records if r.name == FORMATS_LOGGER]
    assert len(msgs) == 1 and "1 without alternatives" in msgs[0] and "1 without rephrases" in msgs[0]


def test_clean_file_logs_nothing(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "clean.jsonl", [_zsre_row("q1?", "a", ["b"], ["r1?"])])
    with caplog.at_level(logging.INFO, logger=FORMATS_LOGGER):
        read_zsre_jsonl(path)
    assert not [r for r in caplog.records if r.name == FORMATS_LOGGER]


@pytest.mark.parametrize("field,value", [("prediction", "NOT ENOUGH INFO"), ("output", [{"answer": "TRUE"}])])
def test_fever_bad_label_is_refused(tmp_path, field, value):
    rows = [_fever_row("c1.", "SUPPORTS", ["c1 again."]), _fever_row("c2.", "REFUTES", ["c2 again."])]
    rows[1][field] = value
    path = _write_jsonl(tmp_path / "fever-bad.jsonl", rows)
    with pytest.raises(DataFormatError, match=rf"fever-bad\.jsonl:2: field '{field}'"):
        read_fever_jsonl(path)


def test_fever_locality_bad_label_is_refused(tmp_path):
    rows = [{"input": "c1.", "output": [{"answer": "SUPPORTS"}]}, {"input": "c2.", "output": [{"answer": "true"}]}]
    path = _write_jsonl(tmp_path / "fever-loc.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"fever-loc\.jsonl:2: field 'output' should be one of"):
        read_fever_locality(path)


# --------------------------------------------------------------------------- 6. DDP sharding


@pytest.mark.parametrize("shuffle", [True, False])
def test_ddp_ranks_get_disjoint_shards(small_world, shuffle):
    n_edits = 4
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), n_edits=n_edits, shuffle=shuffle, seed=7)
    dm.setup("fit")
    n = len(dm.dataset("train"))
    per_rank = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        idx = [i for b in loader for i in b["index"]]
        assert all(len(b["index"]) == n_edits for b in dm.train_dataloader())
        assert len(idx) == len(set(idx))
        per_rank.append(idx)
    assert len(per_rank[0]) == len(per_rank[1]) == (n // 2) // n_edits * n_edits
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) <= set(range(n))
    # the two shards together cover nearly everything (at most the ragged tails are dropped)
    assert len(set(per_rank[0]) | set(per_rank[1])) >= n - 1 - 2 * (n_edits - 1)
    if shuffle:
        assert per_rank[0] != sorted(per_rank[0])
    dm.trainer = None
    single = [i for b in dm.train_dataloader() for i in b["index"]]
    assert len(single) == n // n_edits * n_edits and len(set(single)) == len(single)


def test_ddp_evaluation_shards_score_every_edit_once(small_world):
    """Validation and test under 2 processes: shards disjoint, together every edit exactly once (no
    padding duplicates, no dropped tail), so DDP metrics equal one process's."""
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), batch_size=2, val_limit=7)  # odd: padding or dropping shows
    dm.setup("fit")
    assert len(dm.dataset("val")) == 7
    for split, loader in (("val", dm.val_dataloader), ("test", dm.test_dataloader)):
        n = len(dm.dataset(split))
        shards = []
        for rank in (0, 1):
            dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
            shards.append([i for b in loader() for i in b["index"]])
        dm.trainer = None
        assert sorted(shards[0] + shards[1]) == list(range(n)), split
        assert [i for b in loader() for i in b["index"]] == list(range(n))


@pytest.mark.parametrize("shuffle", [True, False])
def test_ddp_deals_whole_problems_so_two_processes_form_one_process_problems(small_world, shuffle):
    """Problems of K = 3 edits (or streams of 3): each step's problems under 2 processes x batch 1 are
    exactly the problems of one process x batch 2 (the same edits grouped the same way, not edits
    interleaved across processes); in evaluation the same whole problems are scored, a ragged tail
    left out by both."""
    def problems(world: int, rank: int, batch: int, split: str, n: int = 8) -> list[list[list[int]]]:
        dm = ZsreDataModule(**_world_paths(small_world, "zsre"), n_edits=3, batch_size=batch, shuffle=shuffle,
                            seed=3, val_limit=n)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank) if world > 1 else None
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        return [[b["index"][i:i + 3] for i in range(0, len(b["index"]), 3)] for b in loader]

    one, r0, r1 = problems(1, 0, 2, "train"), problems(2, 0, 1, "train"), problems(2, 1, 1, "train")
    assert len(r0) == len(r1) == len(one) > 0
    for s in range(len(one)):
        assert one[s] == r0[s] + r1[s]
    flat = lambda steps: sorted(tuple(p) for st in steps for p in st)  # noqa: E731
    # 8 edits: the ragged 2 fill a last batch alone and are kept as a short problem; 5 edits: they share
    # the last (global) batch with a whole problem, and one process's collate leaves them out
    for n, want in ((8, [(0, 1, 2), (3, 4, 5), (6, 7)]), (5, [(0, 1, 2)])):
        one, r0, r1 = problems(1, 0, 2, "val", n), problems(2, 0, 1, "val", n), problems(2, 1, 1, "val", n)
        assert flat(one) == flat(r0 + r1) == want, n
    # eval.py batches 8 edits as one problem and edits them one by one: every edit is served
    dm = ZsreDataModule(**_world_paths(small_world, "zsre"), n_edits=8, batch_size=1, shuffle=False, val_limit=13)
    dm.setup("fit")
    assert [i for b in dm.val_dataloader() for i in b["index"]] == list(range(13))


def test_detect_task_reads_edit_and_locality_files(small_world):
    """Locality claims carry only their gold verdict (no ``prediction``): still FEVER data."""
    for name, task in [("zsre-train.jsonl", "zsre"), ("nq-loc.jsonl", "zsre"), ("fever-train.jsonl", "fever"),
                       ("fever-loc.jsonl", "fever")]:
        assert detect_task(small_world / name) == task, name


def test_fever_locality_holds_every_wording_true_and_false(small_world):
    """Like nq-loc's questions: each locality fact under every claim template, once true, once false."""
    rows = read_fever_locality(small_world / "fever-loc.jsonl")
    facts = [(r["subject"], r["relation"]) for r in read_jsonl_plain(small_world / "fever-loc.jsonl")]
    n_templates = {r: len(cts) for r, (_, _, cts) in RELATIONS.items()}
    assert len(rows) == sum(2 * n_templates[rel] for _, rel in set(facts))
    assert len({p.prompt for p in rows}) == len(rows)
    assert {p.answer for p in rows} == {"SUPPORTS", "REFUTES"}
    assert sum(p.answer == "SUPPORTS" for p in rows) == len(rows) // 2


def test_transfer_world_varies_relations_answers_and_locality_style(tmp_path):
    """The second world kind shares nothing with the default one but the generator: other relations,
    answers of two to four words, and locality questions about relations that are never edited."""
    from datamodules.world import TRANSFER_LOC_RELATIONS, TRANSFER_RELATIONS

    d = generate_world(tmp_path / "w", WorldConfig(n_subjects=60, kind="transfer"))
    edits = [r for sp in ("train", "val", "test") for r in read_jsonl_plain(d / f"zsre-{sp}.jsonl")]
    assert {r["relation"] for r in edits} == set(TRANSFER_RELATIONS) and not set(TRANSFER_RELATIONS) & set(RELATIONS)
    assert {len(r["output"][0]["answer"].split()) for r in edits} == {2, 3, 4}
    loc = read_jsonl_plain(d / "nq-loc.jsonl")
    loc_templates = [t for _, qts, _ in TRANSFER_LOC_RELATIONS.values() for t in qts]
    edit_subjects = {r["subject"] for r in edits}
    for row in loc:
        (q,) = row["questions"]
        assert any(re.fullmatch(re.escape(t).replace(re.escape("{s}"), r"(\w+)"), q) for t in loc_templates), q
        assert not any(s in q.split() for s in edit_subjects)
    with pytest.raises(ValueError, match="kind"):
        WorldConfig(kind="other")


def test_codes_world_asks_locality_about_never_edited_relations_with_one_token_codes(tmp_path):
    """The third kind edits the default relations; its locality questions ask about two relations that
    are never edited, whose answers are one-token codes that no edit or other fact uses."""
    from datamodules.world import CODE_LOC_RELATIONS

    d = generate_world(tmp_path / "w", WorldConfig(n_subjects=60, kind="codes"))
    edits = [r for sp in ("train", "val", "test") for r in read_jsonl_plain(d / f"zsre-{sp}.jsonl")]
    assert {r["relation"] for r in edits} == set(RELATIONS)
    loc = read_jsonl_plain(d / "nq-loc.jsonl")
    codes = {o for objs, _, _ in CODE_LOC_RELATIONS.values() for o in objs}
    assert loc and {a for row in loc for a in row["answers"]} <= codes
    from datamodules.encoding import build_word_tokenizer
    from datamodules.world import world_texts

    tok = build_word_tokenizer(world_texts(d), tmp_path / "tok")
    assert all(len(tok.tokenize(c)) == 1 for c in codes)
    edit_words = {w for r in edits for t in (r["input"], r["output"][0]["answer"]) for w in t.split()}
    assert not codes & edit_words


def test_codes_of_edited_world_asks_its_code_questions_about_the_edited_subjects(tmp_path):
    """The fourth kind asks the code questions about the edited subjects, so the meta-training locality
    pool (which drops inputs naming any split's subject) keeps none of them, while the test pool does."""
    from datamodules.world import CODE_LOC_RELATIONS

    d = generate_world(tmp_path / "w", WorldConfig(n_subjects=60, kind="codes_of_edited"))
    edits = {sp: read_jsonl_plain(d / f"zsre-{sp}.jsonl") for sp in ("train", "val", "test")}
    assert {r["relation"] for rows in edits.values() for r in rows} == set(RELATIONS)
    edited = {r["subject"] for rows in edits.values() for r in rows}
    loc = read_jsonl_plain(d / "nq-loc.jsonl")
    codes = {o for objs, _, _ in CODE_LOC_RELATIONS.values() for o in objs}
    code_rows = [row for row in loc if row["answers"][0] in codes]
    assert {row["subject"] for row in code_rows} == edited  # about every edited subject, no other
    assert all(row["subject"] not in edited for row in loc if row not in code_rows)
    base = read_jsonl_plain(d / "base-qa.jsonl")  # the base model learns the code facts too
    assert {(r["question"], r["answer"]) for r in base} >= {(row["questions"][0], row["answers"][0]) for row in code_rows}
    from datamodules.encoding import build_word_tokenizer
    from datamodules.world import world_texts

    build_word_tokenizer(world_texts(d), d / "tokenizer")
    dm = ZsreDataModule(**_world_paths(d, "zsre"), family="causal")
    dm.setup()
    code_q = {row["questions"][0] for row in code_rows}
    assert not code_q & {p.prompt for p in dm.loc_split_pairs["train"]}
    assert code_q & {p.prompt for p in dm.loc_split_pairs["test"]}
