"""A patched model as a plain Hugging Face model: :func:`widen_ffn` writes each Transformer-Patcher
patch (:mod:`editors.patcher`) into its FFN as extra neurons, so the result has the base's class,
a wider FFN in its config, no hooks, and round-trips through ``save_pretrained`` /
``from_pretrained`` without hypedit. :func:`plain_model` is what a stream's working model of any
editor becomes for that (``eval.py --save_model``).

Plain torch and transformers: no Lightning here.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import Tensor, nn

from editors.patcher import PATCH_ATTR, FFNPatch, _is_conv1d, _layout, installed_patches

# model type -> [(full-match regex of the FFN containers that share one config width, that width's config field)]
_WIDTH_RULES: dict[str, list[tuple[str, str]]] = {
    "gpt2": [(r"(?:.*\.)?h\.\d+\.mlp", "n_inner")],
    "gptj": [(r"(?:.*\.)?h\.\d+\.mlp", "n_inner")],
    "gpt_neox": [(r"(?:.*\.)?layers\.\d+\.mlp", "intermediate_size")],
    "bert": [(r"(?:.*\.)?encoder\.layer\.\d+", "intermediate_size")],
    "roberta": [(r"(?:.*\.)?encoder\.layer\.\d+", "intermediate_size")],
    "bart": [(r"(?:.*\.)?encoder\.layers\.\d+", "encoder_ffn_dim"),
             (r"(?:.*\.)?decoder\.layers\.\d+", "decoder_ffn_dim")],
    "t5": [(r"(?:.*\.)?(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense", "d_ff")],  # one d_ff for both
    "llama": [(r"(?:.*\.)?layers\.\d+\.mlp", "intermediate_size")],
}


@torch.no_grad()
def widen_ffn(model: nn.Module) -> nn.Module:
    """A plain Hugging Face model (same class, wider FFN in its config) equal to the patched ``model``.

    Each patch's neurons are appended to its FFN; every other FFN sharing that config width gets
    zero neurons (key, bias and value 0: ``act(0) * 0 = 0``), so ``save_pretrained`` /
    ``from_pretrained`` work unchanged. Supported: GPT-2 and GPT-J (``n_inner``), GPT-NeoX, BERT and
    RoBERTa (``intermediate_size``), BART (``encoder_ffn_dim`` / ``decoder_ffn_dim``), T5 (``d_ff``)
    and LLaMA. A LLaMA patch neuron ``act(x k + b) v`` is written in the gated form
    ``act(gate x) * (up x)`` exactly: gate row ``k`` with bias ``b``, up row 0 with bias 1; so the
    wider LLaMA has ``mlp_bias=True`` (zero biases for every original neuron and for ``down_proj``).
    T5's FFN has no biases: only the original T5's (``wi`` / ``wo``) takes patches, and only patches
    of bias 0 (``Patcher(train_bias=False)``); T5 v1.1's gated FFN takes none. Refused otherwise.
    """
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in _WIDTH_RULES:
        raise NotImplementedError(f"widening is implemented for {sorted(_WIDTH_RULES)}, not {mtype!r}; "
                                  f"use the patched model or save_patches instead")
    patches = installed_patches(model)
    new_cfg = copy.deepcopy(cfg)
    state = {k: v for k, v in model.state_dict().items() if f".{PATCH_ATTR}." not in f".{k}"}
    covered: set[str] = set()
    gated = False
    for rx, field in _WIDTH_RULES[mtype]:
        members = [n for n, m in model.named_modules() if re.fullmatch(rx, n) and _layout(m) is not None]
        if not members:
            continue
        covered.update(members)
        extra = max((patches[n].n_neurons for n in members if n in patches), default=0)
        if extra == 0:
            continue
        widths = set()
        for name in members:
            container = model.get_submodule(name)
            inp, out, up = _layout(container)  # type: ignore[misc]
            gated |= up is not None
            widths.add(_widen_one(state, name, container, inp, out, up, patches.get(name), extra))
        if len(widths) != 1:
            raise ValueError(f"FFNs matching {rx} have different widths {sorted(widths)}; cannot widen via {field}")
        setattr(new_cfg, field, widths.pop() + extra)
    stray = set(patches) - covered
    if stray:
        raise NotImplementedError(f"patches at {sorted(stray)} are not in an FFN group that {mtype} configures")
    if gated:
        if not hasattr(new_cfg, "mlp_bias"):
            raise NotImplementedError(f"cannot widen {type(model).__name__}: its gated FFN has no biases (no mlp_bias "
                                      f"option), and a patch neuron act(x k + b) v has no exact form act(gate x) * "
                                      f"(up x) without them; use the patched model or save_patches instead")
        new_cfg.mlp_bias = True
    ref = next(model.parameters())
    wide = type(model)(new_cfg).to(device=ref.device, dtype=ref.dtype)  # before loading: no round trip through float32
    missing, unexpected = wide.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the widened state does not fit {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    if hasattr(wide, "tie_weights"):
        wide.tie_weights()
    return wide.train(model.training)


def _widen_one(state: dict[str, Tensor], name: str, container: nn.Module, inp: str, out: str, up: str | None,
               patch: FFNPatch | None, extra: int) -> int:
    """Append ``extra`` neurons (``patch``'s, then zeros) to one FFN's tensors in ``state``; returns its old width."""
    in_mod = container.get_submodule(inp)
    conv = _is_conv1d(in_mod)
    d, width = in_mod.weight.shape if conv else in_mod.weight.shape[::-1]
    dt, dev = in_mod.weight.dtype, in_mod.weight.device
    key, bias, value = torch.zeros(d, extra, dtype=dt, device=dev), torch.zeros(extra, dtype=dt, device=dev), \
        torch.zeros(extra, d, dtype=dt, device=dev)
    real = torch.zeros(extra, dtype=dt, device=dev)
    if patch is not None and patch.n_neurons:
        n = patch.n_neurons
        key[:, :n], bias[:n], value[:n], real[:n] = patch.key.to(dt), patch.bias.to(dt), patch.value.to(dt), 1
    p_in, p_out = f"{name}.{inp}", f"{name}.{out}"
    if conv:  # Conv1D: weight [in, out]
        state[f"{p_in}.weight"] = torch.cat([state[f"{p_in}.weight"], key], 1)
        state[f"{p_out}.weight"] = torch.cat([state[f"{p_out}.weight"], value], 0)
    else:     # Linear: weight [out, in]
        state[f"{p_in}.weight"] = torch.cat([state[f"{p_in}.weight"], key.T], 0)
        state[f"{p_out}.weight"] = torch.cat([state[f"{p_out}.weight"], value.T], 1)
    if f"{p_in}.bias" in state:
        state[f"{p_in}.bias"] = torch.cat([state[f"{p_in}.bias"], bias])
    elif up is not None:
        state[f"{p_in}.bias"] = torch.cat([torch.zeros(width, dtype=dt, device=dev), bias])
    elif bool((bias != 0).any()):
        raise NotImplementedError(f"cannot widen {type(container).__name__} at {name}: {inp} has no bias, so the "
                                  f"patch's non-zero bias cannot be written into it (a Patcher with "
                                  f"train_bias=False keeps the bias 0)")
    if up is not None:  # gated: up row 0 with bias 1 turns act(gate) * up into act(x k + b) for a patch neuron
        p_up = f"{name}.{up}"
        state[f"{p_up}.weight"] = torch.cat([state[f"{p_up}.weight"], torch.zeros(extra, d, dtype=dt, device=dev)], 0)
        old = state.get(f"{p_up}.bias", torch.zeros(width, dtype=dt, device=dev))
        state[f"{p_up}.bias"] = torch.cat([old, real])
        state.setdefault(f"{p_out}.bias", torch.zeros(d, dtype=dt, device=dev))
    return int(width)


def plain_model(work: nn.Module, original: nn.Module) -> nn.Module:
    """A stream's working model ``work`` (``original`` plus merged edits) as a plain Hugging Face
    model of ``original``'s class: widened (:func:`widen_ffn`) when it carries patches, else ``work``
    itself (the delta editors: MEND, FT, surgery, ...). Refused when it holds parameters that the
    base has not (an editor's own modules), which ``from_pretrained`` would drop."""
    model = widen_ffn(work) if installed_patches(work) else work
    own = set(dict(model.named_parameters())) - set(dict(original.named_parameters()))
    if own:
        raise NotImplementedError(f"the working model has parameters the base model has not ({sorted(own)[:3]}...): "
                                  f"it is no plain {type(original).__name__}")
    return model
