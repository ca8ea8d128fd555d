"""Meta-training of a lifelong editor over streams of edits (RLEdit, Li et al., ICML 2025; docs/methods.md).

A training example is a *stream*: one DataModule problem of ``n_edits`` = T x k edits, taken in order
as T steps of k (``edits_per_step``). From the base weights ``W_0``, step t (1..T):

1. the gradient pieces of step t's edit inputs on the *current* model ``W_{t-1} = W_0 + D_{t-1}``;
2. the editor's change ``dW_t`` from them, and ``D_t = D_{t-1} + dW_t``;
3. the step's loss on ``W_t``: ``L_t = c_edit * NLL(step t's paraphrases) + c_back * NLL(n_back edit
   inputs drawn from the stream's earlier steps: memory backtracking) + c_loc * KL(base || W_t on step
   t's locality inputs) + c_norm * ||D_t||^2`` (squared Frobenius norm summed over the edited matrices).

The objective is ``sum_t gamma^(t-1) L_t / sum_t gamma^(t-1)``, mean over the batch's streams: with
T = 1 and ``c_norm`` 0 it is MEND's.

With ``polyak_fraction`` set, each step's change is rescaled per stream by Polyak's step length, as
evaluation's ``rledit_polyak`` (:class:`editors.until_right.PolyakStep`) does: the step's edit loss
and the slope of its change along the step's gradient (both at ``W_{t-1}``) fix the scale, a
constant of the step (not differentiated), so the editor is trained for the rule it is used with.

**The gradient.** As in MEND, the pieces are constants (no second-order term through how an earlier
change moved a later step's gradient). ``L_t`` then depends on the editor only through
``D_t = sum_{s<=t} dW_s``, so the objective's gradient is ``sum_s J_s^T H_s`` with ``J_s`` the Jacobian
of ``dW_s`` in the editor's parameters and ``H_s = sum_{t>=s} dL_t/dD_t``. It is computed in two
passes: (A) the stream without the editor's graph, keeping each step's pieces and ``G_t = dL_t/dD_t``;
(B) per step, the change recomputed with its graph and ``<dW_s, H_s>`` backpropagated. This is the
exact (first-order) gradient of the whole stream, not a truncated one, at the memory of one step's
activations plus T tensors the size of the edited matrices (``G_t``). The input statistics are folded
in after both passes, so both see the same normalisation.

Manual optimisation (:meth:`EditorModule.manual_step`): gradients averaged over data-parallel
processes with one all-reduce, clipped, Adam with the shared warm-up/cosine schedule.

Validation runs the validation streams the same way (no gradient) and logs ``val/edit_success`` and
``val/generality`` (exact match on each step's edit inputs / paraphrases just after the step),
``val/edit_retention`` (every edit input of the stream at its end), ``val/drawdown``,
``val/loc_agreement``, ``val/loc_kl`` (all the stream's locality inputs at its end, against the base)
and ``val/loss`` (the objective). Torchmetrics means, exact under DDP.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.io import editor_file_class
from editors.layers import dense_edit, weight_update
from editors.losses import forward_logits, kl_pre_post, nll, scores, top1_agreement
from editors.malmen import MALMEN
from editors.mend import MEND
from editors.rledit import RLEdit
from editors.until_right import polyak_scale
from lightning_modules.editor_module import EditorModule, has_label, join_problems, split_problems
from lightning_modules.models import BaseDtype

STREAM_METRICS = ("edit_success", "generality", "edit_retention", "drawdown", "loc_agreement", "loc_kl", "loss")


def step_rows(part: dict[str, Tensor], n_problems: int, n_steps: int, step: int) -> dict[str, Tensor]:
    """Rows of stream step ``step`` of every problem: ``part``'s rows are ``n_problems`` equal groups of
    ``n_steps`` equal steps (as many rows per edit as the part has); problem order is kept."""
    n = part["input_ids"].shape[0] // n_problems
    width = n // n_steps
    idx = torch.tensor([b * n + step * width + j for b in range(n_problems) for j in range(width)],
                       dtype=torch.long, device=part["input_ids"].device)
    return {k: v.index_select(0, idx) for k, v in part.items()}


def backtrack_rows(inner: dict[str, Tensor], n_problems: int, n_steps: int, step: int, n_back: int,
                   seeds: list[int]) -> dict[str, Tensor] | None:
    """Up to ``n_back`` edit inputs per problem drawn (without replacement, generator seeded by
    ``seeds[b]`` and the step) from the steps before ``step`` of the same stream; None at the first step."""
    n = inner["input_ids"].shape[0] // n_problems
    earlier = step * (n // n_steps)
    if step == 0 or n_back < 1:
        return None
    m = min(n_back, earlier)
    idx = []
    for b in range(n_problems):
        g = torch.Generator().manual_seed(seeds[b] * 1009 + step)
        idx += [b * n + int(i) for i in torch.randperm(earlier, generator=g)[:m]]
    idx_t = torch.tensor(idx, device=inner["input_ids"].device)
    return {k: v.index_select(0, idx_t) for k, v in inner.items()}


def stream_seed(indices: list[int], step: int) -> int:
    """A seed for a stream's backtracking draws: its items' dataset indices and the training step, so that
    the draws are the same whichever process holds the stream and after a resume."""
    return int.from_bytes(hashlib.sha256(repr((indices, step)).encode()).digest()[:4], "little")


def polyak_step_scales(editor: RLEdit | MALMEN, row_losses: Tensor, pieces: dict, dW: dict[str, Tensor], n_problems: int,
                       fraction: float, max_scale: float) -> Tensor:
    """Per stream ``[P]``, :class:`editors.until_right.PolyakStep`'s scale of a step's change ``dW``: the step's
    edit loss (the sum over its edits of ``row_losses``, each one's NLL on the current model, from the
    pieces' forward pass) and the slope ``<dW, G>`` with ``G`` rebuilt from the step's ``pieces`` (the same
    gradient, so no second pass)."""
    P = n_problems
    with torch.no_grad():
        slope = sum((dW[l.name].double() * weight_update(l, pieces[l.name][0].view(P, -1, l.d_in),
                                                         pieces[l.name][1].view(P, -1, l.d_out)).double()).flatten(1).sum(1)
                    for l in editor.layers)
    return polyak_scale(row_losses.double().view(P, -1).sum(1), slope, fraction, max_scale)


def _scaled(dW: dict[str, Tensor], scale: Tensor | None) -> dict[str, Tensor]:
    """``dW`` ([P, *weight.shape] per layer) times a per-stream ``scale`` (None: as it is)."""
    if scale is None:
        return dW
    return {k: v * scale.to(v.dtype).view(-1, *[1] * (v.dim() - 1)) for k, v in dW.items()}


def run_stream(editor: RLEdit | MALMEN, model: nn.Module, batch: dict, family: Family, n_steps: int, coefs: dict[str, float],
               seeds: list[int], with_grad: bool = True, score: bool = False, steps: range | None = None
               ) -> dict[str, Any]:
    """Pass A of the module docstring over the batch's streams (``coefs``: the weights ``edit``, ``back``,
    ``kl``, ``norm`` of the step loss's terms, the discount ``gamma`` and ``n_back``). ``steps`` (default: all
    ``n_steps``) are the steps the objective scores; the steps before them only edit the model (a burn-in:
    no loss, no gradient), and the steps after them are not run. ``coefs["polyak"]`` (> 0): each step's
    change rescaled by :func:`polyak_step_scales` (fraction ``polyak``, cap ``polyak_max``). Returns
    ``pieces``, ``scales`` (per stream, or None) and ``G`` (dL_t/dD_t, with ``with_grad``) of each scored
    step, ``D`` (the final changes, [P, *weight.shape]) and the objective's terms (``logs``); with
    ``score``, each scored step's per-edit exact match just after it (``es``, ``gs``)."""
    P, layers = batch["n_problems"], editor.layers
    steps = range(n_steps) if steps is None else steps
    inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
    weights = torch.tensor([coefs["gamma"] ** i for i in range(len(steps))], dtype=torch.float64)
    weights = (weights / weights.sum()).tolist()
    D: dict[str, Tensor] | None = None
    memory = None  # what the stream keeps of its steps for the next change (MALMEN: its keys; RLEdit: none)
    pieces, memories, scales, G, es, gs = [], [], [], [], [], []
    logs = {k: torch.zeros((), dtype=torch.float64) for k in ("loss", "edit", "back", "kl", "norm")}
    for t in range(steps.stop):
        inner_t = step_rows(inner, P, n_steps, t)
        row_losses: list[Tensor] = []
        if D is None:
            p = editor.pieces(model, inner_t, family, row_losses)
        else:
            with dense_edit(model, layers, D):
                p = editor.pieces(model, inner_t, family, row_losses)
        with torch.no_grad():
            dW = editor.step_deltas(p, P, memory)
        before, memory = memory, editor.remember(p, P, memory)
        scale = None
        if coefs.get("polyak"):
            scale = polyak_step_scales(editor, row_losses[0], p, dW, P, coefs["polyak"], coefs["polyak_max"])
            dW = _scaled(dW, scale)
        D = dW if D is None else {k: D[k] + dW[k] for k in D}
        if t < steps.start:
            continue
        w = weights[t - steps.start]
        pieces.append(p)
        memories.append(before)
        scales.append(scale)
        outer_t, loc_t = step_rows(outer, P, n_steps, t), step_rows(loc, P, n_steps, t)
        with torch.no_grad():
            pre_loc = forward_logits(model, loc_t, family)
        back = backtrack_rows(inner, P, n_steps, t, int(coefs["n_back"]), seeds)
        parts = [outer_t, loc_t] + ([back] if back is not None else []) + ([inner_t] if score else [])
        Dl = {k: v.detach().requires_grad_(with_grad) for k, v in D.items()}
        with torch.set_grad_enabled(with_grad), dense_edit(model, layers, Dl):
            post = split_problems(forward_logits(model, join_problems(parts, P), family), parts, P, family)
            terms = {"edit": nll(post[0], outer_t["labels"], family),
                     "kl": kl_pre_post(pre_loc, post[1], loc_t, family).mean(),
                     "back": nll(post[2], back["labels"], family) if back is not None else torch.zeros(()),
                     "norm": sum((d.to(torch.promote_types(d.dtype, torch.float32)) ** 2).sum() for d in Dl.values()) / P}
            loss_t = sum(coefs[k] * v for k, v in terms.items())
        if with_grad:
            G.append(dict(zip(Dl, torch.autograd.grad(w * loss_t, list(Dl.values())))))
        for k, v in terms.items():
            logs[k] += w * float(v.detach())
        logs["loss"] += w * float(loss_t.detach())
        if score:
            es.append(scores(post[-1], inner_t["labels"], family)[0].view(P, -1))
            gs.append(scores(post[0], outer_t["labels"], family)[0].view(P, -1))
    out = {"pieces": pieces, "memories": memories, "scales": scales, "G": G, "D": D, "logs": logs}
    if score:
        out["es"], out["gs"] = torch.cat(es, 1).flatten(), torch.cat(gs, 1).flatten()
    return out


