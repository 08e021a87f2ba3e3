"""Channel-importance criteria: one float per channel of every prunable group; lower = less important.

Every criterion returns ``Scores``: ``{group name: float64 array of length group.width}`` for the
prunable groups. For groups whose channels go in units (grouped convs), every channel of a unit
gets the unit's score where the criterion is defined per unit (``kl``, ``kl-approx``, ``random``).

    kl         CURL: batch-mean KL(q_masked || p) when the unit is zeroed (exact, fast; kl.py)
    kl-approx  second-order (Fisher) expansion of the same KL from a few backward passes
    l1         L1 norm of the producing filters (data-free)
    bn         |gamma| of the group's batch norms (data-free)
    taylor     first-order Taylor |sum a * dL/da| with labels (Molchanov et al.)
    random     seeded uniform scores (a control)
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.errors import CurlpruneError
from curlprune.graph import eval_mode

DEFAULT_BUDGET_MB = 512
"""Memory (MiB) the data-driven criteria (``kl``, ``kl-approx``) may use for stacked ablations."""

Scores = dict[str, np.ndarray]
Progress = Callable[[int], None]
"""Called with the number of work items just finished (``kl``: ablations)."""


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: where it lives and what it needs."""

    name: str
    module: str
    function: str
    needs_data: bool
    needs_labels: bool
    summary: str

    def load(self) -> Callable[..., Scores]:
        # By name, on first use: the criterion modules import this package (Scores, prunable, ...),
        # so importing them here eagerly would be a cycle; a registry entry only names its module.
        return getattr(importlib.import_module(self.module), self.function)


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("kl", "curlprune.criteria.kl", "kl_scores", True, False, "CURL: KL(q_masked || p) per channel, exact"),
        Criterion("kl-approx", "curlprune.criteria.kl_approx", "kl_approx_scores", True, False,
                  "Fisher (2nd-order) approximation of the KL score from a few backward passes"),
        Criterion("l1", "curlprune.criteria.magnitude", "l1_scores", False, False, "L1 norm of the producing filters"),
        Criterion("bn", "curlprune.criteria.magnitude", "bn_scores", False, False, "|gamma| of the group's batch norms"),
        Criterion("taylor", "curlprune.criteria.taylor", "taylor_scores", True, True, "first-order Taylor |sum a*dL/da| (uses labels)"),
        Criterion("random", "curlprune.criteria.magnitude", "random_scores", False, False, "seeded random scores (control)"),
    )
}

_PROGRESS_CRITERIA = ("kl", "kl-approx")
"""Criteria that report progress, one step per unit of every prunable group."""


def get(name: str) -> Criterion:
    """The criterion called ``name``.

    Args:
        name: one of ``CRITERIA`` (``kl``, ``kl-approx``, ``l1``, ``bn``, ``taylor``, ``random``).

    Returns:
        Its :class:`Criterion` entry.

    Raises:
        CurlpruneError: unknown name (the message lists the valid ones).
    """
    if name not in CRITERIA:
        raise CurlpruneError(f"unknown criterion {name!r}: use one of {', '.join(CRITERIA)}")
    return CRITERIA[name]


def compute_scores(
    name: str,
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    **options,
) -> Scores:
    """Score every prunable group of ``model`` with the criterion ``name``.

    The model is scored in eval mode (its modes are restored).

    Args:
        name: the criterion (``CRITERIA``).
        model: the unpruned model.
        groups: ``trace(model, x)``.
        images: calibration batch ``[N, C, H, W]``, float, already transformed (data-driven criteria).
        labels: ``[N]`` int64 class indices (``taylor``).
        seed: the seed of ``random``.
        progress: called with finished work items (``kl``, ``kl-approx``; see ``work_items``).
        **options: passed to the criterion (e.g. ``budget_mb`` in MiB for ``kl``).

    Returns:
        Scores: group name -> float64 array ``(width,)`` for every prunable group; lower = less important.

    Raises:
        CurlpruneError: unknown criterion, or images/labels missing where the criterion needs them.

    Source: docs/method.md §2 (the KL score).
    """
    criterion = get(name)
    if criterion.needs_data and (images is None or len(images) == 0):
        raise CurlpruneError(f"criterion {name!r} needs calibration images: pass --data (a dataset folder/zip or 'digits')")
    if criterion.needs_labels and labels is None:
        raise CurlpruneError(f"criterion {name!r} needs labels for its calibration images: use a labelled dataset")
    kwargs = dict(options)
    if criterion.needs_data:
        kwargs["images"] = images
    if criterion.needs_labels:
        kwargs["labels"] = labels
    if name == "random":
        kwargs["seed"] = seed
    if name in _PROGRESS_CRITERIA:
        kwargs["progress"] = progress
    with eval_mode(model):
        return criterion.load()(model, groups, **kwargs)


def work_items(name: str, groups: Sequence[ChannelGroup]) -> int:
    """How many progress steps ``compute_scores(name, ...)`` reports.

    Args:
        name: the criterion.
        groups: the model's channel groups.

    Returns:
        ``kl``, ``kl-approx``: the number of units of the prunable groups; other criteria: 0.
    """
    return sum(g.width // g.unit for g in prunable(groups)) if name in _PROGRESS_CRITERIA else 0


# ------------------------------------------------------------------------------------- helpers


def prunable(groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
    """The groups that get scores."""
    return [g for g in groups if g.prunable]


def per_channel(values: torch.Tensor, group: ChannelGroup, member_index: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Sum per-position ``values`` (along a member's sliced dimension) into the group's channels."""
    flat = values.detach().double().cpu()
    out = np.zeros(group.width, dtype=np.float64)
    for channel, positions in enumerate(member_index):
        out[channel] = float(flat[list(positions)].sum())
    return out


def unit_broadcast(per_unit: np.ndarray, unit: int) -> np.ndarray:
    """Give every channel of a unit the unit's value."""
    return np.repeat(np.asarray(per_unit, dtype=np.float64), unit)


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module called ``name``, or None when ``name`` is a parameter (``get_attr`` member)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
