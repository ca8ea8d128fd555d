"""The per-token networks that MEND-style hypernetwork editors share.

Every such editor reads the gradient pieces ``(u, delta)`` of its edited layers
(:func:`editors.layers.gradient_pieces`) and maps each token's pair through a small network ``g``:
``concat(norm(u), norm(delta))`` -> ``(u~, delta~)``. ``g`` is shared by all layers of one weight
shape (each layer gets its own FiLM scale/offset) and is a stack of low-rank residual blocks
``z + relu(s * (U V z + b) + o)`` with ``U = 0`` at init, so it starts as the identity. The running
normalisation statistics are per layer, updated only while meta-training, synchronised across
data-parallel processes, and saved with the editor. Padding tokens (all-zero ``u`` or ``delta``) are
masked out of both the statistics and the output. All layers of one shape go through ``g`` in one
batched call. Optionally (``precondition_ridge``) each ``u~`` is then multiplied by a ridge inverse
of the layer inputs' correlation (:class:`InputPreconditioner`).

What differs between editors is how the transformed pieces become a weight change: MEND sums
``delta~ u~^T`` over tokens (:mod:`editors.mend`); MALMEN fits one change to all tokens' value
shifts by least squares (:mod:`editors.malmen`). Plain torch: no Lightning here.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.layers import LayerSpec, gradient_pieces, real_tokens
from editors.losses import forward_logits, nll_per_example

def _sum_over_processes(t: Tensor) -> None:
    """Sum ``t`` in place over all data-parallel processes (nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


class RunningNorm(nn.Module):
    """Per-layer running mean/std of ``M`` layers' ``D``-dim inputs (Chan's parallel update).

    Before any update it is the identity (mean 0, std 1).
    """

    def __init__(self, n_layers: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(n_layers, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor, mask: Tensor) -> None:
        """Fold in the rows of ``x [M, N, D]`` where ``mask [M, N]``, summed over all processes. Rows
        holding a NaN or infinity are left out (a bad step must not poison the statistics for good)."""
        self.fold(self.sums(x, mask))

    @staticmethod
    @torch.no_grad()
    def sums(x: Tensor, mask: Tensor) -> Tensor:
        """``[M, 1 + 2D]`` float64: count, sum and sum of squares of the finite rows of ``x`` where
        ``mask``. Sums of several chunks add up to those of the whole, so :meth:`fold` can take
        statistics gathered chunk by chunk in one update."""
        finite = torch.isfinite(x).all(-1)
        m = (mask & finite).to(torch.float64).unsqueeze(-1)
        xd = torch.where(finite.unsqueeze(-1), x.detach(), 0).to(torch.float64)
        return torch.cat([m.sum(1), (xd * m).sum(1), (xd * xd * m).sum(1)], dim=-1)

    @torch.no_grad()
    def fold(self, stats: Tensor) -> None:
        """Fold in :meth:`sums` output, summed over all processes (Chan's parallel update)."""
        stats = stats.clone()
        _sum_over_processes(stats)
        D = self.mean.shape[-1]
        n_b, s, ss = stats[:, :1], stats[:, 1:1 + D], stats[:, 1 + D:]
        mean_b = s / n_b.clamp_min(1)
        m2_b = (ss - n_b * mean_b * mean_b).clamp_min(0)
        n_a = self.count.unsqueeze(-1)
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n.clamp_min(1)
        self.m2 += m2_b + delta * delta * n_a * n_b / n.clamp_min(1)
        self.count += n_b.squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        n = self.count.unsqueeze(-1)
        std = torch.where(n > 1, (self.m2 / (n - 1).clamp_min(1)).sqrt(), torch.ones_like(self.m2))
        mean, std = self.mean.to(x.dtype).unsqueeze(1), std.to(x.dtype).unsqueeze(1)
        return (x - mean) / (std + self.eps)


class InputPreconditioner(nn.Module):
    """Per-layer running correlation ``R`` of ``M`` layers' ``D``-dim inputs ``u``, and the
    preconditioner ``K = (1 + r) (R + r I)^-1`` (ridge ``r``) applied to each transformed ``u~``
    (which ``g`` produces in normalised units): an option, not in the published MEND.

    Why: an edit ``delta~ u~^T`` moves another input ``x`` by ``delta~ (u~^T x)``. The inputs an edit
    should leave alone share the directions that carry most of the inputs' variance (a relation's
    wording; the classifier's common [CLS] state), and ``K`` shrinks ``u~`` along them, as K-FAC's
    input factor (or ROME's key covariance) does. ``K`` is the identity for uncorrelated inputs and
    before any update; updated only while meta-training, summed over all processes, saved with the
    editor. ``K`` is recomputed only when the number of inputs seen has doubled since it was last
    computed (a ``D x D`` inversion per step would double a CPU run's time; this is about 20 in all),
    so a step uses statistics of at least half the inputs seen so far. The default zsRE editor uses
    it (docs/experiments.md: more edit success and generality, and less drawdown).
    """

    def __init__(self, n_layers: int, dim: int, ridge: float) -> None:
        super().__init__()
        self.ridge = ridge
        self.register_buffer("count", torch.zeros(n_layers, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(n_layers, dim, dtype=torch.float64))
        self.register_buffer("moment", torch.zeros(n_layers, dim, dim, dtype=torch.float64))  # E[u u^T]
        # K itself is state too: a resumed run and a loaded editor use the K the run last computed
        self.register_buffer("K", torch.eye(dim, dtype=torch.float64).repeat(n_layers, 1, 1))
        self.register_buffer("K_seen", torch.zeros((), dtype=torch.float64))  # inputs seen when K was computed

    @torch.no_grad()
    def update(self, x: Tensor, mask: Tensor) -> None:
        """Fold in the rows of ``x [M, N, D]`` where ``mask [M, N]``, summed over all processes
        (non-finite rows left out, as :meth:`RunningNorm.update` does)."""
        finite = torch.isfinite(x).all(-1)
        m = (mask & finite).to(torch.float64)
        xd = torch.where(finite.unsqueeze(-1), x.detach(), 0).to(torch.float64) * m.unsqueeze(-1)
        M, D = self.mean.shape
        stats = torch.cat([m.sum(1, keepdim=True), xd.sum(1), (xd.transpose(1, 2) @ xd).flatten(1)], 1)
        _sum_over_processes(stats)
        n = self.count + stats[:, 0]
        keep, add = (self.count / n.clamp_min(1)).unsqueeze(-1), (1 / n.clamp_min(1)).unsqueeze(-1)
        self.mean.copy_(self.mean * keep + stats[:, 1:1 + D] * add)
        self.moment.copy_((self.moment.flatten(1) * keep + stats[:, 1 + D:] * add).view(M, D, D))
        self.count.copy_(n)

    @torch.no_grad()
    def matrix(self) -> Tensor:
        """``K [M, D, D]`` in float64; the identity for layers with fewer than two inputs seen."""
        seen = self.count.sum()  # the same on every process: the statistics are all-reduced
        if seen > 0 and seen >= 2 * self.K_seen:
            eye = torch.eye(self.mean.shape[-1], dtype=torch.float64, device=self.moment.device)
            cov = self.moment - self.mean.unsqueeze(-1) * self.mean.unsqueeze(-2)
            sd = cov.diagonal(dim1=1, dim2=2).clamp_min(1e-12).sqrt()
            corr = cov / (sd.unsqueeze(-1) * sd.unsqueeze(-2))
            # symmetric positive definite: Cholesky (the batched LU inverse failed on finite inputs
            # under a sharded bf16-mixed run)
            K = (1 + self.ridge) * torch.cholesky_inverse(torch.linalg.cholesky(corr + self.ridge * eye))
            self.K.copy_(torch.where((self.count > 1)[:, None, None], K, eye))
            self.K_seen.copy_(seen)
        return self.K

    def forward(self, u: Tensor) -> Tensor:
        """``u [M, N, D]`` -> ``u K`` (``K`` is symmetric), layer ``m`` with its own ``K``. Outside
        meta-training the statistics are frozen, so ``K`` is the stored one: no recompute check (which
        reads a tensor on the host: a device sync per edit on GPU)."""
        K = self.matrix() if self.training else self.K
        return u @ K.to(u.dtype)


class LowRankResidualNet(nn.Module):
    """``g``: residual low-rank blocks shared by ``M`` layers, each with its FiLM scale and offset."""

    def __init__(self, n_layers: int, dim: int, rank: int, n_hidden: int = 2) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(n_hidden, dim, rank))  # zero: g starts as the identity
        self.V = nn.Parameter(torch.empty(n_hidden, rank, dim))
        for v in self.V:
            nn.init.xavier_uniform_(v)
        self.b = nn.Parameter(torch.zeros(n_hidden, dim))
        self.scale = nn.Parameter(torch.ones(n_layers, n_hidden, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, n_hidden, dim))

    def forward(self, z: Tensor) -> Tensor:
        """``z [M, N, D]`` -> same shape; layer ``m`` uses FiLM parameters ``m``."""
        return _ResidualBlocks.apply(z, self.U, self.V, self.b, self.scale, self.shift)


class _ResidualBlocks(torch.autograd.Function):
    """:class:`LowRankResidualNet`'s blocks ``z + relu(s * (z V^T U^T + b) + o)`` with a hand-written
    backward. Autograd would give each block its own gradient of ``U[i]``/``V[i]`` and then copy them
    into a stacked one (or zero-fill the whole stack per block when indexing): on CPU that traffic cost
    as much as the products. Here every product writes straight into its slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, U: Tensor, V: Tensor, b: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        saved = []
        for i in range(U.shape[0]):
            a = z.flatten(0, 1) @ V[i].T
            h = torch.addmm(b[i], a, U[i].T).view_as(z)
            g = torch.addcmul(shift[:, i].unsqueeze(1), scale[:, i].unsqueeze(1), h)
            # the ReLU's gradient passes at exactly 0 (as clamp(min=0)'s does): at the identity init
            # every pre-activation is 0, and relu's convention (none at 0) would leave g stuck there
            saved += [z, a, h, g >= 0]
            z = z + g.relu_()
        ctx.save_for_backward(U, V, scale, *saved)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gz: Tensor) -> tuple[Tensor | None, ...]:
        U, V, scale, *saved = ctx.saved_tensors
        gU, gV, gb = torch.empty_like(U), torch.empty_like(V), U.new_empty(U.shape[:2])
        gscale, gshift = torch.empty_like(scale), torch.empty_like(scale)
        with torch.autocast(gz.device.type, enabled=False):  # products in the dtype the forward used
            for i in reversed(range(U.shape[0])):
                z, a, h, pos = saved[4 * i:4 * i + 4]
                gg = gz * pos  # through the ReLU (open at 0, see forward)
                gscale[:, i] = (gg * h).sum(1)
                gshift[:, i] = gg.sum(1)
                gh = (gg * scale[:, i].unsqueeze(1)).flatten(0, 1)
                gb[i] = gh.sum(0)
                gh = gh.to(a.dtype)
                _mm_into(gU[i], gh.T, a)
                ga = gh @ U[i].to(a.dtype)
                _mm_into(gV[i], ga.T, z.flatten(0, 1).to(a.dtype))
                if i or ctx.needs_input_grad[0]:  # the input's gradient is rarely wanted: u, delta are constants
                    gz = gz + (ga @ V[i].to(a.dtype)).view_as(gz)
        return gz if ctx.needs_input_grad[0] else None, gU, gV, gb, gscale, gshift


def _mm_into(out: Tensor, x: Tensor, y: Tensor) -> None:
    """``out[...] = x @ y`` without a temporary where the dtypes allow (not under mixed precision)."""
    if x.dtype == out.dtype:
        torch.mm(x, y, out=out)
    else:
        out.copy_(x @ y)


class PieceNetworks:
    """The networks part of a hypernetwork editor (a mixin for an ``nn.Module`` with ``layers``): one
    :class:`LowRankResidualNet` and :class:`RunningNorm` (and optionally :class:`InputPreconditioner`)
    per distinct (d_in, d_out), and :meth:`_transformed`, the tokens' pieces through them."""

    layers: list[LayerSpec]
    training: bool

    def _build_networks(self, rank: int, n_hidden: int, precondition_ridge: float | None = None) -> None:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, l in enumerate(self.layers):
            groups[(l.d_in, l.d_out)].append(i)
        self.groups = list(groups.items())  # [((d_in, d_out), [layer indices])]
        self.nets = nn.ModuleList(LowRankResidualNet(len(ix), di + do, rank, n_hidden) for (di, do), ix in self.groups)
        self.norms = nn.ModuleList(RunningNorm(len(ix), di + do) for (di, do), ix in self.groups)
        self.preconds = None if precondition_ridge is None else nn.ModuleList(
            InputPreconditioner(len(ix), di, precondition_ridge) for (di, _), ix in self.groups)

    def pieces(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               losses: list[Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer ``(u, delta)`` of every token of ``batch`` (padding as zero rows) for the sum over
        edits of each edit's mean token NLL: every edit's pieces have the scale they have alone, however
        many edits share a problem or a batch (a mean would shrink them by 1/K). ``losses``: a list the
        rows' NLLs (``[rows]``, detached) are appended to, from the same forward pass."""
        rows = batch["input_ids"].shape[0]

        def loss() -> Tensor:
            per_row = nll_per_example(forward_logits(model, batch, family), batch["labels"], family)
            if losses is not None:
                losses.append(per_row.detach())
            return per_row.mean() * rows

        return gradient_pieces(model, self.layers, loss)

    def _group_inputs(self, pieces: Mapping[str, tuple[Tensor, Tensor]], group: int, n_problems: int
                      ) -> tuple[Tensor, Tensor]:
        """Group ``group``'s pieces as ``g``'s input ``x [M, P * n, D]`` and the mask of real tokens."""
        (d_in, d_out), ix = self.groups[group]
        per = [torch.cat(pieces[self.layers[i].name], -1).view(n_problems, -1, d_in + d_out) for i in ix]
        n = max(p.shape[1] for p in per)  # layers of one shape may see different token counts
        # (encoder vs decoder): pad with zero rows, which the mask leaves out like padding tokens
        x = torch.stack([p if p.shape[1] == n else F.pad(p, (0, 0, 0, n - p.shape[1])) for p in per])
        x = x.flatten(1, 2).to(self.nets[group].U.dtype)  # [M, P * n, D]
        mask = real_tokens(x[..., :d_in], x[..., d_in:])  # padding carries no gradient
        return x, mask

    @torch.no_grad()
    def fold_statistics(self, pieces: Mapping[str, tuple[Tensor, Tensor]], n_problems: int = 1) -> None:
        """Fold the tokens' pieces into the input statistics (all processes together), as
        :meth:`_transformed` does while training: for a caller that transforms the same pieces more
        than once and needs the same statistics each time (a stream step, recomputed)."""
        pres = self.preconds if self.preconds is not None else [None] * len(self.groups)
        for k, (((d_in, _), _), norm, pre) in enumerate(zip(self.groups, self.norms, pres)):
            x, mask = self._group_inputs(pieces, k, n_problems)
            norm.update(x, mask)
            if pre is not None:
                pre.update(x[..., :d_in], mask)

    def _transformed(self, pieces: Mapping[str, tuple[Tensor, Tensor]], n_problems: int,
                     update: bool | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer ``(u~ [P, n, d_in], delta~ [P, n, d_out])``: the tokens' pieces through ``g``, split
        into ``P = n_problems`` consecutive groups; padding tokens come out as zero rows. ``update``
        (default: while training) first folds the pieces into the input statistics."""
        update = self.training if update is None else update
        out: dict[str, tuple[Tensor, Tensor]] = {}
        pres = self.preconds if self.preconds is not None else [None] * len(self.groups)
        for k, (((d_in, d_out), ix), net, norm, pre) in enumerate(zip(self.groups, self.nets, self.norms, pres)):
            x, mask = self._group_inputs(pieces, k, n_problems)
            n = x.shape[1] // n_problems
            if update:  # one update from every problem of the step (all processes under DDP)
                norm.update(x, mask)
                if pre is not None:
                    pre.update(x[..., :d_in], mask)
            y = net(norm(x)) * mask.unsqueeze(-1).to(x.dtype)
            u, d = y[..., :d_in], y[..., d_in:]
            if pre is not None:
                u = pre(u)
            u, d = u.view(len(ix), n_problems, n, d_in), d.view(len(ix), n_problems, n, d_out)
            for j, i in enumerate(ix):
                out[self.layers[i].name] = (u[j], d[j])
        return out
