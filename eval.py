"""Evaluate model editors on held-out edits: single, batch and sequential protocols, MEND beside the
fine-tuning baselines, and a report (JSON, Markdown, PNG plots, TensorBoard).

    python eval.py --config configs/mend_zsre_gpt2_tiny.yaml --editor_path runs/default/editor.safetensors --mode single
    python eval.py --config ... --editor_path ... --mode batch               # K = 1, 5, 25, 125 (capped)
    python eval.py --config ... --editor_path ... --mode sequential --folds 2 --edit_only_when_wrong
    python eval.py --config ... --editor ft_kl --mode single                  # baselines need no editor file
    python eval.py --config ... --editor_path ... --editor mend mend_until_right  # MEND under FT's stopping rule
    python eval.py --config ... --editor surgery_dynamic@100 surgery_dynamic@1000  # surgery at two budgets
    python eval.py --config ... --editors+ '{class_path: ft, init_args: {lr: 1e-2, max_steps: 10}}'
    python eval.py --config ... --editors+ '{class_path: mypkg.MyEditor, init_args: {alpha: 2}}'  # your own Editor
    python eval.py --config ... --editor patcher --mode sequential --edit_only_when_wrong  # Transformer-Patcher
    python eval.py --config ... --editor patcher --mode sequential --save_model out  # out/patcher: a plain HF model
    python eval.py --config ... --editor_path ... --mode all --run_dir runs/default  # writes report.json there
    python eval.py --config ... --data.init_args.test_path other.jsonl --print_config  # dotted overrides
    python eval.py --config ... --editor_path ... --mode single --devices 2 --strategy ddp --accelerator cpu

The config is a meta-training YAML (configs/mend_*.yaml): its ``data`` section names the DataModule
(its test split holds the held-out edits), ``model.init_args`` the base model and family, and
``trainer``'s accelerator, devices, strategy and precision are used (the rest of it is training-only).
Editors are specs ``{class_path, init_args, label}`` (``--editors``, a YAML list): any
:class:`editors.base.Editor` subclass, built by its ``for_evaluation``; ``--editor NAME`` and a
``class_path`` of a name in :data:`EDITOR_ALIASES` expand to the built-in ones.
Definitions of every metric: :data:`lightning_modules.evaluation.DEFINITIONS` (also in each report).
"""
from __future__ import annotations

import contextlib
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

from datamodules.atomic import atomic_dir, check_writable
from datamodules.edit_data import EditDataModule
from datamodules.formats import DataFormatError, detect_task
from editors.base import Editor, EditorContext, build_editor, editor_class
from editors.io import check_pool_overlap
from editors.layers import fingerprint
from editors.surgery import METHODS as SURGERY_METHODS
from editors.widen import plain_model
from lightning_modules.evaluation import (DEFINITIONS, EditData, EditEvalModule, LocalitySampler, peak_memory,
                                          reset_peak_memory, run_batch, run_sequential, subset_split)
from lightning_modules.cli import INPUT_ERRORS
from lightning_modules.models import load_model
from lightning_modules.report import table, write_report

MODES = ("single", "batch", "sequential")
EDITOR_FILE = "--editor_path"  # an init arg of this value is the file given as --editor_path
# the short editor names (`--editor NAME`, or `class_path: NAME` in --editors): a class path and init args;
# a new built-in editor is one line here. `NAME@N` sets init_args.n_params to N (a budget).
EDITOR_ALIASES: dict[str, dict[str, Any]] = {
    "mend": {"class_path": "editors.mend.MEND", "init_args": {"path": EDITOR_FILE}},
    "mend_until_right": {"class_path": "editors.until_right.UntilRight",
                         "init_args": {"editor": {"class_path": "mend"}}},
    "mend_polyak": {"class_path": "editors.until_right.PolyakStep", "init_args": {"editor": {"class_path": "mend"}}},
    "ft": {"class_path": "editors.ft.FineTune"},
    "ft_kl": {"class_path": "editors.ft.FineTune", "init_args": {"c_loc": 1.0}},
    **{f"surgery_{m}": {"class_path": "editors.surgery.Surgery", "init_args": {"method": m}} for m in SURGERY_METHODS},
    "selector": {"class_path": "editors.selector.Selector", "init_args": {"path": EDITOR_FILE}},
    # the selector before meta-training (about the "largest |gradient|" rule): what meta-training buys
    "selector_untrained": {"class_path": "editors.selector.Selector", "init_args": {"path": None}},
    "malmen": {"class_path": "editors.malmen.MALMEN", "init_args": {"path": EDITOR_FILE}},
    "rledit": {"class_path": "editors.rledit.RLEdit", "init_args": {"path": EDITOR_FILE}},
    "rledit_polyak": {"class_path": "editors.until_right.PolyakStep", "init_args": {"editor": {"class_path": "rledit"}}},
    # MALMEN for streams: each change keeps the earlier edits' keys (memory_weight), Polyak steps until right
    "malmen_stream": {"class_path": "editors.until_right.PolyakStep",
                      "init_args": {"max_steps": 5, "name": "malmen_stream",
                                    "editor": {"class_path": "malmen", "init_args": {"memory_weight": 10.0}}}},
    "patcher": {"class_path": "editors.patcher.Patcher"},
}
# --mode all without --editor (the MEND ones only with --editor_path)
ALL_MODE_EDITORS = ("mend", "mend_until_right", "ft", "ft_kl")
BATCH_SIZES = (1, 5, 25, 125)  # the published MEND batch-editing table
TRAIN_ONLY = ("world_dir", "world", "optimizer", "lr_scheduler")  # train.py config keys that eval.py ignores
TRAINER_USED = ("accelerator", "devices", "strategy", "precision")  # of the config's trainer section
MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # precisions evaluation runs under autocast


