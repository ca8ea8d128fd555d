"""Evaluate model editors on held-out edits: single, batch and sequential protocols, MEND beside the
fine-tuning baselines, and a report (JSON, Markdown, PNG plots, TensorBoard).

    python eval.py --config configs/mend_zsre_gpt2_tiny.yaml --ckpt_path runs/default/editor.safetensors --mode single
    python eval.py --config ... --ckpt_path ... --mode batch                 # K = 1, 5, 25, 125 (capped)
    python eval.py --config ... --ckpt_path ... --mode sequential --folds 2 --edit_only_when_wrong
    python eval.py --config ... --editor ft_kl --mode single                  # baselines need no checkpoint
    python eval.py --config ... --ckpt_path ... --editor mend mend_until_right   # MEND under FT's stopping rule
    python eval.py --config ... --editor surgery_dynamic --surgery_n_params 1000  # neural-network surgery
    python eval.py --config ... --editor patcher --mode sequential --edit_only_when_wrong  # Transformer-Patcher
    python eval.py --config ... --ckpt_path ... --mode all --run_dir runs/default  # writes report.json there
    python eval.py --config ... --data.init_args.test_path other.jsonl --print_config  # dotted overrides
    python eval.py --config ... --ckpt_path ... --mode single --devices 2 --strategy ddp --accelerator cpu

The config is a meta-training YAML (configs/mend_*.yaml): its ``data`` section names the DataModule
(its test split holds the held-out edits) and ``model.init_args`` the base model and family.
Definitions of every metric: :data:`lightning_modules.evaluation.DEFINITIONS` (also in each report).
"""
from __future__ import annotations

import importlib
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from datamodules.atomic import check_writable
from datamodules.edit_data import EditDataModule
from datamodules.formats import DataFormatError, detect_task
from editors.base import Editor
from editors.ft import FineTune
from editors.layers import fingerprint, select_layers
from editors.mend import MEND
from editors.patcher import Patcher
from editors.selector import Selector
from editors.surgery import METHODS as SURGERY_METHODS
from editors.surgery import Surgery
from editors.until_right import DEFAULT_SCALES, UntilRight
from lightning_modules.evaluation import (DEFINITIONS, EditData, EditEvalModule, LocalitySampler, peak_memory,
                                          reset_peak_memory, run_batch, run_sequential, subset_split)
from lightning_modules.cli import INPUT_ERRORS
from lightning_modules.models import load_model
from lightning_modules.report import table, write_report

MODES = ("single", "batch", "sequential")
SURGERY = tuple(f"surgery_{m}" for m in SURGERY_METHODS)
EDITORS = ("mend", "mend_until_right", "ft", "ft_kl", *SURGERY, "selector", "patcher")
BATCH_SIZES = (1, 5, 25, 125)  # the published MEND batch-editing table
TRAIN_ONLY = ("world_dir", "world", "optimizer", "lr_scheduler")  # train.py config keys that eval.py ignores


class EvalError(Exception):
    """An input evaluation refuses (missing or mismatched file); the CLI prints it without a traceback."""


