"""`make bench`: MEND edit latency, meta-training step time, memory and evaluation throughput; the
edit latency of Transformer-Patcher, dynamic surgery and the (untrained) surgery selector.

Every figure that matters is a ratio to one plain forward+backward of the same base model on the
same input, measured in the same run with the two timed alternately (round-robin, after warm-up,
medians), so a noisy shared machine moves numerator and denominator together.

Models are GPT-2 shaped with random weights (no downloads): ``tiny`` (4 layers, width 256, 4 heads,
vocabulary 5000) and ``gpt2s`` (GPT-2 small: 12 layers, width 768, vocabulary 50257); 32-token
inputs whose last 8 tokens are the target; rank-1920 editor networks (capped at their input width).

Writes ``benchmarks/results.json`` and ``benchmarks/RESULTS.md`` (figures, machine, versions, a
profile of where the time goes, then ``benchmarks/NOTES.md``).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
# OpenMP threads that spin at barriers make 2-thread timings ~20x slower and erratic as soon as another
# process wants the CPU (measured here: 1.2 s instead of 0.05 s per tiny forward+backward); sleeping
# threads keep the figures stable on a shared machine. Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from datamodules.atomic import write_text  # noqa: E402
from datamodules.encoding import collate  # noqa: E402
from editors.losses import forward_logits, nll  # noqa: E402
from editors.malmen import MALMEN  # noqa: E402
from editors.mend import MEND  # noqa: E402
from editors.patcher import Patcher  # noqa: E402
from editors.rledit import RLEdit  # noqa: E402
from editors.selector import Selector  # noqa: E402
from editors.surgery import Surgery  # noqa: E402
from editors.until_right import PolyakStep  # noqa: E402
from lightning_modules.evaluation import BaseLocality, score_step  # noqa: E402

SHAPES = {"tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=5000),
          "gpt2s": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)}
SEQ, TARGET = 32, 8
FAM = "causal"
TARGETS = {"edit_ratio_tiny_1": 2.2, "edit_ratio_gpt2s_1": 1.15, "edit_ratio_gpt2s_10": 1.25,
           "step_ratio_tiny_1": 5.0, "step_ratio_gpt2s_1": 2.8, "memory_ratio_gpt2s": 1.5, "memory_ratio_tiny": 1.5,
           "malmen_step_memory_ratio_tiny_1000_over_10": 1.5, "edit_ratio_gpt2s_patcher": 1.5}
REFERENCE = {"edit_ratio_tiny_1": 3.3, "edit_ratio_gpt2s_1": 1.42, "edit_ratio_gpt2s_10": 1.59,
             "step_ratio_tiny_1": 10.0, "step_ratio_gpt2s_1": 3.9, "edit_ratio_gpt2s_patcher": 2.21}


def build_model(shape: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_positions=128, bos_token_id=0, eos_token_id=0, pad_token_id=0, **SHAPES[shape])
    return GPT2LMHeadModel(cfg).eval()  # eval: no dropout, as MENDModule runs its base model


def make_batch(vocab: int, rows: int, seed: int, target: int = TARGET) -> dict[str, torch.Tensor]:
    """``rows`` causal examples of SEQ random tokens; the loss is on the last ``target`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :SEQ - target] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def step_batch(vocab: int, problems: int, seed: int) -> dict:
    """A meta-training batch as :mod:`datamodules.edit_data` builds it: 1 edit, 1 paraphrase and
    1 locality input per problem."""
    return {"n_problems": problems, "edit_inner": make_batch(vocab, problems, seed),
            "edit_outer": make_batch(vocab, problems, seed + 1), "loc": make_batch(vocab, problems, seed + 2)}


def round_robin(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, timed alternately so load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            dt = time.perf_counter() - t
            if i >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


# -- the measured operations
def fwd_bwd(model: torch.nn.Module, batch: dict) -> None:
    """The denominator: a plain training forward+backward of the base model (all parameters trainable)."""
    model.zero_grad(set_to_none=True)
    nll(forward_logits(model, batch, FAM), batch["labels"], FAM).backward()


def edit(editor: MEND, model: torch.nn.Module, batch: dict) -> None:
    """One edit request: compute the deltas and apply them (the edited weights, functionally)."""
    with torch.no_grad():
        editor.edit(model, batch, FAM).edited_params()


class MetaTrainer:
    """The real meta-training step: the module's ``_step`` (MEND's by default, or the surgery
    selector's), backward, grad-norm clip 100 (as the configs' ``gradient_clip_val``), and the
    module's own optimizer."""

    def __init__(self, model: torch.nn.Module, tmp: Path, selector: bool = False) -> None:
        from lightning_modules.mend_module import MENDModule
        from lightning_modules.selector_module import SelectorModule

        model.save_pretrained(tmp)
        if selector:
            self.module = SelectorModule(base_model=str(tmp), family=FAM, n_params=1000).train()
        else:
            self.module = MENDModule(base_model=str(tmp), family=FAM, rank=1920).train()
            trained_looking(self.module.editor)
        self.opt = self.module.configure_optimizers()
        self.params = [p for g in self.opt.param_groups for p in g["params"]]

    def __call__(self, batch: dict) -> None:
        self.grads(batch)
        self.update(self.opt)
        self.opt.zero_grad(set_to_none=True)

    def grads(self, batch: dict) -> None:
        self.module._step(batch)["loss"].backward()

    def update(self, opt: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 100.0)
        opt.step()

    def fused_adam(self) -> torch.optim.Optimizer:
        """The same parameter groups under fused Adam: a diagnostic of the optimizer's share."""
        return torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in self.opt.param_groups], fused=True)

    def resident_bytes(self) -> int:
        """Tensors alive between steps: base model, editor, optimizer state."""
        state = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return tensor_bytes(list(self.module.parameters()) + list(self.module.buffers()) + state)


def trained_looking(editor: MEND) -> MEND:
    """Nonzero ``U``: at the identity init every ReLU sits at 0 and the networks get no gradient,
    which is not what training costs (the timings do not depend on the values otherwise)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for net in editor.nets:
            net.U.normal_(std=1e-3)
    return editor


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def peak_alloc(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by the CPU allocator during ``fn`` above what was live when it started,
    from the torch profiler's allocation/free events (tracemalloc does not see torch's allocator)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


# -- evaluation throughput
def loc_pool(vocab: int, rows: int, seed: int) -> list[dict]:
    """A locality pool as a DataModule holds it: encoded rows (lists), collated when scored."""
    b = make_batch(vocab, rows, seed)
    return [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in zip(b["input_ids"], b["labels"])]


def base_outputs(model: torch.nn.Module, cache_bytes: int | None) -> BaseLocality:
    """The unedited model's locality outputs as evaluation keeps them (``cache_bytes`` 0: no log-probabilities
    kept, so the base model runs again for every edit's KL, as evaluation did before the cache)."""
    kw = {} if cache_bytes is None else {"max_bytes": cache_bytes}
    return BaseLocality(model, FAM, lambda feats: collate(feats, 0, FAM), eos_id=0, answer_tokens=TARGET, **kw)


def eval_single(editor: MEND, model: torch.nn.Module, data: dict, cache_bytes: int | None = None) -> None:
    """Every held-out edit alone, scored as single-mode evaluation scores it (``--loc_per_edit all``): edit
    input, paraphrase and the whole locality pool, against base outputs computed once per call."""
    base = base_outputs(model, cache_bytes)
    for i in range(data["edit"]["input_ids"].shape[0]):
        row = {k: {kk: v[i:i + 1] for kk, v in data[k].items()} for k in ("edit", "rephrase")}
        score_edit(editor, model, row, data["loc"], base)


def eval_batch(editor: MEND, model: torch.nn.Module, data: dict) -> None:
    """All held-out edits applied at once, all scored, the locality pool once."""
    score_edit(editor, model, {k: data[k] for k in ("edit", "rephrase")}, data["loc"], base_outputs(model, None))


def score_edit(editor: MEND, model: torch.nn.Module, rows: dict, loc: list[dict], base: BaseLocality) -> None:
    edited = editor.edit(model, rows["edit"], FAM)
    owner = torch.arange(rows["rephrase"]["input_ids"].shape[0])
    score_step(base, edited, rows["edit"], rows["rephrase"], owner, loc)


# -- where the time goes
def profile_table(fn: Callable[[], object], reps: int = 3, rows: int = 12) -> str:
    """Self-CPU time of the top ops over ``reps`` calls (after one warm-up)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def editor_nets(editor: MEND, n_tokens: int) -> dict[str, Callable[[], None]]:
    """The editor networks alone (all groups, ``n_tokens`` tokens per layer), forward and
    forward+backward: part of every edit's and step's floor."""
    xs = [torch.randn(len(ix), n_tokens, di + do) for (di, do), ix in editor.groups]

    def fwd() -> None:
        with torch.no_grad():
            for net, x in zip(editor.nets, xs):
                net(x)

    def fwd_bwd_nets() -> None:
        editor.zero_grad(set_to_none=True)
        sum(net(x).sum() for net, x in zip(editor.nets, xs)).backward()

    return {"nets_fwd": fwd, "nets_fwd_bwd": fwd_bwd_nets}


def bench_model(shape: str, quick: bool, tmp: Path, res: dict, prof: dict) -> None:
    model = build_model(shape)
    vocab, big, raw = model.config.vocab_size, shape == "gpt2s", res["raw"][shape]
    reps, warm = (3, 1) if quick else ((7, 2) if big else (25, 5))
    few = (2, 1) if quick or big else (7, 2)  # for the slow figures: 10-edit steps and evaluation
    editor = trained_looking(MEND.for_model(model, rank=1920).eval())
    one, ten = make_batch(vocab, 1, 0), make_batch(vocab, 10, 10)

    # edit latency, 1 and 10 edits at once
    t = round_robin({"fwd_bwd_1": lambda: fwd_bwd(model, one), "edit_1": lambda: edit(editor, model, one),
                     "fwd_1": torch.no_grad()(lambda: forward_logits(model, one, FAM))}, reps, warm)
    t.update(round_robin({"fwd_bwd_10": lambda: fwd_bwd(model, ten),
                          "edit_10": lambda: edit(editor, model, ten)}, *few))
    raw.update(t)
    res[f"edit_ratio_{shape}_1"] = t["edit_1"] / t["fwd_bwd_1"]
    res[f"edit_ratio_{shape}_10"] = t["edit_10"] / t["fwd_bwd_10"]
    model.zero_grad(set_to_none=True)

    # meta-training step: 1 problem (1 edit + 1 paraphrase + 1 locality input), and 10 problems
    trainer = MetaTrainer(model, tmp / shape)
    batch, batch10 = step_batch(vocab, 1, 20), step_batch(vocab, 10, 40)
    trainer.grads(batch)  # the optimizer's share: clip + step on the gradients of one step, kept aside
    grads = [p.grad for p in trainer.params]
    fused = trainer.fused_adam()

    def update(opt: torch.optim.Optimizer) -> None:
        for p, g in zip(trainer.params, grads):
            p.grad = g
        trainer.update(opt)
        opt.zero_grad(set_to_none=True)

    # the step's parts are timed in the same rounds as the step, so the breakdown adds up
    t = round_robin({"step_fwd_bwd_1": lambda: fwd_bwd(model, one), "step_1": lambda: trainer(batch),
                     **editor_nets(trainer.module.editor, SEQ), "step_clip_and_optimizer": lambda: update(trainer.opt),
                     "step_clip_and_fused_adam": lambda: update(fused)}, reps, warm)
    t.update(round_robin({"step_fwd_bwd_10": lambda: fwd_bwd(model, ten), "step_10": lambda: trainer(batch10)}, *few))
    raw.update(t)
    res[f"step_ratio_{shape}_1"] = t["step_1"] / t["step_fwd_bwd_1"]
    res[f"step_ratio_{shape}_10"] = t["step_10"] / t["step_fwd_bwd_10"]
    res[f"step_edits_per_s_{shape}_1"] = 1 / t["step_1"]
    res[f"step_edits_per_s_{shape}_10"] = 10 / t["step_10"]
    # what the step would cost with fused Adam (same step, optimizer time swapped; diagnostic)
    fused_step = t["step_1"] - t["step_clip_and_optimizer"] + t["step_clip_and_fused_adam"]
    res[f"step_ratio_{shape}_1_if_fused_adam"] = fused_step / t["step_fwd_bwd_1"]

    # memory: resident tensors + the peak the call allocates on top of them (profiler events)
    model.zero_grad(set_to_none=True)
    base_res = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    base_peak = peak_alloc(lambda: fwd_bwd(model, one))
    model.zero_grad(set_to_none=True)
    step_res = trainer.resident_bytes()
    step_peak = peak_alloc(lambda: trainer(batch))
    grads_peak = peak_alloc(lambda: trainer.grads(batch))  # the same without clip + optimizer
    trainer.opt.zero_grad(set_to_none=True)
    raw["memory_bytes"] = {"fwd_bwd": {"resident": base_res, "transient_peak": base_peak},
                           "step": {"resident": step_res, "transient_peak": step_peak,
                                    "transient_peak_before_optimizer": grads_peak}}
    res[f"memory_ratio_{shape}"] = (step_res + step_peak) / (base_res + base_peak)
    res[f"memory_ratio_{shape}_transient"] = step_peak / base_peak

    # evaluation throughput: held-out edits scored per second, each on the whole locality pool; single
    # mode also without the base outputs' cache (the base model run again for every edit)
    k, pool = (4, 16) if big or quick else (16, 32)
    data = {"edit": make_batch(vocab, k, 30), "rephrase": make_batch(vocab, k, 31), "loc": loc_pool(vocab, pool, 32)}
    t = round_robin({"eval_single": lambda: eval_single(editor, model, data),
                     "eval_single_uncached": lambda: eval_single(editor, model, data, cache_bytes=0),
                     "eval_batch": lambda: eval_batch(editor, model, data)}, *few)
    raw.update({f"{k_}_{k}_edits_{pool}_loc": v for k_, v in t.items()})
    res[f"eval_edits_per_s_{shape}_single"] = k / t["eval_single"]
    res[f"eval_edits_per_s_{shape}_single_uncached"] = k / t["eval_single_uncached"]
    res[f"eval_edits_per_s_{shape}_batch"] = k / t["eval_batch"]
    res[f"eval_cache_speedup_{shape}"] = t["eval_single_uncached"] / t["eval_single"]

    # the other editors: one edit each, of a 2-token answer the model gets wrong (random weights), as
    # evaluation makes them: each stops once the answer is right (or at its step cap)
    answer = make_batch(vocab, 1, 60, target=2)
    # the patcher with a small memory (64 inputs) and with one of 160,000 queries (5,000 inputs), the
    # size of the 2,000-subject world's; its queries are computed once per editor, before timing
    large = Patcher(model, memory=make_batch(vocab, 160_000 // SEQ, 62))
    large.memory_queries(model, FAM)
    others = {"patcher": Patcher(model, memory=make_batch(vocab, 64, 61)), "patcher_memory160k": large,
              "surgery_dynamic": Surgery.for_model(model, n_params=1000, method="dynamic"),
              "selector": Selector.for_model(model, n_params=1000, step_rule="polyak"),  # the configs' rule
              "mend_polyak": PolyakStep(editor)}
    t = round_robin({"other_fwd_bwd_1": lambda: fwd_bwd(model, answer),
                     **{f"edit_{n}": (lambda e=e: e.make_edit(model, answer, FAM)) for n, e in others.items()}}, *few)
    raw.update(t)
    for n in others:
        res[f"edit_ratio_{shape}_{n}"] = t[f"edit_{n}"] / t["other_fwd_bwd_1"]
        res[f"edit_seconds_{shape}_{n}"] = t[f"edit_{n}"]
    model.zero_grad(set_to_none=True)

    # the surgery selector's meta-training step (1 problem), beside MEND's above
    sel = MetaTrainer(model, tmp / f"{shape}_selector", selector=True)
    t = round_robin({"sel_fwd_bwd_1": lambda: fwd_bwd(model, one), "step_selector_1": lambda: sel(batch)}, *few)
    raw.update(t)
    res[f"step_ratio_{shape}_selector_1"] = t["step_selector_1"] / t["sel_fwd_bwd_1"]
    model.zero_grad(set_to_none=True)

    prof[f"{shape}: one edit (editor.edit)"] = profile_table(lambda: edit(editor, model, one))
    prof[f"{shape}: one meta-training step"] = profile_table(lambda: trainer(batch))
    model.zero_grad(set_to_none=True)


def bench_malmen(shape: str, res: dict) -> None:
    """MALMEN: memory of one memory-decoupled meta-training step at K = 10 and K = 1,000 edits (micro-batch
    of 8 edits fixed; resident tensors + the step's transient peak, as ``memory_ratio_*``) with the edit
    tokens' pieces recomputed by each pass (``cache_pieces`` False) and cached (``_cached``), the step
    time of the two at K = 100, and a K = 1,000 edit against one forward+backward over the same 1,000
    inputs, beside MEND's edit of them."""
    from lightning_modules.malmen_module import decoupled_meta_gradients

    model = build_model(shape)
    vocab, raw = model.config.vocab_size, res["raw"][shape]
    # the shipped config's editor: its matrices and key-covariance penalty
    cfg = yaml.safe_load((HERE.parent / "configs" / "malmen_zsre_gpt2_tiny.yaml").read_text())["model"]["init_args"]
    editors = {c: trained_looking(MALMEN.for_model(model, cfg["edit_params"], rank=1920, edit_chunk=8, cache_pieces=c,
                                                   key_cov_weight=cfg["key_cov_weight"])) for c in (False, True)}
    editor = editors[True]
    mend = trained_looking(MEND.for_model(model, rank=1920).eval())
    resident = tensor_bytes(list(model.parameters()) + list(editor.parameters()) + list(editor.buffers()))

    def step(cache: bool, k: int) -> Callable[[], object]:
        batch = {"n_problems": 1, **{part: make_batch(vocab, k, 70 + i)
                                     for i, part in enumerate(("edit_inner", "edit_outer", "loc"))}}
        return lambda: decoupled_meta_gradients(editors[cache], model, batch, FAM, 0.1, 1.0)

    suffix = {False: "", True: "_cached"}
    for cache in (False, True):
        mem = {k: resident + peak_alloc(step(cache, k)) for k in (10, 1000)}
        raw[f"malmen_step_memory_bytes{suffix[cache]}"] = mem
        res[f"malmen_step_memory_ratio_{shape}_1000_over_10{suffix[cache]}"] = mem[1000] / mem[10]
    t = round_robin({f"malmen_step_100{suffix[c]}": step(c, 100) for c in (False, True)}, 3, 1)
    raw.update(t)
    res[f"malmen_step_time_ratio_{shape}_100_streamed_over_cached"] = t["malmen_step_100"] / t["malmen_step_100_cached"]
    big = make_batch(vocab, 1000, 80)
    t = round_robin({"fwd_bwd_1000": lambda: fwd_bwd(model, big),
                     "malmen_edit_1000": torch.no_grad()(lambda: editor.make_edit(model, big, FAM)),
                     "mend_edit_1000": lambda: edit(mend, model, big)}, 1, 0)  # each call takes seconds: one round
    raw.update(t)
    for name in ("malmen", "mend"):
        res[f"edit_ratio_{shape}_{name}_1000"] = t[f"{name}_edit_1000"] / t["fwd_bwd_1000"]

    # malmen_stream: one stream edit (key memory, Polyak steps until right, at most 5) merged into a working
    # model that already remembers 10 edits, against one forward+backward of one edit's input
    stream = PolyakStep(trained_looking(MALMEN.for_model(model, cfg["edit_params"], rank=1920, memory_weight=10.0,
                                                         key_cov_weight=cfg["key_cov_weight"])), max_steps=5)
    work, one = copy.deepcopy(model), make_batch(vocab, 1, 81)
    for i in range(10):
        stream.make_edit(work, make_batch(vocab, 1, 100 + i), FAM).merge_(work)
    steps: list[int] = []

    def stream_edit() -> None:
        stream.make_edit(work, one, FAM).merge_(work)
        steps.append(stream.last_steps)

    t = round_robin({"fwd_bwd_1": lambda: fwd_bwd(model, one), "malmen_stream_edit": stream_edit}, 5, 1)
    raw.update({**t, "malmen_stream_edit_steps": steps})
    res[f"edit_ratio_{shape}_malmen_stream"] = t["malmen_stream_edit"] / t["fwd_bwd_1"]
    model.zero_grad(set_to_none=True)


def bench_rledit(shape: str, res: dict, n_steps: int = 10) -> None:
    """The lifelong editors: one meta-training step over a stream of ``n_steps`` single-edit steps (both
    passes, no optimizer) of RLEdit and of MALMEN over streams (key memory mu 10), and one RLEdit stream edit
    (the pieces on the current model, the change, merged into it), each as a ratio to one forward+backward
    of the base over one edit's input (``malmen_stream``'s edit: :func:`bench_malmen`)."""
    from lightning_modules.rledit_module import stream_meta_gradients

    model = build_model(shape)
    vocab, raw = model.config.vocab_size, res["raw"][shape]
    # eval mode: a stream edit does not update the input statistics (and the steps below do not either)
    editor = trained_looking(RLEdit.for_model(model, rank=1920, precondition_ridge=1.0)).eval()
    malmen = trained_looking(MALMEN.for_model(model, rank=1920, memory_weight=10.0)).eval()
    batch = {"n_problems": 1, "index": list(range(n_steps)), "edit_inner": make_batch(vocab, n_steps, 90),
             "edit_outer": make_batch(vocab, n_steps, 91), "loc": make_batch(vocab, 4 * n_steps, 92)}
    coefs = {"edit": 0.1, "back": 0.1, "kl": 1.0, "norm": 0.0, "gamma": 1.0, "n_back": 4}
    one = make_batch(vocab, 1, 93)
    work = copy.deepcopy(model)

    def stream_edit() -> None:
        editor.make_edit(work, one, FAM).merge_(work)

    def step(e: RLEdit | MALMEN) -> Callable[[], object]:
        return lambda: stream_meta_gradients(e, model, batch, FAM, n_steps, coefs, [0], update_statistics=False)

    t = round_robin({"rledit_fwd_bwd_1": lambda: fwd_bwd(model, one), f"rledit_step_T{n_steps}": step(editor),
                     f"malmen_stream_step_T{n_steps}": step(malmen), "rledit_stream_edit": stream_edit}, 5, 1)
    raw.update(t)
    res[f"rledit_step_ratio_{shape}_T{n_steps}"] = t[f"rledit_step_T{n_steps}"] / t["rledit_fwd_bwd_1"]
    res[f"malmen_stream_step_ratio_{shape}_T{n_steps}"] = t[f"malmen_stream_step_T{n_steps}"] / t["rledit_fwd_bwd_1"]
    res[f"rledit_stream_edit_ratio_{shape}"] = t["rledit_stream_edit"] / t["rledit_fwd_bwd_1"]
    model.zero_grad(set_to_none=True)


def machine() -> dict[str, str]:
    import lightning

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "os": platform.platform()}


def ms(seconds: float, unit: float) -> str:
    return f"{seconds * 1e3:.0f} ms ({seconds / unit:.2f}x)"


def write_markdown(path: Path, res: dict, prof: dict) -> None:
    m = res["machine"]
    lines = [f"# Benchmarks ({res['date']})", "",
             f"Command: `{res['command']}` ({res['seconds']:.0f} s). Machine: {m['cpu']}, {m['cores']} cores "
             f"({m['torch_threads']} torch threads, OMP_WAIT_POLICY={m['omp_wait_policy']}), GPU: {m['gpu']} "
             f"(every figure here is on CPU). Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}, lightning {m['lightning']}; {m['os']}.", "",
             "Ratios are to one plain forward+backward of the base model on the same input, measured "
             "alternately in the same run (medians after warm-up).", "",
             "| figure | measured | target | reference impl. | met |", "|---|---|---|---|---|"]
    for k, target in TARGETS.items():
        v = res.get(k)
        if v is not None:
            lines.append(f"| {k} | {v:.2f} | <= {target} | {REFERENCE.get(k, '')} | {'yes' if v <= target else 'NO'} |")
    lines += ["", "| other figure | value |", "|---|---|"]
    for k, v in res.items():
        if k not in TARGETS and k != "seconds" and isinstance(v, float):
            lines.append(f"| {k} | {v:.3g} |")
    lines += ["", "Where one meta-training step's time goes (1 edit; the editor networks and the clip + optimizer "
              "timed alone on the step's shapes, in the same rounds as the step; the rest is the difference):", "",
              "| model | step | editor networks fwd+bwd | clip + optimizer (fused Adam) | rest | one fwd+bwd |",
              "|---|---|---|---|---|---|"]
    for shape, r in res["raw"].items():
        x = r["step_fwd_bwd_1"]
        rest = r["step_1"] - r["nets_fwd_bwd"] - r["step_clip_and_optimizer"]
        lines.append(f"| {shape} | {ms(r['step_1'], x)} | {ms(r['nets_fwd_bwd'], x)} "
                     f"| {ms(r['step_clip_and_optimizer'], x)} ({ms(r['step_clip_and_fused_adam'], x)}) "
                     f"| {ms(rest, x)} | {ms(x, x)} |")
    lines += ["", "Raw medians (seconds unless named):", "", "```", json.dumps(res["raw"], indent=1), "```", ""]
    for title, table in prof.items():
        lines += [f"### Profile: {title}", "", "```", table.rstrip(), "```", ""]
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    write_text(path, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (a smoke test, not figures)")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=str(HERE), help="where results.json and RESULTS.md go")
    args = ap.parse_args()
    torch.set_num_threads(2)
    transformers.logging.disable_progress_bar()
    start = time.time()
    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "make bench" if len(sys.argv) == 1 else " ".join(["python", *sys.argv]),
                 "machine": machine(), "raw": {s: {} for s in args.models}}
    prof: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.models:
            bench_model(shape, args.quick, Path(tmp), res, prof)
            if shape == "tiny":  # a K = 1,000 step on GPT-2 small is minutes of CPU: tiny only
                bench_malmen(shape, res)
                bench_rledit(shape, res)
            print({k: round(v, 3) for k, v in res.items() if isinstance(v, float)}, flush=True)
    res["seconds"] = time.time() - start
    out = Path(args.out)
    write_text(out / "results.json", json.dumps(res, indent=1))
    write_markdown(out / "RESULTS.md", res, prof)
    for k, target in TARGETS.items():
        if k in res:
            print(f"{k:24s} {res[k]:6.2f}  (target <= {target})")
    print(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
