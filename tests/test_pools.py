"""Locality pools that do not move: every locality input has its pool (meta-training, validation,
test) by a hash of its subject (else its text), whatever splits are configured; the data's
fingerprint; editor files that record the pools they were meta-trained with, and the refusal of a
test pool that overlaps them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from datamodules.edit_data import ZsreDataModule, assign_pools
from datamodules.formats import LocalityPair, read_fever_locality, read_nq
from editors.io import LocalityOverlapError, check_pool_overlap, save_blob
from editors.layers import select_layers
from editors.mend import MEND
from editors.until_right import UntilRight


def _paths(world: Path, *splits: str, loc: str = "nq-loc.jsonl") -> dict:
    return {**{f"{s}_path": str(world / f"zsre-{s}.jsonl") for s in splits}, "loc_path": str(world / loc),
            "tokenizer": str(world / "tokenizer")}


def _pools(**kwargs) -> dict[str, list[str]]:
    dm = ZsreDataModule(**kwargs)
    dm.setup("test")
    return {k: [p.prompt for p in v] for k, v in dm.loc_split_pairs.items()}


def test_a_split_keeps_its_locality_pool_whatever_else_is_configured(small_world):
    """eval.py may configure fewer or other splits than meta-training did: the test pool (and the
    validation pool) stay the inputs they were, so no test input is one validation saw."""
    full = _pools(**_paths(small_world, "train", "val", "test"))
    assert all(full.values())
    assert _pools(**_paths(small_world, "test"))["test"] == full["test"]
    assert _pools(**_paths(small_world, "train", "test"))["test"] == full["test"]
    assert _pools(**_paths(small_world, "train", "val")) == {"train": full["train"], "val": full["val"]}
    # validation carved out of training (another validation split) does not move the test pool either
    carved = _pools(**_paths(small_world, "train", "test"), val_from_train=0.2)
    assert carved["test"] == full["test"] and carved["val"] == full["val"]


def test_same_subject_locality_inputs_share_a_pool(small_world):
    for pairs in (read_nq(small_world / "nq-loc.jsonl"), read_fever_locality(small_world / "fever-loc.jsonl")):
        assert all(p.subject for p in pairs)
        pool_of: dict[str, set[str]] = {}
        for name, pool in assign_pools(pairs, (0.5, 0.25, 0.25)).items():
            for p in pool:
                pool_of.setdefault(p.subject, set()).add(name)
        assert len(pool_of) >= 8 and all(len(v) == 1 for v in pool_of.values())
        assert len({next(iter(v)) for v in pool_of.values()}) == 3, "every pool gets subjects"
    # without a subject, an input is grouped by its text, case and punctuation aside
    pairs = [LocalityPair(q) for i in range(40) for q in (f"who wrote book {i}?", f"Who wrote book {i}")]
    pools = assign_pools(pairs, (0.5, 0.25, 0.25))
    for pool in pools.values():
        assert len(pool) % 2 == 0 and all(a.prompt.lower().rstrip("?") == b.prompt.lower().rstrip("?")
                                          for a, b in zip(pool[::2], pool[1::2]))
    # shares are targets, not exact: 400 groups land near 0.5 / 0.25 / 0.25
    many = assign_pools([LocalityPair(f"question {i}") for i in range(400)], (0.5, 0.25, 0.25))
    assert 160 <= len(many["train"]) <= 240 and 60 <= len(many["val"]) <= 140 and 60 <= len(many["test"]) <= 140
    with pytest.raises(ValueError, match="three positive shares"):
        assign_pools(pairs, (0.5, 0.5, 0.0))


def test_grouping_and_dropped_rows_are_recorded(small_world, tmp_path):
    """MEND's released zsRE rows name no subject (grouped by prompt); the toolkit's do; rows without
    an agreeing rephrase are counted per split."""
    def row(q, reph, **extra):
        return {"input": q, "prediction": "a", "alternatives": ["b"], "filtered_rephrases": reph,
                "output": [{"answer": "a"}], **extra}

    released = tmp_path / "test.jsonl"
    released.write_text("".join(json.dumps(r) + "\n" for r in [row("who is Ada?", ["Ada is?"]),
                                                                 row("who is Bob?", []), row("who is Cy?", [])]))
    toolkit = tmp_path / "train.json"
    toolkit.write_text(json.dumps([{"subject": "Dee", "src": "who is Dee?", "pred": "a", "alt": "b",
                                    "rephrase": "Dee is?", "answers": ["a"]}]))
    nq = tmp_path / "nq.jsonl"
    nq.write_text(json.dumps({"questions": [f"what is {i}" for i in range(30)], "answers": ["x"] * 30}))
    dm = ZsreDataModule(train_path=str(toolkit), test_path=str(released), loc_path=str(nq),
                        tokenizer=str(small_world / "tokenizer"))
    dm.setup("test")
    assert dm.grouping == {"edits": "mixed", "locality": "prompt"}
    assert dm.rows_dropped == {"train": {"without alternatives": 0, "without rephrases": 0},
                               "test": {"without alternatives": 0, "without rephrases": 2}}
    only_released = ZsreDataModule(test_path=str(released), loc_path=str(nq), tokenizer=str(small_world / "tokenizer"))
    only_released.setup("test")
    assert only_released.grouping["edits"] == "prompt"


def test_fingerprint_names_the_edit_records_and_each_pool(small_world):
    dm = ZsreDataModule(**_paths(small_world, "train", "val", "test"))
    dm.setup("test")
    fp = dm.data_fingerprint()
    assert set(fp["edits"]) == set(fp["loc_pools"]) == {"train", "val", "test"}
    assert fp["loc_pools"]["test"]["n"] == len(dm.loc_ids("test")) == len(dm.loc_split_pairs["test"])
    again = ZsreDataModule(**_paths(small_world, "test"))
    again.setup("test")
    assert again.data_fingerprint()["loc_pools"]["test"] == fp["loc_pools"]["test"]
    assert again.data_fingerprint()["edits"]["test"] == fp["edits"]["test"]
    moved = ZsreDataModule(**_paths(small_world, "test"), loc_shares=(0.25, 0.25, 0.5))
    moved.setup("test")
    assert moved.data_fingerprint()["loc_pools"]["test"] != fp["loc_pools"]["test"]
    record = dm.data_record()
    assert set(record["loc_ids"]) == {"train", "val"} and record["sha256"] == fp["sha256"]
    json.dumps(record)  # plain JSON: it goes in the editor file's header


def test_evaluation_refuses_a_test_pool_that_overlaps_the_editors_pools(small_world, tiny_models, tmp_path, caplog):
    model = tiny_models["causal"]
    trained = ZsreDataModule(**_paths(small_world, "train", "val", "test"))
    trained.setup("fit")
    editor = MEND(select_layers(model), rank=4)
    path = save_blob(tmp_path / "editor.safetensors", {**editor.export(model), "data": trained.data_record()})
    loaded = MEND.load(path, model)

    same = ZsreDataModule(**_paths(small_world, "test"))
    same.setup("test")
    check_pool_overlap([loaded, UntilRight(loaded)], "test", same.loc_ids("test"))
    # the validation pool scored by --split val is its own: only the meta-training pool may not overlap
    check_pool_overlap([loaded], "val", trained.loc_ids("val"))
    moved = ZsreDataModule(**_paths(small_world, "test"), loc_shares=(0.5, 0.1, 0.4))
    moved.setup("test")
    with pytest.raises(LocalityOverlapError, match=r"test locality inputs were in the val locality pool"):
        check_pool_overlap([UntilRight(loaded)], "test", moved.loc_ids("test"))
    with pytest.raises(LocalityOverlapError, match="train locality pool"):
        check_pool_overlap([loaded], "test", trained.loc_ids("train"))

    old = MEND.load(editor.save(tmp_path / "old.safetensors", model), model)  # written without a data record
    with caplog.at_level(logging.WARNING, logger="editors.io"):
        check_pool_overlap([old], "test", moved.loc_ids("test"))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "old.safetensors records no meta-training data" in msg and "\n" not in msg


def test_patcher_memory_keeps_locality_inputs_of_the_kind_the_test_pool_asks(tmp_path):
    """Where locality questions are about the edited subjects (the ``codes_of_edited`` world), the
    meta-training pool keeps none of them; Transformer-Patcher's memory takes the meta-training share
    filtered as the evaluated split's pool is, so it has them (a patch fired on 80% of them without), and
    still no input that names an evaluated subject or is scored."""
    from datamodules.encoding import build_word_tokenizer
    from datamodules.world import CODE_LOC_RELATIONS, WorldConfig, generate_world, world_texts
    from lightning_modules.evaluation import EditData

    d = generate_world(tmp_path / "w", WorldConfig(n_subjects=60, kind="codes_of_edited"))
    build_word_tokenizer(world_texts(d), d / "tokenizer")
    dm = ZsreDataModule(**_paths(d, "train", "val", "test"))
    dm.setup("test")
    codes = {o for objs, _, _ in CODE_LOC_RELATIONS.values() for o in objs}
    texts = lambda feats: [dm.tokenizer.decode(f["input_ids"]) for f in feats]  # noqa: E731
    is_code = lambda t: t.split()[-2] in codes  # its answer, before [EOS]  # noqa: E731
    assert not any(map(is_code, texts(dm.loc_pools["train"])))
    assert any(map(is_code, texts(dm.loc_pools["test"])))
    memory = texts(EditData(dm, "test", n_train_probe=10).memory_pool())
    assert sum(map(is_code, memory)) >= 20
    test_subjects = {r.subject for r in dm.splits["test"].records}
    assert not any(s in t.split() for t in memory for s in test_subjects)
    assert not set(memory) & set(texts(dm.loc_pools["test"]))