def parse_args(argv: list[str] | None = None) -> tuple[Namespace, dict]:
    """Parse the command line into (evaluation options, the config's sections as plain data).

    The same jsonargparse machinery as train.py: ``--config`` takes a meta-training YAML, any of
    its keys can be overridden with dotted names (``--data.init_args.test_path X``) and
    ``--print_config`` prints the resolved whole."""
    p = ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="meta-training YAML: its data and model sections are used")
    p.add_argument("--seed_everything", type=int | bool | None, default=None, help="from the config: the default --seed")
    p.add_subclass_arguments(L.LightningModule, "model", required=True,
                             help="the config's model: base_model, family, edit_params, until_right_scales")
    p.add_subclass_arguments(EditDataModule, "data", required=True,
                             help="the config's data: its test split holds the held-out edits")
    p.add_argument("--trainer", type=dict | None, default=None, help="the config's trainer section (unused here)")
    for key in TRAIN_ONLY:  # keys of a config that train.py saved or printed
        p.add_argument(f"--{key}", type=str | dict | None, default=None, help="from a train.py config (unused here)")
    p.add_argument("--run_dir", type=str | None, default=None,
                   help="this job's output directory: DIR/report.json (report_val.json for --split val), with .md, "
                        "plots and TensorBoard beside it")
    p.add_argument("--ckpt_path", type=str | None, default=None, help="trained MEND editor file (the other editors need none)")
    p.add_argument("--mode", choices=MODES + ("all",), default="single")
    p.add_argument("--editor", nargs="+", choices=EDITORS,
                   help="editors to evaluate (default: mend with a checkpoint, else ft; --mode all: every available one)")
    p.add_argument("--edits_per_step", type=int | None, default=None,
                   help="batch: only this K (default 1, 5, 25, 125); sequential: edits per step (default 1)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="held-out edits and locality pool to score: 'val' for every design choice (layers, rates, "
                        "grids), 'test' once, for the figures reported")
    p.add_argument("--n_edits", type=int | None, default=None, help="use this many held-out edits (a seeded sample; default all)")
    p.add_argument("--report", type=str | None, default=None,
                   help="write the JSON report here, with .md, plots and TensorBoard beside it (default: under --run_dir)")
    p.add_argument("--seed", type=int | None, default=None, help="edit sample, locality draws (default: seed_everything or 0)")
    p.add_argument("--folds", type=int, default=1, help="sequential: split the edits into this many streams")
    p.add_argument("--edit_only_when_wrong", action="store_true", help="sequential: apply an edit only if the current model gets it wrong")
    p.add_argument("--loc_per_edit", type=int | str, default="all",
                   help="locality inputs scored per edit (single, batch); default 'all': every input of the test "
                        "locality pool for every edit, so drawdown's noise is that of the edits, not of a sample "
                        "of inputs (the report gives its standard error, drawdown_stderr)")
    p.add_argument("--stream_state", type=str | None, default=None,
                   help="sequential: save each editor's stream state under DIR/<editor> every --save_every edits, "
                        "and continue an interrupted stream from there")
    p.add_argument("--save_every", type=int, default=100, help="sequential: edits between saved stream states")
    p.add_argument("--n_test_probe", type=int, default=1000,
                   help="sequential: held-out locality inputs for TestR and drift (the whole pool when smaller)")
    p.add_argument("--n_train_probe", type=int, default=100, help="sequential: held-in training inputs for TrainR")
    p.add_argument("--until_right_scales", type=float, nargs="+",
                   help="mend_until_right: scales of MEND's step tried in increasing order; the first that makes "
                        "the edit input right is kept (FT's stopping rule). Default: the config's "
                        "model.init_args.until_right_scales (the grid validation selected the editor under), "
                        f"else {' '.join(f'{s:g}' for s in DEFAULT_SCALES)}")
    p.add_argument("--ft_lr", type=float, default=1e-3, help="ft, ft_kl: learning rate")
    p.add_argument("--ft_steps", type=int, default=25, help="ft, ft_kl: most optimiser steps per edit (stops once right)")
    p.add_argument("--ft_optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--ft_kl_weight", type=float, default=1.0, help="ft_kl: weight of KL(original || edited)")
    p.add_argument("--ft_kl_inputs", type=int, default=4, help="ft_kl: locality inputs sampled per edit step")
    p.add_argument("--surgery_n_params", type=int, nargs="+", default=[1000],
                   help="surgery_*: scalar weights an edit may change (global budget over the edited matrices); "
                        "several budgets evaluate each method at each, and the report plots the sweep")
    p.add_argument("--selector_ckpt_path", type=str | None, default=None,
                   help="selector: a meta-trained selector (train.py --config configs/selector_*.yaml writes "
                        "RUN_DIR/editor.safetensors)")
    p.add_argument("--selector_until_right_steps", type=int | None, default=None,
                   help="selector: masked steps on its own mask until the edit input is right (default: the file's)")
    p.add_argument("--patcher_layer", type=str | None, default=None, help="patcher: FFN (module name) to patch; default the last block's")
    p.add_argument("--patcher_memory", type=int, default=40000,
                   help="patcher: most training-split inputs (training edits beyond the TrainR probe, their "
                        "rephrases, the meta-training locality share) whose queries every patch must stay silent on")
    p.add_argument("--patcher_options", type=dict | None, default=None,
                   help="patcher: other settings of editors.patcher.Patcher, e.g. '{memory_margin: -5, top_k: 64}'")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int | str, default=1, help="single mode runs through Lightning: >1 evaluates data-parallel")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--chunk", type=int, default=64, help="rows per forward pass when scoring")
    p.add_argument("--no_progress", action="store_true")
    ns = p.parse_args(argv)
    for name in ("edits_per_step", "n_edits", "folds", "loc_per_edit", "n_test_probe", "chunk", "save_every"):
        val = ns[name]
        if isinstance(val, str) and val != "all":
            p.error(f"--{name} must be a count or 'all', got {val!r}")
        if isinstance(val, int) and val < 1:
            p.error(f"--{name} must be at least 1")
    if any(s <= 0 for s in ns.until_right_scales or []):
        p.error("--until_right_scales must all be positive")
    cfg = {k: v for k, v in ns.as_dict().items() if k in ("seed_everything", "model", "data")}
    args = Namespace(**{k: v for k, v in ns.as_dict().items()
                        if k not in ("model", "data", "trainer", "seed_everything", "__path__", *TRAIN_ONLY)})
    args.config = ", ".join(str(c) for c in ns.config or []) or None
    if args.run_dir and not args.report:
        args.report = str(Path(args.run_dir) / ("report.json" if args.split == "test" else "report_val.json"))
    return args, cfg


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_data_files(cls: type, init_args: dict) -> None:
    """Refuse missing data files and files of another task than the DataModule reads."""
    if not init_args.get("test_path"):
        raise EvalError("the config has no data.init_args.test_path: the test split holds the held-out edits")

    task = getattr(cls, "task", None)
    for key in ("train_path", "val_path", "test_path", "loc_path"):
        path = init_args.get(key)
        if not path:
            continue
        if not Path(path).exists():
            raise EvalError(f"data file {path} (data.init_args.{key}) does not exist")
        if task in ("zsre", "fever") and Path(path).suffix == ".jsonl":
            try:
                found = detect_task(path)
            except DataFormatError as e:
                raise EvalError(str(e)) from None
            if found != task:
                raise EvalError(f"data file {path} (data.init_args.{key}) holds {found} data, but the config's "
                                f"{cls.__name__} reads {task} files")


