"""A recovery stage that ends far below where it started is a failure, not a result (issue 18).

A learning rate that is too high does not always produce NaN (that is caught at once by
:func:`curlprune.recover.guards.check_finite_loss`): the loss can rise epoch after epoch while the
weights stay finite and the model collapses to answering one class. Such a stage must not be
reported as done, and its model must not become the run's model.

The rule (:func:`check_not_diverged`), applied when a stage's last epoch is done, before anything
is written as its result: the stage **diverged** when its last test top-1 is

* no better than answering the most frequent test class every time (:func:`chance_top1`), and
* less than half of the best it had: the model it started from or any of its epochs.

Both must hold, so a stage that starts near chance (a new classifier) and stays there, or one
that ends somewhat lower than it started, is not flagged. A diverged stage raises one
:class:`CurlpruneError` line. Its best model is kept: the model it started from (unchanged on disk)
or, when an epoch was better, that epoch's weights in ``<stage>/best.safetensors`` (:data:`BEST_FILE`,
plain weights, written whenever an epoch beats everything before it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.store import save_safetensors

__all__ = ["BEST_FILE", "chance_top1", "check_not_diverged", "is_new_best", "save_best"]

BEST_FILE = "best.safetensors"  # a training stage's best epoch so far (plain weights)


def chance_top1(dataset: Any) -> float | None:
    """Test top-1 (%) of always answering the most frequent class of ``dataset``.

    Returns:
        The share of the largest class in %, or None when the dataset has no ``labels`` tensor or is empty.
    """
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, torch.Tensor) or labels.numel() == 0:
        return None
    return 100.0 * float(torch.bincount(labels.flatten().long()).max()) / labels.numel()


def is_new_best(history: Sequence[Mapping[str, Any]], start_top1: float | None) -> bool:
    """Whether the last epoch of ``history`` is better than the start and every earlier epoch."""
    last = history[-1]["test_top1"]
    earlier = [r["test_top1"] for r in history[:-1]] + ([start_top1] if start_top1 is not None else [])
    return all(last > top1 for top1 in earlier)


def save_best(stage_dir: Path, model: nn.Module, record: Mapping[str, Any]) -> None:
    """Write the model's weights as ``<stage_dir>/best.safetensors`` (plain weights; the epoch's record as metadata)."""
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_safetensors(stage_dir / BEST_FILE, weights, {"epoch": json.dumps(dict(record))})


def check_not_diverged(stage: str, stage_dir: Path, history: Sequence[Mapping[str, Any]], start_top1: float | None,
                       chance: float | None, lr: float) -> None:
    """Refuse to finish a stage that diverged (see the module docstring for the rule).

    Args:
        stage: the stage's name.
        stage_dir: its folder (named in the message, with the best model's file).
        history: the per-epoch records (``test_top1``, ``loss``), all epochs.
        start_top1: test top-1 (%) of the model the stage started from; None when unknown (a state
            written by an earlier version): then only the epochs count.
        chance: :func:`chance_top1` of the test set; None: the check is skipped.
        lr: the stage's learning rate (named in the advice).
    Raises:
        CurlpruneError: one line: how far the stage fell, where its best model is, what to do.
    """
    if chance is None or not history:
        return
    last = history[-1]["test_top1"]
    best_epoch = max(history, key=lambda r: r["test_top1"])
    reference = max(best_epoch["test_top1"], start_top1 if start_top1 is not None else float("-inf"))
    if last > chance or last >= 0.5 * reference:
        return
    if start_top1 is not None and start_top1 >= best_epoch["test_top1"]:
        kept = f"its best model is the one it started from ({start_top1:.2f}%), which is unchanged"
    else:
        kept = f"its best model (epoch {best_epoch['epoch']}, {best_epoch['test_top1']:.2f}%) is in {stage_dir / BEST_FILE}"
    began = f"from {start_top1:.2f}% before the stage" if start_top1 is not None else f"from {reference:.2f}% at its best"
    raise CurlpruneError(
        f"{stage} diverged: test top-1 fell to {last:.2f}% after {len(history)} epochs {began}, no better than "
        f"always answering one class ({chance:.2f}%); the loss went from {history[0]['loss']:.4g} to {history[-1]['loss']:.4g}. "
        f"Nothing was written as the stage's result and {kept}. Lower the learning rate (lr {lr:g}) or add "
        f"warmup_epochs, then delete {stage_dir} and run again"
    )
