"""The LightningCLI behind train.py: YAML configs, a synthetic-world section, resume, export."""
from __future__ import annotations

from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from datamodules.atomic import check_writable
from datamodules.encoding import TargetTooLong, build_word_tokenizer
from datamodules.formats import DataFormatError
from datamodules.world import WORLD_FORMAT, WorldConfig, generate_world, world_texts
from editors.io import EditorFileError

# what a job raises on a file or setting it cannot use: train.py and eval.py print it as one line;
# any other error is a bug and keeps its traceback
INPUT_ERRORS = (OSError, DataFormatError, TargetTooLong, EditorFileError, MisconfigurationException)


def ensure_world(world_dir: str | Path, cfg: WorldConfig) -> Path:
    """Generate the synthetic world and its word-level tokenizer unless they already exist."""
    world_dir = generate_world(world_dir, cfg)
    if not (world_dir / "tokenizer" / "tokenizer.json").exists():
        build_word_tokenizer(world_texts(world_dir), world_dir / "tokenizer")
    return world_dir


def place_outputs(cfg) -> None:
    """One directory per job: ``run_dir`` (else the model's ``output_dir``) holds the export, and
    Lightning's logs and each checkpoint callback's files unless those are set explicitly."""
    init = cfg.model.init_args
    run_dir = cfg.get("run_dir") or init.get("output_dir")
    if not run_dir:
        return
    cfg.run_dir = init.output_dir = str(run_dir)
    cfg.trainer.default_root_dir = cfg.trainer.default_root_dir or str(run_dir)
    for cb in cfg.trainer.callbacks or []:
        if cb.class_path.endswith("ModelCheckpoint") and not cb.init_args.get("dirpath"):
            cb.init_args.dirpath = str(Path(run_dir) / "checkpoints")


class HypeditCLI(LightningCLI):
    """LightningCLI plus ``--world`` (the built-in data, generated before anything is built) and
    ``--ckpt_path`` (resume a killed run: ``--ckpt_path last``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("run", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--world_dir", type=str | None, default=None,
                            help="Generate the built-in synthetic world here before building the model and data")
        parser.add_class_arguments(WorldConfig, "world")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Checkpoint to resume from ('last' picks the newest in the run's checkpoint dir)")
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Where this job writes: the export, RUN_DIR/lightning_logs and RUN_DIR/checkpoints "
                                 "(default: model.init_args.output_dir)")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        place_outputs(cfg)
        if cfg.get("world_dir") and not cfg.data.init_args.get("train_files"):  # own files: no world needed
            w = cfg["world"].as_dict()
            ensure_world(cfg["world_dir"], WorldConfig(**{**w, "split_fractions": tuple(w["split_fractions"])}))

    def run_job(self) -> dict:
        """Fit (unless a cached result with the same settings exists), then export the result."""
        model, dm, trainer = self.model, self.datamodule, self.trainer
        if hasattr(model, "cache_key"):  # everything that shapes the result, not how it is displayed
            keep = {k: v for k, v in self.config.as_dict().items() if k not in ("ckpt_path", "trainer", "run_dir")}
            keep["trainer"] = {k: v for k, v in self.config.as_dict()["trainer"].items()
                               if k in ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")}
            if keep.get("world_dir"):  # the generator's output shapes the data the result is exported with
                keep["world_format"] = WORLD_FORMAT
            model.cache_key = keep
        if getattr(model, "is_cached", lambda: False)():
            print(f"[hypedit] reusing cached result in {model.hparams.output_dir}")
        else:
            # a read-only or full disk stops the job now, not at its first checkpoint or at the export
            outputs = [model.hparams.get("output_dir"), trainer.default_root_dir,
                       *(getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks),
                       *(lg.save_dir for lg in trainer.loggers)]
            for d in dict.fromkeys(d for d in outputs if d):
                check_writable(d)
            trainer.fit(model, datamodule=dm, ckpt_path=self.config.get("ckpt_path"))
        return model.export(trainer, dm)
