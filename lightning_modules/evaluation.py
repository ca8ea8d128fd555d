"""Evaluation of editors on held-out edits: metric definitions, the three protocols, and a
LightningModule that runs the single-edit protocol data-parallel.

Protocols (metrics and protocols as described in docs/methods.md; sequential metrics after
Huang et al., ICLR 2023):

- ``single``: every held-out edit applied alone, functionally, to the unedited model
  (:class:`EditEvalModule`, run by ``trainer.test`` over the DataModule's test loader).
- ``batch``: K edits applied at once, all K scored (:func:`run_batch`).
- ``sequential``: a stream of edits merged step after step into a working copy, scored right after
  each edit and re-scored at checkpoints 1, 10, every 100 edits and the end (:func:`run_sequential`).

The base model is never modified: single and batch edits are functional, and the stream edits a
deep copy, so every locality number compares with the untouched original. Every number's
definition is in :data:`DEFINITIONS`, which every report carries.
"""
from __future__ import annotations

import copy
import json
import math
import random
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric, SumMetric
from tqdm.auto import tqdm

from datamodules.atomic import write_text
from datamodules.edit_data import EditDataModule, EncodedSplit
from datamodules.encoding import Family, collate, encode
from editors.base import Edit, Editor
from editors.losses import (agreement_positions, forward_logits, kl_pre_post, kl_tokens, real_positions, scores,
                            top1_agreement)

DEFINITIONS: dict[str, str] = {
    "edit_success": "exact match on the edit input: every target token (end-of-answer included) is the "
                    "teacher-forced argmax, i.e. the greedy answer equals the new target; label accuracy "
                    "for the classifier. Mean over edits.",
    "edit_success_token_acc": "teacher-forced token accuracy of the new target on the edit input, mean over edits.",
    "generality": "exact match (as edit_success) on ALL paraphrases of each edit: per edit the mean over its "
                  "paraphrases, then the mean over edits.",
    "generality_token_acc": "teacher-forced token accuracy on all paraphrases, averaged like generality (a "
                            "diagnostic: partial answers count in part). Not the published MEND figure: MEND's code "
                            "counts a paraphrase right only if every target token is the teacher-forced argmax, "
                            "which is generality here.",
    "locality_agreement": "share of the answer positions (those predicting a gold answer token; all real positions "
                          "of an input without an answer) of unrelated inputs where the edited model's top-1 token "
                          "equals the original model's (label agreement for the classifier), mean over inputs.",
    "locality_base_agreement": "share of unrelated inputs whose answer from the original model (its greedy "
                               "answer to its end-of-answer token, cut at 16 tokens if it has not ended) the edited "
                               "model still gives: exact match against the original's answer instead of the gold "
                               "one. Needs no gold answer and stays informative where the original rarely gives the "
                               "gold answer (a real pretrained model on open questions); equals locality_agreement "
                               "for the classifier.",
    "locality_kl": "KL(original || edited) of the next-token distributions on unrelated inputs, averaged over "
                   "each input's real positions, then over inputs (nats).",
    "drawdown": "exact-match accuracy on labelled unrelated inputs, original model minus edited model "
                "(positive = the edit broke answers). MEND's reference code reports the same difference.",
    "drawdown_stderr": "standard error of drawdown over edit steps: the standard deviation of the per-step "
                       "drawdowns divided by sqrt(n_steps). Steps, not single checks, are the independent units "
                       "(one edit breaks related inputs together); a drawdown within 2 stderr of a target is "
                       "not distinguishable from it.",
    "flips_right_to_wrong": "count of labelled unrelated inputs the original model answered right (exact "
                            "match) and the edited model answers wrong; *_share divides by n_locality_labelled.",
    "flips_wrong_to_right": "count of labelled unrelated inputs that went from wrong to right; share as above.",
    "seconds_per_edit": "median wall-clock seconds to compute (and, in sequential mode, merge) one edit; "
                        "a step of K edits counts its time divided by K. Scoring is not timed.",
    "peak_memory_bytes": "torch.cuda.max_memory_allocated over the run of this entry on GPU; on CPU the "
                         "process's peak resident set size so far (resource.getrusage ru_maxrss).",
    "params_changed": "number of base-model parameters the edit changed: nonzero entries of the weight "
                      "changes of one step (sequential: entries of the working copy that differ from the "
                      "original at the end of the stream, mean over folds).",
    "params_changed_fraction": "params_changed divided by the base model's total parameter count.",
    "sr": "sequential: mean over the edits made among stream items 1..t of 'edit input right (exact match) just "
          "after its own step'; items skipped under only_when_wrong (already right) are not edits and are left "
          "out (as Transformer-Patcher reports); edit_success and generality are the end-of-stream values.",
    "gr": "sequential: as sr, on all paraphrases of each edit made (generality just after its step).",
    "er": "sequential: share of the edits made among items 1..t whose edit input is still right at checkpoint t "
          "(edit retention).",
    "n_edits_skipped": "sequential: stream items not edited because the model already answered them right "
                       "(only_when_wrong); sr, gr and er leave them out.",
    "n_edits_rolled_back": "edits the editor gave up on and left the model unchanged (Transformer-Patcher rolls "
                           "back a patch that stays wrong or breaks its memory constraints); they count as made "
                           "and, unless already right, as failed in edit_success / sr.",
    "train_r": "sequential: exact-match accuracy on held-in training inputs with their original gold "
               "answers at checkpoint t, divided by the original model's accuracy on them.",
    "test_r": "sequential: exact-match accuracy on held-out labelled locality inputs at checkpoint t, "
              "divided by the original model's accuracy on them.",
    "test_r_base": "sequential: locality_base_agreement on the held-out locality probe at checkpoint t: the share "
                   "of the original model's own answers the working model still gives (the original's accuracy "
                   "on them is 1, so this is a retention); defined where test_r is not (original accuracy 0).",
    "checkpoints": "sequential: number of stream edits applied when each curve point was taken "
                   "(1, 10, every 100 edits and the end of the stream); curves are means over folds.",
}


