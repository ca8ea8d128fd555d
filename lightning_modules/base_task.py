"""Train the model to be edited on the world's facts (or the user's files), save it, and annotate the
edit data from it; ``python -m lightning_modules.base_task annotate`` annotates files from any model."""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torchmetrics import MeanMetric

from datamodules.atomic import write_text
from datamodules.encoding import FAMILIES, Family, collate, encode, load_tokenizer
from datamodules.formats import FEVER_LABELS, DataFormatError, SourceRow, read_source_rows, write_rows
from datamodules.world import kind_relations, world_kind
from editors.losses import forward_logits, nll, scores
from lightning_modules.callbacks import ProgressLog
from lightning_modules.models import build_tiny, decoder_start_id, load_model
from lightning_modules.schedules import warmup_cosine


class BaseTaskModule(L.LightningModule):
    """Plain supervised training of a causal LM, a seq2seq LM or a one-logit classifier.

    Logs ``train/loss``, ``val/exact_match`` and ``val/token_acc`` (teacher-forced, on the
    training questions; see :mod:`editors.losses` for the definitions).
    """

    def __init__(self, model_name_or_path: str = "tiny-gpt2", family: Family = "causal",
                 tokenizer: str = "runs/world/tokenizer", tiny_config: dict[str, Any] | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 100,
                 cosine_decay: bool = False, output_dir: str = "runs/base") -> None:
        super().__init__()
        if lr < 0 or weight_decay < 0 or warmup_steps < 0:  # Adam would train uphill without a word
            raise ValueError(f"lr, weight_decay and warmup_steps must not be negative; got {lr}, {weight_decay}, {warmup_steps}")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        if model_name_or_path.startswith("tiny-"):
            self.model = build_tiny(model_name_or_path, self.tokenizer, tiny_config)
        else:
            self.model = load_model(model_name_or_path, family).train()  # from_pretrained gives eval mode: dropout on
        self.decoder_start_id = decoder_start_id(self.model)
        self.val_em, self.val_tok = MeanMetric(), MeanMetric()
        self.cache_key: dict | None = None  # set by the CLI: the resolved config that made this model

    # -- cache: a finished base model is reused by later jobs with the same settings
    def fingerprint(self) -> str:
        key = self.cache_key if self.cache_key is not None else dict(self.hparams)
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def is_cached(self) -> bool:
        stamp = Path(self.hparams.output_dir) / "model" / "hypedit_base.json"
        return stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == self.fingerprint()

    def setup(self, stage: str) -> None:
        """Check, before training, the files the export reads when training ends."""
        data = self.trainer.datamodule.hparams if self.trainer.datamodule is not None else None
        if stage == "fit" and data is not None and not data.annotate and not data.train_files:
            missing = [f for f in world_export_inputs(Path(data.world_dir), self.hparams.family) if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{missing[0]} not found: the export annotates the world in {data.world_dir} "
                                        "when training ends; generate it (the config's world section and world_dir) "
                                        "or set data.init_args.annotate or train_files")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = nll(forward_logits(self.model, batch, self.hparams.family), batch["labels"], self.hparams.family)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        em, tok = scores(forward_logits(self.model, batch, self.hparams.family), batch["labels"], self.hparams.family)
        self.val_em.update(em)
        self.val_tok.update(tok)
        self.log("val/exact_match", self.val_em, prog_bar=True)
        self.log("val/token_acc", self.val_tok)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # linear warm-up, then constant or (cosine_decay) down to 0 along a half cosine at the last step:
        # at a constant rate the last epoch's weights land anywhere in the rate's noise band, and how
        # close to converged they are depends on the machine's float rounding (tiny GPT-2 at 3e-3 for
        # 30 epochs: exact match 0.999 on an Intel CPU, 0.90 on an AMD one)
        total = self.trainer.estimated_stepping_batches if self.hparams.cosine_decay else None
        factor = partial(warmup_cosine, warmup=max(1, self.hparams.warmup_steps), total=total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def training_set_accuracy(self, datamodule: L.LightningDataModule) -> tuple[float, float]:
        """Teacher-forced exact match and token accuracy over every example the model was trained on."""
        self.model.eval()
        em, tok = [], []
        for batch in datamodule.val_dataloader():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            e, t = scores(forward_logits(self.model, batch, self.hparams.family), batch["labels"], self.hparams.family)
            em.append(e)
            tok.append(t)
        return torch.cat(em).mean().item(), torch.cat(tok).mean().item()

    def configure_callbacks(self) -> list[L.Callback]:
        return [ProgressLog()]

    def export(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> dict:
        """Save the model and tokenizer, write the annotated edit data (the world's, or the files of
        ``data.init_args.annotate``); return the accuracy summary."""
        out = Path(self.hparams.output_dir)
        if not trainer.is_global_zero:
            return {}
        if self.is_cached():
            return json.loads((out / "model" / "hypedit_base.json").read_text())
        # into a temporary directory renamed into place: a crash leaves no half-saved model
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        tmp.rename(out / "model")
        em, tok = self.training_set_accuracy(datamodule)
        summary = {"fingerprint": self.fingerprint(), "family": self.hparams.family,
                   "exact_match_on_training_questions": em, "token_acc_on_training_questions": tok}
        data = datamodule.hparams
        if data.annotate:
            summary.update(annotate_files(self.model.eval(), self.tokenizer, self.hparams.family, data.annotate, out / "data"))
        elif not data.train_files:
            summary.update(annotate_world(self.model.eval(), self.tokenizer, self.hparams.family,
                                          Path(data.world_dir), out / "data"))
        write_text(out / "model" / "hypedit_base.json", json.dumps(summary, indent=1))  # last: the stamp of a complete export
        return summary


@torch.no_grad()
def _rank_candidates(model, tok, family: Family, prompts: list[str], cands: list[list[str]], bs: int = 256) -> list[list[str]]:
    """Order each prompt's candidate answers by the model's log-likelihood (a beam search restricted
    to the candidates): the first is the model's answer, the rest its runner-ups."""
    flat = [(i, c) for i, cs in enumerate(cands) for c in cs]
    feats = encode(tok, family, [prompts[i] for i, _ in flat], [c for _, c in flat])
    start = decoder_start_id(model)
    ll = []
    for k in range(0, len(feats), bs):
        b = collate(feats[k: k + bs], tok.pad_token_id, family, start)
        b = {n: v.to(model.device) for n, v in b.items()}
        logits = forward_logits(model, b, family)
        lg, tg = (logits[:, :-1], b["labels"][:, 1:]) if family == "causal" else (logits, b["labels"])
        lp = torch.log_softmax(lg.float(), -1).gather(-1, tg.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ll += ((lp * (tg != -100)).sum(1)).tolist()
    out: list[list[tuple[float, str]]] = [[] for _ in prompts]
    for (i, c), s in zip(flat, ll):
        out[i].append((s, c))
    return [[c for _, c in sorted(o, key=lambda x: -x[0])] for o in out]


@torch.no_grad()
def _classify(model, tok, prompts: list[str], bs: int = 256) -> list[float]:
    feats = encode(tok, "classifier", prompts, [None] * len(prompts))
    logits = []
    for k in range(0, len(feats), bs):
        b = collate(feats[k: k + bs], tok.pad_token_id, "classifier")
        logits += forward_logits(model, {n: v.to(model.device) for n, v in b.items()}, "classifier").tolist()
    return logits


def annotate_files(model, tok, family: Family, inputs: Mapping[str, str | Path], out_dir: Path,
                   candidates: Mapping[str, list[str]] | None = None, n_alternatives: int = 3,
                   max_candidates: int = 64) -> dict[str, float]:
    """Annotate zsRE/FEVER files from ``model``, as the released files were made from theirs: write each
    ``inputs[split]`` (either released format) to ``out_dir/{task}-{split}`` with its own extension, in its
    own format, so the edit DataModules read it unchanged; return per-split figures.

    - ``prediction``: the model's answer. A classifier's verdict is the sign of its logit. A QA model's
      answer is the most likely (summed log-probability) of the row's candidates, ranked again on every
      rephrase: ``candidates[relation]`` when given (the built-in world's answer sets); else the gold
      answer and the row's own alternatives when it has some; else the gold answer and the other gold
      answers of all ``inputs`` (of the same ``relation`` when rows carry one; a sample of at most
      ``max_candidates``, seeded by the question).
    - ``alternatives``: the next ``n_alternatives`` candidates by likelihood (the edit target is the
      first); for FEVER the flipped verdict.
    - ``filtered_rephrases``: the rephrases on which the model gives the same answer as on the input.

    Real QA answers are open-ended: there, ranking the answers found in the files is an approximation
    of what the model would say (its answer among these candidates, not its free generation)."""
    task = "fever" if family == "classifier" else "zsre"
    rows = {split: read_source_rows(path, FEVER_LABELS if task == "fever" else None) for split, path in inputs.items()}
    pool: dict[str | None, dict[str, None]] = {}  # relation -> gold answers, in file order
    for r in (r for rs in rows.values() for r in rs):
        pool.setdefault(r.relation, {})[r.gold] = None

    def cands(r: SourceRow) -> list[str]:
        if candidates is not None and r.relation in candidates:
            return candidates[r.relation]
        if r.alternatives:
            return list(dict.fromkeys([r.gold, *r.alternatives]))
        others = [a for a in pool[r.relation] if a != r.gold]
        return [r.gold, *random.Random(r.prompt).sample(others, min(len(others), max_candidates - 1))]

    stats: dict[str, float] = {}
    for split, rs in rows.items():
        texts = [r.prompt for r in rs] + [p for r in rs for p in r.rephrases]
        if task == "zsre":
            cand = [cands(r) for r in rs]
            cand += [c for r, c in zip(rs, cand) for _ in r.rephrases]
            ranked = _rank_candidates(model, tok, family, texts, cand)
            answers = [rk[0] for rk in ranked]
        else:
            logits = _classify(model, tok, texts)
            answers = ["SUPPORTS" if x > 0 else "REFUTES" for x in logits]
        out, k, correct, kept, total = [], len(rs), 0, 0, 0
        for i, r in enumerate(rs):
            keep = [p for j, p in enumerate(r.rephrases) if answers[k + j] == answers[i]]
            k += len(r.rephrases)
            total, kept = total + len(r.rephrases), kept + len(keep)
            correct += answers[i] == r.gold
            if task == "zsre":
                out.append(r.annotated(answers[i], ranked[i][1: 1 + n_alternatives], keep))
            else:
                out.append({**r.annotated(answers[i], ["REFUTES" if answers[i] == "SUPPORTS" else "SUPPORTS"], keep),
                            "logit": logits[i]})
        write_rows(out_dir / f"{task}-{split}{Path(inputs[split]).suffix}", out)
        stats[f"{task}_{split}_prediction_accuracy"] = correct / max(1, len(rs))
        stats[f"{task}_{split}_rephrases_kept"] = kept / max(1, total)
    return stats


WORLD_LOC_FILES = ("nq-loc.jsonl", "fever-loc.jsonl")


def world_export_inputs(world_dir: Path, family: Family) -> list[Path]:
    """The world's files :func:`annotate_world` reads: its stamp (the kind), the edit files, the locality files."""
    task = "fever" if family == "classifier" else "zsre"
    return [world_dir / "world.json", *(world_dir / f"{task}-{s}.jsonl" for s in ("train", "val", "test")),
            *(world_dir / f for f in WORLD_LOC_FILES)]


def annotate_world(model, tok, family: Family, world_dir: Path, out_dir: Path) -> dict[str, float]:
    """:func:`annotate_files` on the built-in world's edit files, each question's answers ranked over
    its relation's objects; the locality files are copied beside them."""
    task = "fever" if family == "classifier" else "zsre"
    stats = annotate_files(model, tok, family, {s: world_dir / f"{task}-{s}.jsonl" for s in ("train", "val", "test")},
                           out_dir, candidates={r: objs for r, (objs, _, _) in kind_relations(world_kind(world_dir)).items()})
    for f in WORLD_LOC_FILES:
        shutil.copy(world_dir / f, out_dir / f)
    return stats


def main(argv: list[str] | None = None) -> dict[str, float]:
    """``python -m lightning_modules.base_task annotate --model DIR --family causal --train X --test Y --out DIR``:
    annotate zsRE/FEVER files from any model directory, without training it (:func:`annotate_files`)."""
    p = argparse.ArgumentParser(prog="python -m lightning_modules.base_task")
    a = p.add_subparsers(dest="command", required=True).add_parser(
        "annotate", help="write prediction, alternatives and filtered_rephrases of zsRE/FEVER files from a model")
    a.add_argument("--model", required=True, help="local Hugging Face model directory (or hub name)")
    a.add_argument("--tokenizer", help="default: --model")
    a.add_argument("--family", required=True, choices=FAMILIES)
    for split in ("train", "val", "test"):
        a.add_argument(f"--{split}", help=f"{split} file (zsRE or FEVER, either released format)")
    a.add_argument("--out", required=True, help="directory for {zsre,fever}-{split}.jsonl (.json for toolkit files)")
    args = p.parse_args(argv)
    inputs = {s: getattr(args, s) for s in ("train", "val", "test") if getattr(args, s)}
    if not inputs:
        p.error("give at least one of --train, --val, --test")
    model = load_model(args.model, args.family).eval().to("cuda" if torch.cuda.is_available() else "cpu")
    try:
        stats = annotate_files(model, load_tokenizer(args.tokenizer or args.model), args.family, inputs, Path(args.out))
    except DataFormatError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    main()
