"""MALMEN: mass editing by least-squares aggregation (Tan, Zhang and Fu, ICLR 2024).

MEND (:mod:`editors.mend`) applies K edits at once by summing their per-token updates
``delta~ u~^T``; the sum lets edits cancel and spill into each other, so quality falls as K grows.
MALMEN keeps the same per-token networks (:mod:`editors.hypernet`) but uses them to produce, for
every edit token ``t`` of every edit, a *value shift* ``v_t = -alpha_l * delta~_t`` (the change the
token's output of layer ``l`` should get: a descent step on that output through ``g``) and then
fits one weight change to all of them by ridge least squares over the tokens' keys ``u_t``
(the layer inputs, unchanged)::

    S_l = argmin_S  sum_t ||u_t S - v_t||^2 + lambda_l ||S||^2 = (U^T U + lambda_l I)^-1 U^T V

with ``S_l [d_in, d_out]`` acting as ``y += x S_l`` (GPT-2's Conv1D weight layout; a Linear weight
gets ``S_l^T``) and ``lambda_l = exp(log_ridges[l])`` learned per layer. Optionally
(``key_cov_weight`` w > 0) the penalty is also ``w ||C_l^(1/2) S||^2`` with ``C_l`` the mean ``u u^T``
of the keys of other inputs seen in meta-training (training edits and locality inputs), as MEMIT's
key covariance does (Meng et al., ICLR 2023): the change is kept small along the directions other
inputs use, not uniformly (an option, not in the published MALMEN; docs/experiments.md). ``U^T U`` and ``U^T V`` are
accumulated ``token_chunk`` tokens at a time and the system is solved by a Cholesky factorisation in
float32 (float64 for a float64 model) whatever the base dtype, so the cost of the solve does not
depend on K. The base model's forward/backward for the pieces runs ``edit_chunk`` edits at a time.
By default each pass that reads the pieces recomputes them from the frozen base model ``edit_chunk``
edits at a time (:meth:`MALMEN.piece_chunks`), so no more than two edit chunks' pieces are held,
whatever K; ``cache_pieces`` keeps all K edits' pieces instead (memory grows with K; the step time
measured about the same on the tiny model, where the hypernetwork dominates).

In a stream, ``memory_weight`` mu > 0 (an evaluation option) makes each change also keep the layer's
outputs at the keys of the edits already merged into the working model: the solve adds ``mu * M_l``,
``M_l`` the sum of their ``u u^T`` (:mod:`editors.key_memory`), to ``U^T U``.

Plain torch: no Lightning here. Typical use::

    editor = MALMEN.load("runs/malmen/editor.safetensors", model)   # refuses a different base model
    edited = editor.edit(model, batch_of_1000_edits, family="causal")
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.base import DeltaEditor, EditorContext, WeightDelta
from editors.hypernet import PieceNetworks, _sum_over_processes
from editors.io import FileEditor
from editors.key_memory import RememberedDelta, key_memory
from editors.layers import LayerSpec, gradient_pieces, real_tokens
from editors.losses import forward_logits, nll

Pieces = dict[str, tuple[Tensor, Tensor]]  # per layer (u [T, d_in], delta [T, d_out]) of real tokens
PieceChunks = Callable[[], Iterator[Pieces]]  # each call: one pass over a batch's pieces, token_chunk at a time


class MALMEN(FileEditor, PieceNetworks, nn.Module, DeltaEditor):
    """The editor: :class:`editors.hypernet.PieceNetworks`, a step size ``edit_lrs`` and a log ridge
    ``log_ridges`` per edited layer. ``init_ridge`` 0 (no ridge) is allowed for analysis and fails
    with a clear error when the keys do not span the layer's input space. ``cache_pieces`` False (default)
    trades a base-model forward+backward over the edit inputs per extra pass for memory constant in K."""

    def __init__(self, layers: Sequence[LayerSpec | Mapping[str, Any]], rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-3, init_ridge: float = 1.0, edit_chunk: int = 64,
                 token_chunk: int = 4096, key_cov_weight: float = 0.0, cache_pieces: bool = False,
                 memory_weight: float = 0.0) -> None:
        super().__init__()
        if init_ridge < 0 or key_cov_weight < 0 or memory_weight < 0 or min(edit_chunk, token_chunk) < 1:
            raise ValueError(f"init_ridge, key_cov_weight and memory_weight must not be negative, and edit_chunk, "
                             f"token_chunk at least 1; got {init_ridge}, {key_cov_weight}, {memory_weight}, "
                             f"{edit_chunk}, {token_chunk}")
        self.name = "malmen"
        self.layers = [l if isinstance(l, LayerSpec) else LayerSpec(**l) for l in layers]
        self.edit_chunk, self.token_chunk, self.cache_pieces = edit_chunk, token_chunk, cache_pieces
        self.memory_weight = float(memory_weight)
        self.config = {"layers": [asdict(l) for l in self.layers], "rank": rank, "n_hidden": n_hidden,
                       "init_edit_lr": init_edit_lr, "init_ridge": init_ridge, "edit_chunk": edit_chunk,
                       "token_chunk": token_chunk, "key_cov_weight": key_cov_weight, "cache_pieces": cache_pieces,
                       "memory_weight": self.memory_weight}
        self._build_networks(rank, n_hidden)
        self.edit_lrs = nn.Parameter(torch.full((len(self.layers),), float(init_edit_lr)))
        self.log_ridges = nn.Parameter(torch.full((len(self.layers),), math.log(init_ridge) if init_ridge else -math.inf))
        self.key_cov_weight = key_cov_weight
        if key_cov_weight:  # per layer: sum of u u^T and count of the other inputs' keys (float64)
            for i, l in enumerate(self.layers):
                self.register_buffer(f"key_moment{i}", torch.zeros(l.d_in, l.d_in, dtype=torch.float64))
            self.register_buffer("key_count", torch.zeros(len(self.layers), dtype=torch.float64))

    # -- the pieces: keys and value gradients of the edit tokens, edit_chunk edits at a time
    def edit_chunk_pieces(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family) -> Iterator[Pieces]:
        """``edit_chunk`` edits at a time: per layer ``(u, delta)`` of every token that carries gradient
        (padding left out), for the sum over edits of each edit's mean token NLL (each edit's pieces at
        the scale they have alone)."""
        for a in range(0, batch["input_ids"].shape[0], self.edit_chunk):
            mb = {k: v[a:a + self.edit_chunk] for k, v in batch.items()}
            n = mb["input_ids"].shape[0]
            p = gradient_pieces(model, self.layers, lambda: nll(forward_logits(model, mb, family), mb["labels"], family) * n)
            keep = {k: real_tokens(u, d) for k, (u, d) in p.items()}
            yield {k: (u[keep[k]], d[keep[k]]) for k, (u, d) in p.items()}

    def token_pieces(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family) -> Pieces:
        """:meth:`edit_chunk_pieces` of all edits of ``batch`` together (real tokens only; :meth:`pieces`,
        the networks' own, keeps padding as zero rows, in the layout a stream step reads)."""
        parts = list(self.edit_chunk_pieces(model, batch, family))
        return {l.name: (torch.cat([p[l.name][0] for p in parts]), torch.cat([p[l.name][1] for p in parts]))
                for l in self.layers}

    def token_chunks(self, pieces: Pieces) -> Iterator[Pieces]:
        """``pieces`` ``token_chunk`` tokens (of each layer) at a time."""
        n = max(u.shape[0] for u, _ in pieces.values())
        for a in range(0, n, self.token_chunk):
            yield {k: (u[a:a + self.token_chunk], d[a:a + self.token_chunk]) for k, (u, d) in pieces.items()}

    def piece_chunks(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family) -> PieceChunks:
        """``batch``'s pieces for the passes that read them: each call of the result is one pass,
        ``token_chunk`` tokens at a time. With ``cache_pieces`` the pieces are computed here, once, and
        kept (memory grows with the number of edits); without, every pass recomputes them from the base
        model (frozen: the same pieces bit for bit) ``edit_chunk`` edits at a time, so a pass holds the
        pieces of the edit chunk it reads (and, while computing the next, of the one before) only."""
        if self.cache_pieces:
            pieces = self.token_pieces(model, batch, family)
            return lambda: self.token_chunks(pieces)
        return lambda: (c for p in self.edit_chunk_pieces(model, batch, family) for c in self.token_chunks(p))

    @torch.no_grad()
    def update_statistics(self, chunks: Iterable[Pieces]) -> None:
        """Fold all tokens of ``chunks`` (of one or several problems; read once, a chunk at a time)
        into the input statistics in one update per network (summed over processes): the same
        statistics however the tokens are chunked."""
        sums: list[Tensor | int] = [0] * len(self.norms)
        for c in chunks:
            for k, norm in enumerate(self.norms):
                sums[k] = sums[k] + norm.sums(*self._group_inputs(c, k, 1))
        for norm, s in zip(self.norms, sums):
            norm.fold(s)

    @torch.no_grad()
    def fold_keys(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family) -> None:
        """Fold the keys of every real token of ``batch`` (other inputs, not edits) into the key
        statistics of ``key_cov_weight``, summed over processes."""
        dev = batch["input_ids"].device
        sums = [torch.zeros(l.d_in * l.d_in + 1, dtype=torch.float64, device=dev) for l in self.layers]
        for a in range(0, batch["input_ids"].shape[0], self.edit_chunk):
            mb = {k: v[a:a + self.edit_chunk] for k, v in batch.items()}
            keep = mb["attention_mask"].flatten().bool()
            p = gradient_pieces(model, self.layers, lambda: nll(forward_logits(model, mb, family), mb["labels"], family))
            for s, l in zip(sums, self.layers):
                u = p[l.name][0][keep].double()
                s[:-1] += (u.T @ u).flatten()
                s[-1] += u.shape[0]
        for i, s in enumerate(sums):
            _sum_over_processes(s)
            getattr(self, f"key_moment{i}").add_(s[:-1].view_as(getattr(self, f"key_moment{i}")))
            self.key_count[i] += s[-1]

    # -- value shifts and the least-squares change
    def value_shifts(self, pieces: Pieces) -> dict[str, Tensor]:
        """Per layer ``v [T, d_out] = -alpha_l * delta~`` (differentiable in the editor's parameters)."""
        t = self._transformed(pieces, 1, update=False)
        return {l.name: -self.edit_lrs[i] * t[l.name][1][0, :pieces[l.name][0].shape[0]]
                for i, l in enumerate(self.layers)}

    def ridges(self) -> Tensor:
        return self.log_ridges.exp()

    @torch.no_grad()
    def normal_equations(self, chunks: Iterable[Pieces]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer ``(U^T U, U^T V)`` over all tokens of ``chunks`` (a :meth:`piece_chunks` pass),
        accumulated a chunk at a time in float32 (or wider)."""
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for chunk in chunks:
            v = self.value_shifts(chunk)
            for l in self.layers:
                u = chunk[l.name][0]
                dt = torch.promote_types(u.dtype, torch.float32)
                u, vl = u.to(dt), v[l.name].to(dt)
                uu, uv = out.get(l.name, (u.new_zeros(l.d_in, l.d_in), u.new_zeros(l.d_in, l.d_out)))
                out[l.name] = (uu.addmm_(u.T, u), uv.addmm_(u.T, vl))
        return out

    @torch.no_grad()
    def solve(self, eqs: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer ``(S [d_in, d_out], L)``: the ridge solution and the Cholesky factor of
        ``U^T U + lambda I`` (meta-training reuses it for the gradient)."""
        out = {}
        for i, l in enumerate(self.layers):
            uu, uv = eqs[l.name]
            L = self._factor(i, uu)
            out[l.name] = (torch.cholesky_solve(uv, L), L)
        return out

    def _factor(self, i: int, uu: Tensor) -> Tensor:
        """The Cholesky factor of layer ``i``'s system ``U^T U + lambda I (+ w C)`` (``uu`` ``[..., d_in, d_in]``;
        differentiable in the ridge where autograd is on)."""
        l = self.layers[i]
        A = uu + self.ridges()[i].to(uu.dtype) * torch.eye(l.d_in, dtype=uu.dtype, device=uu.device)
        if self.key_cov_weight:
            A = A + (self.key_cov_weight / self.key_count[i].clamp_min(1) * getattr(self, f"key_moment{i}")).to(A.dtype)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            ridge = float(self.ridges()[i])
            if ridge == 0:
                raise ValueError(f"{l.name}: the least-squares system is singular (ridge 0; the edit tokens' keys do "
                                 f"not span the layer's {l.d_in} inputs): use a positive ridge")
            # a wide layer's key moments can outgrow the ridge by more than the dtype resolves
            raise ValueError(f"{l.name}: the least-squares system is not positive definite in {A.dtype} (ridge {ridge:g}, "
                             f"largest diagonal entry {float(A.diagonal(dim1=-2, dim2=-1).max()):.3g}): its condition "
                             f"is past {A.dtype}'s precision; raise init_ridge (about 1e-5 of that entry) or edit in float64")
        return L

    # -- a stream step (meta-training over streams: lightning_modules.malmen_stream_module)
    @staticmethod
    def _keys(pieces: Pieces, l: LayerSpec, n_problems: int) -> tuple[Tensor, Tensor]:
        """Layer ``l``'s keys ``U [P, n, d_in]`` of :meth:`pieces` (``P`` equal consecutive groups; padding
        zeroed as the networks mask it), in float32 or wider, and their moments ``U^T U [P, d_in, d_in]``."""
        u, d = pieces[l.name]
        u = u * real_tokens(u, d).unsqueeze(-1).to(u.dtype)
        u = u.to(torch.promote_types(u.dtype, torch.float32)).view(n_problems, -1, l.d_in)
        return u, u.transpose(1, 2) @ u

    def remember(self, pieces: Pieces, n_problems: int, memory: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """The stream's key memory after a step: ``memory`` plus, per problem, the step's ``U^T U``
        (``[P, d_in, d_in]`` per layer; what :class:`editors.key_memory.RememberedDelta` adds on merge)."""
        out = {}
        for l in self.layers:
            uu = self._keys(pieces, l, n_problems)[1]
            out[l.name] = uu if memory is None else memory[l.name] + uu
        return out

    def step_deltas(self, pieces: Pieces, n_problems: int, memory: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One stream step's changes ``[P, *weight.shape]`` from :meth:`pieces` of ``P`` problems (streams),
        each problem's edits solved together as :meth:`make_edit` does, with ``memory_weight`` times the
        stream's key ``memory`` (:meth:`remember` of the earlier steps) in the system; differentiable in
        the editor's parameters (the statistics as they are: a step is computed twice in meta-training)."""
        t = self._transformed(pieces, n_problems, update=False)
        out = {}
        for i, l in enumerate(self.layers):
            u, uu = self._keys(pieces, l, n_problems)
            v = -self.edit_lrs[i] * t[l.name][1].to(u.dtype)
            if memory is not None and self.memory_weight:
                uu = uu + self.memory_weight * memory[l.name].to(uu.dtype)
            S = torch.cholesky_solve(u.transpose(1, 2) @ v, self._factor(i, uu))
            out[l.name] = self.to_weight(l, S).to(pieces[l.name][0].dtype)
        return out

    @staticmethod
    def to_weight(spec: LayerSpec, S: Tensor) -> Tensor:
        """``S [..., d_in, d_out]`` (``y += x S``) in the layer's stored weight layout."""
        return S if spec.kind == "conv1d" else S.transpose(-1, -2)

    def solved(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family) -> dict[str, tuple[Tensor, Tensor]]:
        """:meth:`solve` for all edits of ``batch`` together (no graph)."""
        return self.solve(self.normal_equations(self.piece_chunks(model, batch, family)()))

    @classmethod
    def for_evaluation(cls, context: EditorContext, path: str, memory_weight: float | None = None,
                       key_cov_weight: float | None = None) -> "MALMEN":
        """The trained editor in file ``path``. ``memory_weight`` (default: the file's, 0 after
        meta-training) sets the stream key memory's weight mu (see the module docstring); ``key_cov_weight``
        (default: the file's) the weight of its key covariance penalty (a file trained without one has none)."""
        editor = cls.load(path, context.model)
        if key_cov_weight is not None and not editor.key_cov_weight:
            raise ValueError(f"{path} was trained without key statistics: key_cov_weight needs a file trained with one")
        for key, value in (("memory_weight", memory_weight), ("key_cov_weight", key_cov_weight)):
            if value is not None:
                if value < 0:
                    raise ValueError(f"{key} must not be negative, got {value}")
                setattr(editor, key, float(value))
                editor.config[key] = float(value)
        return editor

    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The weight changes (to add) that apply all edits of ``batch`` at once (``loc_batch`` unused)."""
        return self.make_edit(model, batch, family).deltas

    def make_edit(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
                  loc_batch: Mapping[str, Tensor] | None = None) -> WeightDelta:
        """All edits of ``batch`` at once; with ``memory_weight``, a change that also keeps the outputs at
        ``model``'s remembered keys and, merged, adds this edit's keys to them."""
        eqs = self.normal_equations(self.piece_chunks(model, batch, family)())
        memory = key_memory(model) if self.memory_weight else {}
        kept = {k: (uu + self.memory_weight * memory[k].to(uu.dtype) if k in memory else uu, uv)
                for k, (uu, uv) in eqs.items()}
        solved = self.solve(kept)
        deltas = {l.name: self.to_weight(l, solved[l.name][0]) for l in self.layers}
        if not self.memory_weight:
            return WeightDelta(deltas)
        return RememberedDelta(deltas, {k: uu for k, (uu, _) in eqs.items()})
