"""Guards that keep a diverging run from being reported (or saved) as a success.

* :func:`check_hyperparameters`: finite values in sane ranges, before anything trains.
* :func:`check_finite_loss`: a NaN or infinite loss stops the stage at once, naming epoch and step.
* :func:`curlprune.store.canonical.check_finite_state` (in store/): weights with NaN/inf are never
  written as a final model.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from curlprune.errors import CurlpruneError
from curlprune.validate import check_ranges

__all__ = ["MAX_LR", "check_finite_loss", "check_hyperparameters"]

MAX_LR = 10.0  # far above any SGD learning rate that trains a CNN; larger is a typo or an inf


def check_hyperparameters(cfg: Any) -> None:
    """Check a training config's numbers before anything trains (issue 12).

    Every float finite, lr in (0, MAX_LR], epochs and batch_size positive whole numbers,
    momentum and weight_decay in [0, 1); then every numeric field in its range
    (:func:`curlprune.validate.check_ranges`: seed in 0 .. 2**32 - 1, ...).

    Args:
        cfg: a training config (a dataclass such as :class:`curlprune.recover.stage.TrainConfig`).
    Raises:
        CurlpruneError: naming the setting, its value and the accepted range.
    """
    for name, value in vars(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise CurlpruneError(f"{name} must be a finite number (got {value})")
    for name in ("epochs", "batch_size"):
        value = getattr(cfg, name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CurlpruneError(f"{name} must be a positive whole number (got {value!r})")
    lr = getattr(cfg, "lr", None)
    if lr is not None and not 0.0 < lr <= MAX_LR:
        raise CurlpruneError(f"lr must be in (0, {MAX_LR:g}] (got {lr}): typical SGD learning rates are 1e-4 .. 0.1")
    for name in ("momentum", "weight_decay"):
        value = getattr(cfg, name, 0.0)
        if not 0.0 <= value < 1.0:
            raise CurlpruneError(f"{name} must be in [0, 1) (got {value})")
    check_ranges(cfg)  # the seed and every other number (issue 18)


def check_finite_loss(loss: torch.Tensor, epoch: int, step: int, lr: float | None = None) -> None:
    """Stop a diverged stage at the first non-finite loss.

    Nothing of the epoch is saved: a rerun resumes after the last completed (finite) epoch.

    Args:
        loss: the step's loss (any shape).
        epoch, step: 0-based (reported 1-based).
        lr: the step's learning rate, named in the message when given.
    Raises:
        CurlpruneError: one line naming epoch, step, the learning rate and the likely cause.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    at = f" (learning rate {lr:.3g})" if lr is not None else ""
    raise CurlpruneError(
        f"the training loss became {float(loss.detach().float().flatten()[0])} in epoch {epoch + 1}, step {step + 1}{at}: "
        "the run diverged; most likely the learning rate is too high (lower lr or add warmup_epochs), else a "
        "setting such as a tiny temperature or NaN in the weights or data; nothing of this epoch was saved, "
        "rerun to resume from the last finished epoch or delete the stage's folder to start it again"
    )