# ---------------------------------------------------------------- metric functions
def flip_counts(pre_right: Tensor, post_right: Tensor) -> tuple[int, int]:
    """Instance-wise (right->wrong, wrong->right) counts between two boolean correctness vectors."""
    pre, post = pre_right.bool(), post_right.bool()
    return int((pre & ~post).sum()), int((~pre & post).sum())


def drawdown(pre_right: Tensor, post_right: Tensor) -> float:
    """Accuracy before minus accuracy after on the same labelled inputs."""
    return float(pre_right.float().mean() - post_right.float().mean())


def retention(accuracy: float, initial: float) -> float | None:
    """``accuracy / initial`` (TrainR/TestR); undefined (None) when the initial accuracy is 0."""
    return accuracy / initial if initial > 0 else None


def stream_checkpoints(n: int) -> list[int]:
    """Where a stream of ``n`` edits is re-scored: 1, 10, then every 100 edits, and ``n``."""
    return [m for m in (1, 10, *range(100, n, 100)) if m < n] + [n] if n > 0 else []


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory since the last :func:`reset_peak_memory`, and what that number measures."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_measure": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "peak_memory_measure": "process peak RSS (resource.getrusage ru_maxrss)"}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def labelled(labels: Tensor, family: Family) -> Tensor:
    """Which rows carry a known answer (locality inputs may be unlabelled)."""
    return labels >= 0 if family == "classifier" else (labels != -100).any(1)


# ---------------------------------------------------------------- batches
def select_rows(batch: Mapping[str, Any], idx: Sequence[int]) -> dict[str, Tensor]:
    """Rows ``idx`` of a collated batch, without the padding columns none of them uses."""
    idx = list(idx)
    out = {k: v[idx] for k, v in batch.items() if isinstance(v, Tensor)}
    n = int(out["attention_mask"].sum(1).max())
    causal_labels = out["labels"].dim() == 2 and "decoder_input_ids" not in out
    for k in ("input_ids", "attention_mask") + (("labels",) if causal_labels else ()):
        out[k] = out[k][:, :n]
    if "decoder_attention_mask" in out:
        t = int(out["decoder_attention_mask"].sum(1).max())
        for k in ("labels", "decoder_input_ids", "decoder_attention_mask"):
            out[k] = out[k][:, :t]
    return out


def n_rows(batch: Mapping[str, Tensor]) -> int:
    return batch["input_ids"].shape[0]


def chunks(batch: Mapping[str, Tensor], size: int) -> Iterator[dict[str, Tensor]]:
    n = n_rows(batch)
    for i in range(0, n, size):
        yield select_rows(batch, range(i, min(n, i + size)))


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}


def subset_split(split: EncodedSplit, indices: Sequence[int]) -> EncodedSplit:
    """The records ``indices`` of an evaluation split, in that order (one item per record)."""
    return EncodedSplit([split.records[i] for i in indices], [(j, 0) for j in range(len(indices))],
                        [split.edits[i] for i in indices], [split.rephrases[i] for i in indices])


class EditData:
    """A set-up edit DataModule's held-out edits and probe sets as collated batches on ``device``.

    The locality inputs paired with each edit are the DataModule's own (its ``loc_per_edit``
    inputs per item). Sequential mode adds two fixed probes: ``test_probe`` (a seeded sample of the
    labelled locality pool) and ``train_probe`` (held-in training edit inputs with their original
    gold answers). FT+KL samples its locality inputs from the rest of the training split
    (:meth:`kl_pool`), so it never trains on an input locality is scored on.
    """

    def __init__(self, dm: EditDataModule, split: str = "test", device: torch.device | str = "cpu",
                 seed: int = 0, n_train_probe: int = 100) -> None:
        self.dm, self.split, self.family, self.split_name = dm, dm.splits[split], dm.hparams.family, split
        self.loc_pool = dm.loc_pools[split]  # this split's own locality inputs, disjoint from the others'
        self.dataset = dm.dataset(split)
        self.device = torch.device(device)
        self.seed = seed
        train = dm.splits.get("train")
        order = list(range(len(train.records))) if train else []
        random.Random(seed).shuffle(order)
        self._train_probe_ids, self._kl_ids = order[:n_train_probe], order[n_train_probe:]

    def collate(self, feats: Sequence[dict]) -> dict[str, Tensor]:
        b = collate(feats, self.dm.tokenizer.pad_token_id, self.family, self.dm.decoder_start_id)
        return to_device(b, self.device)

    def edits(self, ids: Sequence[int]) -> dict[str, Tensor]:
        return self.collate([self.split.edits[i] for i in ids])

    def rephrases(self, ids: Sequence[int]) -> tuple[dict[str, Tensor], Tensor]:
        """All paraphrases of the edits ``ids``, and for each row the position of its edit in ``ids``."""
        feats, owner = [], []
        for j, i in enumerate(ids):
            feats += self.split.rephrases[i]
            owner += [j] * len(self.split.rephrases[i])
        return self.collate(feats), torch.tensor(owner, device=self.device)

    def locality_inputs(self, ids: Sequence[int]) -> list[dict]:
        """The locality inputs of the edits ``ids``, each input once: edits that share inputs (with
        ``loc_per_edit`` all, every edit has the whole pool) have them scored once per step, not once per edit."""
        seen: dict[int, dict] = {}
        for i in ids:
            for l in self.dataset[i]["loc"]:
                seen.setdefault(id(l), l)  # the pool's own objects: identity is "the same input"
        return list(seen.values())

    def locality(self, ids: Sequence[int]) -> dict[str, Tensor]:
        return self.collate(self.locality_inputs(ids))

    def test_probe_inputs(self, n: int) -> list[dict]:
        pool = self.loc_pool
        return [pool[i] for i in random.Random(self.seed).sample(range(len(pool)), min(n, len(pool)))]

    def test_probe(self, n: int) -> dict[str, Tensor]:
        return self.collate(self.test_probe_inputs(n))

    def base_locality(self, model: nn.Module, chunk: int = 64, max_bytes: int | None = None) -> BaseLocality:
        """A :class:`BaseLocality` of ``model`` for this data's inputs."""
        kw = {} if max_bytes is None else {"max_bytes": max_bytes}
        return BaseLocality(model, self.family, self.collate, self.dm.tokenizer.eos_token_id, chunk, **kw)

    def _train_inputs(self, ids: Sequence[int], answer: str) -> list[dict]:
        recs = [self.dm.splits["train"].records[i] for i in ids]
        return encode(self.dm.tokenizer, self.family, [r.prompt for r in recs], [getattr(r, answer) for r in recs],
                      self.dm.hparams.max_length)

    def train_probe(self) -> dict[str, Tensor] | None:
        return self.collate(self._train_inputs(self._train_probe_ids, "gold")) if self._train_probe_ids else None

    def kl_pool(self) -> list[dict]:
        """Training inputs (with the model's own original answers) for FT+KL's locality term."""
        if not self._kl_ids:
            raise ValueError("FT+KL samples its locality inputs from the training split, and this config has "
                             "none left: set data.init_args.train_path (or lower --n_train_probe)")
        return self._train_inputs(self._kl_ids, "prediction")

    def memory_pool(self) -> list[dict]:
        """Training-split inputs a patch must stay silent on (Transformer-Patcher's memory): the training
        edits beyond the TrainR probe with their rephrases, each with the model's own answer, and the
        meta-training share of the locality inputs, filtered only against the evaluated split's edits
        (:meth:`EditDataModule.memory_locality`). None of them is ever scored."""
        recs = [self.dm.splits["train"].records[i] for i in self._kl_ids]
        pairs = [(t, r.prediction) for r in recs for t in (r.prompt, *r.rephrases)]
        return (encode(self.dm.tokenizer, self.family, [t for t, _ in pairs], [a for _, a in pairs],
                       self.dm.hparams.max_length) + self.dm.memory_locality(self.split_name))


