"""Build or load the transformer that editors edit: a tiny model from a config, or any checkpoint.

``name_or_path`` may be a local directory written by ``save_pretrained`` (ours or anyone's), a
Hugging Face hub name (``gpt2``, ``facebook/bart-base``, ``bert-base-uncased`` ...) for users
who have the weights, or ``tiny-gpt2`` / ``tiny-bart`` / ``tiny-bert`` to build a small randomly
initialised model from a config (no download), sized by ``tiny_config``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from datamodules.encoding import Family

BaseDtype = Literal["bf16", "fp16", "fp32"]
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": dict(n_layer=4, n_embd=128, n_head=4, n_positions=128),
    "tiny-bart": dict(encoder_layers=2, decoder_layers=2, d_model=128, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, max_position_embeddings=128),
    "tiny-bert": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                      max_position_embeddings=128),
}


def _auto_class(family: Family):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "classifier": AutoModelForSequenceClassification}[family]


def build_tiny(name: str, tokenizer, overrides: dict[str, Any] | None = None) -> nn.Module:
    """A small randomly initialised model of the named kind, with the tokenizer's vocabulary."""
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig,
                              BertForSequenceClassification, GPT2Config, GPT2LMHeadModel)

    if name not in TINY_DEFAULTS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_DEFAULTS)}")
    kw = {**TINY_DEFAULTS[name], **(overrides or {})}
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if name == "tiny-gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **ids, **kw))
    if name == "tiny-bart":
        cfg = BartConfig(vocab_size=len(tokenizer), decoder_start_token_id=tokenizer.bos_token_id,
                         forced_eos_token_id=tokenizer.eos_token_id, **ids, **kw)
        return BartForConditionalGeneration(cfg)
    return BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), num_labels=1,
                                                    pad_token_id=tokenizer.pad_token_id, **kw))


def load_model(name_or_path: str | Path, family: Family, base_dtype: BaseDtype | None = None) -> nn.Module:
    """Load a pretrained model (local dir or hub name) with the head for ``family``, in ``base_dtype``
    (a 7B base in bf16 takes half the memory of fp32) or, when None, in the loader's default dtype
    (transformers 5: as saved; 4.x: fp32)."""
    kw: dict[str, Any] = {"num_labels": 1} if family == "classifier" else {}
    if base_dtype is not None:
        if base_dtype not in DTYPES:
            raise ValueError(f"base_dtype must be one of {sorted(DTYPES)} or None, got {base_dtype!r}")
        kw["torch_dtype"] = DTYPES[base_dtype]  # the name transformers 4.44+ and 5 both accept
    return _auto_class(family).from_pretrained(str(name_or_path), **kw)


def decoder_start_id(model: nn.Module) -> int | None:
    """The token a seq2seq decoder starts from (None for other families)."""
    cfg = model.config
    return getattr(cfg, "decoder_start_token_id", None) if cfg.is_encoder_decoder else None
