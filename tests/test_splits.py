"""The test split decides nothing: for every shipped config, meta-training, validation and test share
no edit and no locality input, and nothing that selects or stops reads a test metric."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from datamodules.edit_data import FeverDataModule, ZsreDataModule, carve_by_subject
from datamodules.formats import EditRecord
from datamodules.world import WorldConfig

ROOT = Path(__file__).resolve().parents[1]
MEND_CONFIGS = sorted(ROOT.glob("configs/mend_*.yaml"))
ALL_CONFIGS = sorted(ROOT.glob("configs/*.yaml"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A world large enough that 5% of its training subjects is a real validation split."""
    from lightning_modules.cli import ensure_world

    return ensure_world(tmp_path_factory.mktemp("world200"), WorldConfig(n_subjects=200, seed=3))


def _local_paths(init: dict, world: Path, task: str) -> dict:
    """The config's data arguments with every file replaced by the world's file of the same role and
    format (the released files are not available offline); all other arguments are the config's."""
    loc = "nq-loc.jsonl" if task == "zsre" else "fever-loc.jsonl"
    out = dict(init, tokenizer=str(world / "tokenizer"), loc_path=str(world / loc))
    for split in ("train", "val", "test"):
        if init.get(f"{split}_path"):
            out[f"{split}_path"] = str(world / f"{task}-{split}.jsonl")
    if out.get("family") == "seq2seq":
        out["decoder_start_id"] = 0  # read from the base model's config otherwise
    return out


def _config(path: Path) -> dict:
    """A config as LightningCLI reads it: a ``config:`` file included first, then this file's keys
    (dotted ones, e.g. ``trainer.strategy``, set inside their section)."""
    cfg = yaml.safe_load(path.read_text())
    out = _config(path.parent / cfg.pop("config")) if "config" in cfg else {}
    for key, value in cfg.items():
        *parents, last = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def _texts(recs: list[EditRecord]) -> set[str]:
    return {t for r in recs for t in (r.prompt, *r.rephrases)}


def _subjects(recs: list[EditRecord]) -> set[str]:
    return {r.subject for r in recs if r.subject}


@pytest.mark.parametrize("path", MEND_CONFIGS, ids=lambda p: p.stem)
def test_every_config_has_disjoint_edit_splits_and_locality_pools(path, world):
    cfg = _config(path)
    cls = {"ZsreDataModule": ZsreDataModule, "FeverDataModule": FeverDataModule}[cfg["data"]["class_path"].rsplit(".", 1)[1]]
    init = cfg["data"]["init_args"]
    assert init.get("test_path"), "every config names its test split"
    assert init.get("val_path") or init.get("val_from_train"), "every config has a validation split"
    assert init.get("val_path") != init["test_path"]
    dm = cls(**_local_paths(init, world, cls.task))
    dm.setup("fit")
    splits = {k: v.records for k, v in dm.splits.items()}
    assert set(splits) == {"train", "val", "test"} and all(splits.values())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not _texts(splits[a]) & _texts(splits[b]), f"{a} and {b} share an edit text"
        assert not _subjects(splits[a]) & _subjects(splits[b]), f"{a} and {b} share a subject"
    pools = {k: {p.prompt for p in v} for k, v in dm.loc_split_pairs.items()}
    assert set(pools) == {"train", "val", "test"} and all(pools.values())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not pools[a] & pools[b], f"{a} and {b} locality pools overlap"
    edit_text = set().union(*(_texts(r) for r in splits.values()))
    assert not set().union(*pools.values()) & edit_text
    # what each split's loader draws comes from its own pool only
    for split in ("val", "test"):
        ds = dm.dataset(split)
        own = {tuple(x["input_ids"]) for x in dm.loc_pools[split]}
        drawn = {tuple(l["input_ids"]) for i in range(len(ds)) for l in ds[i]["loc"]}
        assert drawn <= own


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_nothing_selects_or_stops_on_a_test_metric(path):
    cfg = _config(path)
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        monitor = (cb.get("init_args") or {}).get("monitor")
        assert monitor is None or monitor.startswith("val/"), f"{cb['class_path']} monitors {monitor}"
    assert "test" not in json.dumps(cfg.get("model", {})).lower(), "a model default names the test split"


def test_validation_and_test_files_must_differ(world):
    args = _local_paths({"train_path": "x", "test_path": "x"}, world, "zsre")
    with pytest.raises(ValueError, match="same file"):
        ZsreDataModule(**{**args, "val_path": args["test_path"]}).setup("fit")
    with pytest.raises(ValueError, match="also the val or test file"):
        ZsreDataModule(**{**args, "train_path": args["test_path"], "val_path": None}).setup("fit")
    with pytest.raises(ValueError, match="either val_path or val_from_train"):
        ZsreDataModule(**{**args, "val_path": str(world / "zsre-val.jsonl"), "val_from_train": 0.1}).setup("fit")


def test_carving_validation_out_of_train_is_by_subject_and_deterministic(caplog):
    recs = [EditRecord(f"Q{i} about S{i // 3}", "a", [f"P{i}"], "g", "p", f"S{i // 3}") for i in range(600)]
    train, val = carve_by_subject(recs, 0.1)
    assert len(train) + len(val) == 600 and 30 <= len(val) <= 90
    assert not _subjects(train) & _subjects(val)
    again = carve_by_subject(list(reversed(recs)), 0.1)  # independent of file order
    assert {r.prompt for r in again[1]} == {r.prompt for r in val}
    no_subject = [EditRecord(r.prompt, r.target, r.rephrases, r.gold, r.prediction) for r in recs]
    assert carve_by_subject(no_subject, 0.1)[1], "rows without a subject are carved by their edit input"
    with pytest.raises(ValueError, match="validation edits"):
        carve_by_subject(recs[:3], 0.01)


def test_evaluation_scores_only_the_test_pool(world):
    from lightning_modules.evaluation import EditData

    init = yaml.safe_load((ROOT / "configs/mend_zsre_gpt2_tiny.yaml").read_text())["data"]["init_args"]
    dm = ZsreDataModule(**{**_local_paths(init, world, "zsre"), "loc_per_edit": 5})
    dm.setup("test")
    data = EditData(dm, "test")
    test_pool = {tuple(x["input_ids"]) for x in dm.loc_pools["test"]}
    for batch in (data.test_probe(10_000), data.locality(range(len(dm.splits["test"].records)))):
        rows = {tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], batch["attention_mask"])}
        assert rows <= test_pool
    assert data.test_probe(10_000)["input_ids"].shape[0] == len(dm.loc_pools["test"])