class LocalitySampler:
    """Deterministic draws of ``n`` inputs per edit from a pool (FT+KL's locality term)."""

    def __init__(self, pool: list[dict], n: int, seed: int, data: EditData) -> None:
        self.pool, self.n, self.seed, self.data = pool, n, seed, data

    def __call__(self, key: int) -> dict[str, Tensor]:
        rng = random.Random(self.seed * 1_000_003 + key)  # depends only on the edit: same draw on any process
        return self.data.collate(rng.sample(self.pool, min(self.n, len(self.pool))))


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def answer_scores(model: nn.Module, batch: Mapping[str, Tensor], family: Family, chunk: int = 64
                  ) -> tuple[Tensor, Tensor]:
    """Per-row (exact match, token accuracy) of ``model`` on ``batch``'s labels."""
    em, tok = [], []
    for part in chunks(batch, chunk):
        e, t = scores(forward_logits(model, part, family), part["labels"], family)
        em.append(e)
        tok.append(t)
    return torch.cat(em), torch.cat(tok)


def _prompt(feat: Mapping[str, Sequence[int]], family: Family) -> list[int]:
    """An encoded input without its answer (a causal input's tokens before its first label)."""
    ids = list(feat["input_ids"])
    if family != "causal":
        return ids
    return ids[:next((t for t, l in enumerate(feat["labels"]) if l != -100), len(ids))]


@torch.no_grad()
def greedy_answers(model: nn.Module, feats: Sequence[Mapping[str, Sequence[int]]], family: Family,
                   collate_fn: Callable[[Sequence[dict]], dict[str, Tensor]], eos_id: int, max_tokens: int,
                   chunk: int = 64) -> list[dict]:
    """Each input (causal or seq2seq) re-labelled with ``model``'s greedy answer to its prompt.

    The answer grows one token at a time, each the argmax of the same padded teacher-forced forward that
    scoring runs, until the end-of-answer token or ``max_tokens`` tokens (or the model's last position),
    so the model's exact match on its own answers is 1 (up to exact ties between top logits)."""
    causal = family == "causal"
    prompts = [_prompt(f, family) for f in feats]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    caps = [min(max_tokens, limit - len(p)) if causal and limit else max_tokens for p in prompts]
    answers: list[list[int]] = [[] for _ in feats]
    todo = [r for r, c in enumerate(caps) if c > 0]
    while todo:
        going = []
        for i in range(0, len(todo), chunk):
            rows = todo[i:i + chunk]
            step = [{"input_ids": prompts[r] + answers[r], "labels": [-100] * (len(prompts[r]) + len(answers[r]))}
                    if causal else {"input_ids": prompts[r], "labels": answers[r] + [eos_id]} for r in rows]
            logits = forward_logits(model, collate_fn(step), family)
            at = [len(prompts[r]) + len(answers[r]) - 1 if causal else len(answers[r]) for r in rows]
            picked = logits[torch.arange(len(rows), device=logits.device), torch.tensor(at, device=logits.device)]
            for r, t in zip(rows, picked.argmax(-1).tolist()):
                answers[r].append(t)
                if t != eos_id and len(answers[r]) < caps[r]:
                    going.append(r)
        todo = going
    if causal:
        return [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(prompts, answers)]
    return [{"input_ids": p, "labels": a} for p, a in zip(prompts, answers)]


