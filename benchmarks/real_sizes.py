"""Sizes of the shipped real-model MEND configs, from the published architecture dimensions (no
downloads): ``python benchmarks/real_sizes.py`` prints the table in docs/real_models.md.

Each base is built on the ``meta`` device (shapes only, no memory) from its Hugging Face config
class with the published dimensions; the edited matrices are the config's ``edit_params`` or the
family default (``editors.layers.select_layers``) and the editor is ``MEND.for_model`` with the
config's rank, exactly as ``MENDModule`` builds them. Memory for meta-training is estimated as:

- base weights at 4 bytes (fp32) or 2 (bf16, ``base_dtype: bf16``) per parameter;
- editor: parameters, gradients and Adam's two moments in fp32 (16 bytes per parameter), plus its
  float64 normalisation statistics;
- activations, rough: only layers from the first edited one up record a graph (the base is frozen;
  for encoder-decoders all decoder layers do, through cross-attention). Per such layer and row,
  ``s * h * (34 + 5 * a * s / h)`` bytes (Korthikanti et al. 2022, 16-bit activations, no
  recomputation) with ``s`` the config's max_length, for the edit pass (1 row) and the edited pass
  (paraphrase + locality: 2 rows); the logits of both passes at 14 bytes per entry (bf16 output,
  fp32 copy, log-softmax and gradient); the editor's saved tensors (``x``, then ``z, a, h`` and a
  mask per residual block) in fp32.

Not counted: the CUDA context and allocator slack (typically 1-2 GB), and the unedited model's no-grad
locality logits (one row). ``--no-fingerprint`` skips timing :func:`editors.layers.fingerprint`
on one real 4096 x 16384 fp32 matrix (one GPT-J FFN matrix); the fingerprint column scales that
time by each base's edited scalars.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from editors.layers import fingerprint, select_layers  # noqa: E402
from editors.mend import MEND  # noqa: E402

CONFIGS = ["mend_zsre_gpt2xl", "mend_zsre_gptj", "mend_zsre_llama", "mend_zsre_t5", "mend_zsre_bart_base",
           "mend_fever_bert_base"]


def published(base: str):
    """The published config of a hub base model (dimensions from its config.json)."""
    import transformers as tf

    return {
        "gpt2-xl": lambda: tf.GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257),
        "EleutherAI/gpt-j-6b": lambda: tf.GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64,
                                                     n_positions=2048, vocab_size=50400),
        "meta-llama/Llama-2-7b-hf": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                                           num_hidden_layers=32, num_attention_heads=32,
                                                           num_key_value_heads=32, vocab_size=32000,
                                                           max_position_embeddings=4096),
        "google/t5-xl-lm-adapt": lambda: tf.T5Config(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                                                     num_decoder_layers=24, vocab_size=32128,
                                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        "facebook/bart-base": lambda: tf.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6,
                                                    encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                                                    encoder_attention_heads=12, decoder_attention_heads=12,
                                                    vocab_size=50265, max_position_embeddings=1024),
        "bert-base-uncased": lambda: tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                   intermediate_size=3072, vocab_size=30522,
                                                   max_position_embeddings=512, num_labels=1),
    }[base]()


def dims(cfg) -> tuple[int, int, int, int]:
    """(width, heads, encoder or only layers, decoder layers; 0 when none)."""
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.n_embd
    a = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None) or cfg.n_head
    if cfg.is_encoder_decoder:
        return h, a, getattr(cfg, "encoder_layers", None) or cfg.num_layers, \
            getattr(cfg, "decoder_layers", None) or cfg.num_decoder_layers
    return h, a, cfg.num_hidden_layers, 0


def graph_layers(cfg, names: list[str]) -> int:
    """Layers that record an autograd graph: from the first edited block up (all decoder layers of an
    encoder-decoder, which cross-attend to the edited encoder's output)."""
    _, _, n_enc, n_dec = dims(cfg)
    first_enc = min((int(re.search(r"\.(\d+)\.", n).group(1)) for n in names if "decoder" not in n), default=n_enc)
    if not cfg.is_encoder_decoder:
        return n_enc - first_enc
    return (n_enc - first_enc) + n_dec


def sizes(name: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    cfg_yaml = yaml.safe_load(open(HERE.parent / "configs" / f"{name}.yaml"))
    init, data = cfg_yaml["model"]["init_args"], cfg_yaml["data"]["init_args"]
    cfg = published(init["base_model"])
    auto = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "classifier": AutoModelForSequenceClassification}[init["family"]]
    with torch.device("meta"):
        model = auto.from_config(cfg)
        layers = select_layers(model, init.get("edit_params"))
        editor = MEND(layers, rank=init.get("rank", 1920), n_hidden=init.get("n_hidden", 2))
    base = sum(p.numel() for p in model.parameters())
    edited = sum(l.d_in * l.d_out for l in layers)
    ed_params = sum(p.numel() for p in editor.parameters())
    ed_buffers = sum(b.numel() for b in editor.buffers())  # float64 statistics
    h, a, _, _ = dims(cfg)
    s, vocab = data.get("max_length", 32), cfg.vocab_size
    rows = 1 + 2  # the edit pass, then paraphrase + locality through the edited model
    act = graph_layers(cfg, [l.name for l in layers]) * rows * s * h * (34 + 5 * a * s / h)
    act += rows * s * vocab * 14 if init["family"] != "classifier" else 0
    n_hidden, rank = init.get("n_hidden", 2), init.get("rank", 1920)
    for (d_in, d_out), ix in editor.groups:  # the edit's tokens through g: x, and z, a, h, mask per block
        D = d_in + d_out
        act += len(ix) * s * (4 * D + n_hidden * (4 * D + 4 * min(rank, D) + 4 * D + D))
    editor_bytes = 16 * ed_params + 8 * ed_buffers
    gib = 2 ** 30
    return {"config": name, "base": init["base_model"], "base_params": base, "matrices": len(layers),
            "edited_scalars": edited, "editor_params": ed_params, "fp32": (4 * base + editor_bytes + act) / gib,
            "bf16": (2 * base + editor_bytes + act) / gib, "editor_gib": editor_bytes / gib, "act_gib": act / gib,
            "shapes": sorted({f"{l.d_out}x{l.d_in}" for l in layers})}


def fingerprint_seconds_per_scalar(repeats: int = 3) -> float:
    """:func:`fingerprint` on one real 16384 x 4096 fp32 matrix (a GPT-J FFN matrix), best of ``repeats``."""
    m = nn.Module()
    m.fc = nn.Linear(4096, 16384, bias=False)
    layers = select_layers(m, ["fc.weight"])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fingerprint(m, layers)
        best = min(best, time.perf_counter() - t)
    print(f"fingerprint of one 16384x4096 fp32 matrix: {best:.3f} s (best of {repeats}, {torch.get_num_threads()} threads)")
    return best / m.fc.weight.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-fingerprint", action="store_true", help="skip timing the fingerprint")
    args = ap.parse_args()
    per_scalar = None if args.no_fingerprint else fingerprint_seconds_per_scalar()
    print("| config | base (params) | edited matrices (shapes) | edited scalars | MEND editor params "
          "| editor + Adam | activations | meta-training, fp32 base | bf16 base |" + (" fingerprint |" if per_scalar else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if per_scalar else ""))
    for name in CONFIGS:
        r = sizes(name)
        fp = f" {r['edited_scalars'] * per_scalar:.1f} s |" if per_scalar else ""
        print(f"| {r['config']} | {r['base']} ({r['base_params'] / 1e9:.2f}B) | {r['matrices']} ({', '.join(r['shapes'])}) "
              f"| {r['edited_scalars'] / 1e6:.0f}M | {r['editor_params'] / 1e6:.0f}M | {r['editor_gib']:.1f} GiB "
              f"| {r['act_gib']:.2f} GiB | {r['fp32']:.1f} GiB | {r['bf16']:.1f} GiB |{fp}")


if __name__ == "__main__":
    main()