def build_data(cfg: dict, args: Namespace, family: str) -> EditDataModule:
    cls = _import(cfg["data"]["class_path"])
    init = dict(cfg["data"].get("init_args") or {})
    check_data_files(cls, init)
    if init.get("family", family) != family:
        raise EvalError(f"data.init_args.family is {init['family']!r} but the base model's family is {family!r}")
    # the loader batches edits only for throughput: the evaluation module still edits them one by one
    every = args.loc_per_edit == "all"
    # (8 per batch, one problem each: a batch keeps whole problems only, so a larger problem count per
    # batch would drop a ragged tail of edits)
    init.update(family=family, n_edits=8, batch_size=1, loc_per_edit=1 if every else args.loc_per_edit, shuffle=False, seed=args.seed)
    dm = cls(**init)
    dm.eval_split = args.split
    try:
        dm.setup("test")
    except DataFormatError as e:
        raise EvalError(str(e)) from None
    if args.split not in dm.splits:
        raise EvalError(f"the config has no {args.split} split (data.init_args.{args.split}_path or val_from_train)")
    held_out = len(dm.loc_pools[args.split])
    if every:
        dm.hparams.loc_per_edit = held_out
    elif args.loc_per_edit > held_out:  # more would score some inputs twice for the same edit
        raise EvalError(f"--loc_per_edit {args.loc_per_edit} is more than the {held_out} held-out locality inputs; "
                        f"use --loc_per_edit all to score every one")
    return dm


def load_base(cfg: dict) -> tuple[torch.nn.Module, str, str]:
    init = cfg["model"].get("init_args") or {}
    path, family = init.get("base_model"), init.get("family", "causal")
    if not path:
        raise EvalError("the config has no model.init_args.base_model")
    try:
        model = load_model(path, family, init.get("base_dtype"))  # as meta-training loaded it
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot load base model {path!r} (train it first, e.g. `python train.py --config "
                        f"configs/base_zsre_gpt2_tiny.yaml`): {e}") from None
    return model.eval().requires_grad_(False), path, family


def build_editors(names: list[str], model: torch.nn.Module, cfg: dict, args: Namespace,
                  dm: EditDataModule) -> list[tuple[str, Editor]]:
    """(label, editor) pairs: one per name, and one per budget for each surgery method (``name@n``)."""
    out = []
    for name in names:
        budgets = args.surgery_n_params if name in SURGERY else [None]
        for n in budgets:
            label = f"{name}@{n}" if n is not None and len(budgets) > 1 else name
            out.append((label, build_editor(name, model, cfg, args, dm, n_params=n)))
    return out