def _answer_checks(gold: Mapping[str, Sequence[int]], answer: dict, family: Family) -> dict[str, Any]:
    """How an input's scoring forward (on its gold answer) bears on its greedy ``answer``: whether the two
    are the same input (``answer_is_gold``), and the answer tokens that forward already predicts (those up
    to and including the first that differs from the gold answer, whose prefixes both share) with their
    positions: an edited model that misses one of them misses the answer, with no forward of its own."""
    a = [t for t in answer["labels"] if t != -100]
    g = [t for t in gold["labels"] if t != -100]
    shared = 0
    while shared < min(len(a), len(g)) and a[shared] == g[shared]:
        shared += 1
    n = min(shared + 1, len(a))
    first = len(_prompt(gold, family)) - 1 if family == "causal" else 0  # where the first answer token is predicted
    return {"answer": answer, "answer_is_gold": a == g and answer["input_ids"] == list(gold["input_ids"]),
            "answer_head": a[:n], "answer_at": list(range(first, first + n)), "answer_checked": n == len(a)}


def _row_means(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row means of ``values`` given at ``mask``'s true entries, in row-major order."""
    rows = mask.nonzero()[:, 0]
    total = torch.zeros(mask.shape[0], device=values.device).index_add_(0, rows, values.float())
    return total / mask.sum(1).clamp_min(1)


class BaseLocality:
    """The unedited model's outputs on locality inputs, computed once per input and reused by every edit
    (they never change: edits are functional or made on a copy).

    Per input it keeps what scoring needs: whether the base gives the gold answer, its top-1 tokens at the
    :func:`~editors.losses.agreement_positions`, its greedy answer (:func:`greedy_answers`, at most
    ``answer_tokens`` tokens; for ``locality_base_agreement``), and its log-probabilities at the input's real
    positions (for the KL). The log-probabilities are the large part: positions x vocabulary floats per
    input, about 200 KB per position at a 50,000-token vocabulary, held where the model is (GPU memory). Past
    ``max_bytes`` of them, inputs keep none and the base model is run again on them for each edit's KL, as
    before this cache; ``max_bytes=0`` runs it for every edit (a baseline for timing the cache).
    """

    def __init__(self, model: nn.Module, family: Family, collate_fn: Callable[[Sequence[dict]], dict[str, Tensor]],
                 eos_id: int, chunk: int = 64, max_bytes: int = 2 ** 30, answer_tokens: int = 16) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model, self.family, self.collate, self.eos_id = model, family, collate_fn, eos_id
        self.chunk, self.max_bytes, self.answer_tokens = chunk, max_bytes, answer_tokens
        self.cached_bytes = 0
        self._rows: dict[tuple, dict[str, Any]] = {}

    @staticmethod
    def _key(feat: Mapping[str, Sequence]) -> tuple:
        return tuple(feat["input_ids"]), tuple(feat["labels"])

    def rows(self, feats: Sequence[Mapping[str, Sequence]]) -> list[dict[str, Any]]:
        """The base model's outputs on each input of ``feats``, computing those not seen before."""
        new = list({self._key(f): f for f in feats if self._key(f) not in self._rows}.values())
        for i in range(0, len(new), self.chunk):
            self._add(new[i:i + self.chunk])
        return [self._rows[self._key(f)] for f in feats]

    @torch.no_grad()
    def _add(self, feats: Sequence[Mapping[str, Sequence]]) -> None:
        fam, batch = self.family, self.collate(feats)
        pre = forward_logits(self.model, batch, fam)
        right = scores(pre, batch["labels"], fam)[0].bool()
        lab = labelled(batch["labels"], fam)
        if fam == "classifier":
            for j, f in enumerate(feats):
                self._rows[self._key(f)] = {"right": right[j], "labelled": lab[j], "logit": pre[j]}
            return
        real, agree, top1 = real_positions(batch, fam), agreement_positions(batch, fam), pre.argmax(-1)
        # a gold answer the base gets right (every token, end included, its argmax) is its greedy answer
        wrong = [j for j, r in enumerate(right.tolist()) if not r]
        decoded = greedy_answers(self.model, [feats[j] for j in wrong], fam, self.collate, self.eos_id,
                                 self.answer_tokens, self.chunk)
        answers = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in feats]
        for j, a in zip(wrong, decoded):
            answers[j] = a
        for j, f in enumerate(feats):
            log_probs = F.log_softmax(pre[j][real[j]].float(), -1)
            size = log_probs.numel() * log_probs.element_size()
            keep = self.cached_bytes + size <= self.max_bytes
            self.cached_bytes += size if keep else 0
            self._rows[self._key(f)] = {"right": right[j], "labelled": lab[j], "top1": top1[j][agree[j]],
                                        "log_probs": log_probs if keep else None,
                                        **_answer_checks(f, answers[j], fam)}


def _answer_agreement(rows: Sequence[dict[str, Any]], post: Tensor, post_right: Tensor) -> tuple[Tensor, list[int]]:
    """Per row, the edited model's exact match on the original's greedy answer, as far as the gold forward's
    logits ``post`` decide it (the answer is the gold one, or differs within the tokens they predict), and
    the rows they leave open: those need a forward on the answer itself."""
    same = post_right.float()
    top = post.argmax(-1).tolist()
    open_rows = []
    for j, r in enumerate(rows):
        if r["answer_is_gold"]:
            continue
        ok = all(top[j][p] == t for p, t in zip(r["answer_at"], r["answer_head"]))
        same[j] = float(ok)
        if ok and not r["answer_checked"]:
            open_rows.append(j)
    return same, open_rows


