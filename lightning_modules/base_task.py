"""Train the model to be edited on the world's facts, save it, and annotate the edit data from it."""
from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from datamodules.atomic import write_text
from datamodules.encoding import Family, collate, encode, load_tokenizer
from datamodules.world import RELATIONS, read_jsonl_plain, write_jsonl
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
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        if model_name_or_path.startswith("tiny-"):
            self.model = build_tiny(model_name_or_path, self.tokenizer, tiny_config)
        else:
            self.model = load_model(model_name_or_path, family)
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
        """Save the model and tokenizer, write the annotated edit data; return the accuracy summary."""
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
        summary.update(annotate_world(self.model.eval(), self.tokenizer, self.hparams.family,
                                      Path(datamodule.hparams.world_dir), out / "data"))
        write_text(out / "model" / "hypedit_base.json", json.dumps(summary, indent=1))  # last: the stamp of a complete export
        return summary


@torch.no_grad()
def _rank_candidates(model, tok, family: Family, prompts: list[str], cands: list[list[str]], bs: int = 256) -> list[list[str]]:
    """Order each prompt's candidate answers by the model's log-likelihood (a beam search over the
    relation's answer set): the first is the model's answer, the rest its runner-ups."""
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


def annotate_world(model, tok, family: Family, world_dir: Path, out_dir: Path) -> dict:
    """Rewrite ``prediction``, ``alternatives`` and ``filtered_rephrases`` from the trained model,
    as the released zsRE/FEVER files were made, into ``out_dir``; return per-split figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task = "fever" if family == "classifier" else "zsre"
    stats: dict[str, float] = {}
    for split in ("train", "val", "test"):
        rows = read_jsonl_plain(world_dir / f"{task}-{split}.jsonl")
        texts = [r["input"] for r in rows] + [p for r in rows for p in r["filtered_rephrases"]]
        if task == "zsre":
            cand = [RELATIONS[r["relation"]][0] for r in rows]
            cand += [RELATIONS[r["relation"]][0] for r in rows for _ in r["filtered_rephrases"]]
            ranked = _rank_candidates(model, tok, family, texts, cand)
            answers = [rk[0] for rk in ranked]
        else:
            logits = _classify(model, tok, texts)
            answers = ["SUPPORTS" if x > 0 else "REFUTES" for x in logits]
        n, k, correct, kept, total = len(rows), len(rows), 0, 0, 0
        for i, r in enumerate(rows):
            r["prediction"] = answers[i]
            if task == "zsre":
                r["alternatives"] = ranked[i][1:4]
            else:
                r["alternatives"] = ["REFUTES" if answers[i] == "SUPPORTS" else "SUPPORTS"]
                r["logit"] = logits[i]
            ph = r["filtered_rephrases"]
            keep = [p for j, p in enumerate(ph) if answers[k + j] == answers[i]]
            k += len(ph)
            total, kept = total + len(ph), kept + len(keep)
            r["filtered_rephrases"] = keep
            correct += answers[i] == r["output"][0]["answer"]
        write_jsonl(out_dir / f"{task}-{split}.jsonl", rows)
        stats[f"{task}_{split}_prediction_accuracy"] = correct / max(1, n)
        stats[f"{task}_{split}_rephrases_kept"] = kept / max(1, total)
    for f in ("nq-loc.jsonl", "fever-loc.jsonl"):
        shutil.copy(world_dir / f, out_dir / f)
    return stats