def build_editor(name: str, model: torch.nn.Module, cfg: dict, args: Namespace,
                 dm: EditDataModule | None = None, n_params: int | None = None) -> Editor:
    if name == "mend_until_right":
        return UntilRight(build_editor("mend", model, cfg, args), args.until_right_scales)
    if name == "patcher":  # negatives: training inputs beyond the TrainR probe, never an evaluated input
        memory = None
        if dm is not None and "train" in dm.splits:
            data = EditData(dm, args.split, "cpu", args.seed, args.n_train_probe)
            pool = data.memory_pool()
            memory = data.collate(random.Random(args.seed).sample(pool, min(args.patcher_memory, len(pool))))
        try:
            return Patcher(model, args.patcher_layer, memory, **(args.patcher_options or {}))
        except (TypeError, ValueError) as e:
            raise EvalError(f"--patcher_options: {e}") from None
    if name == "mend":
        if not args.ckpt_path:
            raise EvalError("mend and mend_until_right need --ckpt_path (a trained editor); ft and ft_kl need none")
        if not Path(args.ckpt_path).exists():
            raise EvalError(f"editor checkpoint {args.ckpt_path} does not exist (train one with "
                            f"`python train.py --config {args.config}`)")
        try:
            return MEND.load(args.ckpt_path, model)
        except ValueError as e:
            raise EvalError(str(e)) from None
    # the baselines tune the matrices MEND edits under this config
    layers = select_layers(model, (cfg["model"].get("init_args") or {}).get("edit_params"))
    if name == "selector":
        if not args.selector_ckpt_path or not Path(args.selector_ckpt_path).exists():
            raise EvalError("selector needs --selector_ckpt_path, an existing meta-trained selector file")
        try:
            sel = Selector.load(args.selector_ckpt_path, model)
        except ValueError as e:
            raise EvalError(str(e)) from None
        if args.selector_until_right_steps is not None:
            sel.until_right_steps = args.selector_until_right_steps
            sel.config = {**sel.config, "until_right_steps": sel.until_right_steps}
        return sel
    if name in SURGERY:
        try:
            return Surgery(layers, n_params=n_params or args.surgery_n_params[0], method=name.removeprefix("surgery_"),
                           seed=args.seed)
        except ValueError as e:
            raise EvalError(str(e)) from None
    return FineTune(layers, lr=args.ft_lr, max_steps=args.ft_steps, optimizer=args.ft_optimizer,
                    c_loc=args.ft_kl_weight if name == "ft_kl" else 0.0, name=name)


def batch_sizes(requested: int | None, n: int) -> dict[int, list[int]]:
    """K used -> the Ks requested that it stands for: each K is capped at the ``n`` edits available."""
    out: dict[int, list[int]] = {}
    for k in ([requested] if requested else BATCH_SIZES):
        out.setdefault(min(k, n), []).append(k)
    return out


def _weights_hash(model: torch.nn.Module, editor: Editor) -> str:
    return fingerprint(model, editor.layers)["edited_weights_sha256"]


def run_single(editor: Editor, model: torch.nn.Module, dm: EditDataModule, family: str,
               args: Namespace) -> tuple[dict[str, Any], bool]:
    """Single mode through Lightning (data-parallel with --devices N); returns (results, is_global_zero)."""
    module = EditEvalModule(model, editor, family, args.chunk, args.ft_kl_inputs, args.seed, args.n_train_probe)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, inference_mode=False,
                        enable_progress_bar=not args.no_progress)
    trainer.test(module, datamodule=dm, verbose=False)
    return module.results, trainer.is_global_zero


def evaluate_editor(editor: Editor, model: torch.nn.Module, dm: EditDataModule, family: str,
                    modes: list[str], args: Namespace, device: torch.device,
                    label: str | None = None) -> list[dict[str, Any]] | None:
    """One result dict per (mode, K) for one editor; None on non-zero data-parallel processes."""
    ids = list(range(len(dm.splits[args.split].records)))
    progress = not args.no_progress
    results: list[dict[str, Any]] = []
    single: dict[str, Any] | None = None
    for mode in modes:
        if mode != "single":  # Lightning's teardown may have moved the models back to the CPU
            model.to(device)
            if isinstance(editor, torch.nn.Module):
                editor.to(device)
        reset_peak_memory(device)
        data = EditData(dm, args.split, device, args.seed, args.n_train_probe)
        sampler = (LocalitySampler(data.kl_pool(), args.ft_kl_inputs, args.seed, data)
                   if getattr(editor, "uses_locality", False) else None)
        runs: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        if mode == "single":
            single, is_zero = run_single(editor, model, dm, family, args)
            if not is_zero:
                return None
            runs.append(single)
        elif mode == "batch":
            for k, requested in batch_sizes(args.edits_per_step, len(ids)).items():
                if k == 1 and single is not None:  # the same protocol: do not spend the time twice
                    res = {**single, "note": "K=1 is the single protocol: figures of the single-mode run"}
                else:
                    t0 = time.perf_counter()
                    res = run_batch(editor, model, data, ids, k, sampler=sampler, chunk=args.chunk, progress=progress)
                    res["wall_seconds"] = time.perf_counter() - t0
                capped = [r for r in requested if r != k]
                if capped:
                    cap = f"K={', '.join(map(str, capped))} capped to the {len(ids)} edits available"
                    res.update(requested_edits_per_step=capped, note="; ".join(filter(None, [res.get("note"), cap])))
                runs.append(res)
        else:
            runs.append(run_sequential(editor, model, data, ids, edits_per_step=args.edits_per_step or 1,
                                       folds=args.folds, only_when_wrong=args.edit_only_when_wrong,
                                       n_test_probe=args.n_test_probe, sampler=sampler, chunk=args.chunk,
                                       progress=progress, save_every=args.save_every,
                                       state_dir=Path(args.stream_state) / (label or editor.name) if args.stream_state else None))
        if mode != "batch":
            runs[-1]["wall_seconds"] = time.perf_counter() - t0
        results += [{"mode": mode, **r, **peak_memory(device)} for r in runs]
    return results