class EvalError(Exception):
    """An input evaluation refuses (missing or mismatched file); the CLI prints it without a traceback."""


def parse_args(argv: list[str] | None = None) -> tuple[Namespace, dict]:
    """Parse the command line into (evaluation options, the config's sections as plain data).

    The same jsonargparse machinery as train.py: ``--config`` takes a meta-training YAML, any of
    its keys can be overridden with dotted names (``--data.init_args.test_path X``) and
    ``--print_config`` prints the resolved whole."""
    p = ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0], print_config=None)
    p.add_argument("--config", action=ActionConfigFile, help="meta-training YAML: its data and model sections are used")
    p.add_argument("--print_config", action="store_true",
                   help="print the configuration as evaluation uses it (editors expanded, the data settings it "
                        "sets, the trainer settings it takes) and exit")
    p.add_argument("--seed_everything", type=int | bool | None, default=None, help="from the config: the default --seed")
    p.add_subclass_arguments(L.LightningModule, "model", required=True,
                             help="the config's model: base_model, family, edit_params, until_right_scales")
    p.add_subclass_arguments(EditDataModule, "data", required=True,
                             help="the config's data: its test split holds the held-out edits")
    p.add_argument("--trainer", type=dict | None, default=None,
                   help="the config's trainer section: its accelerator, devices, strategy and precision are the "
                        "defaults of those options; the rest of it is training-only")
    for key in TRAIN_ONLY:  # keys of a config that train.py saved or printed
        p.add_argument(f"--{key}", type=str | dict | None, default=None, help="from a train.py config (unused here)")
    p.add_argument("--run_dir", type=str | None, default=None,
                   help="this job's output directory: DIR/report.json (report_val.json for --split val), with .md, "
                        "plots and TensorBoard beside it")
    p.add_argument("--editor_path", type=str | None, default=None,
                   help="trained editor file (train.py's RUN_DIR/editor.safetensors) of the short names mend, "
                        "mend_until_right, selector, malmen and rledit; the other editors need none")
    p.add_argument("--ckpt_path", type=str | None, default=None,
                   help="deprecated here: --editor_path (train.py's --ckpt_path resumes a training checkpoint; "
                        "the key in a train.py config is ignored)")
    p.add_argument("--mode", choices=MODES + ("all",), default="single",
                   help="protocol; 'all': single, batch and sequential")
    p.add_argument("--editor", nargs="+", type=str,
                   help=f"short editor names ({', '.join(EDITOR_ALIASES)}); NAME@N sets the budget n_params=N "
                        f"(surgery). Default: mend with --editor_path, else ft; --mode all: "
                        f"{', '.join(ALL_MODE_EDITORS)} (the MEND ones with --editor_path)")
    p.add_argument("--editors", type=list[dict] | None, default=None,
                   help="editors as specs {class_path: module.Class or a short name, init_args: {...}, label: ...} "
                        "(a YAML list, or one at a time with --editors+ SPEC): any editors.base.Editor subclass, "
                        "built by its for_evaluation(context, **init_args); evaluated after the --editor ones")
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
    p.add_argument("--save_model", type=str | None, default=None,
                   help="sequential: write each editor's final working model to DIR/<editor> (DIR/<editor>/stream-F "
                        "with --folds) as a plain Hugging Face model with the tokenizer, which from_pretrained loads "
                        "without hypedit (the patcher's patches widened into its FFN)")
    p.add_argument("--n_test_probe", type=int, default=1000,
                   help="sequential: held-out locality inputs for TestR and drift (the whole pool when smaller)")
    p.add_argument("--n_train_probe", type=int, default=100, help="sequential: held-in training inputs for TrainR")
    p.add_argument("--accelerator", type=str | None, default=None, help="default: trainer.accelerator, else auto")
    p.add_argument("--devices", type=int | str | None, default=None,
                   help="default: trainer.devices, else 1. Single mode runs through Lightning: >1 is data-parallel")
    p.add_argument("--strategy", type=str | None, default=None, help="default: trainer.strategy, else auto")
    p.add_argument("--precision", type=str | None, default=None,
                   help=f"default: trainer.precision, else full: {' or '.join(MIXED)} evaluates under autocast; "
                        "other dtypes come from model.init_args.base_dtype")
    p.add_argument("--chunk", type=int, default=64, help="rows per forward pass when scoring")
    p.add_argument("--base_cache_mb", type=int, default=1024,
                   help="memory (where the model is) for the unedited model's log-probabilities on the locality "
                        "inputs, computed once and reused by every edit; inputs past it are re-run for their KL")
    p.add_argument("--no_progress", action="store_true")
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    ns = p.parse_args(argv)
    for name in ("edits_per_step", "n_edits", "folds", "loc_per_edit", "n_test_probe", "chunk", "save_every"):
        val = ns[name]
        if isinstance(val, str) and val != "all":
            p.error(f"--{name} must be a count or 'all', got {val!r}")
        if isinstance(val, int) and val < 1:
            p.error(f"--{name} must be at least 1")
    if ns.base_cache_mb < 0:
        p.error("--base_cache_mb must be 0 (no cache: the unedited model re-run for every edit) or more")
    if ns.save_model and ns.mode not in ("sequential", "all"):
        p.error("--save_model writes the working model of a stream: it needs --mode sequential or all")
    resolve(ns, argv)
    if ns.print_config:
        del ns["print_config"]
        every = "" if ns.loc_per_edit != "all" else (
            "# data.init_args.loc_per_edit: --loc_per_edit all scores every held-out locality input per edit\n")
        print(every + p.dump(ns, skip_unset=False))  # nulls too, as jsonargparse's own --print_config
        sys.exit(0)
    cfg = {k: v for k, v in ns.as_dict().items() if k in ("seed_everything", "model", "data")}
    args = Namespace(**{k: v for k, v in ns.as_dict().items()
                        if k not in ("model", "data", "trainer", "seed_everything", "__path__", "ckpt_path",
                                     "print_config", *TRAIN_ONLY)})
    args.config = ", ".join(str(c) for c in ns.config or []) or None
    if args.run_dir and not args.report:
        args.report = str(Path(args.run_dir) / ("report.json" if args.split == "test" else "report_val.json"))
    return args, cfg


