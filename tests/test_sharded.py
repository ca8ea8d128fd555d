"""Meta-training with the base sharded across processes (lightning_modules/sharding.py), on CPU (gloo)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from editors.io import CHECKPOINT_KEY, load_editor_file
from lightning_modules.models import load_model
from lightning_modules.sharding import shard_base
from test_malmen import DDP_COMMON, malmen_args
from test_train import ROOT, assert_runs_equal, base_args, csv_logger, mend_args, start_train

pytestmark = pytest.mark.usefixtures("one_thread")

SHARDED = ["--trainer.strategy", json.dumps({"class_path": "lightning_modules.sharding.ShardedBaseStrategy"})]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """A tiny GPT-2 QA model (one epoch on a 30-subject world) through train.py, as test_train builds it."""
    tmp = tmp_path_factory.mktemp("bases")
    train.main(base_args("causal", tmp))
    return tmp


def test_sharded_base_two_processes_equal_one_process_same_global_batch(bases, tmp_path, child_env):
    """2 CPU processes, each holding half of the base (the edited modules whole) x 1 problem per step ==
    1 unsharded process x 2 problems: the same editor after 3 steps and the same validation metrics over 5
    validation edits (3 and 2 per process: the process with fewer batches repeats one, uncounted); its
    checkpoint holds the editor and no base weights, and the locality-drift callback runs on the sharded base."""
    common = ["--data.init_args.shuffle", "false", "--trainer.max_steps", "3", "--data.init_args.val_limit", "5",
              "--trainer.accelerator", "cpu", "--seed_everything", "0"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    sharded.mkdir()
    last = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "dirpath": str(sharded / "checkpoints")}}
    drift = {"class_path": "lightning_modules.callbacks.LocalityDrift"}  # the LLaMA config's: passes on every process
    proc = start_train(mend_args("causal", bases, sharded, *common, "--data.init_args.batch_size", "1",
                                 "--trainer.devices", "2", *SHARDED, "--trainer.enable_checkpointing", "true",
                                 "--trainer.callbacks", json.dumps([last, drift]), *csv_logger(sharded)),
                       sharded, child_env)
    try:
        train.main(mend_args("causal", bases, single, *common, "--data.init_args.batch_size", "2",
                             "--trainer.devices", "1", *csv_logger(single)))
        assert proc.wait(timeout=300) == 0, (sharded / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    a = assert_runs_equal(single, sharded, "MEND", "val/edit_success")
    assert a["nets.0.U"].abs().max() > 0, "the networks trained (the comparison is not of untouched zeros)"
    # each process held less than the whole base
    per_process = float(re.search(r"base sharded over 2 processes: ([\d.,]+) MiB", (sharded / "train.log").read_text())
                        [1].replace(",", ""))
    full = sum(p.nbytes for p in load_model(bases / "base_causal" / "model", "causal").parameters()) / 2**20
    assert per_process < 0.8 * full, (per_process, full)
    assert "drift/kl" in next(sharded.glob("lightning_logs/version_*/metrics.csv")).read_text()
    ckpt = torch.load(sharded / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("model.") for k in ckpt["state_dict"]) and CHECKPOINT_KEY in ckpt


def test_sharded_malmen_two_processes_equal_one_process(bases, tmp_path, child_env):
    """Manual optimisation (MALMEN: its own gradient, all-reduced by ``manual_step``) over a sharded base: 2
    processes x 1 problem of 3 edits == 1 unsharded process x 2 problems, editor and validation metrics."""
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    proc = start_train(malmen_args(bases, sharded, *DDP_COMMON, "--data.init_args.batch_size", "1", "--trainer.devices",
                                   "2", *SHARDED, *csv_logger(sharded)), sharded, child_env)
    try:
        train.main(malmen_args(bases, single, *DDP_COMMON, "--data.init_args.batch_size", "2", "--trainer.devices", "1",
                               *csv_logger(single)))
        assert proc.wait(timeout=300) == 0, (sharded / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "base sharded over 2 processes" in (sharded / "train.log").read_text()
    a = assert_runs_equal(single, sharded, "MALMEN", "val/edit_success")
    assert a["nets.0.U"].abs().max() > 0, "the networks trained"


def test_sharded_job_killed_and_resumed_equals_an_unbroken_run(bases, tmp_path, child_env):
    """A 2-process sharded job killed after step 3 of 4 and resumed from last.ckpt (step 2: the base's shards
    taken from the model, the editor and optimizer from the file) ends with the editor of an unbroken
    1-process run on the same global batch."""
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0,
                          "dirpath": str(tmp_path / "part" / "checkpoints")}}
    common = ["--data.init_args.shuffle", "true", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches",
              "0", "--trainer.max_steps", "4", "--trainer.accelerator", "cpu", "--seed_everything", "0"]
    env = {**child_env, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}  # test_train.KillAfter
    for cbs, extra in (([ckpt, {"class_path": "test_train.KillAfter", "init_args": {"step": 3}}], []),
                       ([ckpt], ["--ckpt_path", "last"])):
        args = mend_args("causal", bases, tmp_path / "part", *common, "--data.init_args.batch_size", "1",
                         "--trainer.devices", "2", *SHARDED, "--trainer.enable_checkpointing", "true",
                         "--trainer.callbacks", json.dumps(cbs), *extra)
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == (0 if extra else 1), res.stderr[-3000:]
        if not extra:
            last = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            assert last["global_step"] == 2
    assert "Restored all states from the checkpoint" in res.stdout + res.stderr
    train.main(mend_args("causal", bases, tmp_path / "full", *common, "--data.init_args.batch_size", "2"))
    resumed = load_editor_file(tmp_path / "part" / "editor.safetensors", "MEND")[0]
    unbroken = load_editor_file(tmp_path / "full" / "editor.safetensors", "MEND")[0]
    for k in unbroken:
        torch.testing.assert_close(resumed[k], unbroken[k], rtol=1e-4, atol=1e-6, msg=k)


def test_until_right_scales_are_refused_with_a_sharded_base(bases, tmp_path, child_env):
    """The stopping rule's search ends at each process's own edits: with a sharded base the processes would run
    different numbers of (collective) passes, so the job refuses it in one line."""
    args = mend_args("causal", bases, tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "1", *SHARDED,
                     "--model.init_args.until_right_scales", "[1.0, 2.0]")
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=child_env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1 and "train.py: error: until_right_scales" in res.stderr, res.stderr[-3000:]


def test_a_model_without_block_classes_is_refused():
    with pytest.raises(ValueError, match="names no transformer block class"):
        shard_base(torch.nn.Sequential(torch.nn.Linear(2, 2)), [], None)
