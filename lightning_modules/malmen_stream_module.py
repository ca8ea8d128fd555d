"""Meta-training MALMEN over streams of edits: the lifelong objective of
:mod:`lightning_modules.rledit_module` (RLEdit, Li et al., ICML 2025) with MALMEN's least-squares change
(Tan, Zhang and Fu, ICLR 2024) and its stream key memory (:mod:`editors.key_memory`; docs/methods.md).

A MALMEN editor meta-trained on the base model (:mod:`lightning_modules.malmen_module`) edits streams
under ``malmen_stream`` with two evaluation-time additions it never trained with: each change keeps the
outputs at the keys of the edits already made (``memory_weight`` mu), and edits land on models that
earlier edits changed. Here both are part of training: step t of a training stream solves
``(U_t^T U_t + lambda I + w C + mu sum_{s<t} U_s^T U_s) S_t = U_t^T V_t`` on the model steps 1..t-1 left
(:meth:`editors.malmen.MALMEN.step_deltas`), and the stream objective (edit, backtracking, locality,
norm terms) is backpropagated through every step's solve by the two passes of
:func:`lightning_modules.rledit_module.stream_meta_gradients`. A stream step holds k edits, so the solve
is differentiated directly (autograd through the Cholesky factor and solve), not memory-decoupled as
:mod:`lightning_modules.malmen_module` does for K in the thousands.

The trained file is a MALMEN file carrying ``memory_weight``: ``eval.py --editor malmen_stream`` (or
``malmen``) evaluates it. With ``key_cov_weight`` the key statistics keep being folded in, from each
training step's edit and locality inputs, as MALMEN's meta-training does.
"""
from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from datamodules.encoding import Family
from editors.malmen import MALMEN
from lightning_modules.models import BaseDtype
from lightning_modules.rledit_module import STREAM_METRICS, StreamModule


class MALMENStreamModule(StreamModule):
    """Wraps a frozen base model (``self.model``) and a trainable :class:`MALMEN` (``self.editor``); the
    stream arguments are :class:`lightning_modules.rledit_module.StreamModule`'s. ``init_editor``: a MALMEN
    file of the same shape (its networks, step sizes, ridges and statistics; ``memory_weight`` and
    ``key_cov_weight`` are this module's). ``memory_weight`` mu: the stream key memory's weight, in training
    and in the file it writes."""

    step_size_params = ("edit_lrs", "log_ridges")

    def __init__(self, base_model: str = "runs/base_zsre_gpt2_tiny/model", family: Family = "causal",
                 edit_params: list[str] | None = None, rank: int = 1920, n_hidden: int = 2,
                 init_edit_lr: float = 1e-3, init_ridge: float = 1.0, key_cov_weight: float = 0.0,
                 memory_weight: float = 10.0, init_editor: str | None = None, edits_per_step: int = 1,
                 window: int | None = None, n_back: int = 4, gamma: float = 1.0, lr: float = 1e-4,
                 edit_lr_lr: float = 1e-3, c_edit: float = 0.1, c_back: float = 0.1, c_loc: float = 1.0,
                 c_norm: float = 0.0, cosine_decay: bool = False, grad_clip: float | None = 100.0,
                 output_dir: str = "runs/malmen_stream", base_dtype: BaseDtype | None = None,
                 polyak_fraction: float | None = None, polyak_max_scale: float = 1.0) -> None:
        super().__init__()
        self._check_stream_args(rank, lr, edit_lr_lr, c_back, c_norm, n_back, edits_per_step, window, gamma,
                                polyak_fraction, polyak_max_scale)
        if init_ridge <= 0:
            raise ValueError(f"init_ridge must be positive, got {init_ridge}")
        self.save_hyperparameters()
        self.automatic_optimization = False  # the step computes its own gradient (rledit_module's docstring)
        self._load_base(base_model, family, base_dtype)
        self.editor = MALMEN.for_model(self.model, edit_params, rank=rank, n_hidden=n_hidden, init_edit_lr=init_edit_lr,
                                       init_ridge=init_ridge, key_cov_weight=key_cov_weight,
                                       memory_weight=memory_weight)
        self._start_from(init_editor, {"MALMEN": MALMEN},
                         free=("init_edit_lr", "init_ridge", "edit_chunk", "token_chunk", "cache_pieces",
                               "key_cov_weight", "memory_weight"))
        self.val = torch.nn.ModuleDict({k: MeanMetric() for k in STREAM_METRICS})

    def _before_step(self, batch: dict) -> None:
        if self.editor.key_cov_weight:  # the key statistics: all tokens of the step's edit and locality inputs
            for part in (batch["edit_inner"], batch["loc"]):
                self.editor.fold_keys(self.model, part, self.hparams.family)