def expand_spec(spec: str | dict, editor_path: str | None) -> dict:
    """An editor spec with its short names expanded: an :data:`EDITOR_ALIASES` name (``NAME@N``: budget N)
    as ``class_path``, nested specs in ``init_args``, and the ``--editor_path`` file."""
    spec = {"class_path": spec} if isinstance(spec, str) else dict(spec)
    if not isinstance(spec.get("class_path"), str):
        raise EvalError(f"editor spec {spec}: needs a class_path (module.Class or one of {', '.join(EDITOR_ALIASES)})")
    given = spec["class_path"]
    name, at, budget = given.partition("@")
    init = dict(spec.get("init_args") or {})
    if at:
        if not budget.isdigit():
            raise EvalError(f"editor {given!r}: the budget after @ must be a count")
        init.setdefault("n_params", int(budget))
        spec.setdefault("label", given)
    if name in EDITOR_ALIASES:
        alias = EDITOR_ALIASES[name]
        init, name = {**alias.get("init_args", {}), **init}, alias["class_path"]
    elif "." not in name:
        raise EvalError(f"unknown editor {given!r}: one of {', '.join(EDITOR_ALIASES)}, or a class path module.Class")
    try:  # a class that is no editor stops the job before the model and data are loaded
        editor_class(name)
    except ValueError as e:
        raise EvalError(str(e)) from None
    for key, value in init.items():
        if isinstance(value, dict) and "class_path" in value:
            init[key] = expand_spec(value, editor_path)
        elif value == EDITOR_FILE:
            if not editor_path:
                raise EvalError(f"{given} needs --editor_path, a trained editor file (ft, ft_kl, surgery_* and "
                                f"patcher need none)")
            init[key] = editor_path
    return {**spec, "class_path": name, "init_args": init}


