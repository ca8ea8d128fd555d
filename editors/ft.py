"""Fine-tuning baselines: FT and FT+KL, :class:`editors.base.DeltaEditor` s like MEND.

FT takes optimiser steps on the matrices MEND edits (the family defaults of
:func:`editors.layers.select_layers`, or the given patterns) to lower the edit's NLL, and stops as
soon as every edit in the batch is an exact match (greedy answer = target) or after ``max_steps``.
FT+KL adds ``c_loc * KL(unedited || edited)`` on locality inputs the caller samples (they must not
be the inputs locality is evaluated on).

The trainable variables are the weight changes themselves, starting at zero and applied
functionally, so the base model is never modified and the result is what MEND returns: a dict of
changes to add to the weights. Plain torch: no Lightning here.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from datamodules.encoding import Family
from editors.layers import LayerSpec, select_layers
from editors.losses import forward_logits, kl_pre_post, nll, scores
from editors.base import DeltaEditor, EditorContext

OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class FineTune(DeltaEditor):
    """Bounded fine-tuning of a few weight matrices until the edit is right (FT; FT+KL when ``c_loc > 0``)."""

    def __init__(self, layers: list[LayerSpec], lr: float = 1e-3, max_steps: int = 25, optimizer: str = "adam",
                 c_loc: float = 0.0, name: str | None = None, loc_inputs: int = 4) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if max_steps < 0 or loc_inputs < 1:
            raise ValueError("need max_steps >= 0 and loc_inputs >= 1")
        self.layers, self.n_loc_inputs = layers, loc_inputs
        self.name = name or ("ft_kl" if c_loc > 0 else "ft")
        self.config = {"class": "FineTune", "name": self.name, "lr": lr, "max_steps": max_steps,
                       "optimizer": optimizer, "c_loc": c_loc, "loc_inputs": loc_inputs,
                       "layers": [l.name for l in layers]}
        self.last_steps = 0  # optimiser steps the last edit took (0: it was already right)

    @classmethod
    def for_model(cls, model: nn.Module, edit_params: list[str] | None = None, **kw: Any) -> "FineTune":
        """A baseline tuning ``model``'s default (or given) edited matrices."""
        return cls(select_layers(model, edit_params), **kw)

    @classmethod
    def for_evaluation(cls, context: EditorContext, **init_args: Any) -> "FineTune":
        """Tuning the matrices the config edits (those MEND edits under it)."""
        return cls(context.layers(), **init_args)

    @property
    def uses_locality(self) -> bool:
        """Whether :meth:`deltas` wants sampled locality inputs (FT+KL)."""
        return self.config["c_loc"] > 0

    def deltas(self, model: nn.Module, batch: Mapping[str, Tensor], family: Family,
               loc_batch: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Weight changes (to add to the weights) that make ``model`` produce ``batch``'s labels."""
        cfg = self.config
        # detached base weights: no .grad is ever written on the model, only on the changes
        base = {k: v.detach() for k, v in model.named_parameters()}
        # float32 changes (and optimiser state) under an fp16/bf16 base: Adam's eps is 0 in fp16 (0/0 = NaN)
        change = {l.name: torch.zeros_like(base[l.name], dtype=torch.promote_types(base[l.name].dtype, torch.float32),
                                           requires_grad=True) for l in self.layers}
        opt = OPTIMIZERS[cfg["optimizer"]](change.values(), lr=cfg["lr"])
        use_kl = self.uses_locality and loc_batch is not None
        with torch.no_grad():
            pre_loc = forward_logits(model, loc_batch, family) if use_kl else None
        steps = 0
        with torch.enable_grad():
            while True:
                params = {**base, **{k: base[k] + d.to(base[k].dtype) for k, d in change.items()}}
                logits = forward_logits(model, batch, family, params)
                right, _ = scores(logits.detach(), batch["labels"], family)
                if bool(right.all()) or steps >= cfg["max_steps"]:
                    break
                loss = nll(logits, batch["labels"], family)
                if use_kl:
                    post_loc = forward_logits(model, loc_batch, family, params)
                    loss = loss + cfg["c_loc"] * kl_pre_post(pre_loc, post_loc, loc_batch, family).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        self.last_steps = steps
        return {k: d.detach() for k, d in change.items()}
