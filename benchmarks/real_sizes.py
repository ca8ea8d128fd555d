"""Sizes of the shipped real-model MEND configs, and every editor's memory per edit at GPT-2 XL, GPT-J
and LLaMA-2 7B sizes, from the published architecture dimensions (no downloads):
``python benchmarks/real_sizes.py`` prints the tables in docs/real_models.md.

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

A second table estimates every editor's memory for one edit beyond the base weights, at GPT-2 XL,
GPT-J 6B and LLaMA-2 7B sizes with a bf16 base (``b = 2`` bytes per weight; the editors' own tensors
fp32). ``N``: the candidate (edited) scalars; ``s = 32`` tokens; ``act(r)``: the graph of ``r`` inputs,
as above; ``P`` / ``B``: an editor's parameters (fp32) / float64 buffers, counted on ``meta``; ``c_X``:
peak bytes per candidate scalar allocated during one edit of ``X``, measured on a small random GPT-2
in bf16 (:func:`per_candidate_bytes`; printed):

- MEND: ``4P + 8B + c N + act(1)`` (``c N``: the dense fp32 change and its transients);
- RLEdit: the same networks, with the input preconditioner of its config (``precondition_ridge 1``:
  two float64 ``d_in x d_in`` buffers per layer in ``B``);
- MALMEN at K edits: ``4P + 8B + min(K, 128) s sum(d_in + d_out) b`` (the edit tokens' pieces of two
  ``edit_chunk``s of 64: by default they are recomputed per pass, not cached for all K edits)
  ``+ sum 8 (d_in^2 + d_in d_out) + 12 max d_in^2`` (fp32 normal equations, Cholesky factors and
  solutions, the largest system's temporaries) ``+ act(min(K, 64))`` (``edit_chunk``);
- FT / FT+KL: ``c N + act(1)`` / ``act(1 + 4)``: per step the change, its gradient and Adam's two moments
  (fp32), the edited weights and their gradient (``(16 + 2b) N``);
- surgery: ``c N + act(1)``: per step the flat change and its gradient (fp32), the edited weights and
  their gradient, however few entries are tuned (``(8 + 2b) N``); ``dynamic`` adds its mask, ``l1``
  Adam's moments and scale;
- selector: ``4P + c N + act(1)``: the candidates' gradient, scores and mask (fp32);
- Transformer-Patcher: ``b * 40,000 * s * d_model`` (the memory's queries, at most one per token, in
  the layer input's dtype, on the device) ``+ act(1)``.

Times are counted in *passes*: a forward of the edit input and a backward down to the first edited
block, the core of one step of every gradient-based editor here; the counts are the step caps of
the defaults. ``--measure`` times one edit of each on a random GPT-2 XL in fp32 on the CPU (steps capped
at 1), with its peak allocation, beside one pass.
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
from editors.ft import FineTune  # noqa: E402
from editors.malmen import MALMEN  # noqa: E402
from editors.mend import MEND  # noqa: E402
from editors.patcher import Patcher  # noqa: E402
from editors.rledit import RLEdit  # noqa: E402
from editors.selector import Selector  # noqa: E402
from editors.surgery import Surgery  # noqa: E402

BASES = {"mend_zsre_gpt2xl": "GPT-2 XL", "mend_zsre_gptj": "GPT-J 6B", "mend_zsre_llama": "LLaMA-2 7B"}
K_MALMEN = (1, 1000)  # MALMEN's edits at once
PATCHER_MEMORY = 40000  # eval.py's Transformer-Patcher memory (training inputs)
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


def load(name: str) -> tuple[dict, dict, object, nn.Module, list]:
    """A config's model and data arguments, its base's published config, the base on ``meta`` and its edited layers."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    cfg_yaml = yaml.safe_load(open(HERE.parent / "configs" / f"{name}.yaml"))
    init, data = cfg_yaml["model"]["init_args"], cfg_yaml["data"]["init_args"]
    cfg = published(init["base_model"])
    auto = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "classifier": AutoModelForSequenceClassification}[init["family"]]
    with torch.device("meta"):
        model = auto.from_config(cfg)
    return init, data, cfg, model, select_layers(model, init.get("edit_params"))