def resolve(ns: Namespace, argv: list[str]) -> None:
    """Settle, in ``ns``, what evaluation uses (what ``--print_config`` shows): the seed, the editor file,
    the editors as expanded specs, the trainer settings, and the data settings evaluation sets itself."""
    if any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv):  # the key in a train.py config: ignored
        if ns.editor_path:
            raise EvalError("give the editor file once, as --editor_path (--ckpt_path is its deprecated name)")
        ns.editor_path = ns.ckpt_path
        print("eval.py: warning: --ckpt_path is deprecated here (in train.py it resumes a training checkpoint): "
              "use --editor_path", file=sys.stderr)
    ns.ckpt_path = None
    if ns.seed is None:
        ns.seed = int(ns.seed_everything or 0)
    trainer = ns.trainer or {}
    for key, default in (("accelerator", "auto"), ("devices", 1), ("strategy", "auto"), ("precision", None)):
        if ns[key] is None:
            ns[key] = default if trainer.get(key) is None else trainer[key]
    if isinstance(ns.strategy, dict):  # a training strategy class (the sharded base): evaluation holds the whole base
        ns.strategy = "auto"
    if ns.precision is not None and str(ns.precision) not in ("32", "32-true", *MIXED):
        raise EvalError(f"precision {ns.precision} (--precision or trainer.precision): evaluation runs full precision "
                        f"or {' / '.join(MIXED)}; the base model's dtype is model.init_args.base_dtype")
    ns.precision = None if ns.precision is None else str(ns.precision)
    specs = [*(ns.editor or []), *(ns.editors or [])]
    if not specs:
        specs = ([n for n in ALL_MODE_EDITORS if ns.editor_path or not n.startswith("mend")] if ns.mode == "all"
                 else ["mend" if ns.editor_path else "ft"])
    ns.editor, ns.editors = None, [expand_spec(s, ns.editor_path) for s in specs]
    every = ns.loc_per_edit == "all"
    # the loader batches edits only for throughput (the evaluation module still edits them one by one):
    # 8 per batch, one problem each (a batch keeps whole problems only, so a larger problem count per
    # batch would drop a ragged tail of edits); --loc_per_edit all: one row, then the whole pool
    for key, value in dict(n_edits=8, batch_size=1, loc_per_edit=1 if every else ns.loc_per_edit, shuffle=False,
                           seed=ns.seed).items():
        ns.data.init_args[key] = value


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
    init["family"] = family  # the loader's settings are resolve()'s, already in the config
    every = args.loc_per_edit == "all"
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


def build_editors(specs: list[dict], model: torch.nn.Module, cfg: dict, args: Namespace,
                  dm: EditDataModule) -> list[tuple[str, Editor]]:
    """(label, editor) per spec: its ``label``, else the editor's name; names evaluated twice are told
    apart by budget (``name@n``) where they have one, else they need distinct labels."""
    init = cfg["model"].get("init_args") or {}

    def training_inputs(n: int) -> dict:  # the patcher's negatives: beyond the TrainR probe, never an evaluated input
        data = EditData(dm, args.split, "cpu", args.seed, args.n_train_probe)
        pool = data.memory_pool()
        return data.collate(random.Random(args.seed).sample(pool, min(n, len(pool))))

    context = EditorContext(model, init.get("edit_params"), args.seed, init.get("until_right_scales"),
                            training_inputs if "train" in dm.splits else None)
    built = []
    for spec in specs:
        try:
            built.append((spec, build_editor(spec, context)))
        except (ValueError, OSError) as e:
            raise EvalError(f"{spec['label']}: {e}" if spec.get("label") else str(e)) from None
    names = [e.name for s, e in built if not s.get("label")]
    out = []
    for spec, editor in built:
        n = editor.config.get("n_params") if isinstance(editor.config, dict) else None
        label = spec.get("label") or (f"{editor.name}@{n}" if names.count(editor.name) > 1 and n else editor.name)
        if label in [l for l, _ in out]:
            raise EvalError(f"two editors are labelled {label!r}: give each its own label in --editors "
                            f"({{class_path: ..., init_args: ..., label: NAME}})")
        out.append((label, editor))
    return out


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
    module = EditEvalModule(model, editor, family, args.chunk, editor.n_loc_inputs, args.seed, args.n_train_probe,
                            base_cache_bytes=args.base_cache_mb * 2 ** 20)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, logger=False,
                        precision=args.precision or "32-true",
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
    base = None  # the unedited model's locality outputs, computed once for every K and the stream
    for mode in modes:
        if mode != "single":  # Lightning's teardown may have moved the models back to the CPU
            model.to(device)
            if isinstance(editor, torch.nn.Module):
                editor.to(device)
        reset_peak_memory(device)
        data = EditData(dm, args.split, device, args.seed, args.n_train_probe)
        sampler = (LocalitySampler(data.kl_pool(), editor.n_loc_inputs, args.seed, data)
                   if getattr(editor, "uses_locality", False) else None)
        if mode != "single" and base is None:
            base = data.base_locality(model, args.chunk, args.base_cache_mb * 2 ** 20)
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
                    res = run_batch(editor, model, data, ids, k, sampler=sampler, chunk=args.chunk, progress=progress,
                                    base=base)
                    res["wall_seconds"] = time.perf_counter() - t0
                capped = [r for r in requested if r != k]
                if capped:
                    cap = f"K={', '.join(map(str, capped))} capped to the {len(ids)} edits available"
                    res.update(requested_edits_per_step=capped, note="; ".join(filter(None, [res.get("note"), cap])))
                runs.append(res)
        else:
            saved: list[str | None] = []

            def save(work: torch.nn.Module, fold: int) -> None:
                out = Path(args.save_model) / (label or editor.name)
                saved.append(save_plain_model(out / f"stream-{fold}" if args.folds > 1 else out, work, model,
                                              dm.tokenizer))

            runs.append(run_sequential(editor, model, data, ids, edits_per_step=args.edits_per_step or 1,
                                       folds=args.folds, only_when_wrong=args.edit_only_when_wrong,
                                       n_test_probe=args.n_test_probe, sampler=sampler, chunk=args.chunk,
                                       progress=progress, save_every=args.save_every, base=base,
                                       state_dir=Path(args.stream_state) / (label or editor.name) if args.stream_state else None,
                                       save_model=save if args.save_model else None))
            if args.save_model:
                runs[-1]["saved_models"] = saved
        if mode != "batch":
            runs[-1]["wall_seconds"] = time.perf_counter() - t0
        results += [{"mode": mode, **r, **peak_memory(device)} for r in runs]
    return results


