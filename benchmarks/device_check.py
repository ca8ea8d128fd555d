"""`make device-check`: the GPU figures hypedit needs from a lent accelerator, in one short run.

Builds random-weight models of real sizes from their configs (nothing is downloaded): GPT-2 XL
(1.5 B) and a LLaMA-architecture 7 B, in bf16 on the GPU. For each it times, as a ratio to one
plain forward+backward of the same base on the same batch (the two timed alternately, medians):

- a MEND edit (one edit request, deltas applied functionally), and the peak memory it takes;
- a MEND meta-training step under bf16 autocast (what ``--trainer.precision bf16-mixed`` runs):
  the real ``MENDModule._step`` + backward + clip + Adam, not a copy;
- a Transformer-Patcher edit and a dynamic-surgery edit (1,000 weights);

then a 20-step MEND meta-training smoke run through ``train.py`` with ``--trainer.precision
bf16-mixed`` (a 1-epoch tiny base on a 30-subject world first), and the same run with the base
sharded (``lightning_modules.sharding``; one process: the GPU path runs, not the gathering). Writes
``device_check.json`` and ``device_check.md`` under ``--out``.

``--tiny`` runs the same code on small models of the same two architectures (CPU is fine): the test
suite runs it that way so the script cannot rot before a GPU session needs it. Carrying the
pure-Python packages a device machine lacks: docs/real_models.md ("Running on a lent GPU").
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.run import FAM, fwd_bwd, machine, make_batch, round_robin, step_batch, trained_looking  # noqa: E402
from datamodules.atomic import write_text  # noqa: E402
from editors.mend import MEND  # noqa: E402
from editors.patcher import Patcher  # noqa: E402
from editors.surgery import Surgery  # noqa: E402

# (transformers class, config) per model; vocabularies as released
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2_xl": ("GPT2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
    "llama_7b": ("Llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
}
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2_xl": ("GPT2", dict(n_layer=4, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)),
    "llama_7b": ("Llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)),
}


def build(kind: str, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight model built directly on ``device`` in ``dtype`` (a 7 B model initialised on the
    CPU first would take minutes)."""
    import transformers

    config = getattr(transformers, f"{kind}Config")(bos_token_id=0, eos_token_id=0, pad_token_id=0, **cfg)
    model_cls = getattr(transformers, "GPT2LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")
    before = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def peak(device: torch.device, fn: Callable[[], object]) -> int | None:
    """Peak GPU bytes allocated while ``fn`` runs (None on CPU: the RSS of a process that has already
    built every model says nothing about one call)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def synced(device: torch.device, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device synchronisation, so wall-clock timings cover the GPU's work."""
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


