"""Early stopping on validation top-1 (issue 19 item 1): a stage's ``early_stop: {patience: P,
min_delta: D}`` setting (``finetune`` and ``distill``).

After every epoch the model is evaluated on the validation split (held out of the training
images, :mod:`curlprune.data.valsplit`). An epoch *improves* when its validation top-1 exceeds the best
so far by more than ``min_delta`` points (%; the first epoch always improves); its weights are then
kept as the best. After ``patience`` epochs in a row without an improvement the stage stops. Its
output (``model.safetensors``, the checkpoint the next stage starts from) holds the best epoch's
weights, and its done summary records the best epoch, its validation top-1 and the epochs run.

The learning-rate schedule is the stage's own (warm-up + cosine over ``epochs``): early stopping
only cuts it short. The best weights, best epoch, best validation top-1 and the count of epochs
without improvement are part of the resumable state (``early.*`` tensors and the ``early_stop``
entry of ``state.safetensors``), so a killed stage resumes exactly where it stood.

Validation top-1 is the only monitored quantity: the test split never decides anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from curlprune.errors import CurlpruneError

__all__ = ["EarlyStop", "EarlyStopper", "canonical_early_stop", "check_early_stop_data"]

VAL_KEY = "val"  # the validation split's key in a stage's data (curlprune.data.valsplit.VAL_SPLIT)


@dataclass(frozen=True)
class EarlyStop:
    """``patience``: epochs in a row without improvement before the stage stops (>= 1).
    ``min_delta``: how many points (%) of validation top-1 an epoch must gain over the best to count as one (>= 0)."""

    patience: int
    min_delta: float = 0.0


def canonical_early_stop(value: Any, where: str = "early_stop") -> dict[str, Any] | None:
    """The one stored form of an ``early_stop`` setting: None, or ``{"patience": int, "min_delta": float}``.

    Args:
        value: None (off), or a mapping with ``patience`` (a whole number >= 1) and optionally
            ``min_delta`` (a number >= 0, points of top-1 in %; default 0).
        where: names the setting in the message.
    Returns:
        The canonical mapping (so ``{patience: 3}`` and ``{patience: 3, min_delta: 0}`` are one setting).
    Raises:
        CurlpruneError: not a mapping, an unknown key, or a value outside its range (one line).
    """
    if value is None:
        return None
    example = "e.g. early_stop: {patience: 5, min_delta: 0.1}"
    if not isinstance(value, Mapping):
        raise CurlpruneError(f"{where} must be a mapping with patience (and min_delta), {example} (got {value!r})")
    unknown = sorted(set(value) - {"patience", "min_delta"})
    if unknown:
        raise CurlpruneError(f"{where}: unknown key {unknown[0]!r}; its keys are patience and min_delta, {example}")
    patience, min_delta = value.get("patience"), value.get("min_delta", 0.0)
    if isinstance(patience, float) and patience.is_integer():
        patience = int(patience)
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise CurlpruneError(f"{where}: patience must be a whole number of epochs >= 1 (got {patience!r}), {example}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
        raise CurlpruneError(f"{where}: min_delta must be a number of top-1 points >= 0 (got {min_delta!r}), {example}")
    return {"patience": patience, "min_delta": float(min_delta)}


def check_early_stop_data(stage: str, cfg: Any, data: Mapping[str, Any]) -> None:
    """A stage with ``early_stop`` needs a validation split in its data.

    Raises:
        CurlpruneError: ``cfg.early_stop`` is set and ``data`` has no ``"val"`` split (one line: how to get one).
    """
    if getattr(cfg, "early_stop", None) is not None and VAL_KEY not in data:
        raise CurlpruneError(
            f"{stage}: early_stop monitors validation top-1 and needs a validation split: set val_per_class or "
            "val_fraction in the config (--val-per-class / --val-fraction), give the data a val/ split, or drop early_stop"
        )


class EarlyStopper:
    """The running state of early stopping for one stage (see the module docstring for the rule).

    best_val_top1: the best validation top-1 so far (%), None before the first epoch.
    best_epoch:    the epoch (1-based) whose weights are kept, 0 before the first epoch.
    bad_epochs:    epochs in a row since the last improvement.
    best_weights:  the best epoch's state dict (CPU copies).
    """

    def __init__(self, rule: EarlyStop) -> None:
        self.rule = rule
        self.best_val_top1: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.best_weights: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, setting: Mapping[str, Any] | None) -> "EarlyStopper | None":
        """An early stopper for a canonical ``early_stop`` setting, or None when it is off."""
        return None if setting is None else cls(EarlyStop(int(setting["patience"]), float(setting["min_delta"])))

    @property
    def stopped(self) -> bool:
        """Whether ``patience`` epochs in a row have passed without an improvement."""
        return self.bad_epochs >= self.rule.patience

    def update(self, epoch: int, val_top1: float, model: nn.Module) -> bool:
        """Record one finished epoch; keep the model's weights when it improved.

        Args:
            epoch: the epoch just finished (1-based).
            val_top1: its validation top-1 (%).
            model: the model after it (its state dict is copied to the CPU when it improved).
        Returns:
            Whether the epoch improved on the best by more than ``min_delta``.
        """
        improved = self.best_val_top1 is None or val_top1 > self.best_val_top1 + self.rule.min_delta
        if improved:
            self.best_val_top1, self.best_epoch, self.bad_epochs = val_top1, epoch, 0
            self.best_weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return improved

    def meta(self) -> dict[str, Any]:
        """The JSON part of the state (``early_stop`` in the state file's header)."""
        return {"best_val_top1": self.best_val_top1, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load(self, meta: Any, tensors: Mapping[str, torch.Tensor], epoch: int, where: str) -> None:
        """Inverse of :meth:`meta` and :attr:`best_weights`, checked against the state's ``epoch``.

        Raises:
            CurlpruneError: the entry is missing or inconsistent (a state written without early
                stopping, or edited): one line naming the file.
        """
        fix = f"delete {where} to restart the stage, or run it with the settings it was started with"
        if not isinstance(meta, dict):
            raise CurlpruneError(f"{where} holds no early-stopping state (written without early_stop?): {fix}")
        best, best_epoch, bad = meta.get("best_val_top1"), meta.get("best_epoch"), meta.get("bad_epochs")
        consistent = (isinstance(best_epoch, int) and isinstance(bad, int) and 1 <= best_epoch <= epoch
                      and bad == epoch - best_epoch and isinstance(best, (int, float)) and 0 <= best <= 100 and bool(tensors))
        if not consistent:
            raise CurlpruneError(f"{where}: its early-stopping state {meta} does not fit its {epoch} epoch(s): {fix}")
        self.best_val_top1, self.best_epoch, self.bad_epochs = float(best), best_epoch, bad
        self.best_weights = dict(tensors)