@torch.no_grad()
def locality_scores(base: BaseLocality, edited: nn.Module, feats: Sequence[Mapping[str, Sequence]],
                    chunk: int = 64) -> dict[str, Tensor]:
    """Per input of ``feats``: top-1 agreement and KL(original || edited), gold correctness before and after,
    whether labelled, and the edited model's exact match on the original's own answer (``base_agreement``).
    The original model's side comes from ``base``, computed once per input."""
    fam = base.family
    out: dict[str, list[Tensor]] = {k: [] for k in ("agreement", "kl", "pre_right", "post_right", "labelled",
                                                    "base_agreement")}
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))  # less padding per chunk
    feats = [feats[i] for i in order]
    answers: list[tuple[int, dict]] = []  # (row, the original's answer) still to score
    for i in range(0, len(feats), chunk):
        part = feats[i:i + chunk]
        rows, batch = base.rows(part), base.collate(part)
        post = forward_logits(edited, batch, fam)
        post_right = scores(post, batch["labels"], fam)[0].bool()
        out["pre_right"].append(torch.stack([r["right"] for r in rows]))
        out["labelled"].append(torch.stack([r["labelled"] for r in rows]))
        out["post_right"].append(post_right)
        if fam == "classifier":  # the label is the answer: agreement is answer agreement
            pre = torch.stack([r["logit"] for r in rows])
            out["agreement"].append(top1_agreement(pre, post, batch, fam))
            out["base_agreement"].append(out["agreement"][-1])
            out["kl"].append(kl_pre_post(pre, post, batch, fam))
            continue
        agree = agreement_positions(batch, fam)
        out["agreement"].append(_row_means(post.argmax(-1)[agree] == torch.cat([r["top1"] for r in rows]), agree))
        if all(r["log_probs"] is not None for r in rows):
            real = real_positions(batch, fam)
            kl = kl_tokens(torch.cat([r["log_probs"] for r in rows]), F.log_softmax(post[real].float(), -1))
            out["kl"].append(_row_means(kl, real))
        else:  # beyond the cache's budget: the original model runs again
            out["kl"].append(kl_pre_post(forward_logits(base.model, batch, fam), post, batch, fam))
        same, open_rows = _answer_agreement(rows, post, post_right)
        out["base_agreement"].append(same)
        answers += [(i + j, rows[j]["answer"]) for j in open_rows]
    res = {k: torch.cat(v) for k, v in out.items()}
    for i in range(0, len(answers), chunk):  # the open rows of all chunks together: fewer, fuller forwards
        idx, part = zip(*answers[i:i + chunk])
        b = base.collate(part)
        res["base_agreement"][list(idx)] = scores(forward_logits(edited, b, fam), b["labels"], fam)[0]
    back = torch.argsort(torch.tensor(order, device=res["kl"].device))
    return {k: v[back] for k, v in res.items()}


def owner_mean(values: Tensor, owner: Tensor, n: int) -> Tensor:
    """Mean of ``values`` per owner index (paraphrase scores -> one score per edit)."""
    total = torch.zeros(n, device=values.device).index_add_(0, owner, values.float())
    count = torch.zeros(n, device=values.device).index_add_(0, owner, torch.ones_like(values, dtype=torch.float))
    return total / count.clamp_min(1)


def score_step(base: BaseLocality, edited: nn.Module, edits: Mapping[str, Tensor], reph: Mapping[str, Tensor],
               owner: Tensor, loc: Sequence[Mapping[str, Sequence]], chunk: int = 64) -> dict[str, Tensor]:
    """Everything measured about one edit step: per-edit scores and per-locality-input scores."""
    n, family = n_rows(edits), base.family
    es, es_tok = answer_scores(edited, edits, family, chunk)
    gs, gs_tok = answer_scores(edited, reph, family, chunk)
    return {"edit_success": es, "edit_success_token_acc": es_tok, "generality": owner_mean(gs, owner, n),
            "generality_token_acc": owner_mean(gs_tok, owner, n), **locality_scores(base, edited, loc, chunk)}


