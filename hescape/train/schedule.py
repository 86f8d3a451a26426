"""Learning-rate schedule: linear warm-up then cosine decay (nanoGPT's ``get_lr``)."""

from __future__ import annotations

import math


def get_lr(
    step: int, *, base_lr: float, warmup_steps: int, max_steps: int, min_ratio: float = 0.1
) -> float:
    """Learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``,
    then cosine decay to ``min_ratio * base_lr`` at ``max_steps``; constant after that.
    """
    min_lr = base_lr * min_ratio
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    span = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + coeff * (base_lr - min_lr)

