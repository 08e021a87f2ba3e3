"""How the pruning budget is spread over the channel groups: score transforms and iterative selection.

:func:`curlprune.select.select` ranks raw scores globally (CURL). This module holds the
alternatives measured in issue 9 (``benchmarks/cifar_resnet56.py``), all built on that one
selection so the target search, the floor and the fill step are shared:

* :func:`cost_weighted`: divide every channel's score by the MACs its removal saves (to the power
  ``power``), so a channel is judged by the damage per MAC saved. A channel of a 32x32 stage costs
  four times the MACs of one at 8x8, and a residual-stream ("outside") channel is read and written
  by every block of its stage, so raw scores over-protect cheap channels and under-use the
  expensive ones (docs/method.md §3).
* :func:`protect_kind`: the names of every group of a kind ("outside" or "inside"), for
  ``protect=`` (the paper's "hourglass" question: prune the blocks only, or the stream too).
* :class:`Allocation` + :func:`allocate`: one named combination of the above with ``select``'s
  own options (per-group ``normalize``, ``floor``), applied to given scores.
* :func:`iterative_allocate`: prune part of the way, score the pruned model again, continue.

Scores here are per channel (``{group name: float array [width]}``), as the criteria return them.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from curlprune.analysis import trace
from curlprune.channels import ChannelGroup, Plan
from curlprune.errors import CurlpruneError
from curlprune.select import DEFAULT_FLOOR, CostFn, Selection, Target, select
from curlprune.surgery import apply

ScoreFn = Callable[[nn.Module, Sequence[ChannelGroup]], Mapping[str, np.ndarray]]
"""``(model, its groups) -> scores``: a criterion bound to its calibration data."""


@dataclass(frozen=True)
class Allocation:
    """One way of turning scores into a plan.

    normalize:   per-group normalisation of :func:`curlprune.select.rank_units` (none = CURL).
    floor:       smallest kept fraction of a group (CURL: 0.3), see docs/method.md §3.
    cost_power:  scores are divided by (MACs saved per channel) ** cost_power; 0 = raw (CURL).
    protect:     "none", "outside" (prune inside channels only) or "inside" (stream only).
    steps:       1 = one-shot (CURL); n > 1 = reach the target in n equal steps of the MACs
                 fraction, scoring the pruned model again before every step after the first.
    """

    normalize: str = "none"
    floor: float = DEFAULT_FLOOR
    cost_power: float = 0.0
    protect: str = "none"
    steps: int = 1

    def __post_init__(self) -> None:
        if self.protect not in ("none", "outside", "inside"):
            raise CurlpruneError(f"allocation protect must be none, outside or inside, got {self.protect!r}")
        if self.cost_power < 0 or not math.isfinite(self.cost_power):
            raise CurlpruneError(f"cost_power must be a finite number >= 0, got {self.cost_power}")
        if self.steps < 1:
            raise CurlpruneError(f"steps must be at least 1, got {self.steps}")

    def as_dict(self) -> dict:
        return asdict(self)


PAPER = Allocation()
"""CURL as published: raw global ranking, floor 0.3, nothing protected, one shot."""


def cost_weighted(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], power: float = 1.0) -> dict[str, np.ndarray]:
    """``score / macs_saved ** power`` per channel, for every scored group.

    macs_saved is :attr:`ChannelGroup.macs_per_channel` (MACs removed by removing that channel
    alone from the full model). A channel that saves no MACs keeps an infinite weighted score
    (it is never worth removing). ``power = 0`` returns the scores unchanged (as float64 copies).
    """
    by_name = {g.name: g for g in groups}
    out: dict[str, np.ndarray] = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if power == 0 or name not in by_name:
            out[name] = values.copy()
            continue
        saved = np.asarray(by_name[name].macs_per_channel, dtype=np.float64)
        if saved.shape != values.shape:
            raise CurlpruneError(f"group {name!r}: {values.shape[0]} scores but {saved.shape[0]} channels: score the same model again")
        with np.errstate(divide="ignore", invalid="ignore"):
            weighted = np.where(saved > 0, values / np.power(np.maximum(saved, 1e-300), power), np.inf)
        weighted[np.isneginf(values)] = -np.inf  # already removed (iterative) stays first
        out[name] = weighted
    return out


def protect_kind(groups: Sequence[ChannelGroup], kind: str) -> list[str]:
    """Names of the prunable groups of ``kind`` ("inside"/"outside"); [] for "none"."""
    if kind == "none":
        return []
    return [g.name for g in groups if g.prunable and g.kind == kind]


def allocate(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    cost_fn: CostFn,
    target: Target,
    allocation: Allocation = PAPER,
) -> Selection:
    """One-shot selection of ``scores`` under ``allocation`` (``allocation.steps`` is ignored here)."""
    weighted = cost_weighted(groups, scores, allocation.cost_power)
    return select(groups, weighted, cost_fn, target, floor=allocation.floor,
                  protect=protect_kind(groups, allocation.protect), normalize=allocation.normalize)


def iterative_allocate(
    model: nn.Module,
    example_input: torch.Tensor,
    groups: Sequence[ChannelGroup],
    score_fn: ScoreFn,
    cost_fn: CostFn,
    target: Target,
    allocation: Allocation = PAPER,
    *,
    first_scores: Mapping[str, np.ndarray] | None = None,
) -> tuple[Selection, list[dict]]:
    """Reach ``target`` (a fraction of the MACs) in ``allocation.steps`` steps, re-scoring in between.

    Step i selects to the fraction ``1 - i/n * (1 - target)`` with the scores of the model pruned by
    step i - 1 (sliced with :func:`curlprune.apply` and traced again; group names are kept by
    slicing). Channels removed earlier get score -inf, so every later selection contains the
    earlier one (the walk removes them first, in the same per-group order, under the same floor).
    Returns the last Selection (on ``model``'s groups) and one record per step (fraction, seconds).

    Raises CurlpruneError for a params target or an absolute count (the steps are MACs fractions).
    """
    if target.metric != "macs" or not target.is_fraction:
        raise CurlpruneError("iterative allocation needs a MACs fraction target (e.g. 0.5)")
    n = allocation.steps
    plan: Plan = {}
    steps: list[dict] = []
    selection: Selection | None = None
    for i in range(1, n + 1):
        fraction = 1.0 - i / n * (1.0 - target.value)
        started = time.time()
        if i == 1 and first_scores is not None:
            scores = {k: np.asarray(v, dtype=np.float64) for k, v in first_scores.items()}
        else:
            pruned = apply(model, groups, plan).eval() if plan else model
            sub_groups = trace(pruned, example_input) if plan else groups
            sub_scores = score_fn(pruned, sub_groups)
            scores = _lift(groups, plan, sub_scores)
        seconds = time.time() - started
        selection = allocate(groups, scores, cost_fn, Target("macs", fraction), allocation)
        widths = {g.name: g.width for g in groups}
        missing = [name for name, kept in plan.items() if not set(selection.plan.get(name, range(widths[name]))) <= set(kept)]
        if missing:
            raise CurlpruneError(f"iterative step {i} restored channels of {missing[:3]}: the floor or protection changed between steps")
        plan = selection.plan
        steps.append({"step": i, "fraction": fraction, "score_seconds": round(seconds, 2), "macs": selection.macs})
    assert selection is not None
    return selection, steps


def _lift(groups: Sequence[ChannelGroup], plan: Plan, sub_scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores of a sliced model's groups back on the full groups; removed channels get -inf."""
    out: dict[str, np.ndarray] = {}
    for g in groups:
        if not g.prunable or g.name not in sub_scores:
            continue
        full = np.full(g.width, -np.inf)
        kept = plan.get(g.name, list(range(g.width)))
        values = np.asarray(sub_scores[g.name], dtype=np.float64)
        if values.shape != (len(kept),):
            raise CurlpruneError(f"group {g.name!r}: {values.shape} scores for {len(kept)} kept channels after slicing")
        full[np.asarray(kept, dtype=np.int64)] = values
        out[g.name] = full
    return out