def compute_edit(editor: Editor, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                 loc_batch: Mapping[str, Tensor] | None = None) -> tuple[Edit, float]:
    """The editor's edit for ``batch`` and the seconds it took."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with torch.no_grad():  # editors enable grad where they need it; nothing here trains them
        edit = editor.make_edit(model, batch, family, loc_batch if editor.uses_locality else None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return edit, time.perf_counter() - t0


# ---------------------------------------------------------------- accumulation
def _value(metric: Any) -> float | None:
    with warnings.catch_warnings():  # an empty mean (e.g. no labelled locality input) is reported as None
        warnings.simplefilter("ignore")
        v = float(metric.compute())
    return None if math.isnan(v) else v


class EditMetrics(nn.Module):
    """Accumulates step scores into the reported metrics; torchmetrics states, so exact under DDP."""

    MEANS = ("edit_success", "edit_success_token_acc", "generality", "generality_token_acc",
             "locality_agreement", "locality_base_agreement", "locality_kl", "drawdown", "locality_accuracy_before",
             "locality_accuracy_after", "params_changed")
    SUMS = ("n_edits", "n_steps", "n_locality_inputs", "n_locality_labelled", "flips_right_to_wrong",
            "flips_wrong_to_right", "n_edits_rolled_back")

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict({k: MeanMetric() for k in self.MEANS})
        self.sums = nn.ModuleDict({k: SumMetric() for k in self.SUMS})
        self.seconds = CatMetric()
        self.step_drawdown = CatMetric()  # one value per step with labelled locality inputs: the stderr's units

    def update_step(self, s: Mapping[str, Tensor], seconds: float, params_changed: int, rolled_back: bool = False) -> None:
        """Fold in one edit step's :func:`score_step` output, its time, its changed-entry count and whether
        the editor gave up on it (:attr:`Editor.last_failure`)."""
        m, c = self.means, self.sums
        n = s["edit_success"].numel()
        for k in self.MEANS[:4]:
            m[k].update(s[k])
        m["locality_agreement"].update(s["agreement"])
        m["locality_base_agreement"].update(s["base_agreement"])
        m["locality_kl"].update(s["kl"])
        lab = s["labelled"]
        pre, post = s["pre_right"][lab], s["post_right"][lab]
        if lab.any():
            m["drawdown"].update(pre.float() - post.float())
            self.step_drawdown.update((pre.float() - post.float()).mean().reshape(1))
            m["locality_accuracy_before"].update(pre.float())
            m["locality_accuracy_after"].update(post.float())
        r2w, w2r = flip_counts(pre, post)
        m["params_changed"].update(float(params_changed))
        for k, v in (("n_edits", n), ("n_steps", 1), ("n_locality_inputs", s["agreement"].numel()),
                     ("n_locality_labelled", int(lab.sum())), ("flips_right_to_wrong", r2w),
                     ("flips_wrong_to_right", w2r), ("n_edits_rolled_back", n if rolled_back else 0)):
            c[k].update(float(v))
        self.seconds.update(torch.tensor([seconds / max(n, 1)]))

    def reset(self) -> None:
        for m in [*self.means.values(), *self.sums.values(), self.seconds, self.step_drawdown]:
            m.reset()

    def compute(self, n_base_params: int) -> dict[str, Any]:
        out: dict[str, Any] = {k: _value(v) for k, v in self.means.items()}
        out.update({k: int(_value(v) or 0) for k, v in self.sums.items()})
        lab = out["n_locality_labelled"]
        for k in ("flips_right_to_wrong", "flips_wrong_to_right"):
            out[f"{k}_share"] = out[k] / lab if lab else None
        steps = self.step_drawdown.compute().flatten() if out["n_locality_labelled"] else torch.empty(0)
        out["drawdown_stderr"] = float(steps.std() / math.sqrt(steps.numel())) if steps.numel() > 1 else None
        secs = self.seconds.compute() if self.sums["n_steps"].compute() > 0 else torch.empty(0)
        out["seconds_per_edit"] = statistics.median(secs.flatten().tolist()) if secs.numel() else None
        out["params_changed_fraction"] = (out["params_changed"] / n_base_params
                                          if out["params_changed"] is not None else None)
        return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- protocols
class EditEvalModule(L.LightningModule):
    """Single-edit evaluation: ``trainer.test(module, datamodule=dm)`` applies every held-out edit of
    the test loader (the split ``dm.eval_split``) alone to the unedited base model and accumulates the metrics with torchmetrics,
    so a data-parallel run (each process its shard of the edits) reports exact totals.

    The loader's ``edit_inner`` rows are the edits; their locality inputs (``loc_per_edit`` per edit,
    the same the loader's ``loc`` rows hold) are scored against the base model's outputs computed once
    per input (:class:`BaseLocality`, ``base_cache_bytes`` its budget); generality uses all paraphrases of
    each record, not only the loader's first. After the run, :attr:`results` holds the metrics.
    """

    def __init__(self, model: nn.Module, editor: Editor, family: Family, chunk: int = 64,
                 kl_samples: int = 4, seed: int = 0, n_train_probe: int = 100,
                 base_cache_bytes: int | None = None) -> None:
        super().__init__()
        self.model, self.editor, self.family, self.chunk = model, editor, family, chunk
        self.kl_samples, self.seed, self.n_train_probe = kl_samples, seed, n_train_probe
        self.base_cache_bytes = base_cache_bytes
        self.metrics = EditMetrics()
        self.results: dict[str, Any] = {}

    def on_test_start(self) -> None:
        dm = self.trainer.datamodule
        self.data = EditData(dm, dm.eval_split, self.device, self.seed, self.n_train_probe)
        self.base = self.data.base_locality(self.model, self.chunk, self.base_cache_bytes)
        self.sampler = (LocalitySampler(self.data.kl_pool(), self.kl_samples, self.seed, self.data)
                        if getattr(self.editor, "uses_locality", False) else None)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        for j, i in enumerate(batch["index"]):
            i = int(i)
            edit = select_rows(batch["edit_inner"], [j])
            reph, owner = self.data.rephrases([i])
            kl = self.sampler(i) if self.sampler else None
            change, secs = compute_edit(self.editor, self.model, edit, self.family, kl)
            s = score_step(self.base, change.apply(self.model), edit, reph, owner, self.data.locality_inputs([i]),
                           self.chunk)
            self.metrics.update_step(s, secs, change.params_changed(self.model), bool(self.editor.last_failure))

    def on_test_epoch_end(self) -> None:
        self.results = {**self.metrics.compute(n_params(self.model)), "edits_per_step": 1}
        self.metrics.reset()


def run_batch(editor: Editor, model: nn.Module, data: EditData, ids: Sequence[int], k: int, *,
              sampler: LocalitySampler | None = None, chunk: int = 64, progress: bool = True,
              base: BaseLocality | None = None) -> dict[str, Any]:
    """Apply the edits ``ids`` K at a time (each group to the unedited model) and score all K; each
    group's locality inputs are scored once (:meth:`EditData.locality_inputs`).

    ``len(ids) // k`` groups; the remainder is left out and reported as ``n_edits_left_out``. ``base``
    (default: a new one) holds the unedited model's locality outputs; pass one to share it between runs.
    """
    fam = data.family
    base = base or data.base_locality(model, chunk)
    groups = [list(ids[i:i + k]) for i in range(0, len(ids) - k + 1, k)]
    metrics = EditMetrics()
    for g in tqdm(groups, desc=f"batch K={k}", disable=not progress, leave=False):
        edits = data.edits(g)
        reph, owner = data.rephrases(g)
        change, secs = compute_edit(editor, model, edits, fam, sampler(g[0]) if sampler else None)
        s = score_step(base, change.apply(model), edits, reph, owner, data.locality_inputs(g), chunk)
        metrics.update_step(s, secs, change.params_changed(model), bool(editor.last_failure))
    return {**metrics.compute(n_params(model)), "edits_per_step": k, "n_edits_left_out": len(ids) - len(groups) * k}


@torch.no_grad()
def count_differing(edited: nn.Module, original: nn.Module) -> int:
    """Scalar weights of ``edited`` that differ from ``original``'s: changed entries of the parameters
    they share (by name) plus every entry of the parameters only ``edited`` has (added neurons)."""
    orig = dict(original.named_parameters())
    n = 0
    for name, p in edited.named_parameters():
        q = orig.get(name)
        n += int((p != q).sum()) if q is not None and q.shape == p.shape else p.numel()
    return n


@torch.no_grad()
def _accuracy(model: nn.Module, batch: Mapping[str, Tensor] | None, family: Family, chunk: int) -> float | None:
    if batch is None:
        return None
    em, _ = answer_scores(model, batch, family, chunk)
    return float(em[labelled(batch["labels"], family)].mean())


def run_sequential(editor: Editor, original: nn.Module, data: EditData, ids: Sequence[int], *,
                   edits_per_step: int = 1, folds: int = 1, only_when_wrong: bool = False, n_test_probe: int = 1000,
                   sampler: LocalitySampler | None = None, chunk: int = 64, progress: bool = True,
                   state_dir: str | Path | None = None, save_every: int = 100,
                   base: BaseLocality | None = None,
                   save_model: Callable[[nn.Module, int], Any] | None = None) -> dict[str, Any]:
    """Stream the edits ``ids`` into a working copy of ``original``, ``edits_per_step`` per step.

    The edits are split into ``folds`` equal streams (the remainder is left out), each starting from
    a fresh copy of the original. Each step's edits (only those the current model gets wrong, with
    ``only_when_wrong``) are merged, then its edits and their paraphrases are scored (SR, GR). At
    each checkpoint all earlier edits are re-scored (ER), and held-in training data (TrainR), a
    held-out locality probe (TestR, and TestR against the original's own answers) and locality against
    the original are measured. SR, GR and ER count the edits made: items skipped under
    ``only_when_wrong`` are left out and counted (``n_edits_skipped``). ``base`` (default: a new one)
    holds the original's outputs on the probe.

    With ``state_dir``, the stream's state (working model via the editor's ``save_working``, scores
    and curves so far) is saved there every ``save_every`` edits, and a call with the same arguments
    continues from the last saved state instead of from edit 0 (an interrupted 1,000-edit stream
    resumes at its last save). Its results equal an unbroken run's, timings aside.

    ``save_model(work, fold)`` is called with each stream's final working model.
    """
    fam = data.family
    fold_len = len(ids) // folds
    if fold_len < 1:
        raise ValueError(f"{len(ids)} edits cannot fill {folds} folds")
    base = base or data.base_locality(original, chunk)
    train, test = data.train_probe(), data.test_probe_inputs(n_test_probe)
    probe = base.rows(test)
    test_labelled = [r["right"] for r in probe if r["labelled"]]
    init_train = _accuracy(original, train, fam, chunk)
    init_test = float(torch.stack(test_labelled).float().mean()) if test_labelled else None
    total = n_params(original)
    curves: list[dict[str, list]] = []
    after: dict[str, list[Tensor]] = {"es": [], "es_tok": [], "gs": [], "gs_tok": [], "made": []}
    seconds: list[float] = []
    applied = rolled_back = 0
    stream_key = {"ids": list(ids), "edits_per_step": edits_per_step, "folds": folds, "only_when_wrong": only_when_wrong,
           "editor": editor.config}
    saved = _load_stream(Path(state_dir), stream_key, editor, original) if state_dir else None
    bar = tqdm(total=fold_len * folds, desc="sequential", disable=not progress, leave=False)
    for f in range(folds):
        if saved and f < saved["fold"]:
            continue
        stream = list(ids[f * fold_len:(f + 1) * fold_len])
        work = copy.deepcopy(original)  # the original stays untouched: every comparison is against it
        marks = stream_checkpoints(fold_len)
        curve: dict[str, list] = {k: [] for k in ("checkpoints", "sr", "gr", "er", "train_r", "test_r",
                                                   "test_r_base", "locality_agreement", "locality_kl", "drawdown",
                                                   "flips_right_to_wrong", "flips_wrong_to_right",
                                                   "n_locality_labelled", "params_changed")}
        fold_es: list[Tensor] = []
        fold_gs: list[Tensor] = []
        fold_made: list[Tensor] = []  # per item: edited (not skipped under only_when_wrong)
        first = 0
        if saved:  # continue the saved stream where it stopped
            work, first, marks, curve = saved["work"], saved["start"], saved["marks"], saved["curve"]
            curves, after, seconds, applied = saved["curves"], saved["after"], saved["seconds"], saved["applied"]
            rolled_back = saved["rolled_back"]
            fold_es, fold_gs, fold_made = saved["fold_es"], saved["fold_gs"], saved["fold_made"]
            bar.update(f * fold_len + first)
            saved = None
        for start in range(first, fold_len, edits_per_step):
            group = stream[start:start + edits_per_step]
            edits = data.edits(group)
            todo = group
            if only_when_wrong:
                right, _ = answer_scores(work, edits, fam, chunk)
                todo = [i for i, r in zip(group, right.tolist()) if not r]
            if todo:
                change, secs = compute_edit(editor, work, data.edits(todo), fam, sampler(todo[0]) if sampler else None)
                t0 = time.perf_counter()
                work = change.merge_(work)
                seconds.append((secs + time.perf_counter() - t0) / len(todo))
                applied += len(todo)
                rolled_back += len(todo) if editor.last_failure else 0
            es, es_tok = answer_scores(work, edits, fam, chunk)
            reph, owner = data.rephrases(group)
            gs, gs_tok = answer_scores(work, reph, fam, chunk)
            gs, gs_tok = owner_mean(gs, owner, len(group)), owner_mean(gs_tok, owner, len(group))
            made = torch.tensor([i in todo for i in group], device=es.device)
            for key, v in (("es", es), ("es_tok", es_tok), ("gs", gs), ("gs_tok", gs_tok), ("made", made)):
                after[key].append(v)
            fold_es.append(es)
            fold_gs.append(gs)
            fold_made.append(made)
            done = start + len(group)
            bar.update(len(group))
            if marks and done >= marks[0]:
                while marks and done >= marks[0]:
                    marks.pop(0)
                was_made = torch.cat(fold_made)
                er, _ = answer_scores(work, data.edits(stream[:done]), fam, chunk)
                loc = locality_scores(base, work, test, chunk)
                lab = loc["labelled"]
                r2w, w2r = flip_counts(loc["pre_right"][lab], loc["post_right"][lab])
                acc_train = _accuracy(work, train, fam, chunk)
                point = {"checkpoints": done, "sr": _masked_mean(torch.cat(fold_es), was_made),
                         "gr": _masked_mean(torch.cat(fold_gs), was_made), "er": _masked_mean(er, was_made),
                         "train_r": retention(acc_train, init_train) if train is not None else None,
                         "test_r": retention(float(loc["post_right"][lab].float().mean()), init_test)
                         if init_test is not None else None,
                         "test_r_base": float(loc["base_agreement"].mean()),
                         "locality_agreement": float(loc["agreement"].mean()), "locality_kl": float(loc["kl"].mean()),
                         "drawdown": drawdown(loc["pre_right"][lab], loc["post_right"][lab]),
                         "flips_right_to_wrong": r2w, "flips_wrong_to_right": w2r,
                         "n_locality_labelled": int(lab.sum()), "params_changed": count_differing(work, original)}
                for name, v in point.items():
                    curve[name].append(v)
            if state_dir and (done // save_every > start // save_every) and done < fold_len:
                _save_stream(Path(state_dir), stream_key, editor, work, original, {
                    "fold": f, "start": done, "marks": marks, "curve": curve, "curves": curves, "after": after,
                    "seconds": seconds, "applied": applied, "rolled_back": rolled_back, "fold_es": fold_es, "fold_gs": fold_gs,
                    "fold_made": fold_made})
        curves.append(curve)
        if save_model is not None:
            save_model(work, f)
        del work
    bar.close()
    return _sequential_summary(curves, after, seconds, applied, total, init_train, init_test,
                               edits_per_step=edits_per_step, folds=folds, only_when_wrong=only_when_wrong,
                               n_edits=fold_len * folds, n_edits_left_out=len(ids) - fold_len * folds,
                               n_edits_rolled_back=rolled_back)


def _save_stream(state_dir: Path, key: dict, editor: Editor, work: nn.Module, original: nn.Module,
                 state: dict[str, Any]) -> None:
    """The working model first (under a name of its own), then the JSON that points at it, written last
    and atomically: a kill at any moment leaves a consistent earlier state or the new one."""
    name = f"work-{state['fold']}-{state['start']}.safetensors"
    editor.save_working(state_dir / name, work, original)
    plain = {**state, "after": {k: [t.tolist() for t in v] for k, v in state["after"].items()},
             **{k: [t.tolist() for t in state[k]] for k in ("fold_es", "fold_gs", "fold_made")}}
    write_text(state_dir / "stream.json", json.dumps({"key": key, "work": name, **plain}))
    for old in state_dir.glob("work-*.safetensors"):
        if old.name != name:
            old.unlink()


def _load_stream(state_dir: Path, key: dict, editor: Editor, original: nn.Module) -> dict[str, Any] | None:
    path = state_dir / "stream.json"
    if not path.exists():
        return None
    blob = json.loads(path.read_text())
    if blob["key"] != json.loads(json.dumps(key)):
        raise ValueError(f"{path} holds the state of another stream (other edits, editor or settings): "
                         "use another state directory or delete this one")
    dev = next(original.parameters()).device
    t = lambda xs: [torch.tensor(x, device=dev) for x in xs]
    return {**blob, "work": editor.load_working(state_dir / blob["work"], original),
            "after": {k: t(v) for k, v in blob["after"].items()},
            **{k: t(blob[k]) for k in ("fold_es", "fold_gs", "fold_made")}}


def _masked_mean(values: Tensor, mask: Tensor) -> float | None:
    """Mean of ``values`` where ``mask`` holds; None where it holds nowhere."""
    return float(values[mask].float().mean()) if mask.any() else None


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sequential_summary(curves: list[dict[str, list]], after: dict[str, list[Tensor]], seconds: list[float],
                        applied: int, total: int, init_train: float | None, init_test: float | None,
                        **info: Any) -> dict[str, Any]:
    """Fold curves averaged point by point; scalars: right-after-edit means and end-of-stream values."""
    keys = [k for k in curves[0] if k != "checkpoints"]
    mean_curve = {k: [_mean([c[k][p] for c in curves]) for p in range(len(curves[0][k]))] for k in keys}
    end = {k: v[-1] for k, v in mean_curve.items()}
    counts = {k: sum(c[k][-1] for c in curves)
              for k in ("flips_right_to_wrong", "flips_wrong_to_right", "n_locality_labelled")}
    lab = counts["n_locality_labelled"]
    made = torch.cat(after["made"])
    cat = {k: _masked_mean(torch.cat(v), made) for k, v in after.items() if k != "made"}
    out = {"edit_success": cat["es"], "edit_success_token_acc": cat["es_tok"], "generality": cat["gs"],
           "generality_token_acc": cat["gs_tok"], "locality_agreement": end["locality_agreement"],
           "locality_base_agreement": end["test_r_base"], "locality_kl": end["locality_kl"],
           "drawdown": end["drawdown"], **counts,
           "flips_right_to_wrong_share": counts["flips_right_to_wrong"] / lab if lab else None,
           "flips_wrong_to_right_share": counts["flips_wrong_to_right"] / lab if lab else None,
           "seconds_per_edit": statistics.median(seconds) if seconds else None,
           "params_changed": end["params_changed"], "params_changed_fraction": end["params_changed"] / total,
           "edit_retention": end["er"], "train_retention": end["train_r"], "test_retention": end["test_r"],
           "test_retention_base": end["test_r_base"],
           "initial_train_accuracy": init_train, "initial_test_accuracy": init_test,
           "n_edits_applied": applied, "n_edits_skipped": int((~made).sum()), "checkpoints": curves[0]["checkpoints"],
           **{k: mean_curve[k] for k in ("sr", "gr", "er", "train_r", "test_r", "test_r_base")},
           **{f"{k}_curve": mean_curve[k] for k in ("locality_agreement", "locality_kl", "drawdown", "params_changed")}}
    out.update(info)
    return out