class MetaStep:
    """One real MEND meta-training step under bf16 autocast. The base model in memory stands in for
    the checkpoint ``MENDModule`` would load (writing 13 GB to disk to time nothing else)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, rank: int) -> None:
        from lightning_modules import editor_module
        from lightning_modules.mend_module import MENDModule

        with mock.patch.object(editor_module, "load_model", lambda *a, **k: model):
            self.module = MENDModule(base_model="(random weights, in memory)", family=FAM, rank=rank)
        trained_looking(self.module.editor)
        self.module.to(device).train()
        self.device = device
        self.opt = self.module.configure_optimizers()
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def __call__(self, batch: dict) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.module._step(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 100.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def trainable_fwd_bwd(model: torch.nn.Module, batch: dict) -> None:
    """The denominator beside the meta-training step, which froze the shared base model: its
    parameters trainable for this call only, their gradients dropped after it."""
    model.requires_grad_(True)
    fwd_bwd(model, batch)
    model.requires_grad_(False).zero_grad(set_to_none=True)


def to(batch: dict, device: torch.device) -> dict:
    return {k: to(v, device) if isinstance(v, dict) else (v.to(device) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def check_model(name: str, kind: str, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                reps: int, warmup: int, rank: int) -> dict[str, Any]:
    model = build(kind, cfg, device, dtype)
    vocab = model.config.vocab_size
    one = to(make_batch(vocab, 1, 0), device)
    answer = to(make_batch(vocab, 1, 60, target=2), device)  # a 2-token answer the random model gets wrong
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)}
    mend = trained_looking(MEND.for_model(model, rank=rank)).to(device).eval()
    others = {"patcher": Patcher(model, memory=to(make_batch(vocab, 64, 61), device)),
              "surgery_dynamic": Surgery.for_model(model, n_params=1000, method="dynamic")}

    def mend_edit() -> None:
        with torch.no_grad():
            mend.edit(model, one, FAM).edited_params()

    ops = {"fwd_bwd": lambda: fwd_bwd(model, one), "mend_edit": mend_edit,
           **{f"{k}_edit": (lambda e=e: e.make_edit(model, answer, FAM)) for k, e in others.items()}}
    ops = {k: synced(device, f) for k, f in ops.items()}
    t = round_robin(ops, reps, warmup)
    mem = {k: peak(device, f) for k, f in ops.items()}
    model.zero_grad(set_to_none=True)
    del others

    step = MetaStep(model, device, rank)
    batch = to(step_batch(vocab, 1, 20), device)
    st = round_robin({"fwd_bwd": synced(device, lambda: trainable_fwd_bwd(model, one)),
                      "mend_step_bf16": synced(device, lambda: step(batch))}, reps, warmup)
    model.zero_grad(set_to_none=True)
    mem["mend_step_bf16"] = peak(device, lambda: step(batch))
    t["mend_step_bf16"], t["fwd_bwd_step_round"] = st["mend_step_bf16"], st["fwd_bwd"]
    out["seconds"] = t
    out["ratio_to_fwd_bwd"] = {k: t[k] / t["fwd_bwd"] for k in ("mend_edit", "patcher_edit", "surgery_dynamic_edit")}
    out["ratio_to_fwd_bwd"]["mend_step_bf16"] = st["mend_step_bf16"] / st["fwd_bwd"]
    out["peak_memory_bytes"] = mem
    return out


def smoke_train(tmp: Path, device: torch.device, steps: int = 20) -> dict[str, Any]:
    """A 1-epoch tiny base, then ``steps`` MEND meta-training steps under bf16-mixed, unsharded and with the
    base sharded, all via train.py."""
    acc = "gpu" if device.type == "cuda" else "cpu"
    w, base, mend = tmp / "world", tmp / "base", tmp / "mend"
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]",
             "--trainer.enable_checkpointing", "false", "--trainer.accelerator", acc, "--trainer.devices", "1"]
    jobs = [["--config", "configs/base_zsre_gpt2_tiny.yaml", "--world_dir", str(w), "--world.n_subjects", "30",
             "--model.init_args.tokenizer", f"{w}/tokenizer", "--data.init_args.world_dir", str(w),
             "--data.init_args.tokenizer", f"{w}/tokenizer", "--trainer.max_epochs", "1", "--run_dir", str(base), *quiet],
            ["--config", "configs/mend_zsre_gpt2_tiny.yaml", "--model.init_args.base_model", f"{base}/model",
             "--data.init_args.tokenizer", f"{base}/model", "--run_dir", str(mend),
             *[f"--data.init_args.{s}_path={base}/data/zsre-{s}.jsonl" for s in ("train", "val", "test")],
             f"--data.init_args.loc_path={base}/data/nq-loc.jsonl", "--trainer.max_steps", str(steps),
             "--trainer.val_check_interval", str(steps), "--data.init_args.val_limit", "8",
             "--trainer.precision", "bf16-mixed", *quiet]]
    sharded = tmp / "mend_sharded"
    jobs.append([*jobs[1], "--run_dir", str(sharded), "--trainer.strategy",
                 json.dumps({"class_path": "lightning_modules.sharding.ShardedBaseStrategy"})])
    t0 = time.perf_counter()
    for args in jobs:
        run = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
        if run.returncode:
            return {"ok": False, "seconds": time.perf_counter() - t0, "error": (run.stderr or run.stdout)[-2000:]}
    ok = all((d / "editor.safetensors").exists() for d in (mend, sharded))
    return {"ok": ok, "seconds": time.perf_counter() - t0, "steps": steps}


def write_markdown(path: Path, res: dict[str, Any]) -> None:
    m = res["machine"]
    lines = [f"# Device check ({res['date']})", "", f"Command: `{res['command']}` ({res['seconds']:.0f} s). "
             f"GPU: {m['gpu']}; CPU: {m['cpu']}; torch {m['torch']}, transformers {m['transformers']}.", "",
             "Ratios to one plain forward+backward of the same base on the same 32-token input (timed "
             "alternately, medians); peak memory is torch.cuda.max_memory_allocated during one call.", "",
             "| model | params | op | seconds | x fwd+bwd | peak GiB |", "|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        for op in ("fwd_bwd", "mend_edit", "mend_step_bf16", "patcher_edit", "surgery_dynamic_edit"):
            mem = r["peak_memory_bytes"].get(op)
            ratio = 1.0 if op == "fwd_bwd" else r["ratio_to_fwd_bwd"][op]
            lines.append(f"| {name} | {r['parameters'] / 1e9:.2f} B | {op} | {r['seconds'][op]:.4f} | {ratio:.2f} "
                         f"| {'' if mem is None else f'{mem / 2**30:.1f}'} |")
    s = res["smoke_train"]
    lines += ["", f"train.py smoke run (tiny base, then {s.get('steps')} MEND steps under bf16-mixed, unsharded "
              "and with the base sharded): "
              f"{'ok' if s['ok'] else 'FAILED'} in {s['seconds']:.0f} s.", ""]
    write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "device"), help="where device_check.json and .md go")
    ap.add_argument("--tiny", action="store_true", help="small models of the same architectures (CPU test)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--no_train", action="store_true", help="skip the train.py smoke run")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        ap.error("real sizes need a GPU (7 B parameters in bf16): use --tiny on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps, warmup, rank = (3, 1, 32) if args.tiny else (5, 2, 1920)
    start = time.time()
    res: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(["python benchmarks/device_check.py", *(argv or sys.argv[1:])]),
                           "machine": machine(), "tiny": args.tiny, "models": {}}
    for name in args.models:
        kind, cfg = (TINY if args.tiny else MODELS)[name]
        res["models"][name] = check_model(name, kind, cfg, device, dtype, reps, warmup, rank)
        if device.type == "cuda":  # the model is gone with check_model's frame: hand its memory back
            torch.cuda.empty_cache()
        print(f"[device-check] {name}: {json.dumps(res['models'][name]['ratio_to_fwd_bwd'])}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["smoke_train"] = {"ok": True, "seconds": 0.0, "skipped": True} if args.no_train else smoke_train(Path(tmp), device)
    res["seconds"] = time.time() - start
    out = Path(args.out)
    write_text(out / "device_check.json", json.dumps(res, indent=1))
    write_markdown(out / "device_check.md", res)
    print(f"[device-check] wrote {out / 'device_check.json'} and .md in {res['seconds']:.0f} s", flush=True)
    return res


if __name__ == "__main__":
    main()
