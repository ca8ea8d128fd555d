"""Transformer-Patcher (Huang et al., ICLR 2023, "Transformer-Patcher: One Mistake Worth One Neuron").

Each mistake is fixed by adding a few neurons to one feed-forward layer (by default the last
block's FFN): the patch adds ``act(x @ K + b) @ V`` to the FFN's output, ``x`` being the FFN input
at every position. The base weights are never modified; only the new neurons are trained.

Per edit (:meth:`Patcher.make_edit`):

- nothing is done when the current model already gets the edit right (an empty edit);
- one neuron per mistake: the [CLS] (first) token of a wrong classifier input; for generation, one
  per wrongly predicted target token (its query is the FFN input at the position that predicts
  that token). The paper caps this at 5 per input; by default there is no cap
  (``max_neurons_per_edit``), since a wrong token without its own neuron must be fixed by neurons
  that are trained not to fire at its position (an 8-token target then stayed wrong on every tiny
  model tried, while one neuron per wrong token made all of them right);
- the key starts at ``k = q / |q|^2`` (its first pre-activation on its query ``q`` is 1), the bias
  at 0, the value at 0 (so the untrained patch changes nothing);
- the activation constraints: each new neuron's pre-activation is at least ``edit_activation`` on
  its query, at most ``memory_margin`` on every negative, and at least ``gap_margin`` above the
  largest negative. Negatives: the memory's queries, every earlier edit's queries, and the other
  target positions of this edit (so each neuron fixes its own token: without these, neurons firing
  at each other's positions left most 8-token edits wrong);
- loss = edit NLL + ``activation_weight`` * hinge(edit activation) + ``memory_weight`` * (hinges of
  the margin and the gap, each averaged over a neuron's ``top_k`` worst negatives);
- stop as soon as the edit is right and every constraint holds; when the constraints cannot all be
  met (a negative query next to the edit's), once the edit is right and the activation loss has not
  improved for ``patience`` steps; at most ``max_steps`` model forwards;
- ``key_training``: "joint" trains key, bias and value together on that loss (the paper's); "fit"
  (below) first fits key and bias to the constraints alone; the default "joint_then_fit" trains
  jointly and gives a patch that fails a second try by "fit" (joint keys generalise to paraphrases
  far better, fitted ones keep the most locality: docs/experiments.md);
- a patch that is still wrong then, or whose trained key breaks a constraint, is rolled back: the
  edit is empty (the model unchanged), :attr:`Patcher.last_failure` says why and
  :attr:`Patcher.failures` counts such edits.

How it is optimised (implementation choices, each for speed on a CPU):

- "fit": the constraints are linear in (key, bias) and need no model forward, so key and bias are
  fitted to them alone by L-BFGS on squared hinges (a few dozen evaluations of two small products;
  Adam on the joint loss took hundreds of model forwards for the same). When that meets them, only
  the value is trained afterwards (the NLL's pull on the key would undo them); otherwise key, bias
  and value are trained together on the full loss.
- The key fit reads a working set of the negatives (each neuron's highest pre-activations at the
  start, and an even sample of the rest), adding back any that become active and fitting on until
  none does, so the fitted key meets the same constraints on every negative; the joint loss
  differentiates through each neuron's ``top_k`` worst negatives only, which gives the same loss and
  gradient as all of them. Both cost a fraction of a pass over every negative for a large memory.
- Adam (``lr``, 1e-2 as in the paper) with a step that grows by ``lr_growth`` while the loss falls
  and halves when it rises (at most ``max_lr_factor * lr``): the size a value needs depends on the
  scale of the hidden states the FFN adds to (about 1 after a post-LN block such as BART's, about
  0.01 in a randomly initialised pre-LN GPT-2), and a fixed step takes ~100 steps for the former.
- A training step does not run the layers below the patch again: their outputs on the edit batch
  are recorded on the edit's first forward and replayed (:class:`_Replay`), so a step of a patch of
  the last block's FFN costs about its output projection's hooks, the final norm and the head.

Key and bias are trained, not only the value: a query of one layer is strongly correlated with
most other queries of that layer (a shared mean direction, the same [CLS] token everywhere), so
the initial key ``q / |q|^2`` fires on much of the memory too; moving the key and bias is what
brings those activations below the margin while the edit's stays high. When the negatives include
near-duplicates of the edit's query (a randomly initialised BART's decoder queries barely depend on
the input), the separating key is very long; the patch is then ill-conditioned, and a float32 wider
model (:func:`editors.widen.widen_ffn`) matches it only to about 1e-4 (float64: exactly, up to
rounding).

The memory is a collated batch of training-split inputs (same format as an edit batch); its
queries at the patched layer are computed once from the first model :meth:`Patcher.make_edit`
sees and cached. A patch does not change its own layer's input, so the queries of a model
carrying earlier patches at that layer are the base model's. Each distinct query is kept once
(inputs sharing a beginning share a causal model's queries there: questions of one template share
most of theirs), at most ``max_memory_queries`` of them (an even sample; the paper's memory of
40,000 inputs is about a million queries), stored in the dtype of the layer's input on the model's
device (a bf16 base: 2 bytes a number); the products with the keys are computed in float32 a
chunk at a time. The earlier edits' queries (every target position of an edited input) are stored
in the installed patch as a buffer, so a working model in a sequential stream carries them. The
patch's own parameters are float32 under a bf16 / fp16 base (float64 under a float64 one).

An installed patch is a :class:`FFNPatch` submodule named ``hypedit_patch`` of the FFN container
(e.g. ``transformer.h.3.mlp.hypedit_patch.key``) plus two forward hooks (record the FFN input,
add the patch to the output projection's output). Base parameter names are unchanged, so a
patched model's parameters are the base's plus the patch's. :func:`editors.widen.widen_ffn` turns
a patched model into a plain Hugging Face model with a wider FFN (the patch neurons appended, other
layers of the same width padded with zero neurons); :func:`save_patches` / :func:`load_patches`
store the patch in safetensors with a JSON header that identifies the base model.

Plain torch: no Lightning here.
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.atomic import atomic_path
from datamodules.encoding import Family
from editors.base import Edit, Editor, EditorContext
from editors.layers import LayerSpec, check_fingerprint, fingerprint, frozen, select_layers
from editors.losses import forward_logits, model_inputs, nll, scores

PATCH_ATTR = "hypedit_patch"
_MAX_KEY_ROUNDS = 5  # working-set rounds of the key fit (one or two are the rule)
_CHUNK = 1 << 24  # elements of a bf16 / fp16 memory converted to float32 at a time (64 MB)
FORMAT_VERSION = 1
HEADER_KEY = "hypedit_patches"

# FFN layouts, relative to the FFN container: (input projection, output projection, up projection of a gated FFN)
_LAYOUTS: tuple[tuple[str, str, str | None], ...] = (
    ("c_fc", "c_proj", None),                        # GPT-2 (Conv1D)
    ("intermediate.dense", "output.dense", None),    # BERT / RoBERTa layer
    ("fc1", "fc2", None),                            # BART encoder / decoder layer
    ("gate_proj", "down_proj", "up_proj"),           # LLaMA-style gated FFN: down(act(gate x) * up x)
    ("fc_in", "fc_out", None),                       # GPT-J
    ("dense_h_to_4h", "dense_4h_to_h", None),        # GPT-NeoX
    ("wi", "wo", None),                              # T5 DenseReluDense
    ("wi_0", "wo", "wi_1"),                          # T5 v1.1 gated DenseReluDense: wo(act(wi_0 x) * wi_1 x)
)
_ACT_ATTRS = ("act", "act_fn", "activation_fn", "intermediate.intermediate_act_fn")
_ACT_CONFIG = ("activation_function", "hidden_act", "hidden_activation", "dense_act_fn")


# ---------------------------------------------------------------- where the patch goes
def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _layout(container: nn.Module) -> tuple[str, str, str | None] | None:
    for inp, out, up in _LAYOUTS:
        if _has(container, inp) and _has(container, out) and (up is None or _has(container, up)):
            return inp, out, up
    return None


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _own_activation(container: nn.Module) -> Any:
    for path in _ACT_ATTRS:
        obj: Any = container
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if callable(obj):
            return obj
    return None


@dataclass(frozen=True)
class FFNSite:
    """One patchable FFN: its container module, the input/output projections (relative names),
    the up projection of a gated FFN, the FFN's activation (an ``ACT2FN`` name) and its widths."""

    layer: str
    inp: str
    out: str
    up: str | None
    activation: str
    d_model: int
    width: int
    conv1d: bool

    @property
    def in_name(self) -> str:
        return f"{self.layer}.{self.inp}"

    @property
    def out_name(self) -> str:
        return f"{self.layer}.{self.out}"

    @property
    def matrices(self) -> list[str]:
        """The base weight matrices of this FFN (what identifies the base model)."""
        names = [self.in_name] + ([f"{self.layer}.{self.up}"] if self.up else []) + [self.out_name]
        return [f"{n}.weight" for n in names]

    @property
    def gated(self) -> bool:
        return self.up is not None


