"""The prune stage's preflight: what can be checked before it, or a run with a prune stage, writes
anything (issue 18, item 6): criterion needs data, the target is reachable given floor, protected
groups and ``round_to`` (no scores needed), the calibration set fits in the training split.

:func:`curlprune.run.prune.run_prune` runs these checks before scoring; :meth:`curlprune.run.pipeline.Run.preflight`
runs :func:`preflight_prune` before the run folder is claimed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.cost.analysis import model_cost_fn, trace
from curlprune.criteria import get
from curlprune.errors import CurlpruneError
from curlprune.models import default_protect
from curlprune.run.prune_config import PruneConfig
from curlprune.select.limits import resolve_limits
from curlprune.select.search import Target, resolve_protect, select


@dataclass
class Reachable:
    """What :func:`check_reachable` traced and checked: the channel groups, the target (None for a
    latency target), the protected group names and the MACs/params cost function."""

    groups: list[ChannelGroup]
    target: Target | None
    protect: list[str]
    cost_fn: Callable


def check_needs_data(config: PruneConfig, has_data: bool) -> None:
    """Raise when ``config``'s criterion needs calibration data and there is none.

    Raises:
        CurlpruneError: naming the criterion and ``--data``.
    """
    if get(config.criterion).needs_data and not has_data:
        raise CurlpruneError(f"criterion {config.criterion!r} needs data: pass --data (a dataset folder/zip, or 'digits')")


def check_reachable(config: PruneConfig, model_name: str, model: nn.Module, example: torch.Tensor) -> Reachable:
    """Trace ``model`` and check that ``config``'s MACs/params target is reachable (no scores needed).

    The smallest reachable cost follows from the floor, the protected groups and ``round_to``
    alone: :func:`curlprune.select.search.select` is run on all-zero scores. A latency target is measured
    while selecting and is not checked here.

    Args:
        config: the stage's settings.
        model_name: registry name (it decides the default protected groups).
        model: the unpruned model, eval mode.
        example: one input batch ``[1, C, H, W]``.
    Returns:
        :class:`Reachable` (groups, target, protected names, cost function), reused by the stage.
    Raises:
        CurlpruneError: the model has no prunable group, a ``protect`` pattern matches none, or the
            target is below the smallest reachable cost (the message gives that cost).

    Source: docs/method.md §3 (floor, protected groups, rounding).
    """
    groups = traced_groups(model, example)
    target = config.target()
    protect = _protected(config, model_name, model, groups)
    cost_fn = model_cost_fn(model, example, groups)
    if target is not None:
        check_target_reachable(groups, cost_fn, target, config, protect)
    return Reachable(groups, target, protect, cost_fn)


def check_calibration_size(config: PruneConfig, splits: dict) -> None:
    """Raise when ``config``'s criterion needs more calibration images than the training split holds.

    Args:
        config: the stage's settings (``calib``: images drawn).
        splits: ``{"train", ...}`` datasets ({} when the criterion needs no data).
    Raises:
        CurlpruneError: no training split, or ``calib`` above its size (the message gives the size).
    """
    if not get(config.criterion).needs_data:
        return
    source = splits["train"] if "train" in splits else splits.get("all")
    if source is None:
        raise CurlpruneError(f"the data has no 'train' split (splits: {', '.join(sorted(splits))}): lay it out as train/<class>/<image>")
    if config.calib > len(source):
        raise CurlpruneError(f"calib {config.calib} is more than the {len(source)} training images: use --calib {len(source)} or fewer")


def preflight_prune(config: PruneConfig, model_name: str, model: nn.Module, example: torch.Tensor, splits: dict) -> Reachable:
    """Every check of the prune stage that needs no scores, for a run that must not write before it
    is valid (:meth:`curlprune.run.pipeline.Run.preflight`, issue 18): data needed, target reachable,
    calibration size. Writes nothing.

    Args:
        config: the stage's settings.
        model_name: registry name of the unpruned model.
        model: the model the stage will prune (the unpruned model, with the task's classifier in a transfer).
        example: one input batch ``[1, C, H, W]``.
        splits: the run's ``{"train", "test"}`` datasets.
    Returns:
        :class:`Reachable`.
    Raises:
        CurlpruneError: see :func:`check_needs_data`, :func:`check_reachable`, :func:`check_calibration_size`.
    """
    check_needs_data(config, bool(splits))
    reach = check_reachable(config, model_name, model, example)
    check_calibration_size(config, splits)
    return reach


def traced_groups(model: nn.Module, example: torch.Tensor) -> list[ChannelGroup]:
    """``trace(model, example)``, refused in one line when no group is prunable.

    Raises:
        CurlpruneError: no prunable channel group (the first three reasons named).
    """
    groups = trace(model, example)
    if not any(g.prunable for g in groups):
        reasons = "; ".join(sorted({g.reason for g in groups if g.reason})[:3])
        raise CurlpruneError(f"the model has no prunable channel group ({reasons}): nothing can be pruned")
    return groups


def _protected(config: PruneConfig, model_name: str, model: nn.Module, groups: list[ChannelGroup]) -> list[str]:
    if config.protect is None:
        return default_protect(model_name, model, groups)
    return resolve_protect(groups, config.protect)


def check_target_reachable(groups: list[ChannelGroup], cost_fn: Callable, target: Target, config: PruneConfig,
                           protect: list[str], limits: dict[str, float] | None = None) -> None:
    """Raise the impossible-target error before scoring: reachability does not depend on scores, so
    :func:`curlprune.select.search.select` runs on all-zero scores with the floor, the protected groups,
    ``round_to`` and the per-group limits (``max_ratio``).

    Raises:
        CurlpruneError: the target is below the smallest reachable cost (the message gives that cost).

    Source: docs/method.md §3.
    """
    zeros = {g.name: np.zeros(g.width) for g in groups if g.prunable}
    limits = resolve_limits(groups, config.max_ratio or {}) if limits is None else limits
    select(groups, zeros, cost_fn, target, floor=config.floor, protect=protect, round_to=config.round_to, limits=limits)
