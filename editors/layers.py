"""Which weight matrices an editor edits, and how to read the per-token pieces of their gradients.

For a linear map ``y = W x`` applied to T tokens, dL/dW is ``sum_t delta_t u_t^T`` with ``u`` the
layer input and ``delta = dL/dy``. :func:`gradient_pieces` returns those ``(u, delta)`` for the
edited layers only: no ``.grad`` is written on any base parameter, and autograd runs back only as
far as the earliest edited layer (the forward below it records no graph).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

_LLAMA_MLP = r"(?:.*\.)?layers\.(\d+)\.mlp\.(?:gate_proj|up_proj|down_proj)\.weight"
# model_type -> [(regex with the block index as group 1, how many of the last blocks)]
DEFAULT_RULES: dict[str, list[tuple[str, int]]] = {
    "gpt2": [(r"(?:.*\.)?h\.(\d+)\.mlp\.(?:c_fc|c_proj)\.weight", 3)],
    "gptj": [(r"(?:.*\.)?h\.(\d+)\.mlp\.(?:fc_in|fc_out)\.weight", 3)],
    "gpt_neox": [(r"(?:.*\.)?layers\.(\d+)\.mlp\.(?:dense_h_to_4h|dense_4h_to_h)\.weight", 3)],
    **{t: [(_LLAMA_MLP, 3)] for t in ("llama", "mistral", "qwen2")},
    "bert": [(r"(?:.*\.)?encoder\.layer\.(\d+)\.(?:intermediate|output)\.dense\.weight", 3)],
    "roberta": [(r"(?:.*\.)?encoder\.layer\.(\d+)\.(?:intermediate|output)\.dense\.weight", 3)],
    "bart": [(r"(?:.*\.)?encoder\.layers\.(\d+)\.fc[12]\.weight", 2), (r"(?:.*\.)?decoder\.layers\.(\d+)\.fc[12]\.weight", 2)],
    # every FFN matrix: wi, wo (original T5); wi_0, wi_1, wo (v1.1's gated FFN, e.g. t5-xl-lm-adapt)
    "t5": [(r"(?:.*\.)?encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo)\.weight", 2),
           (r"(?:.*\.)?decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(?:wi|wi_0|wi_1|wo)\.weight", 2)],
}


@dataclass(frozen=True)
class LayerSpec:
    """An edited weight: its parameter name, module kind and (input, output) widths."""

    name: str
    kind: str  # "linear": weight [out, in]; "conv1d": GPT-2 Conv1D, weight [in, out]
    d_in: int
    d_out: int

    @property
    def module_name(self) -> str:
        return self.name.rsplit(".", 1)[0]


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _spec(model: nn.Module, name: str) -> LayerSpec:
    mod_name, leaf = name.rsplit(".", 1)
    mod = model.get_submodule(mod_name)
    if leaf != "weight" or not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
        raise ValueError(f"{name} is not the weight of an nn.Linear or Conv1D layer")
    w = mod.weight
    if _is_conv1d(mod):
        return LayerSpec(name, "conv1d", w.shape[0], w.shape[1])
    return LayerSpec(name, "linear", w.shape[1], w.shape[0])


def candidate_matrices(model: nn.Module) -> list[str]:
    """Every Linear/Conv1D weight of the model: what an editor could be pointed at."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]


def select_layers(model: nn.Module, patterns: list[str] | None = None) -> list[LayerSpec]:
    """Resolve edit patterns (exact names or full-match regexes) or the family defaults to specs."""
    names = candidate_matrices(model)
    if patterns:
        chosen = [n for n in names if any(n == p or re.fullmatch(p, n) for p in patterns)]
        if not chosen:
            raise ValueError(f"edit patterns {patterns} match no Linear/Conv1D weight; candidates: {_short(names)}")
        return [_spec(model, n) for n in chosen]
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in DEFAULT_RULES:
        raise ValueError(f"no default edited layers for model type {mtype!r}: give edit_params explicitly. "
                         f"Candidate matrices: {_short(names)}")
    chosen = []
    for rx, last in DEFAULT_RULES[mtype]:
        hits = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(rx, n))]
        if not hits:  # a variant named otherwise (e.g. one stack only): refuse, rather than edit the rest silently
            raise ValueError(f"the default rule {rx!r} for model type {mtype!r} matches no matrix of this model: "
                             f"give edit_params explicitly. Candidate matrices: {_short(names)}")
        blocks = sorted({b for b, _ in hits})[-last:]
        chosen += [n for b, n in hits if b in blocks]
    return [_spec(model, n) for n in chosen]


