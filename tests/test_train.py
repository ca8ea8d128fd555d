"""Fast real runs of the train.py entry point: base models, MEND per family, DDP, resume, checkpoints."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import train
from editors.io import load_editor_file
from editors.io import CHECKPOINT_KEY
from editors.mend import MEND

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # family -> (base config, mend config, task, locality file, tiny model size)
    "causal": ("base_zsre_gpt2_tiny", "mend_zsre_gpt2_tiny", "zsre", "nq-loc.jsonl",
               '{"n_layer": 2, "n_embd": 32, "n_head": 2}'),
    "seq2seq": ("base_zsre_bart_tiny", "mend_zsre_bart_tiny", "zsre", "nq-loc.jsonl",
                '{"encoder_layers": 2, "decoder_layers": 2, "d_model": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,'
                ' "encoder_attention_heads": 2, "decoder_attention_heads": 2}'),
    "classifier": ("base_fever_bert_tiny", "mend_fever_bert_tiny", "fever", "fever-loc.jsonl",
                   '{"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}'),
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def base_args(family: str, tmp: Path) -> list[str]:
    cfg, _, _, _, size = FAMILIES[family]
    w = str(tmp / "world")
    return ["--config", str(ROOT / "configs" / f"{cfg}.yaml"), "--world_dir", w, "--world.n_subjects", "30",
            "--model.init_args.tokenizer", f"{w}/tokenizer", "--model.init_args.tiny_config", size,
            "--model.init_args.output_dir", str(tmp / f"base_{family}"), "--data.init_args.world_dir", w,
            "--data.init_args.tokenizer", f"{w}/tokenizer", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp / f"base_{family}"), "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", *QUIET]


def mend_args(family: str, tmp: Path, out: Path, *extra: str) -> list[str]:
    _, cfg, task, loc, _ = FAMILIES[family]
    data = tmp / f"base_{family}" / "data"
    return ["--config", str(ROOT / "configs" / f"{cfg}.yaml"),
            "--model.init_args.base_model", str(tmp / f"base_{family}" / "model"),
            "--model.init_args.rank", "16", "--model.init_args.output_dir", str(out),
            "--data.init_args.train_path", str(data / f"{task}-train.jsonl"),
            "--data.init_args.val_path", str(data / f"{task}-val.jsonl"),
            "--data.init_args.test_path", str(data / f"{task}-test.jsonl"),
            "--data.init_args.loc_path", str(data / loc),
            "--data.init_args.tokenizer", str(tmp / f"base_{family}" / "model"),
            "--trainer.default_root_dir", str(out), "--trainer.callbacks", "[]",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.init_args.val_limit", "4",
            "--trainer.enable_checkpointing", "false", *QUIET, *extra]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Path:
    """One tiny base model per family, trained for one epoch on a 30-subject world through train.py."""
    tmp = tmp_path_factory.mktemp("bases")
    for fam in FAMILIES:
        summary = train.main(base_args(fam, tmp))
        assert (tmp / f"base_{fam}" / "model" / "config.json").exists()
        assert 0.0 <= summary["exact_match_on_training_questions"] <= 1.0
    return tmp


def test_base_training_writes_model_annotated_data_and_is_cached(bases, capsys):
    data = bases / "base_causal" / "data"
    rows = [json.loads(l) for l in open(data / "zsre-train.jsonl")]
    assert rows and all(r["prediction"] not in r["alternatives"] for r in rows)
    # the predictions come from the (barely trained) model, not from the world's gold answers
    world = [json.loads(l) for l in open(bases / "world" / "zsre-train.jsonl")]
    assert [r["input"] for r in rows] == [r["input"] for r in world]
    summary = train.main(base_args("causal", bases))  # same settings: reused, not retrained
    assert "reusing cached result" in capsys.readouterr().out
    assert "zsre_train_prediction_accuracy" in summary
    from transformers import AutoModelForCausalLM  # any Hugging Face loader reads what we saved

    AutoModelForCausalLM.from_pretrained(str(bases / "base_causal" / "model"))


class RecordTrainMode(Callback):
    """Records, at every training step, whether each module of the base model is in train mode."""

    seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        RecordTrainMode.seen.append(all(m.training for m in pl_module.model.modules()))


def test_base_fine_tuned_from_a_saved_model_trains_in_train_mode(bases, tmp_path):
    """from_pretrained returns eval mode: fine-tuning a saved base ran with dropout off."""
    RecordTrainMode.seen = []
    out = str(tmp_path / "again")
    train.main(base_args("causal", bases) + [
        "--model.init_args.model_name_or_path", str(bases / "base_causal" / "model"),
        "--model.init_args.output_dir", out, "--trainer.default_root_dir", out,
        "--trainer.callbacks", json.dumps([{"class_path": "test_train.RecordTrainMode"}])])
    assert RecordTrainMode.seen and all(RecordTrainMode.seen)


@pytest.mark.parametrize("cosine", [False, True])
def test_base_learning_rate_warms_up_then_holds_or_decays_to_zero(small_world, cosine):
    from types import SimpleNamespace

    from lightning_modules.base_task import BaseTaskModule

    module = BaseTaskModule(tokenizer=str(small_world / "tokenizer"), warmup_steps=10, cosine_decay=cosine,
                            tiny_config={"n_layer": 1, "n_embd": 8, "n_head": 1})
    module._trainer = SimpleNamespace(estimated_stepping_batches=110)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [f(s) for f in sched.lr_lambdas for s in (0, 9, 10, 60, 110)]
    expected = [0.1, 1.0, 1.0, 0.5, 0.0] if cosine else [0.1, 1.0, 1.0, 1.0, 1.0]
    assert factors == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mend_meta_training_runs_for_each_family(bases, tmp_path, family):
    out = tmp_path / "run"
    train.main(mend_args(family, bases, out))
    tensors, header = load_editor_file(out / "editor.safetensors", "MEND")
    blob = {**header, "state_dict": tensors}
    assert not any(k.startswith("model.") for k in blob["state_dict"]), "editor only, no base weights"
    assert blob["fingerprint"]["edited_weights_sha256"]
    # the step sizes moved: they are trained at their own learning rate
    assert not torch.allclose(blob["state_dict"]["edit_lrs"], torch.full_like(blob["state_dict"]["edit_lrs"], 1e-3))
    assert blob["state_dict"]["norms.0.count"].min() > 0, "normalisation statistics were updated"
    # and so did the networks: U starts at zero (g = identity) and must leave it
    us = [v for k, v in blob["state_dict"].items() if k.startswith("nets.") and k.endswith(".U")]  # one net per shape
    assert us and all(u.abs().max() > 0 for u in us), "the editor networks never trained"


def test_print_config(bases, capsys):
    with pytest.raises(SystemExit):
        train.main(mend_args("causal", bases, bases / "pc") + ["--print_config"])
    text = capsys.readouterr().out
    assert "class_path: lightning_modules.mend_module.MENDModule" in text and "c_loc: 1.0" in text


def _editor_state(path: Path) -> dict[str, torch.Tensor]:
    return load_editor_file(path, "MEND")[0]


def check_resume_equals_unbroken(make_args, tmp_path: Path, editor_class: str, trained_key: str) -> None:
    """An editor job killed after step 3 of 4 (last.ckpt at step 2) and resumed with --ckpt_path last ends
    with the editor an unbroken run exports (editor, optimizer state, schedule and data order restored).
    ``make_args(out, *extra)``: the job's train.py arguments; ``trained_key``: an editor tensor training moves."""
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0, "dirpath": "CKPT"}}
    common = ["--data.init_args.shuffle", "true", "--trainer.limit_train_batches", "3",
              "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "true", "--trainer.max_steps", "4"]

    def run(out: Path, *callbacks: dict, resume: bool = False) -> None:
        args = make_args(out, *common, "--trainer.callbacks", json.dumps([ckpt, *callbacks]),
                         *(["--ckpt_path", "last"] if resume else []))
        train.main([a.replace("CKPT", str(out / "checkpoints")) for a in args])

    full, part = tmp_path / "full", tmp_path / "part"
    run(full)
    with pytest.raises(RuntimeError, match="killed"):
        run(part, {"class_path": "test_train.KillAfter", "init_args": {"step": 3}})
    last = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 and not any(k.startswith("model.") for k in last["state_dict"])
    run(part, resume=True)
    resumed = load_editor_file(part / "editor.safetensors", editor_class)[0]
    unbroken = load_editor_file(full / "editor.safetensors", editor_class)[0]
    assert not torch.equal(last["state_dict"][f"editor.{trained_key}"], resumed[trained_key]), "the resumed run trained"
    for k in unbroken:
        torch.testing.assert_close(resumed[k], unbroken[k], rtol=1e-5, atol=1e-7, msg=k)


class KillAfter(Callback):
    """Dies with an error at the end of training step ``step`` (or of the first step of epoch
    ``epoch``), like a killed job (the checkpoint of that step is not written: Lightning runs
    checkpoint callbacks after the others)."""

    def __init__(self, step: int | None = None, epoch: int | None = None) -> None:
        self.step, self.epoch = step, epoch

    def on_train_batch_end(self, trainer, *args) -> None:
        if (self.step is not None and trainer.global_step >= self.step
                or self.epoch is not None and trainer.current_epoch >= self.epoch):
            raise RuntimeError("killed")


def test_resume_mid_epoch_equals_uninterrupted_run(bases, tmp_path):
    """A run killed in the middle of its second epoch and resumed with --ckpt_path last ends where an
    unbroken run ends: the restored editor, optimizer, learning-rate schedule and normalisation
    state, and the data (shuffled, 3 steps per epoch), which carries on from the restored step
    instead of restarting the epoch's order."""
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": 0, "dirpath": "CKPT"}}
    common = ["--data.init_args.shuffle", "true", "--trainer.limit_train_batches", "3",
              "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "true",
              "--trainer.max_steps", "7"]  # the same max_steps: the LR schedule's horizon

    def run(out: Path, *extra: str) -> None:
        args = mend_args("causal", bases, out, *common, "--trainer.callbacks", json.dumps([ckpt, *extra]))
        train.main([a.replace("CKPT", str(out / "ck")) for a in args])

    full, part = tmp_path / "full", tmp_path / "part"
    run(full)
    with pytest.raises(RuntimeError, match="killed"):
        run(part, {"class_path": "test_train.KillAfter", "init_args": {"step": 5}})
    last = torch.load(part / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 and last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    args = mend_args("causal", bases, part, *common, "--ckpt_path", str(part / "ck" / "last.ckpt"),
                     "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false")
    train.main(args)
    resumed, unbroken = _editor_state(part / "editor.safetensors"), _editor_state(full / "editor.safetensors")
    groups = torch.load(full / "ck" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.0, 0.0], abs=1e-12), "cosine decay ends at 0 at max_steps"
    assert not torch.equal(last["state_dict"]["editor.edit_lrs"], resumed["edit_lrs"]), "the resumed run trained"
    for k in unbroken:
        torch.testing.assert_close(resumed[k], unbroken[k], rtol=1e-5, atol=1e-7, msg=k)


class CountBatches(Callback):
    """Counts the training batches a run takes (class-level: the CLI builds the instance)."""

    seen = 0

    def on_train_batch_end(self, *args) -> None:
        CountBatches.seen += 1


def test_base_training_resumes_from_the_last_finished_epoch(tmp_path):
    """A base-model run killed in its third epoch, with the base config's own checkpoint callback,
    resumes with --ckpt_path last from the end of its second epoch and trains only the third."""
    cbs = yaml.safe_load(open(ROOT / "configs" / "base_zsre_gpt2_tiny.yaml"))["trainer"]["callbacks"]
    for c in cbs:
        c["init_args"].update(dirpath=str(tmp_path / "ck"), every_n_epochs=1)
    args = base_args("causal", tmp_path) + ["--trainer.max_epochs", "3", "--trainer.enable_checkpointing", "true"]
    kill = {"class_path": "test_train.KillAfter", "init_args": {"epoch": 2}}
    with pytest.raises(RuntimeError, match="killed"):
        train.main(args + ["--trainer.callbacks", json.dumps([*cbs, kill])])
    last = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    per_epoch = last["global_step"] // 2
    assert last["epoch"] == 1 and per_epoch > 0, "the end of the second epoch was saved"
    assert not (tmp_path / "base_causal" / "model" / "config.json").exists(), "the killed run exported nothing"
    CountBatches.seen = 0
    summary = train.main(args + ["--ckpt_path", "last", "--trainer.callbacks",
                                 json.dumps([*cbs, {"class_path": "test_train.CountBatches"}])])
    assert CountBatches.seen == per_epoch, "the resumed run trained the third epoch only"
    final = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 3 * per_epoch and final["epoch"] == 2
    assert 0.0 <= summary["exact_match_on_training_questions"] <= 1.0


def test_checkpoint_for_another_base_is_refused(bases, tmp_path):
    out = tmp_path / "run"
    train.main(mend_args("causal", bases, out))
    from lightning_modules.models import load_model

    other = load_model(bases / "base_seq2seq" / "model", "seq2seq")
    with pytest.raises(ValueError, match="was trained for base model"):
        MEND.load(out / "editor.safetensors", other)


def test_ddp_two_processes_equal_one_process_same_global_batch(bases, tmp_path, child_env):
    """2 CPU processes (gloo) x 1 problem per step == 1 process x 2 problems per step: the same
    editor after 3 steps, and the same validation metrics at step 2 over an odd number of
    validation edits (each scored once, on whichever process holds it)."""
    common = ["--data.init_args.shuffle", "false", "--trainer.max_steps", "3", "--data.init_args.val_limit", "5",
              "--trainer.accelerator", "cpu", "--seed_everything", "0", "--model.init_args.precondition_ridge", "1.0"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for out, extra in ((single, ["--data.init_args.batch_size", "2", "--trainer.devices", "1"]),
                       (ddp, ["--data.init_args.batch_size", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp"])):
        cmd = [sys.executable, str(ROOT / "train.py"), *mend_args("causal", bases, out, *common, *extra), *csv_logger(out)]
        res = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    # editor networks, step sizes, normalisation and preconditioner statistics alike
    a = assert_runs_equal(single, ddp, "MEND", "val/edit_success")
    assert a["norms.0.count"].min() > 0 and a["preconds.0.count"].min() > 0, "input statistics were updated"
    assert a["nets.0.U"].abs().max() > 0, "the networks trained (the comparison is not of untouched zeros)"


def csv_logger(out: Path) -> list[str]:
    """train.py arguments that log metrics as CSV under ``out`` (for :func:`_val_metrics`)."""
    return ["--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                            "init_args": {"save_dir": str(out)}})]


def start_train(args: list[str], out: Path, env: dict[str, str]) -> subprocess.Popen:
    """train.py as a child process (DDP relaunches its own command), its output in ``out/train.log``: a
    file, not a pipe, which would block the child once full."""
    with open(out / "train.log", "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def assert_runs_equal(single: Path, ddp: Path, editor_class: str, metric: str) -> dict[str, torch.Tensor]:
    """The two runs exported the same editor (every tensor) and logged the same validation metrics
    (``metric`` among them); returns the single run's editor tensors."""
    a = load_editor_file(single / "editor.safetensors", editor_class)[0]
    b = load_editor_file(ddp / "editor.safetensors", editor_class)[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    va, vb = _val_metrics(single), _val_metrics(ddp)
    assert va and set(va) == set(vb) and metric in va
    for k in va:
        assert va[k] == pytest.approx(vb[k], rel=1e-3, abs=1e-5), k
    return a


def _val_metrics(out: Path) -> dict[str, float]:
    """The validation metrics a CSVLogger wrote under ``out`` (one validation in these runs)."""
    (path,) = out.glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v != ""}


class StallAt(Callback):
    """On process ``rank``, at the end of training step ``step``: writes the process id to ``pid_file``
    and hangs there (the other process waits in its next step's gradient all-reduce), for the test
    to kill it."""

    def __init__(self, step: int, rank: int, pid_file: str) -> None:
        self.step, self.rank, self.pid_file = step, rank, pid_file

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            from datamodules.atomic import write_text

            write_text(self.pid_file, str(os.getpid()))
            time.sleep(600)


def _launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """train.py in its own process group (it and the DDP process it starts), output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _reap(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code of ``proc`` (None if it outlived ``timeout``); its whole process group is killed
    either way, so no process of the job outlives the test."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (exited, or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.parametrize("rank", [1, 0])
def test_ddp_job_with_a_process_killed_by_sigkill_resumes_to_the_unbroken_result(bases, tmp_path, child_env, rank):
    """A 2-process DDP meta-training run (CPU, gloo) whose process ``rank`` is SIGKILLed between two
    checkpoints (rank 0 is train.py itself, which started rank 1): the surviving process goes down
    too (nothing hangs), and the job resumed with --ckpt_path last, from the config's own latest-state
    checkpoint (written at a validation in the middle of an epoch), ends with exactly the editor of an
    unbroken run: the step after the checkpoint, done before the kill, is redone as the unbroken run did it."""
    cbs = yaml.safe_load(open(ROOT / "configs" / "mend_zsre_gpt2_tiny.yaml"))["trainer"]["callbacks"]
    (latest,) = [c for c in cbs if c.get("init_args", {}).get("filename") == "last"]
    common = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
              "--data.init_args.shuffle", "true", "--trainer.limit_train_batches", "3", "--trainer.max_steps", "7",
              "--trainer.enable_checkpointing", "true"]  # validation (and last.ckpt) at steps 2, 4 and 6

    def args(out: Path, *extra: dict) -> list[str]:
        ck = {**latest, "init_args": {**latest["init_args"], "dirpath": str(out / "ck")}}
        return mend_args("causal", bases, out, *common, "--trainer.callbacks", json.dumps([ck, *extra]))

    child_env = {**child_env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}  # StallAt is in this module

    def run(argv: list[str], log: Path) -> None:
        assert _reap(_launch(argv, child_env, log), 300) == 0, log.read_text()[-3000:]

    full, part = tmp_path / "full", tmp_path / "part"
    run(args(full), tmp_path / "full.log")
    pid_file = tmp_path / "stalled.pid"
    stall = {"class_path": "test_train.StallAt", "init_args": {"step": 5, "rank": rank, "pid_file": str(pid_file)}}
    job = _launch(args(part, stall), child_env, tmp_path / "part.log")
    try:
        deadline = time.monotonic() + 300
        while not pid_file.exists():
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "part.log").read_text()[-3000:]
            time.sleep(0.2)
        stalled = int(pid_file.read_text())
        assert (stalled == job.pid) == (rank == 0), "rank 0 is train.py; rank 1 the process it started"
        (other,) = [int(p) for p in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()] \
            if rank == 0 else [job.pid]
        os.kill(stalled, signal.SIGKILL)
        # the survivor's next collective fails (gloo: connection closed), or Lightning's observer kills it
        deadline = time.monotonic() + 60
        while not _gone(other):
            assert time.monotonic() < deadline, "the surviving process hangs"
            time.sleep(0.2)
        code = job.wait(timeout=10)
    finally:
        _reap(job, 0)
    assert code != 0
    last = torch.load(part / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}], "mid-epoch"
    assert not (part / "editor.safetensors").exists(), "the killed job exported nothing"
    run(args(part) + ["--ckpt_path", "last"], tmp_path / "resume.log")
    resumed, unbroken = _editor_state(part / "editor.safetensors"), _editor_state(full / "editor.safetensors")
    assert not torch.equal(last[CHECKPOINT_KEY]["state_dict"]["edit_lrs"], resumed["edit_lrs"]), "it trained"
    for k in unbroken:
        assert torch.equal(resumed[k], unbroken[k]), k


def test_early_stopping_keeps_the_best_editor_and_a_resumable_latest_state(bases, tmp_path):
    """The default config's own checkpoint and early-stopping callbacks, validating every step and
    (mode max on a falling loss) stopping after 2 validations without a new best: the run must stop
    before max_steps, editor.safetensors must hold the best validation's editor, not the latest one, and
    last.ckpt (what --ckpt_path last resumes from) must hold the latest state, not the best one."""
    out = tmp_path / "es"
    cbs = yaml.safe_load(open(ROOT / "configs" / "mend_zsre_gpt2_tiny.yaml"))["trainer"]["callbacks"]
    checkpoints = [c["init_args"] for c in cbs if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoints) == 2 and sum("monitor" in c for c in checkpoints) == 1, "one best, one latest"
    for c in cbs:
        args = c.get("init_args", {})
        if "monitor" in args:  # checkpoint and early stopping: a falling loss never "improves"
            args["mode"] = "max"
        if "patience" in args:
            args["patience"] = 2
    cbs = [c for c in cbs if not c["class_path"].endswith("LocalityDrift")]  # not under test here
    summary = train.main(mend_args("causal", bases, out, "--trainer.enable_checkpointing", "true",
                                   "--trainer.callbacks", json.dumps(cbs), "--trainer.max_steps", "40",
                                   "--trainer.val_check_interval", "1", "--model.init_args.lr", "1e-3"))
    latest = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)  # in the run dir
    best = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert latest["global_step"] < 40, "early stopping fired before max_steps"
    assert best["global_step"] < latest["global_step"], "the best validation was not the last one"
    assert latest["global_step"] == best["global_step"] + 2, "last.ckpt is the state the run stopped in"
    kept = _editor_state(out / "editor.safetensors")
    for k, v in best[CHECKPOINT_KEY]["state_dict"].items():
        assert torch.equal(kept[k], v), k
    assert not torch.equal(kept["edit_lrs"], latest[CHECKPOINT_KEY]["state_dict"]["edit_lrs"])


def test_locality_drift_callback_logs_kl_and_flips(bases, tmp_path):
    out = tmp_path / "drift"
    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s", "name": "csv"}}' % out
    cb = '[{"class_path": "lightning_modules.callbacks.LocalityDrift", "init_args": {"n_edits": 2, "n_probes": 8}}]'
    train.main(mend_args("causal", bases, out, "--trainer.callbacks", cb, "--trainer.logger", logger))
    import csv

    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    kl = [float(r["drift/kl"]) for r in rows if r.get("drift/kl")]
    flips = [float(r["drift/top1_flip_rate"]) for r in rows if r.get("drift/top1_flip_rate")]
    assert len(kl) == 2 and len(flips) == 2, "logged at each of the two validations"
    assert all(k >= 0 for k in kl) and all(0 <= f <= 1 for f in flips)
    assert max(kl) > 0, "the edits moved the probe distributions"


def test_standalone_validate_runs_under_inference_mode(bases):
    """`trainer.validate` runs under torch.inference_mode; the edit's autograd must still work there."""
    import lightning as L

    from datamodules.edit_data import ZsreDataModule
    from lightning_modules.mend_module import MENDModule

    data = bases / "base_causal" / "data"
    module = MENDModule(base_model=str(bases / "base_causal" / "model"), rank=16)
    dm = ZsreDataModule(train_path=str(data / "zsre-train.jsonl"), val_path=str(data / "zsre-val.jsonl"),
                        loc_path=str(data / "nq-loc.jsonl"), tokenizer=str(bases / "base_causal" / "model"),
                        val_limit=4, batch_size=2)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        inference_mode=True)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert 0.0 <= metrics["val/edit_success"] <= 1.0 and metrics["val/loc_kl"] > -1e-6  # KL up to rounding


def test_validation_under_the_stopping_rule_equals_until_right_edit_by_edit(bases):
    """``until_right_scales``: validation scores each edit under FT's stopping rule, all problems of a
    batch at once; the kept scales, generality and drawdown must equal :class:`UntilRight` applied
    to one validation edit at a time."""
    import lightning as L

    from datamodules.edit_data import ZsreDataModule
    from editors.losses import forward_logits, scores
    from editors.base import EditedModel
    from editors.until_right import UntilRight
    from lightning_modules.mend_module import MENDModule

    data, base = bases / "base_causal" / "data", str(bases / "base_causal" / "model")
    scales = [0.3, 1.0, 3.0, 10.0, 30.0]
    module = MENDModule(base_model=base, rank=16, init_edit_lr=0.1, until_right_scales=scales)
    dm = ZsreDataModule(train_path=str(data / "zsre-train.jsonl"), val_path=str(data / "zsre-val.jsonl"),
                        loc_path=str(data / "nq-loc.jsonl"), tokenizer=base, val_limit=9, batch_size=3,
                        loc_per_edit=2, val_loc_per_edit=5)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    got = trainer.validate(module, datamodule=dm, verbose=False)[0]

    module.eval()  # as in validation: the editor's normalisation statistics stay as they are
    rule, model = UntilRight(module.editor, scales), module.model
    kept, gen, drawdown = [], [], []
    ds = dm.dataset("val")
    for i in range(len(ds)):
        b = dm.collate([ds[i]])
        assert b["loc"]["input_ids"].shape[0] == 5, "validation scores val_loc_per_edit locality inputs"
        edited = EditedModel(model, rule.deltas(model, b["edit_inner"], "causal"))
        kept.append(rule.last_scale)
        with torch.no_grad():
            gen.append(scores(forward_logits(edited, b["edit_outer"], "causal"), b["edit_outer"]["labels"], "causal")[0])
            labelled = (b["loc"]["labels"] != -100).any(1)
            pre = scores(forward_logits(model, b["loc"], "causal"), b["loc"]["labels"], "causal")[0]
            post = scores(forward_logits(edited, b["loc"], "causal"), b["loc"]["labels"], "causal")[0]
        drawdown.append((pre - post)[labelled])
    assert len(set(kept)) > 1, "the test needs edits that keep different scales"
    assert got["val/until_right_scale"] == pytest.approx(sum(kept) / len(kept), rel=1e-5)
    assert got["val/until_right_generality"] == pytest.approx(torch.cat(gen).mean().item(), abs=1e-6)
    assert got["val/until_right_drawdown"] == pytest.approx(torch.cat(drawdown).mean().item(), abs=1e-6)
    assert 0.0 <= got["val/until_right_edit_success"] <= 1.0 and got["val/until_right_loc_kl"] > -1e-6


class PoisonGrads(Callback):
    """Turns the gradients of the given global steps (all steps from ``every_from`` on) into NaN, as a
    bad batch or an overflow would."""

    def __init__(self, steps: list[int] = (), every_from: int | None = None) -> None:
        self.steps, self.every_from = set(steps), every_from

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        s = trainer.global_step
        if s in self.steps or (self.every_from is not None and s >= self.every_from):
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_when_they_persist(bases, tmp_path):
    """A NaN gradient skips its step (the editor stays finite and is exported; the step is counted in
    train/skipped_steps); ten in a row stop the run with a message naming the step."""
    out = tmp_path / "nan"
    logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s", "name": "csv"}}' % out
    poison = {"class_path": "test_train.PoisonGrads", "init_args": {"steps": [1, 2]}}
    train.main(mend_args("causal", bases, out, "--trainer.callbacks", json.dumps([poison]), "--trainer.logger", logger,
                         "--trainer.log_every_n_steps", "1"))
    state = _editor_state(out / "editor.safetensors")
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    import csv

    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    assert max(float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")) == 2
    poison = {"class_path": "test_train.PoisonGrads", "init_args": {"every_from": 1}}
    with pytest.raises(RuntimeError, match="10 optimiser steps in a row.*global step"):
        train.main(mend_args("causal", bases, tmp_path / "nan2", "--trainer.callbacks", json.dumps([poison]),
                             "--trainer.max_steps", "20"))


def test_run_dir_moves_every_output_of_a_job(bases, tmp_path):
    """One setting places a job: the export, Lightning's logs and the config's checkpoint callbacks
    (which name no directory of their own) all land under --run_dir."""
    _, cfg, task, loc, _ = FAMILIES["causal"]
    data, base = bases / "base_causal" / "data", bases / "base_causal" / "model"
    run = tmp_path / "mine"
    train.main(["--config", str(ROOT / "configs" / f"{cfg}.yaml"), "--run_dir", str(run),
                "--model.init_args.base_model", str(base), "--model.init_args.rank", "16",
                "--data.init_args.train_path", str(data / f"{task}-train.jsonl"),
                "--data.init_args.val_path", str(data / f"{task}-val.jsonl"),
                "--data.init_args.test_path", str(data / f"{task}-test.jsonl"),
                "--data.init_args.loc_path", str(data / loc), "--data.init_args.tokenizer", str(base),
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.init_args.val_limit", "4",
                "--trainer.enable_progress_bar", "false"])
    assert (run / "editor.safetensors").exists()
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} >= {"last.ckpt"}
    assert any((run / "lightning_logs").rglob("events.out.tfevents.*"))
