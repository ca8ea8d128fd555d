"""Tokenisation of (prompt, target) pairs for the three model families, and batch padding.

Families:
- ``causal`` (GPT-2/GPT-J/LLaMA): ``prompt + " " + target + eos`` in one sequence; labels are the
  token ids on the target tokens and -100 elsewhere (HF convention: the model shifts them).
- ``seq2seq`` (BART/T5): the prompt is the encoder input; labels are ``target + eos``;
  ``decoder_input_ids`` are the labels shifted right behind the decoder start token.
- ``classifier`` (BERT, one logit): the prompt with the tokenizer's special tokens; the label is
  1.0 for SUPPORTS and 0.0 for REFUTES.

Everything is tokenised once when a DataModule is set up; collating only pads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch

Family = Literal["causal", "seq2seq", "classifier"]
FAMILIES = ("causal", "seq2seq", "classifier")
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}


class TargetTooLong(ValueError):
    """A target that does not fit ``max_length`` (it is refused, never cut)."""


def build_word_tokenizer(texts: Sequence[str], out_dir: str | Path):
    """Build (offline) and save a word-level fast tokenizer that covers ``texts``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(name_or_path: str | Path):
    """Any Hugging Face tokenizer by hub name or local directory, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def encode(tokenizer, family: Family, prompts: Sequence[str], targets: Sequence[str | None],
           max_length: int = 64) -> list[dict[str, list]]:
    """Tokenise pairs into per-example dicts (unpadded). A ``None`` target means no labels. Prompts are
    cut to fit ``max_length``; a target that does not fit raises :class:`TargetTooLong`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    eos = tokenizer.eos_token_id
    out = []
    if family == "classifier":
        enc = tokenizer(list(prompts), truncation=True, max_length=max_length)["input_ids"]
        for ids, t in zip(enc, targets):
            out.append({"input_ids": ids, "labels": [float(t == "SUPPORTS") if t is not None else -100.0]})
        return out
    # Only the encoder input is cut here (from the right); a causal prompt is cut below, from the left,
    # so that the words next to the target survive.
    p_ids = tokenizer(list(prompts), add_special_tokens=(family == "seq2seq"), truncation=(family == "seq2seq"),
                      max_length=max_length if family == "seq2seq" else None)["input_ids"]
    t_text = [(" " + t) if t is not None else "" for t in targets]
    t_ids = tokenizer(t_text, add_special_tokens=False)["input_ids"]
    # a causal sequence needs room for one prompt token besides the target
    room = max_length - 1 if family == "causal" else max_length
    for p, t, tgt in zip(p_ids, t_ids, targets):
        t = (t + [eos]) if tgt is not None else []
        if len(t) > room:  # a cut target would silently change what is trained and measured
            raise TargetTooLong(f"target {tgt!r} is {len(t)} tokens with its end-of-sequence token, more than "
                                f"max_length {max_length} allows ({room}); raise max_length or shorten the target")
        if family == "causal":
            p = p[-(max_length - len(t)):]  # truncate the prompt from the left, never the target
            labels = [-100] * len(p) + t if tgt is not None else [-100] * len(p)
            out.append({"input_ids": p + t, "labels": labels})
        else:
            out.append({"input_ids": p, "labels": t})
    return out


def collate(features: Sequence[dict[str, list]], pad_id: int, family: Family,
            decoder_start_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch of tensors."""
    n = len(features)
    L = max(len(f["input_ids"]) for f in features)
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "classifier":
        batch["labels"] = torch.tensor([f["labels"][0] for f in features], dtype=torch.float)
        return batch
    T = max(1, max(len(f["labels"]) for f in features)) if family == "seq2seq" else L
    labels = torch.full((n, T), -100, dtype=torch.long)
    for i, f in enumerate(features):
        labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
    batch["labels"] = labels
    if family == "seq2seq":
        dec = torch.full((n, T), pad_id, dtype=torch.long)
        dec[:, 0] = decoder_start_id
        dec[:, 1:] = labels[:, :-1].clamp_min(0)
        dec[:, 1:][labels[:, :-1] == -100] = pad_id
        batch["decoder_input_ids"] = dec
        batch["decoder_attention_mask"] = (labels != -100).long()
        batch["decoder_attention_mask"][:, 0] = 1
    return batch