def _resolve_layer(model: nn.Module, layer: str | None) -> str:
    if layer is None:
        cands = [n for n, m in model.named_modules() if n and PATCH_ATTR not in n and _layout(m) is not None]
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            cands = [n for n in cands if "decoder" in n] or cands
        if not cands:
            raise ValueError(f"no feed-forward layer found in {type(model).__name__}: give `layer` (an FFN "
                             f"module holding one of the input/output projection pairs {[l[:2] for l in _LAYOUTS]})")
        return cands[-1]
    try:
        container = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}") from None
    if _layout(container) is None:
        if _has(container, "mlp") and _layout(container.get_submodule("mlp")) is not None:
            return f"{layer}.mlp"
        raise ValueError(f"layer {layer!r} is not a feed-forward layer: it holds none of the projection pairs "
                         f"{[l[:2] for l in _LAYOUTS]}")
    return layer


def resolve_site(model: nn.Module, layer: str | None = None, activation: str | None = None) -> FFNSite:
    """The FFN ``layer`` of ``model`` (default: the last block's FFN; the decoder's for an
    encoder-decoder model), checked: known layout, and an activation we can reproduce exactly."""
    from transformers.activations import ACT2FN

    layer = _resolve_layer(model, layer)
    container = model.get_submodule(layer)
    inp, out, up = _layout(container)  # type: ignore[misc]
    in_mod = container.get_submodule(inp)
    conv = _is_conv1d(in_mod)
    if not (conv or isinstance(in_mod, nn.Linear)):
        raise ValueError(f"{layer}.{inp} is neither nn.Linear nor Conv1D")
    d_model, width = (in_mod.weight.shape if conv else in_mod.weight.shape[::-1])
    if activation is None:
        cfg = getattr(model, "config", None)
        activation = next((getattr(cfg, a) for a in _ACT_CONFIG
                           if isinstance(getattr(cfg, a, None), str) and getattr(cfg, a) in ACT2FN), None)
    if activation is None or activation not in ACT2FN:
        raise ValueError(f"cannot tell the activation of {layer}: pass `activation` (a transformers ACT2FN name)")
    own = _own_activation(container)
    if own is not None:
        t = torch.linspace(-8, 8, 161)
        if not torch.equal(ACT2FN[activation](t), own(t)):
            raise ValueError(f"activation {activation!r} differs from the one {layer} uses ({own}); the patch must "
                             f"use the FFN's own activation")
    return FFNSite(layer, inp, out, up, activation, int(d_model), int(width), conv)


# ---------------------------------------------------------------- the patch module
def _patch_dtype(base: torch.dtype) -> torch.dtype:
    """The patch's own dtype under a base of dtype ``base``: float32, or float64 for a float64 base. A bf16 /
    fp16 key would be rounded to 8 / 11 bits, and a key that separates close queries is long and exact."""
    return torch.promote_types(base, torch.float32)