def activations(cfg, layers: list, rows: int, s: int, family: str) -> float:
    """Bytes of the base's autograd graph for ``rows`` inputs of ``s`` tokens (see the module docstring)."""
    h, a, _, _ = dims(cfg)
    act = graph_layers(cfg, [l.name for l in layers]) * rows * s * h * (34 + 5 * a * s / h)
    return act + (rows * s * cfg.vocab_size * 14 if family != "classifier" else 0)


def sizes(name: str) -> dict:
    init, data, cfg, model, layers = load(name)
    with torch.device("meta"):
        editor = MEND(layers, rank=init.get("rank", 1920), n_hidden=init.get("n_hidden", 2))
    base = sum(p.numel() for p in model.parameters())
    edited = sum(l.d_in * l.d_out for l in layers)
    ed_params = sum(p.numel() for p in editor.parameters())
    ed_buffers = sum(b.numel() for b in editor.buffers())  # float64 statistics
    s = data.get("max_length", 32)
    # the edit pass, then paraphrase + locality through the edited model
    act = activations(cfg, layers, 1 + 2, s, init["family"])
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


def per_candidate_bytes(dtype: torch.dtype) -> dict[str, float]:
    """Peak bytes allocated during one edit (torch profiler) per candidate scalar, for the editors whose
    working memory grows with the candidate matrices, on a random 4-block GPT-2 of width 512 in ``dtype``
    (6.3 M candidates, beside which its other tensors are small); lr 1e-12, so every step runs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.run import make_batch, peak_alloc

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=512, n_head=4, vocab_size=500, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval().to(dtype)
    layers, batch = select_layers(model), make_batch(500, 1, 0)
    n = sum(l.d_in * l.d_out for l in layers)
    editors = {"mend": MEND(layers), "ft": FineTune(layers, lr=1e-12, max_steps=2), "selector": Selector(layers),
               **{f"surgery_{m}": Surgery(layers, method=m, lr=1e-12, dense_lr=1e-12, max_steps=2, l1_steps=2,
                                          shrink_every=1) for m in ("grad", "dynamic", "l1")}}
    return {k: peak_alloc(lambda e=e: e.deltas(model, batch, "causal")) / n for k, e in editors.items()}


def editor_rows(name: str, per_n: dict[str, float], b: int) -> dict[str, tuple[float, str]]:
    """Per editor: bytes for one edit beyond the base weights (base at ``b`` bytes per weight) and the
    passes per edit, both estimated (the module docstring's formulas)."""
    init, data, cfg, model, layers = load(name)
    s, fam, h = data.get("max_length", 32), init["family"], dims(cfg)[0]
    n = sum(l.d_in * l.d_out for l in layers)
    rank = init.get("rank", 1920)
    with torch.device("meta"):
        nets = {"mend": MEND(layers, rank=rank), "malmen": MALMEN(layers, rank=rank),
                "rledit": RLEdit(layers, rank=rank, precondition_ridge=1.0)}
    nets["selector"] = Selector(layers)  # small, and it reads its sizes back from a tensor (not on meta)
    state = {k: 4 * sum(p.numel() for p in e.parameters()) + 8 * sum(x.numel() for x in e.buffers())
             for k, e in nets.items()}
    act = lambda rows: activations(cfg, layers, rows, s, fam)  # noqa: E731
    solve = sum(8 * (l.d_in ** 2 + l.d_in * l.d_out) for l in layers) + 12 * max(l.d_in ** 2 for l in layers)
    pieces = s * sum(l.d_in + l.d_out for l in layers) * b  # per edit
    shrinks = len(Surgery(layers, n_params=1000).shrink_schedule)
    return {
        "mend": (state["mend"] + per_n["mend"] * n + act(1), "1 + networks"),
        "rledit (precondition_ridge 1)": (state["rledit"] + per_n["mend"] * n + act(1), "1 + networks"),
        **{f"malmen, K={k}": (state["malmen"] + min(k, 128) * pieces + solve + act(min(k, 64)),
                              f"{k} + {len(layers)} Cholesky solves") for k in K_MALMEN},
        "ft": (per_n["ft"] * n + act(1), "<= 25"),
        "ft_kl (4 locality inputs)": (per_n["ft"] * n + act(1 + 4), "<= 25 (of 1 + 4 inputs)"),
        "surgery_grad": (per_n["surgery_grad"] * n + act(1), "1 + <= 50"),
        "surgery_dynamic": (per_n["surgery_dynamic"] * n + act(1), f"<= {3 * shrinks} + 50, {shrinks} cuts"),
        "surgery_l1": (per_n["surgery_l1"] * n + act(1), "1 + <= 25 + 50"),
        "selector": (state["selector"] + per_n["selector"] * n + act(1), "1 + scores"),
        "patcher (memory 40,000 inputs)": (b * PATCHER_MEMORY * s * h + act(1), "<= 100 forwards + key fit"),
    }


def measure(reps: int = 2) -> None:
    """``--measure``: one edit of each editor on a random-weight GPT-2 XL in fp32 on the CPU (steps capped at
    1), its peak allocation (a first, profiled call) and its time (median of ``reps`` calls, round-robin),
    beside one pass (MEND's gradient pieces) on the same 32-token input. (A full forward+backward with every
    weight trainable would add 6 GiB of gradients to the 6 GiB base: too much beside other jobs.)"""
    from benchmarks.device_check import MODELS, build
    from benchmarks.run import FAM, make_batch, peak_alloc, round_robin, trained_looking
    from editors.surgery import top_abs

    model = build(*MODELS["gpt2_xl"], torch.device("cpu"), torch.float32)
    layers, vocab = select_layers(model), model.config.vocab_size
    answer = make_batch(vocab, 1, 60, target=2)  # a 2-token answer the random model gets wrong
    n = sum(l.d_in * l.d_out for l in layers)
    flat, mend = torch.randn(n), trained_looking(MEND(layers))
    eds = {"mend": mend, "malmen, K=1": trained_looking(MALMEN(layers)),
           "ft, 1 step": FineTune(layers, lr=1e-12, max_steps=1), "selector": Selector(layers),
           "surgery_grad, 1 tuning step": Surgery(layers, method="grad", lr=1e-12, max_steps=1),
           "patcher, 1 step, memory of 4 inputs": Patcher(model, memory=make_batch(vocab, 4, 61), max_steps=1)}
    ops = {"pass": lambda: mend.pieces(model, answer, FAM),
           **{k: torch.no_grad()(lambda e=e: e.make_edit(model, answer, FAM)) for k, e in eds.items()},
           "a dynamic-surgery cut (N/2 of N)": lambda: top_abs(flat, n // 2, torch.ones(n, dtype=torch.bool), True)}
    peaks = {k: peak_alloc(f) for k, f in ops.items()}
    t = round_robin(ops, reps, 0)
    print(f"\nGPT-2 XL, fp32, {torch.get_num_threads()} CPU threads, {n / 1e6:.0f} M candidates:\n")
    print("| op | seconds | x pass | peak allocated during it |\n|---|---|---|---|")
    for k in ops:
        print(f"| {k} | {t[k]:.1f} | {t[k] / t['pass']:.2f} | {peaks[k] / 2 ** 30:.2f} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-fingerprint", action="store_true", help="skip timing the fingerprint")
    ap.add_argument("--measure", action="store_true", help="also time each editor on a random GPT-2 XL "
                    "(fp32, CPU: about 6 minutes and 8 GB)")
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
    per_n = per_candidate_bytes(torch.bfloat16)
    print("\nbytes per candidate scalar, measured (bf16 base): " + ", ".join(f"{k} {v:.1f}" for k, v in per_n.items()))
    rows = {name: editor_rows(name, per_n, 2) for name in BASES}
    print("\n| editor (one edit, bf16 base) | " + " | ".join(BASES.values()) + " | passes per edit |")
    print("|---|" + "---|" * (len(BASES) + 1))
    for ed in rows["mend_zsre_gpt2xl"]:
        when = dict.fromkeys(rows[n][ed][1] for n in BASES)  # one entry unless it depends on the base
        print(f"| {ed} | " + " | ".join(f"{rows[n][ed][0] / 2 ** 30:.1f} GiB est." for n in BASES)
              + f" | {' / '.join(when)} est. |")
    if args.measure:
        measure()


if __name__ == "__main__":
    main()
