"""Family-aware losses and scores shared by editors, meta-training and evaluation.

Batches come from :mod:`datamodules.encoding`. Every score here states what it counts:

- *exact match* (EM): every target token is the argmax under teacher forcing, the end-of-answer
  token included. For greedy decoding this is the same as "the greedy answer equals the target".
- *token accuracy*: the share of target tokens that are the argmax under teacher forcing.
- classifier: both reduce to label accuracy (logit > 0 means SUPPORTS).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.encoding import Family


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments a Hugging Face model takes: everything but our labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def forward_logits(model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                   params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Logits of ``model`` (or of ``model`` with some weights replaced by ``params``) on ``batch``.

    Classifier logits are squeezed to shape ``[batch]`` (one logit, SUPPORTS > 0).
    """
    kwargs = model_inputs(batch)
    if params is None:
        out = model(**kwargs)
    else:
        out = torch.func.functional_call(model, dict(params), args=(), kwargs=kwargs, strict=False)
    logits = out.logits
    return logits.squeeze(-1) if family == "classifier" else logits


def _aligned(logits: Tensor, labels: Tensor, family: Family) -> tuple[Tensor, Tensor]:
    if family == "causal":  # position t predicts token t+1
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def nll_per_example(logits: Tensor, labels: Tensor, family: Family) -> Tensor:
    """Per example ``[batch]``: the mean negative log-likelihood of its target tokens."""
    if family == "classifier":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    lg, tg = _aligned(logits, labels, family)
    mask = tg != -100
    tok = F.cross_entropy(lg.float().flatten(0, 1), tg.clamp_min(0).flatten(), reduction="none").view_as(tg)
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1)


def nll(logits: Tensor, labels: Tensor, family: Family) -> Tensor:
    """Mean negative log-likelihood of the targets: per example over its target tokens, then over examples."""
    return nll_per_example(logits, labels, family).mean()


def scores(logits: Tensor, labels: Tensor, family: Family) -> tuple[Tensor, Tensor]:
    """Per-example (exact match, token accuracy) as float tensors of shape ``[batch]``."""
    if family == "classifier":
        right = ((logits > 0).float() == labels).float()
        return right, right
    lg, tg = _aligned(logits, labels, family)
    mask = tg != -100
    hit = (lg.argmax(-1) == tg) & mask
    n = mask.sum(1)
    em = (hit.sum(1) == n) & (n > 0)
    return em.float(), hit.sum(1).float() / n.clamp_min(1)


def real_positions(batch: Mapping[str, Tensor], family: Family) -> Tensor:
    """Which output positions carry a real next-token distribution (the KL's positions)."""
    if family == "seq2seq":
        return batch["decoder_attention_mask"].bool()
    return batch["attention_mask"].bool()


def agreement_positions(batch: Mapping[str, Tensor], family: Family) -> Tensor:
    """The output positions top-1 agreement counts: those that predict an answer token (labels != -100),
    as MEND's retain rate; a row without an answer (an unlabelled input) counts all its real positions."""
    labels = batch["labels"]
    answer = labels != -100
    if family == "causal":  # position t predicts token t+1
        answer = torch.cat([answer[:, 1:], torch.zeros_like(answer[:, :1])], 1)
    real = real_positions(batch, family)
    return torch.where(answer.any(1, keepdim=True), answer & real, real)


def kl_tokens(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p || q) per position from log-probabilities over the last dimension."""
    return (lp.exp() * (lp - lq)).sum(-1)


def kl_pre_post(pre: Tensor, post: Tensor, batch: Mapping[str, Tensor], family: Family) -> Tensor:
    """Per-example KL(pre || post), averaged over the example's real positions; shape ``[batch]``."""
    if family == "classifier":
        p = torch.sigmoid(pre.float())
        lp, lq = F.logsigmoid(pre.float()), F.logsigmoid(post.float())
        lp1, lq1 = F.logsigmoid(-pre.float()), F.logsigmoid(-post.float())
        return p * (lp - lq) + (1 - p) * (lp1 - lq1)
    mask = real_positions(batch, family)
    kl = kl_tokens(F.log_softmax(pre.float(), -1), F.log_softmax(post.float(), -1))
    return (kl * mask).sum(1) / mask.sum(1).clamp_min(1)


def top1_agreement(pre: Tensor, post: Tensor, batch: Mapping[str, Tensor], family: Family) -> Tensor:
    """Per-example share of :func:`agreement_positions` where the edited model's argmax equals the original's."""
    if family == "classifier":
        return ((pre > 0) == (post > 0)).float()
    mask = agreement_positions(batch, family)
    same = (pre.argmax(-1) == post.argmax(-1)) & mask
    return same.sum(1).float() / mask.sum(1).clamp_min(1)
