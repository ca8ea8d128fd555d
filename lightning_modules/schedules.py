"""The learning-rate multiplier shared by the LightningModules (for ``torch.optim.lr_scheduler.LambdaLR``)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int = 0, total: int | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then 1 (``total`` None) or a half cosine from 1 down to
    0 at step ``total``, where it stays."""
    if step < warmup:
        return (step + 1) / warmup
    if total is None:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
