"""The per-iteration learning-rate schedule of CURL: linear warm-up from 0, then cosine to 0.

From the authors' training scripts (docs/method.md §4): with ``it`` counted in iterations,

    lr = base * it / warm                                        for it < warm
    lr = base * (1 + cos(pi * (it - warm) / (max - warm))) / 2   afterwards

The schedule is a pure function of the iteration counter, so resuming only needs that counter.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer


def warmup_cosine_lr(iteration: int, total_iterations: int, warmup_iterations: int, base_lr: float) -> float:
    """Learning rate at ``iteration`` (0-based) of ``total_iterations``."""
    if warmup_iterations > 0 and iteration < warmup_iterations:
        return base_lr * iteration / warmup_iterations
    span = max(total_iterations - warmup_iterations, 1)
    progress = min(max(iteration - warmup_iterations, 0) / span, 1.0)
    return base_lr * (1.0 + math.cos(math.pi * progress)) / 2.0


def set_lr(optimizer: Optimizer, lr: float, epoch: float | None = None) -> None:
    """Put ``lr`` into every parameter group, times the group's ``lr_mult`` (default 1); a group
    with ``start_epoch`` gets 0 while ``epoch`` (the fractional epoch, if given) is before it."""
    for group in optimizer.param_groups:
        waiting = epoch is not None and epoch < group.get("start_epoch", 0.0)
        group["lr"] = 0.0 if waiting else lr * group.get("lr_mult", 1.0)