def stream_meta_gradients(editor: RLEdit | MALMEN, model: nn.Module, batch: dict, family: Family, n_steps: int,
                          coefs: dict[str, float], seeds: list[int], update_statistics: bool = True,
                          steps: range | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The objective's gradient w.r.t. ``editor.parameters()`` (in that order) by passes A and B of the
    module docstring, and the objective's terms (means over streams); ``steps``: see :func:`run_stream`
    (a burn-in step's change is a constant: the gradient is truncated there)."""
    P = batch["n_problems"]
    a = run_stream(editor, model, batch, family, n_steps, coefs, seeds, steps=steps)
    params = list(editor.parameters())
    grads = [torch.zeros_like(p) for p in params]
    H = {k: torch.zeros_like(g) for k, g in a["G"][0].items()}
    for t in reversed(range(len(a["G"]))):  # pass B: H_t = sum over later steps' G, one step's graph at a time
        H = {k: H[k] + a["G"][t][k] for k in H}
        dW = _scaled(editor.step_deltas(a["pieces"][t], P, a["memories"][t]), a["scales"][t])
        out = sum((dW[k] * H[k].to(dW[k].dtype)).sum() for k in dW)
        for g, d in zip(grads, torch.autograd.grad(out, params, allow_unused=True)):
            if d is not None:
                g += d
    if update_statistics:
        for p in a["pieces"]:
            editor.fold_statistics(p, P)
    return grads, a["logs"]


class StreamModule(EditorModule):
    """What the stream meta-training modules share (a subclass builds ``self.editor``, a stream editor:
    :class:`RLEdit` or :class:`editors.malmen.MALMEN`): the stream objective's training step and the
    validation streams. The subclasses' common arguments:

    ``edits_per_step`` k splits each DataModule problem (``n_edits`` = T x k) into T stream steps.
    ``window`` (default: all T): a training stream scores only ``window`` consecutive steps, after a
    burn-in of random length (drawn per training step, uniform over 0..T - window) whose edits change the
    model without adding to the objective: the editor sees models far into a stream at the cost of a
    short one (a burn-in step costs about half a scored step), but the gradient is truncated at the
    window's start, so the burn-in's drift is never charged to the editor (on the built-in world it
    did not help: docs/methods.md). Validation scores every step of its streams.
    ``init_editor``: a trained editor file of the same shape to start from (the networks of an editor that
    already edits the base well, or short streams), which stream training then teaches to edit edited
    models (or longer streams: a curriculum).
    ``polyak_fraction``: each step's change rescaled by Polyak's step length (fraction of the step's edit
    loss, scale at most ``polyak_max_scale``; see the module docstring); evaluate the editor under
    ``PolyakStep`` with the same settings. None: the change as the networks make it.
    Checkpoints hold the editor only, with the base model's fingerprint.
    """

    editor: RLEdit | MALMEN

    def _check_stream_args(self, rank: int, lr: float, edit_lr_lr: float, c_back: float, c_norm: float, n_back: int,
                           edits_per_step: int, window: int | None, gamma: float, polyak_fraction: float | None,
                           polyak_max_scale: float) -> None:
        if (polyak_fraction is not None and polyak_fraction <= 0) or polyak_max_scale <= 0:
            raise ValueError(f"polyak_fraction (or None) and polyak_max_scale must be positive, got {polyak_fraction} "
                             f"and {polyak_max_scale}")
        if rank < 1 or min(lr, edit_lr_lr, c_back, c_norm, n_back) < 0 or min(edits_per_step, window or 1) < 1 \
                or not 0 < gamma <= 1:
            raise ValueError(f"rank, edits_per_step and window must be at least 1, lr, edit_lr_lr, c_back, c_norm and n_back "
                             f"not negative, and 0 < gamma <= 1; got rank {rank}, edits_per_step {edits_per_step}, window "
                             f"{window}, lr {lr}, "
                             f"edit_lr_lr {edit_lr_lr}, c_back {c_back}, c_norm {c_norm}, n_back {n_back}, gamma {gamma}")

    def _start_from(self, init_editor: str | None, classes: dict[str, type], free: tuple[str, ...]) -> None:
        """Load ``init_editor`` (a file of one of ``classes``, by class name; refused for another base model)
        into ``self.editor``; their configs must agree but for the keys in ``free``."""
        if not init_editor:
            return
        kind = editor_file_class(init_editor)
        if kind not in classes:
            raise ValueError(f"init_editor {init_editor} holds a {kind} editor; this module starts from "
                             f"{' or '.join(classes)}")
        start = classes[kind].load(init_editor, self.model)
        ours = {k: v for k, v in self.editor.config.items() if k not in free}
        theirs = {k: v for k, v in start.config.items() if k not in free}
        if ours != theirs:
            diff = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise ValueError(f"init_editor {init_editor} has another shape than this editor: {diff} differ "
                             f"(set them as in its config: {({k: theirs.get(k) for k in diff})})")
        tensors = set(self.editor.state_dict()) ^ set(start.state_dict())
        if tensors:  # e.g. key statistics on one side only
            raise ValueError(f"init_editor {init_editor} and this editor hold different tensors: {sorted(tensors)}")
        self.editor.load_state_dict(start.state_dict())

    def _before_step(self, batch: dict) -> None:
        """Work on a training batch before its stream runs (statistics the step's changes read)."""

    def _after_step(self) -> None:
        """Work after each optimizer step."""

    def coefs(self) -> dict[str, float]:
        hp = self.hparams
        return {"edit": hp.c_edit, "back": hp.c_back, "kl": hp.c_loc, "norm": hp.c_norm, "gamma": hp.gamma,
                "n_back": hp.n_back, "polyak": hp.polyak_fraction or 0.0, "polyak_max": hp.polyak_max_scale}

    def n_steps(self) -> int:
        return self.trainer.datamodule.hparams.n_edits // self.hparams.edits_per_step

    def on_fit_start(self) -> None:
        hp, dm = self.hparams, self.trainer.datamodule.hparams
        if dm.n_edits % hp.edits_per_step:
            raise MisconfigurationException(f"data n_edits {dm.n_edits} (the stream length) is not a multiple of "
                                            f"edits_per_step {hp.edits_per_step}")
        if hp.window and hp.window > self.n_steps():
            raise MisconfigurationException(f"window {hp.window} is longer than the streams' {self.n_steps()} steps")
        need, have = dm.n_edits * dm.batch_size * self.trainer.world_size, len(self.trainer.datamodule.dataset("train"))
        if need > have:
            raise MisconfigurationException(
                f"n_edits {dm.n_edits} x batch_size {dm.batch_size} x {self.trainer.world_size} process(es) = {need} "
                f"edits per step, but the training split has only {have}: shorten the streams")

    def _seeds(self, batch: dict, step: int) -> list[int]:
        P, idx = batch["n_problems"], batch["index"]
        n = len(idx) // P
        return [stream_seed(list(idx[b * n:(b + 1) * n]), step) for b in range(P)]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp, T = self.hparams, self.n_steps()
        steps = None
        if hp.window and hp.window < T:  # a burn-in of random length (the same in every process), then the window
            g = torch.Generator().manual_seed(self.global_step)
            first = int(torch.randint(0, T - hp.window + 1, (1,), generator=g))
            steps = range(first, first + hp.window)
        self._before_step(batch)
        grads, logs = stream_meta_gradients(self.editor, self.model, batch, hp.family, T, self.coefs(),
                                            self._seeds(batch, self.global_step), steps=steps)
        self.manual_step(grads, hp.grad_clip)
        self._after_step()
        self.log_dict({"train/loss": logs["loss"], "train/edit_nll": logs["edit"], "train/back_nll": logs["back"],
                       "train/loc_kl": logs["kl"], "train/change_norm": logs["norm"]},
                      prog_bar=True, batch_size=batch["n_problems"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the pieces are gradients: step out of validation's inference mode, with ordinary copies of the batch
        with torch.inference_mode(False), torch.enable_grad():
            batch = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v for k, v in batch.items()}
            self._validate(batch)

    def _validate(self, batch: dict) -> None:
        # the batch's own stream length: a split's last problem may be a short one
        fam, P = self.hparams.family, batch["n_problems"]
        T = max(1, batch["edit_inner"]["input_ids"].shape[0] // P // self.hparams.edits_per_step)
        a = run_stream(self.editor, self.model, batch, fam, T, self.coefs(), self._seeds(batch, -1), with_grad=False,
                       score=True)
        inner, loc = batch["edit_inner"], batch["loc"]
        with torch.no_grad():
            pre = forward_logits(self.model, loc, fam)
            with dense_edit(self.model, self.editor.layers, a["D"]):
                post_inner, post_loc = split_problems(forward_logits(self.model, join_problems([inner, loc], P), fam),
                                                      [inner, loc], P, fam)
        lab = has_label(loc["labels"], fam)
        m = self.val
        m["edit_success"].update(a["es"])
        m["generality"].update(a["gs"])
        m["edit_retention"].update(scores(post_inner, inner["labels"], fam)[0])
        m["drawdown"].update((scores(pre, loc["labels"], fam)[0] - scores(post_loc, loc["labels"], fam)[0])[lab])
        m["loc_agreement"].update(top1_agreement(pre, post_loc, loc, fam))
        m["loc_kl"].update(kl_pre_post(pre, post_loc, loc, fam))
        m["loss"].update(a["logs"]["loss"].float(), weight=P)


class RLEditModule(StreamModule):
    """Wraps a frozen base model (``self.model``) and a trainable :class:`RLEdit` (``self.editor``); the
    stream arguments are :class:`StreamModule`'s. ``init_editor``: a MEND or RLEdit file.
    ``descent_only``: the step sizes are kept non-negative (set to 0 after any optimizer step that takes
    one below): a negative one makes its layer take an ascent step on every edit, which a long stream
    feeds until the model breaks (``RLEdit.for_evaluation``'s option of the same name, at training time).
    """

    def __init__(self, base_model: str = "runs/base_zsre_gpt2_tiny/model", family: Family = "causal",
                 edit_params: list[str] | None = None, rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-4, precondition_ridge: float | None = None, init_editor: str | None = None,
                 edits_per_step: int = 1, window: int | None = None, n_back: int = 4, gamma: float = 1.0,
                 lr: float = 1e-4, edit_lr_lr: float = 1e-3, c_edit: float = 0.1, c_back: float = 0.1,
                 c_loc: float = 1.0, c_norm: float = 0.0, cosine_decay: bool = False, grad_clip: float | None = 100.0,
                 output_dir: str = "runs/rledit", base_dtype: BaseDtype | None = None, descent_only: bool = False,
                 polyak_fraction: float | None = None, polyak_max_scale: float = 1.0) -> None:
        super().__init__()
        self._check_stream_args(rank, lr, edit_lr_lr, c_back, c_norm, n_back, edits_per_step, window, gamma,
                                polyak_fraction, polyak_max_scale)
        self.save_hyperparameters()
        self.automatic_optimization = False  # the step computes its own gradient (see the module docstring)
        self._load_base(base_model, family, base_dtype)
        self.editor = RLEdit.for_model(self.model, edit_params, rank=rank, n_hidden=n_hidden, init_edit_lr=init_edit_lr,
                                       precondition_ridge=precondition_ridge)
        self._start_from(init_editor, {"MEND": MEND, "RLEdit": RLEdit}, free=("init_edit_lr",))
        self.val = torch.nn.ModuleDict({k: MeanMetric() for k in STREAM_METRICS})

    def _after_step(self) -> None:
        if self.hparams.descent_only:
            self.editor.descent_only_()
