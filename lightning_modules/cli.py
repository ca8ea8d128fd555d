"""The LightningCLI behind train.py: YAML configs, a synthetic-world section, resume, export."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from datamodules.encoding import build_word_tokenizer
from datamodules.world import WORLD_FORMAT, WorldConfig, generate_world, world_texts


def ensure_world(world_dir: str | Path, cfg: WorldConfig) -> Path:
    """Generate the synthetic world and its word-level tokenizer unless they already exist."""
    world_dir = generate_world(world_dir, cfg)
    if not (world_dir / "tokenizer" / "tokenizer.json").exists():
        build_word_tokenizer(world_texts(world_dir), world_dir / "tokenizer")
    return world_dir


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

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        if cfg.get("world_dir"):
            w = cfg["world"]
            ensure_world(cfg["world_dir"], WorldConfig(n_subjects=w.n_subjects, seed=w.seed,
                                                       split_fractions=tuple(w.split_fractions),
                                                       eval_templates=w.eval_templates,
                                                       n_alternatives=w.n_alternatives))

    def run_job(self) -> dict:
        """Fit (unless a cached result with the same settings exists), then export the result."""
        model, dm, trainer = self.model, self.datamodule, self.trainer
        if hasattr(model, "cache_key"):  # everything that shapes the result, not how it is displayed
            keep = {k: v for k, v in self.config.as_dict().items() if k not in ("ckpt_path", "trainer")}
            keep["trainer"] = {k: v for k, v in self.config.as_dict()["trainer"].items()
                               if k in ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "gradient_clip_val")}
            if keep.get("world_dir"):  # the generator's output shapes the data the result is exported with
                keep["world_format"] = WORLD_FORMAT
            model.cache_key = keep
        if getattr(model, "is_cached", lambda: False)():
            print(f"[hypedit] reusing cached result in {model.hparams.output_dir}")
        else:
            trainer.fit(model, datamodule=dm, ckpt_path=self.config.get("ckpt_path"))
        return model.export(trainer, dm)
