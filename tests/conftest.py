"""Shared fixtures: a very small world, its tokenizer and tiny models (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """The environment of entry points run as child processes (the DDP tests): this checkout
    importable, one intra-op thread per process (two processes share the 2 CPU cores)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    from datamodules.world import WorldConfig
    from lightning_modules.cli import ensure_world

    return ensure_world(tmp_path_factory.mktemp("world"), WorldConfig(n_subjects=40, seed=1))


@pytest.fixture(scope="session")
def tokenizer(small_world):
    from datamodules.encoding import load_tokenizer

    return load_tokenizer(small_world / "tokenizer")


@pytest.fixture
def tiny_models(tokenizer):
    """One tiny model per family, random weights, dropout off."""
    from lightning_modules.models import build_tiny

    torch.manual_seed(0)
    small = {"tiny-gpt2": dict(n_layer=3, n_embd=32, n_head=2),
             "tiny-bart": dict(encoder_layers=2, decoder_layers=2, d_model=32, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2),
             "tiny-bert": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64)}
    fam = {"tiny-gpt2": "causal", "tiny-bart": "seq2seq", "tiny-bert": "classifier"}
    return {fam[k]: build_tiny(k, tokenizer, v).eval() for k, v in small.items()}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine (the editor tests' modules)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