class FFNPatch(nn.Module):
    """Extra neurons of one FFN: adds ``act(x @ key + bias) @ value`` to the FFN's output.

    ``key [d_model, n]``, ``bias [n]``, ``value [n, d_model]`` are frozen parameters (counted as
    the edit's added weights), in float32 at least (:func:`_patch_dtype`); ``queries [m, d_model]``
    is a buffer of the earlier edits' queries, in the base's dtype (they are its hidden states).
    Installed by :func:`install_patch`: a pre-hook on the FFN's input projection records ``x``, a
    hook on its output projection adds the patch.
    """

    def __init__(self, d_model: int, activation: str, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        self.activation = activation
        self.act = ACT2FN[activation]
        kw: dict[str, Any] = {"dtype": _patch_dtype(dtype or torch.get_default_dtype()), "device": device}
        self.key = nn.Parameter(torch.zeros(d_model, 0, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(0, **kw), requires_grad=False)
        self.value = nn.Parameter(torch.zeros(0, d_model, **kw), requires_grad=False)
        self.register_buffer("queries", torch.zeros(0, d_model, dtype=dtype, device=device))
        self._x: Tensor | None = None

    @property
    def n_neurons(self) -> int:
        return self.key.shape[1]

    def pre_activations(self, x: Tensor) -> Tensor:
        return x.to(self.key.dtype) @ self.key + self.bias

    def contribution(self, x: Tensor) -> Tensor:
        return self.act(self.pre_activations(x)) @ self.value

    def _record(self, module: nn.Module, args: tuple) -> None:
        self._x = args[0]

    def _add(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        x, self._x = self._x, None
        if x is None or self.n_neurons == 0:
            return None
        return out + self.contribution(x).to(out.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.key.shape[0]}, neurons={self.n_neurons}, queries={self.queries.shape[0]}, "
                f"act={self.activation}")


def installed_patches(model: nn.Module) -> dict[str, FFNPatch]:
    """The patches installed in ``model``, by FFN container name."""
    return {n.rsplit(".", 1)[0] if "." in n else "": m for n, m in model.named_modules()
            if isinstance(m, FFNPatch) and n.endswith(PATCH_ATTR)}


def install_patch(model: nn.Module, site: FFNSite) -> FFNPatch:
    """The patch of ``site`` in ``model``, installed (empty) on first use."""
    container = model.get_submodule(site.layer)
    patch = getattr(container, PATCH_ATTR, None)
    if patch is not None:
        if patch.activation != site.activation or patch.key.shape[0] != site.d_model:
            raise ValueError(f"the patch installed at {site.layer} ({patch.extra_repr()}) does not fit this edit "
                             f"(d_model {site.d_model}, activation {site.activation})")
        return patch
    ref = model.get_submodule(site.in_name).weight
    patch = FFNPatch(site.d_model, site.activation, dtype=ref.dtype, device=ref.device)
    container.add_module(PATCH_ATTR, patch)
    # bound methods of the patch: a deep copy of the model copies the hooks along with their patch
    model.get_submodule(site.in_name).register_forward_pre_hook(patch._record)
    model.get_submodule(site.out_name).register_forward_hook(patch._add)
    return patch


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module structure that shares every parameter and buffer with it."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------- the edit
class PatchEdit(Edit):
    """New neurons for one FFN (``key [d, n]``, ``bias [n]``, ``value [n, d]``) and the edit's
    queries ``[m, d]`` (kept in the patch as negatives for later edits)."""

    def __init__(self, site: FFNSite, key: Tensor, bias: Tensor, value: Tensor, queries: Tensor) -> None:
        self.site = site
        self.key, self.bias, self.value = key.detach(), bias.detach(), value.detach()
        self.queries = queries.detach()

    @classmethod
    def empty(cls, site: FFNSite) -> "PatchEdit":
        d = site.d_model
        return cls(site, torch.zeros(d, 0), torch.zeros(0), torch.zeros(0, d), torch.zeros(0, d))

    @property
    def n_neurons(self) -> int:
        return self.key.shape[1]

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` with the patch, functionally: a structural copy sharing all of ``model``'s tensors."""
        return self.merge_(_shared_copy(model)) if self.n_neurons else model

    @torch.no_grad()
    def merge_(self, model: nn.Module) -> nn.Module:
        """Add the neurons to ``model``'s patch (installed on first use); the existing tensors are
        replaced by longer ones, never written in place. Returns ``model``."""
        if self.n_neurons == 0:
            return model
        patch = install_patch(model, self.site)
        dt, dev = patch.key.dtype, patch.key.device
        patch.key = nn.Parameter(torch.cat([patch.key, self.key.to(dev, dt)], 1), requires_grad=False)
        patch.bias = nn.Parameter(torch.cat([patch.bias, self.bias.to(dev, dt)]), requires_grad=False)
        patch.value = nn.Parameter(torch.cat([patch.value, self.value.to(dev, dt)], 0), requires_grad=False)
        patch.queries = torch.cat([patch.queries, self.queries.to(dev, patch.queries.dtype)], 0)
        return model

    def params_changed(self, model: nn.Module) -> int:
        """Added scalars: the new neurons' key, bias and value entries (no base weight changes)."""
        return self.key.numel() + self.bias.numel() + self.value.numel()


# ---------------------------------------------------------------- the editor
class _Stop(Exception):
    """Raised inside a forward pass to end it early: the patched layer's input is recorded, or a replay
    (:class:`_Replay`) ran out of recorded outputs."""


@contextlib.contextmanager
def _extra_neurons(model: nn.Module, site: FFNSite, act: Any, key: Tensor, bias: Tensor, value: Tensor
                   ) -> Iterator[None]:
    """Run ``model`` with the (trainable) neurons ``key, bias, value`` added to ``site``, on top of any
    installed patch."""
    seen: dict[str, Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen["x"] = args[0]

    def add(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = seen.pop("x")
        return out + (act(x.to(key.dtype) @ key + bias) @ value).to(out.dtype)

    handles = [model.get_submodule(site.in_name).register_forward_pre_hook(record),
               model.get_submodule(site.out_name).register_forward_hook(add)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Replay:
    """What the modules below the patch return, recorded on one forward of ``model`` and replayed on the
    training steps, so that a step computes only what the patch can change (for the last block's FFN:
    its output projection's hooks, the final norm and the head), in any architecture.

    Below the patch: the outermost module calls that return before the patched FFN's output projection
    does (its own raw output included), nothing the patch adds can reach them. Not replayed: the
    ancestors of the FFN's input projection (the hooks on it read the FFN's input, so it must be called).
    On a replayed forward each recorded module's ``forward`` returns its recorded outputs in call order
    (its hooks still run). The full forward is used instead when the recording cannot stand for it: a
    module called both below and above the patch, a different call sequence, or a first replay (the
    untrained patch adds exactly 0) whose logits differ from the recorded forward's (an output changed
    in place by its caller, dropout).
    """

    def __init__(self, model: nn.Module, site: FFNSite) -> None:
        self.model = model
        self.boundary = model.get_submodule(site.out_name)
        parts = site.in_name.split(".")
        self.running = {id(model.get_submodule(".".join(parts[:i]))) for i in range(len(parts))}
        self.outputs: dict[nn.Module, list[Any]] = {}
        self.reference: Tensor | None = None  # the recorded forward's logits, which the first replay must give

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the outputs below the patch during the forward run inside this context."""
        frontier: list[tuple[nn.Module, Any]] = []  # (module, raw output) of the outermost calls so far
        starts: list[int] = []
        below: set[int] = set()
        state = {"above": False, "again": False}

        def pre(module: nn.Module, args: tuple) -> None:
            starts.append(len(frontier))

        def post(module: nn.Module, args: tuple, out: Any) -> None:
            start = starts.pop()
            if state["above"]:
                state["again"] |= id(module) in below
                return
            below.add(id(module))
            if id(module) not in self.running:
                del frontier[start:]  # the calls made inside this one: replaying it covers them
                frontier.append((module, out))
            state["above"] = module is self.boundary

        # prepended: the raw output, before other hooks (an installed patch's) change it; they run on replay
        handles = [h for m in self.model.modules()
                   for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post, prepend=True))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.outputs = {}
        if state["above"] and not state["again"]:
            for module, out in frontier:
                self.outputs.setdefault(module, []).append(out)

    def logits(self, batch: Mapping[str, Tensor], family: Family) -> Tensor:
        """``forward_logits`` of the model on ``batch`` (the recorded one), replayed below the patch when it can be."""
        if self.outputs:
            left = {m: list(outs) for m, outs in self.outputs.items()}
            saved = {m: m.__dict__.get("forward") for m in left}

            def replayed(module: nn.Module) -> Any:
                def forward(*args: Any, **kwargs: Any) -> Any:
                    if not left[module]:
                        raise _Stop
                    return left[module].pop(0)
                return forward

            out: Tensor | None = None
            try:
                for m in left:
                    m.forward = replayed(m)
                out = forward_logits(self.model, batch, family)
            except _Stop:
                pass
            finally:
                for m, f in saved.items():
                    if f is None:
                        del m.forward
                    else:
                        m.forward = f
            ref, self.reference = self.reference, None
            if out is not None and not any(left.values()) and (ref is None or _same(out, ref)):
                return out
            self.outputs = {}
        return forward_logits(self.model, batch, family)


def _same(a: Tensor, b: Tensor) -> bool:
    """``a`` equals ``b`` up to rounding in their dtype (kernels may differ with and without autograd)."""
    tol = max(1e-4, 8 * torch.finfo(b.dtype).eps)
    return a.shape == b.shape and torch.allclose(a.detach(), b, rtol=tol, atol=tol * float(b.abs().max()))


def _chunks(batch: Mapping[str, Tensor], size: int) -> Iterator[dict[str, Tensor]]:
    n = next(iter(batch.values())).shape[0]
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in batch.items()}


def _first_of_each(ids: Tensor) -> Tensor:
    """True at the first occurrence of each value of ``ids`` (1-D)."""
    _, inv = torch.unique(ids, return_inverse=True)
    dev = ids.device
    first = torch.full((int(inv.max()) + 1 if len(ids) else 0,), len(ids), dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, inv, torch.arange(len(ids), device=dev), "amin")
    return torch.zeros(len(ids), dtype=torch.bool, device=dev).index_fill_(0, first, True)


def _memory_positions(batch: Mapping[str, Tensor], family: Family) -> Tensor:
    """Which positions of ``batch`` give memory queries, each distinct query once: [CLS] for classifiers
    (``[B, 1]``), every real token of the (decoder) input otherwise (``[B, T]``).

    A query repeats an earlier one when its inputs do: at a causal position, the tokens up to and including
    it (the FFN input there depends on nothing else); at a seq2seq decoder position, those and the whole
    encoder input; at a classifier's [CLS], the whole input. Equal inputs are found exactly (prefixes are
    numbered position by position), not by comparing query vectors, which a batch's shape can change in
    the last bits."""
    inputs = {k: v.long() for k, v in model_inputs(batch).items()}
    stream = [] if family == "classifier" else [k for k in inputs if k.startswith("decoder_") == (family == "seq2seq")]
    context = [v.flatten(1) for k, v in inputs.items() if k not in stream]
    n = next(iter(inputs.values())).shape[0]
    ids = (torch.unique(torch.cat(context, 1), dim=0, return_inverse=True)[1] if context
           else torch.zeros(n, dtype=torch.long, device=inputs["input_ids"].device))
    if family == "classifier":
        return _first_of_each(ids)[:, None]
    steps = torch.stack([inputs[k] for k in stream], -1)  # [B, T, inputs per token]
    prefixes, offset = [], 0
    for t in range(steps.shape[1]):  # number of the prefix ending at t: (that of t - 1, the inputs at t)
        ids = torch.unique(torch.cat([ids[:, None], steps[:, t]], 1), dim=0, return_inverse=True)[1]
        prefixes.append(ids + offset)
        offset += int(ids.max()) + 1
    real = inputs["decoder_attention_mask" if family == "seq2seq" else "attention_mask"].bool()
    keep = torch.zeros_like(real)
    keep[real] = _first_of_each(torch.stack(prefixes, 1)[real])
    return keep


def _times(kt: Tensor, block: Tensor) -> Tensor:
    """``kt @ block`` in ``kt``'s dtype, autocast off: a bf16 block (the memory is kept in the base's dtype)
    is converted ``_CHUNK`` elements at a time, never copied whole to float32."""
    with torch.autocast(kt.device.type, enabled=False):
        if block.dtype == kt.dtype:
            return kt @ block
        step = max(1, _CHUNK // max(1, block.shape[0]))
        return torch.cat([kt @ block[:, i:i + step].to(kt.dtype) for i in range(0, max(1, block.shape[1]), step)], 1)


def _pre_activations(q: Tensor, negs: Sequence[Tensor], valid: Tensor, key: Tensor, bias: Tensor
                     ) -> tuple[Tensor, Tensor]:
    """New neuron ``j``'s pre-activation on its own query ``q[j]`` ([n]) and on the negatives ([n, N]),
    ``-inf`` where ``valid`` is False (not a negative of that neuron). The negatives come as blocks
    ``[d, N_i]`` (stored transposed, joined only in the small product): the ``[n, d] @ [d, N]`` layout
    keeps both products of forward and backward fast on a CPU, where ``[N, d] @ [d, n]`` with a skinny
    ``n`` was ten times slower, and the memory's block is not copied for every edit. Computed in the
    key's dtype (float32 at least) whatever the blocks' dtype."""
    kt = key.T
    a_neg = torch.cat([_times(kt, t) for t in negs], 1) + bias[:, None]
    return (q * kt).sum(-1) + bias, a_neg.masked_fill(~valid, -float("inf"))


def _columns(negs: Sequence[Tensor], cols: Tensor) -> Tensor:
    """Columns ``cols`` (sorted global indices) of the negatives' blocks, as one ``[d, len(cols)]`` block."""
    parts, start = [], 0
    for t in negs:
        end = start + t.shape[1]
        lo, hi = torch.searchsorted(cols, torch.tensor([start, end], device=cols.device)).tolist()
        parts.append(t.index_select(1, cols[lo:hi] - start))
        start = end
    return torch.cat(parts, 1)


class Patcher(Editor):
    """Transformer-Patcher: one new FFN neuron per mistake (Huang et al., ICLR 2023).

    ``layer``: the FFN to patch by module name (default: the last block's FFN; an encoder-decoder's
    last decoder layer). ``memory``: a collated batch of training-split inputs whose queries the
    patch must not fire on. See the module docstring for the loss and the stopping rule.
    """

    name = "patcher"
    uses_locality = False

    def __init__(self, model: nn.Module, layer: str | None = None, memory: Mapping[str, Tensor] | None = None, *,
                 lr: float = 1e-2, max_steps: int = 100, max_key_steps: int = 100, memory_margin: float = -3.0,
                 edit_activation: float = 5.0, gap_margin: float | None = None, activation_weight: float = 1.0,
                 memory_weight: float = 1.0, top_k: int = 16, max_neurons_per_edit: int | None = None,
                 train_key: bool = True, lr_growth: float = 1.5, max_lr_factor: float = 100.0, patience: int = 10,
                 activation: str | None = None, memory_chunk: int = 64, key_working_set: int = 8192,
                 max_memory_queries: int | None = None, key_training: str = "joint_then_fit",
                 train_bias: bool = True) -> None:
        """``model``: the base model (resolves ``layer`` and its activation). ``memory``: collated
        training-split inputs, or None (then only earlier edits are negatives). ``gap_margin``
        defaults to ``edit_activation - memory_margin``. ``max_key_steps``: L-BFGS iterations fitting
        key and bias. ``train_key=False`` keeps key ``q / |q|^2`` and bias 0 (value only).
        ``activation``: an ``ACT2FN`` name, default from the model config (checked against the FFN's
        own). ``memory_chunk``: rows per forward when computing the memory's queries.
        ``key_training``: "fit" (key and bias fitted to the activation constraints first, then the value
        trained), "joint" (key, bias and value trained together on the whole loss, as in the paper) or
        "joint_then_fit" (joint; a patch that fails is trained again by "fit").
        ``train_bias=False`` keeps every neuron's bias 0 (an FFN without biases, as T5's, then takes the
        patch when widened: :func:`editors.widen.widen_ffn`).
        ``max_memory_queries``: keep at most this many of the memory's distinct queries (an even sample;
        None: all). ``key_working_set``: size of the sample of negatives the key fit starts from (:meth:`_fit_keys`).
        ``max_neurons_per_edit``: at most this many neurons per wrong input (None: one per wrong token)."""
        if (max_steps < 0 or max_key_steps < 0 or (max_neurons_per_edit or 1) < 1 or top_k < 1 or key_working_set < 1
                or (max_memory_queries is not None and max_memory_queries < 0)
                or key_training not in ("fit", "joint", "joint_then_fit")):
            raise ValueError("need max_steps >= 0, max_key_steps >= 0, max_neurons_per_edit >= 1 (or None), "
                             "top_k >= 1, key_working_set >= 1, max_memory_queries >= 0 (or None) and key_training "
                             "'fit', 'joint' or 'joint_then_fit'")
        self.site = resolve_site(model, layer, activation)
        self.layers: list[LayerSpec] = select_layers(model, [re.escape(n) for n in self.site.matrices])
        self.memory = dict(memory) if memory is not None else None
        self.gap_margin = edit_activation - memory_margin if gap_margin is None else gap_margin
        self.max_key_steps = max_key_steps
        self.lr, self.max_steps = lr, max_steps
        self.memory_margin, self.edit_activation = memory_margin, edit_activation
        self.activation_weight, self.memory_weight, self.top_k = activation_weight, memory_weight, top_k
        self.max_neurons_per_edit, self.train_key, self.memory_chunk = max_neurons_per_edit, train_key, memory_chunk
        self.key_working_set, self.max_memory_queries = key_working_set, max_memory_queries
        self.key_training, self.train_bias = key_training, train_bias
        self.lr_growth, self.max_lr_factor, self.patience = lr_growth, max_lr_factor, patience
        self.config = {"class": "Patcher", "name": self.name, "layer": self.site.layer,
                       "activation": self.site.activation,
                       "lr": lr, "max_steps": max_steps, "max_key_steps": max_key_steps, "memory_margin": memory_margin,
                       "edit_activation": edit_activation, "gap_margin": self.gap_margin,
                       "activation_weight": activation_weight, "memory_weight": memory_weight, "top_k": top_k,
                       "max_neurons_per_edit": max_neurons_per_edit, "train_key": train_key, "lr_growth": lr_growth,
                       "max_lr_factor": max_lr_factor, "patience": patience, "key_working_set": key_working_set,
                       "memory_rows": int(next(iter(memory.values())).shape[0]) if memory else 0,
                       "max_memory_queries": max_memory_queries, "key_training": key_training, "train_bias": train_bias,
                       "layers": [l.name for l in self.layers]}
        self._memory_t: Tensor | None = None  # [d, N], in the patched layer's input dtype, on the model's device
        # what the last edit did (0 steps and 0 neurons: the model was already right)
        self.last_steps, self.last_neurons, self.last_right, self.last_constraints = 0, 0, True, True
        self.last_key_steps = self.last_key_rounds = 0
        # why the last edit was rolled back ({} when it was kept or not needed): each failed check and by how
        # much, e.g. {"wrong_rows": 1.0, "memory_margin": 0.8}; ``failures``: edits rolled back so far
        self.last_failure: dict[str, float] = {}
        self.failures = 0

    @classmethod
    def for_evaluation(cls, context: EditorContext, layer: str | None = None, memory_size: int = 40000,
                       **init_args: Any) -> "Patcher":
        """A patcher of ``context.model`` whose memory is ``memory_size`` of the context's training
        inputs (never an evaluated input; none without a training split)."""
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        memory = context.training_inputs(memory_size) if context.training_inputs and memory_size else None
        return cls(context.model, layer, memory, **init_args)

    # ------------------------------------------------------------ queries
    @torch.no_grad()
    def _layer_inputs(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                      logits: bool) -> tuple[Tensor, Tensor | None]:
        """The patched FFN's input ``[B, T, d]`` on ``batch`` (and the logits, or stop right there)."""
        seen: dict[str, Tensor] = {}

        def record(module: nn.Module, args: tuple) -> None:
            seen["x"] = args[0].detach()
            if not logits:
                raise _Stop

        h = model.get_submodule(self.site.in_name).register_forward_pre_hook(record, prepend=True)
        try:
            out = forward_logits(model, batch, family)
        except _Stop:
            out = None
        finally:
            h.remove()
        if "x" not in seen:
            raise RuntimeError(f"the forward pass did not use {self.site.in_name}")
        return seen["x"], out

    def memory_queries(self, model: nn.Module, family: Family) -> Tensor:
        """The memory's distinct queries ``[N, d]`` at the patched layer (:func:`_memory_positions`), at most
        ``max_memory_queries`` (an even sample of them in memory order), in the dtype of the layer's input
        (lossless: they are its values) on the model's device. Computed once, then cached; kept transposed,
        as the key fit reads them; rows that give no kept query are not run."""
        dev = next(model.parameters()).device
        if self._memory_t is None:
            d, in_dtype = self.site.d_model, model.get_submodule(self.site.in_name).weight.dtype
            self._memory_t = torch.zeros(d, 0, dtype=in_dtype, device=dev)
            if self.memory is not None:
                keep = _memory_positions(self.memory, family)
                where = keep.flatten().nonzero().flatten()
                cap = self.max_memory_queries
                if cap is not None and len(where) > cap:
                    keep = torch.zeros_like(keep).flatten().index_fill_(
                        0, where[torch.arange(cap, device=where.device) * len(where) // cap], True).view_as(keep)
                rows = keep.any(1).nonzero().flatten()
                memory, keep = {k: v[rows] for k, v in self.memory.items()}, keep[rows]
                filled = 0
                for chunk, kept in zip(_chunks(memory, self.memory_chunk), keep.split(self.memory_chunk)):
                    chunk = {k: v.to(dev) for k, v in chunk.items()}
                    x, _ = self._layer_inputs(model, model_inputs(chunk), family, logits=False)
                    q = x[:, :kept.shape[1]][kept.to(dev)]
                    if filled == 0:  # allocated once, in the layer input's dtype (autocast can make it float32)
                        self._memory_t = torch.empty(d, int(keep.sum()), dtype=x.dtype, device=dev)
                    self._memory_t[:, filled:filled + len(q)] = q.T
                    filled += len(q)
        if self._memory_t.device != dev:
            self._memory_t = self._memory_t.to(dev)
        return self._memory_t.T

    def _positions(self, logits: Tensor, labels: Tensor, family: Family
                   ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(neuron positions, stored query positions) as (row, position) pairs, wrong rows only."""
        right, _ = scores(logits, labels, family)
        rows = [i for i, r in enumerate(right.tolist()) if not r]
        if family == "classifier":
            return [(i, 0) for i in rows], [(i, 0) for i in rows]
        if family == "causal":  # position t predicts token t + 1
            pred, tgt = logits[:, :-1].argmax(-1), labels[:, 1:]
        else:
            pred, tgt = logits.argmax(-1), labels
        target = tgt != -100
        wrong = (pred != tgt) & target
        neurons, queries = [], []
        for i in rows:
            neurons += [(i, int(t)) for t in wrong[i].nonzero().flatten()[:self.max_neurons_per_edit]]  # None: all
            queries += [(i, int(t)) for t in target[i].nonzero().flatten()]
        return neurons, queries

    # ------------------------------------------------------------ the edit
    def _topk_mean(self, v: Tensor) -> Tensor:
        """Per neuron (row), the mean of the ``top_k`` largest entries; averaged over neurons."""
        if v.shape[-1] == 0:
            return v.new_zeros(())
        return v.topk(min(self.top_k, v.shape[-1]), dim=-1).values.mean()

    def _violations(self, a_edit: Tensor, a_neg: Tensor) -> dict[str, float]:
        """The activation constraints some new neuron breaks (beyond rounding), each with its worst
        shortfall: ``edit_activation`` (on its own query), ``memory_margin`` (on a negative), ``gap``
        (edit's over the largest negative's); {} when all hold."""
        tol = 1e-4
        a_edit = a_edit.detach()
        short = {"edit_activation": float((self.edit_activation - a_edit).max())}
        if a_neg.shape[-1]:
            worst = a_neg.detach().amax(-1)
            short["memory_margin"] = float((worst - self.memory_margin).max())
            short["gap"] = float((self.gap_margin - (a_edit - worst)).max())
        return {k: v for k, v in short.items() if v > tol}

    def _fits(self, a_edit: Tensor, a_neg: Tensor) -> bool:
        """Whether every new neuron meets the activation constraints (to within rounding)."""
        return not self._violations(a_edit, a_neg)

    def _activation_loss(self, a_edit: Tensor, a_neg: Tensor) -> Tensor:
        """The activation terms of the loss: the edit's pre-activation above ``edit_activation``; over the
        ``top_k`` worst negatives, theirs below ``memory_margin`` and ``gap_margin`` below the edit's."""
        loss = self.activation_weight * F.relu(self.edit_activation - a_edit).mean()
        if a_neg.shape[-1]:
            loss = loss + self.memory_weight * (self._topk_mean(F.relu(a_neg - self.memory_margin))
                                                + self._topk_mean(F.relu(a_neg - a_edit[:, None] + self.gap_margin)))
        return loss

    def _fit_keys(self, q: Tensor, negs: Sequence[Tensor], valid: Tensor, key: Tensor, bias: Tensor,
                  a_neg: Tensor) -> tuple[Tensor, Tensor]:
        """Fit ``key`` and ``bias`` (in place) to the activation constraints alone, from the
        pre-activations ``a_neg`` of the key as given; returns those of the fitted key, on the edit's
        queries and on every negative (``last_key_steps``: function evaluations; ``last_key_rounds``:
        working-set rounds).

        The constraints are linear in (key, bias): a separation of each query from the negatives with
        margins. They need no model forward, so L-BFGS on squared hinges (aiming ``slack`` past each
        bound) settles them in a few dozen evaluations of two small products, where Adam steps on the
        joint loss took hundreds of model forwards for the same.

        A negative below both bounds by ``slack`` adds nothing to that loss or its gradient, and nearly
        all of a large memory is such. So L-BFGS works on a working set: an even sample of
        ``key_working_set`` negatives and each neuron's ``key_working_set / 8`` highest pre-activations
        at the start (the top ones alone are a poor guide: a key fitted on a 160,000-query memory's top
        1,024 then fired on 20,000-120,000 others). After each round all negatives are checked, those
        that have become active join the set, and the fit goes on from where it is until none does
        (at most ``_MAX_KEY_ROUNDS``), so the result meets the same loss on all negatives.
        """
        slack = 0.1

        def lbfgs(sub: list[Tensor], vsub: Tensor) -> int:
            evals = 0
            opt = torch.optim.LBFGS([key, bias] if self.train_bias else [key], lr=1, max_iter=self.max_key_steps,
                                    history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                    tolerance_change=1e-12)

            def closure() -> Tensor:
                nonlocal evals
                evals += 1
                opt.zero_grad(set_to_none=True)
                a_edit, a_neg = _pre_activations(q, sub, vsub, key, bias)
                loss = (F.relu(self.edit_activation + slack - a_edit).pow(2).sum()
                        + F.relu(a_neg - self.memory_margin + slack).pow(2).sum()
                        + F.relu(a_neg - a_edit[:, None] + self.gap_margin + slack).pow(2).sum())
                loss.backward()
                return loss

            with torch.enable_grad():
                opt.step(closure)
            return evals

        n_neg, m = a_neg.shape[1], self.key_working_set
        top = a_neg.topk(min(max(1, m // 8), n_neg), dim=1).indices.flatten()
        cols = torch.cat([top, torch.arange(0, n_neg, max(1, n_neg // m), device=top.device)]).unique()
        self.last_key_steps = 0
        for self.last_key_rounds in range(1, _MAX_KEY_ROUNDS + 1):
            self.last_key_steps += lbfgs([_columns(negs, cols)], valid[:, cols])
            with torch.no_grad():
                a_edit, a_neg = _pre_activations(q, negs, valid, key, bias)
                new = ((a_neg > self.memory_margin - slack) | (a_neg > a_edit[:, None] - self.gap_margin - slack)).any(0)
                new[cols] = False
            if not bool(new.any()):
                break
            cols = torch.cat([cols, new.nonzero().flatten()]).unique()
        return a_edit, a_neg

    def save_working(self, path: str | Path, work: nn.Module, original: nn.Module) -> None:
        """A stream's working model is the base plus its patches: save those (a patch file)."""
        if installed_patches(work):
            with atomic_path(path) as tmp:
                save_patches(tmp, work)
        else:
            super().save_working(path, work, original)

    def load_working(self, path: str | Path, original: nn.Module) -> nn.Module:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            patched = HEADER_KEY in (f.metadata() or {})
        if not patched:
            return super().load_working(path, original)
        return load_patches(path, copy.deepcopy(original), inplace=True)

    def make_edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                  loc_batch: Mapping[str, Tensor] | None = None) -> PatchEdit:
        """New neurons that make ``model`` produce ``batch``'s labels (``model`` is not modified);
        an empty edit when ``model`` already gets every row right.

        1. Queries: the patched FFN's input at each wrong token's position (see :meth:`_positions`).
        2. Init: key ``q / |q|^2`` (pre-activation 1 on its query), bias 0, value 0.
        3. ``key_training`` "fit": key and bias are fitted to the activation constraints, which need no
           model forward (:meth:`_fit_keys`); "joint": no fit (the paper's training).
        4. Adam on edit NLL + activation loss, with a model forward per step (the layers below the patch
           replayed from step 1's forward, :class:`_Replay`), until the edit is right and the
           constraints hold, or ``max_steps``. Only the value is trained here when step 3 met
           the constraints (training the key on the NLL would undo them); key and bias too otherwise.
        5. A patch still wrong, or whose trained key breaks a constraint (the "stalled" stop above), is
           tried again from step 2 with "fit" under ``key_training`` "joint_then_fit"; otherwise, or when
           that fails too, it is rolled back (an empty edit, reason in ``last_failure``).
        """
        site = self.site
        labels = batch["labels"]
        self.last_steps = self.last_key_steps = self.last_key_rounds = 0
        replay = _Replay(model, site)
        with replay.recording():
            x, logits = self._layer_inputs(model, batch, family, logits=True)
        replay.reference = logits
        neurons, stored = self._positions(logits, labels, family)
        self.last_neurons, self.last_right, self.last_constraints = len(neurons), not neurons, True
        self.last_failure = {}
        if not neurons:
            return PatchEdit.empty(site)
        dt = _patch_dtype(x.dtype)  # the patch is trained in float32 at least
        q = torch.stack([x[i, t] for i, t in neurons]).to(dt)                       # [n, d]
        stored_q = torch.stack([x[i, t] for i, t in stored])                        # the base's dtype, as the memory
        dev = q.device
        # each neuron's negatives, as [d, N_i] blocks: the memory, the earlier edits, and this edit's
        # other target positions (so that a neuron fixes its own token and leaves the others to theirs)
        negs = [self.memory_queries(model, family).T]
        installed = getattr(model.get_submodule(site.layer), PATCH_ATTR, None)
        if installed is not None:
            negs.append(installed.queries.T.contiguous())
        n_shared = sum(t.shape[1] for t in negs)
        negs.append(stored_q.T.contiguous())
        valid = torch.ones(q.shape[0], n_shared + stored_q.shape[0], dtype=torch.bool, device=dev)  # [n, N]
        for j, pos in enumerate(neurons):
            valid[j, n_shared + stored.index(pos)] = False

        tries = {"fit": (False,), "joint": (True,), "joint_then_fit": (True, False)}[self.key_training]
        for joint in tries if self.train_key else (False,):
            key, bias, value, out, right, broken = self._train_patch(replay, batch, family, q, negs, valid, joint)
            if right and not broken:
                return PatchEdit(site, key, bias, value, stored_q)
        # roll back a patch that is still wrong, or (keys trained) fires where the constraints forbid: the
        # working model must not keep a neuron that breaks the memory or fixes nothing
        wrong = float((1 - scores(out.detach(), batch["labels"], family)[0]).sum())
        self.last_failure = {**({"wrong_rows": wrong} if not right else {}), **broken}
        self.failures += 1
        return PatchEdit.empty(site)

    def _train_patch(self, replay: _Replay, batch: Mapping[str, Tensor], family: Family, q: Tensor,
                     negs: Sequence[Tensor], valid: Tensor, joint: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, dict[str, float]]:
        """Steps 2-4 of :meth:`make_edit` for the neurons of queries ``q``: (key, bias, value, the last
        logits, whether the edit is right, the constraints the trained key breaks). ``joint``: no key
        fit, key, bias and value trained together on the whole loss (the paper's training)."""
        from transformers.activations import ACT2FN

        site, labels, dt, dev = self.site, batch["labels"], q.dtype, q.device
        key = (q / q.pow(2).sum(-1, keepdim=True)).T.contiguous()                  # [d, n]
        bias = torch.zeros(q.shape[0], device=dev, dtype=dt)
        value = torch.zeros(q.shape[0], site.d_model, device=dev, dtype=dt, requires_grad=True)
        a_edit, a_neg = _pre_activations(q, negs, valid, key, bias)
        fits = self._fits(a_edit, a_neg)
        if self.train_key and not fits and self.max_key_steps and not joint:
            key.requires_grad_(True)
            bias.requires_grad_(self.train_bias)
            fits = self._fits(*self._fit_keys(q, negs, valid, key, bias, a_neg))
        trained = [value] + ([key, bias] if self.train_key and not fits else [])
        if not self.train_bias:
            trained = [t for t in trained if t is not bias]
        for t in (key, bias):
            t.requires_grad_(any(t is u for u in trained))
        opt = torch.optim.Adam(trained, lr=self.lr)
        act = ACT2FN[site.activation]
        steps, last_loss, best_act, stalled = 0, float("inf"), float("inf"), 0
        with frozen(replay.model), torch.enable_grad(), _extra_neurons(replay.model, site, act, key, bias, value):
            while True:
                out = replay.logits(batch, family)  # the layers below the patch are not run again
                right = bool(scores(out.detach(), labels, family)[0].all())
                if key.requires_grad:  # otherwise the activations, and whether they fit, cannot change
                    with torch.no_grad():
                        a_neg = _pre_activations(q, negs, valid, key, bias)[1]
                    # the loss reads each neuron's top_k negatives only: differentiate through those alone
                    cols = a_neg.topk(min(self.top_k, a_neg.shape[1]), dim=1).indices.flatten().unique()
                    a_edit, a_top = _pre_activations(q, [_columns(negs, cols)], valid[:, cols], key, bias)
                    fits = self._fits(a_edit, a_neg)
                # fixed key and bias: the constraints cannot change, so being right is enough
                done = fits or not key.requires_grad or stalled >= self.patience
                if (right and done) or steps >= self.max_steps:
                    break
                loss = nll(out, labels, family)
                if key.requires_grad:
                    act_loss = self._activation_loss(a_edit, a_top)
                    loss = loss + act_loss
                    # constraints that cannot all be met (a negative query next to the edit's): stop once
                    # the edit is right and the activation loss has stopped improving
                    stalled = 0 if float(act_loss.detach()) < 0.99 * best_act else stalled + 1
                    best_act = min(best_act, float(act_loss.detach()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.lr_growth != 1.0 and steps:  # grow the step while the loss keeps falling, halve it when not
                    factor = self.lr_growth if float(loss.detach()) < last_loss else 0.5
                    for group in opt.param_groups:
                        group["lr"] = min(group["lr"] * factor, self.lr * self.max_lr_factor)
                last_loss = float(loss.detach())
                opt.step()
                steps += 1
        self.last_steps += steps
        self.last_right, self.last_constraints = right, fits
        broken: dict[str, float] = {}
        if not fits and self.train_key:
            with torch.no_grad():
                broken = self._violations(*_pre_activations(q, negs, valid, key, bias))
        return key.detach(), bias.detach(), value.detach(), out, right, broken


# ---------------------------------------------------------------- patch files
def _header_layers(model: nn.Module, sites: list[FFNSite]) -> list[LayerSpec]:
    return select_layers(model, [re.escape(n) for s in sites for n in s.matrices])


def save_patches(path: str | Path, model: nn.Module) -> Path:
    """Write ``model``'s installed patches to a safetensors file; the JSON header (in the file's
    metadata) records the class, format version, patched layers and the base model's fingerprint."""
    from safetensors.torch import save_file

    patches = installed_patches(model)
    if not patches:
        raise ValueError("the model carries no patches to save")
    sites, tensors = [], {}
    for layer, p in patches.items():
        site = resolve_site(model, layer, p.activation)
        sites.append(site)
        for t in ("key", "bias", "value", "queries"):
            tensors[f"{layer}.{t}"] = getattr(p, t).detach().cpu().contiguous()
    header = {"class": "Patcher", "format_version": FORMAT_VERSION,
              "patches": [asdict(s) for s in sites],
              "fingerprint": fingerprint(model, _header_layers(model, sites))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    return path


def load_patches(path: str | Path, base_model: nn.Module, inplace: bool = False) -> nn.Module:
    """``base_model`` with the patches of ``path`` (saved by :func:`save_patches`) installed.

    Refuses (ValueError) a file of another kind or version, a base model other than the one the
    patches were made for, and a model that already carries patches. Reads tensors and JSON only
    (nothing is unpickled). By default the result is a structural copy sharing ``base_model``'s
    tensors; ``inplace=True`` installs into ``base_model`` itself.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if HEADER_KEY not in meta:
            raise ValueError(f"{path} is not a hypedit patch file (no '{HEADER_KEY}' header)")
        header = json.loads(meta[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header.get("class") != "Patcher" or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} holds {header.get('class')} format {header.get('format_version')}; "
                         f"this code reads Patcher format {FORMAT_VERSION}")
    saved = [FFNSite(**s) for s in header["patches"]]
    missing = [s.layer for s in saved if not _has(base_model, s.layer)]
    if missing:
        raise ValueError(f"patch file {path} was made for a model with FFN layers {missing}, which "
                         f"{type(base_model).__name__} does not have")
    sites = [resolve_site(base_model, s.layer, s.activation) for s in saved]
    check_fingerprint(header["fingerprint"], base_model, _header_layers(base_model, sites), f"patch file {path}")
    if installed_patches(base_model):
        raise ValueError("the model already carries patches: load patch files onto the unpatched base model")
    target = base_model if inplace else _shared_copy(base_model)
    for s in sites:
        t = {k: tensors[f"{s.layer}.{k}"] for k in ("key", "bias", "value", "queries")}
        PatchEdit(s, **t).merge_(target)
        if t["key"].shape[1] == 0:  # keep stored queries even without neurons
            install_patch(target, s).queries = t["queries"].to(next(target.parameters()).device)
    return target