def save_plain_model(path: Path, work: torch.nn.Module, original: torch.nn.Module, tokenizer: Any) -> str | None:
    """Write a stream's final working model to directory ``path`` as a plain Hugging Face model (the
    patcher's widened: :func:`editors.widen.plain_model`) with the tokenizer; the directory appears
    complete or not at all. Returns ``path``, or None after a one-line warning when the model cannot
    be written: the evaluation and its report go on."""
    try:
        plain = plain_model(work, original)
        with atomic_dir(path) as tmp:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (NotImplementedError, ValueError, OSError) as e:
        print(f"eval.py: warning: --save_model: {path} not written: {e}", file=sys.stderr)
        return None
    print(f"[hypedit-eval] working model: {path}", flush=True)
    return str(path)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the evaluation; return the report (None on non-zero data-parallel ranks)."""
    args, cfg = parse_args(argv)
    for out in (Path(args.report).parent if args.report else None, args.stream_state, args.save_model):
        if out:  # a read-only or full disk stops the job now, not after the evaluation
            check_writable(out)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # no device/tip banners
    L.seed_everything(args.seed, verbose=False)
    model, base_path, family = load_base(cfg)
    dm = build_data(cfg, args, family)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    editors = build_editors(args.editors, model, cfg, args, dm)
    check_pool_overlap([e for _, e in editors], args.split, dm.loc_ids(args.split))
    taken = [str(Path(args.save_model) / l) for l, _ in editors
             if args.save_model and (Path(args.save_model) / l).exists()]
    if taken:  # found now, not after the stream: a directory is never replaced
        raise EvalError(f"--save_model: {', '.join(taken)} exists already; remove it or give another directory")
    n_train = len(dm.splits["train"].records) if "train" in dm.splits else 0
    for label, editor in editors:
        if editor.uses_locality and n_train <= args.n_train_probe:
            raise EvalError(f"{label} samples its locality inputs from the training split beyond the first "
                            f"--n_train_probe records (kept for TrainR): set data.init_args.train_path or lower "
                            f"--n_train_probe")

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
                "split": args.split, "seed": args.seed, "n_edits_available": available,
                "data_fingerprint": dm.data_fingerprint(), "grouping": dm.grouping, "rows_dropped": dm.rows_dropped}

    entries: list[dict[str, Any]] = []
    for label, editor in editors:
        name = editor.name
        before = _weights_hash(model, editor)
        # single mode's Trainer autocasts itself; batch and sequential need it here
        amp = torch.autocast(device.type, MIXED[args.precision]) if args.precision in MIXED else contextlib.nullcontext()
        with amp:
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