def _short(names: list[str], k: int = 40) -> str:
    return ", ".join(names[:k]) + (f" ... ({len(names)} in all)" if len(names) > k else "")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily stop autograd from tracking the base parameters (restored afterwards)."""
    live = [p for p in model.parameters() if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


def gradient_pieces(model: nn.Module, layers: list[LayerSpec], loss_fn: Callable[[], Tensor]
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``loss_fn`` (a forward pass of ``model`` returning a scalar loss) and return, per edited
    layer, ``(u [tokens, d_in], delta [tokens, d_out])`` with ``dL/dW = sum delta u^T``.

    The first edited layer's output is made the root of the autograd graph, so nothing below it is
    recorded and nothing is differentiated that the pieces do not need.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            inputs[name] = args[0].detach()
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            outputs[name] = out
            return out
        return fn

    handles = [model.get_submodule(l.module_name).register_forward_hook(hook(l.name)) for l in layers]
    try:
        with frozen(model), torch.enable_grad():
            loss = loss_fn()
            missing = [l.name for l in layers if l.name not in outputs]
            if missing:
                raise RuntimeError(f"edited layers were not used by the forward pass: {missing}")
            grads = torch.autograd.grad(loss, [outputs[l.name] for l in layers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    pieces = {}
    for l, g in zip(layers, grads):
        u = inputs[l.name].reshape(-1, l.d_in)
        d = g.reshape(-1, l.d_out) if g is not None else torch.zeros(u.shape[0], l.d_out, device=u.device, dtype=u.dtype)
        pieces[l.name] = (u, d.detach())
    return pieces


def real_tokens(u: Tensor, d: Tensor) -> Tensor:
    """Which rows of :func:`gradient_pieces`' ``(u, delta)`` (any leading shape) are real tokens: both parts
    nonzero (padding has no gradient; a zero key carries no change)."""
    return (u != 0).any(-1) & (d != 0).any(-1)


@contextlib.contextmanager
def per_problem_edit(model: nn.Module, layers: list[LayerSpec], n_problems: int,
                     terms: Mapping[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Run ``model`` with ``terms[name](x)`` added to each edited layer's output, ``x`` being the layer's
    input as ``[n_problems, rows, d_in]``: the rows of every batch are ``n_problems`` equal consecutive
    groups, and a term returns ``[n_problems, rows, d_out]``, so group ``b`` sees problem ``b``'s edit
    only. The base weights are neither copied nor changed; autograd reaches what the terms use."""
    def hook(spec: LayerSpec, term: Callable[[Tensor], Tensor]):
        def fn(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return out + term(args[0].reshape(n_problems, -1, spec.d_in)).view_as(out)
        return fn

    handles = [model.get_submodule(l.module_name).register_forward_hook(hook(l, terms[l.name])) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def low_rank_edit(model: nn.Module, layers: list[LayerSpec], factors: Mapping[str, tuple[Tensor, Tensor]]
                  ) -> contextlib.AbstractContextManager:
    """Run ``model`` as if ``weight_update(layer, u[b], d[b])`` were added to each edited weight, for ``P``
    problems at once: ``factors[name] = (u [P, n, d_in], d [P, n, d_out])`` (see :func:`per_problem_edit`).
    Each edited layer adds ``(x u^T) d`` to its output (``x (u^T d)`` when the dense product is
    cheaper), one batched product over all problems."""
    def term(spec: LayerSpec) -> Callable[[Tensor], Tensor]:
        u, d = factors[spec.name]

        def fn(x: Tensor) -> Tensor:
            uu, dd = u.to(x.dtype).transpose(1, 2), d.to(x.dtype)
            n, rows = u.shape[1], x.shape[1]
            if rows * n * (spec.d_in + spec.d_out) <= (rows + n) * spec.d_in * spec.d_out:
                return (x @ uu) @ dd
            return x @ (uu @ dd)
        return fn

    n_problems = next(iter(factors.values()))[0].shape[0] if factors else 1
    return per_problem_edit(model, layers, n_problems, {l.name: term(l) for l in layers})


def dense_edit(model: nn.Module, layers: list[LayerSpec], deltas: Mapping[str, Tensor]
               ) -> contextlib.AbstractContextManager:
    """Run ``model`` as if ``deltas[name][b]`` (``[P, *weight.shape]``) were added to each edited weight,
    for ``P`` problems at once (see :func:`per_problem_edit`)."""
    def term(spec: LayerSpec) -> Callable[[Tensor], Tensor]:
        dw = deltas[spec.name]
        a = dw if spec.kind == "conv1d" else dw.transpose(1, 2)  # [P, d_in, d_out]
        return lambda x: x @ a.to(x.dtype)

    n_problems = next(iter(deltas.values())).shape[0] if deltas else 1
    return per_problem_edit(model, layers, n_problems, {l.name: term(l) for l in layers})


def weight_update(spec: LayerSpec, u: Tensor, delta: Tensor) -> Tensor:
    """``sum_t delta_t u_t^T`` in the layer's stored weight layout (one contraction over tokens)."""
    if spec.kind == "conv1d":
        return u.transpose(-1, -2) @ delta
    return delta.transpose(-1, -2) @ u


def fingerprint(model: nn.Module, layers: list[LayerSpec]) -> dict[str, str]:
    """Identify a base model: its name, a hash of its config and a hash of the edited weights.

    Every value of every edited weight is hashed (as float32 bytes), so any change is seen: about
    0.2 s per 4096 x 16384 matrix on one CPU core (docs/real_models.md). Meta-training computes it
    once per run (the base is frozen), not on every checkpoint save.
    """
    cfg = getattr(model, "config", None)
    cfg_d = {k: v for k, v in (cfg.to_dict() if cfg is not None else {}).items()
             if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")}
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for l in layers:
        h.update(l.name.encode())
        w = params.get(l.name)  # a model without this layer gets a hash that matches nothing
        # the array's own buffer (no bytes copy of a weight that may be 1 GB): the same bytes as before
        h.update(w.detach().float().cpu().contiguous().numpy() if w is not None else b"missing")
    dtypes = sorted({str(params[l.name].dtype).removeprefix("torch.") for l in layers if l.name in params})
    return {"name": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
            "config_sha256": hashlib.sha256(json.dumps(cfg_d, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "edited_weights_sha256": h.hexdigest()[:16],
            "weights_dtype": ",".join(dtypes),  # informational: explains a mismatch, never compared
            "layers": json.dumps([asdict(l) for l in layers])}


def check_fingerprint(saved: Mapping[str, str], model: nn.Module, layers: list[LayerSpec], source: str,
                      current: Mapping[str, str] | None = None) -> None:
    """Refuse to use an editor on a base model other than the one it was trained for (``current``:
    the model's fingerprint when already computed)."""
    cur = current if current is not None else fingerprint(model, layers)
    bad = [k for k in ("config_sha256", "edited_weights_sha256") if saved.get(k) != cur[k]]
    if bad:
        # the same checkpoint loaded in another dtype has other weight values (older editor files lack the entry)
        dt = saved.get("weights_dtype")
        hint = (f"; the editor's base had {dt} weights and this one has {cur.get('weights_dtype')}: "
                f"load the base with the same base_dtype" if dt and dt != cur.get("weights_dtype") else "")
        raise ValueError(
            f"{source} was trained for base model '{saved.get('name')}' (config {saved.get('config_sha256')}, "
            f"edited weights {saved.get('edited_weights_sha256')}), but the model given is '{cur['name']}' "
            f"(config {cur['config_sha256']}, edited weights {cur['edited_weights_sha256']}); mismatch in {', '.join(bad)}{hint}")