def main(argv: list[str] | None = None) -> dict | None:
    """Run the evaluation; return the report (None on non-zero data-parallel ranks)."""
    args, cfg = parse_args(argv)
    for out in (Path(args.report).parent if args.report else None, args.stream_state):
        if out:  # a read-only or full disk stops the job now, not after the evaluation
            check_writable(out)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no device/tip banners
    if args.seed is None:
        args.seed = int(cfg.get("seed_everything") or 0)
    if args.until_right_scales is None:
        args.until_right_scales = (cfg.get("model", {}).get("init_args") or {}).get("until_right_scales") or list(DEFAULT_SCALES)
    L.seed_everything(args.seed, verbose=False)
    model, base_path, family = load_base(cfg)
    dm = build_data(cfg, args, family)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    names = args.editor or ((["mend", "mend_until_right"] if args.ckpt_path else []) + ["ft", "ft_kl"] if args.mode == "all"
                            else ["mend" if args.ckpt_path else "ft"])
    editors = build_editors(names, model, cfg, args, dm)
    n_train = len(dm.splits["train"].records) if "train" in dm.splits else 0
    if "ft_kl" in names and n_train <= args.n_train_probe:
        raise EvalError("ft_kl samples its locality inputs from the training split beyond the first --n_train_probe "
                        "records (kept for TrainR): set data.init_args.train_path or lower --n_train_probe")

    # the held-out edits: a seeded sample, in a seeded order (the order of the sequential stream)
    split = dm.splits[args.split]
    available = len(split.records)
    order = list(range(available))
    random.Random(args.seed).shuffle(order)
    order = order[: args.n_edits] if args.n_edits else order
    dm.splits[args.split] = subset_split(split, order)
    device = torch.device("cuda" if args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")
    run_info = {"base_model": base_path, "family": family, "dataset": getattr(dm, "task", type(dm).__name__),
                "data_file": dm.hparams.test_path if args.split == "test" else (dm.hparams.val_path or dm.hparams.train_path),
                "split": args.split, "seed": args.seed, "n_edits_available": available}

    entries: list[dict[str, Any]] = []
    for label, editor in editors:
        name = editor.name
        before = _weights_hash(model, editor)
        results = evaluate_editor(editor, model, dm, family, modes, args, device, label)
        if results is None:
            return None  # a non-zero data-parallel process: only single mode is shared
        if _weights_hash(model, editor) != before:
            raise RuntimeError(f"evaluating {name} modified the base model: evaluation bug, results discarded")
        for res in results:
            e = {"editor": name, "label": label, "editor_config": getattr(editor, "config", {}), **run_info, **res,
                 "base_model_unchanged": True}
            entries.append(e)
            dd = e["drawdown"] if e["drawdown"] is not None else float("nan")
            print(f"[hypedit-eval] {label} {e['mode']} K={e['edits_per_step']}: edit_success {e['edit_success']:.3f} "
                  f"generality {e['generality']:.3f} drawdown {dd:+.3f} ({e['n_edits']} edits)", flush=True)

    report = {"command": " ".join(["python eval.py"] + (argv if argv is not None else sys.argv[1:])),
              "config_path": args.config, "config": cfg, "eval_args": args.as_dict(), **run_info,
              "definitions": DEFINITIONS, "entries": entries}
    print("\n" + table(entries))
    if args.report:
        written = write_report(report, args.report)
        print(f"\n[hypedit-eval] report: {written['json']} (summary {written['markdown']}, "
              f"TensorBoard {written['tensorboard']})")
    return report


if __name__ == "__main__":
    try:
        main()
    except (EvalError, *INPUT_ERRORS) as e:  # a file or setting refused: one line, no traceback
        sys.exit(f"eval.py: error: {e}")
