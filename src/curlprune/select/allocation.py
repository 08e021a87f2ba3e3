"""How the pruning budget is spread over the channel groups: score transforms and iterative selection.

:func:`curlprune.select.search.select` ranks raw scores globally (CURL). This module holds the
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
* iterative re-scoring (prune part of the way, score the pruned model again, continue) is
  :func:`curlprune.select.iterative.iterative_allocate`, the prune stage's ``steps``.

Scores here are per channel (``{group name: float array [width]}``), as the criteria return them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from curlprune.channels import ChannelGroup
from curlprune.criteria import get
from curlprune.errors import CurlpruneError
from curlprune.select.search import DEFAULT_FLOOR, NORMALIZATIONS, CostFn, Selection, Target, normalize_values, select

@dataclass(frozen=True)
class Allocation:
    """One way of turning scores into a plan.

    normalize:   per-group normalisation of :func:`curlprune.select.search.rank_units` (none = CURL); with
                 cost_power > 0 it is applied before the division by the cost (so that it does not
                 cancel the cost weighting).
    floor:       smallest kept fraction of a group (CURL: 0.3), see docs/method.md §3.
    cost_power:  scores are divided by (cost saved per channel) ** cost_power; 0 = raw (CURL). The
                 cost is the target's metric: parameters for a params target, MACs otherwise.
    protect:     "none", "outside" (prune inside channels only) or "inside" (stream only).
    steps:       1 = one-shot (CURL); n > 1 = reach the target in n steps, scoring the pruned
                 model again before every step after the first
                 (:func:`curlprune.select.iterative.iterative_allocate`, docs/method.md §3).
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

COST_WEIGHTED = Allocation(cost_power=1.0)
"""score / cost saved per channel (MACs; params for a params target), floor 0.3, one shot: the
prune stage's default for the KL criteria (issue 9: ResNet-56 at 50% of the MACs, 85.01% top-1 after BN re-estimation
vs 79.13% for PAPER; benchmarks/results/cifar_resnet56.md)."""

ALLOCATIONS = {"cost-weighted": COST_WEIGHTED, "paper": PAPER}
"""The allocations the prune stage offers by name (``PruneConfig.allocation``)."""


def default_allocation(criterion: str) -> str:
    """The allocation the prune stage uses when none is set.

    Args:
        criterion: a registered criterion's name.

    Returns:
        "cost-weighted" when the criterion's scores share one scale across groups
        (:attr:`curlprune.criteria.Criterion.one_scale`: kl, kl-approx), so that damage per MAC
        saved is meaningful; "paper" for the others (per-layer scales, where the division hurts).

    Raises:
        CurlpruneError: an unknown criterion.

    Source: docs/method.md §3 (allocation).
    """
    return "cost-weighted" if get(criterion).one_scale else "paper"


COSTS = ("macs", "params")


def named_allocation(name: str, *, floor: float = DEFAULT_FLOOR, normalize: str = "none") -> Allocation:
    """The :data:`ALLOCATIONS` entry ``name`` with the prune stage's own floor and normalisation.

    Args:
        name: ``"cost-weighted"`` or ``"paper"``.
        floor: smallest kept fraction of a group (docs/method.md §3).
        normalize: per-group score normalisation (``select.NORMALIZATIONS``).

    Returns:
        The :class:`Allocation` (one shot, no kind protected: the stage protects by name).

    Raises:
        CurlpruneError: an unknown name (the message lists the allowed ones).

    Source: docs/method.md §3 (allocation).
    """
    if name not in ALLOCATIONS:
        raise CurlpruneError(f"unknown allocation {name!r}: use one of {', '.join(ALLOCATIONS)}")
    return replace(ALLOCATIONS[name], floor=floor, normalize=normalize)


def saving_metric(metric: str) -> str:
    """The per-channel saving a target of ``metric`` weighs scores by: params for params, MACs otherwise (latency too)."""
    return "params" if metric == "params" else "macs"


def _per_group(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray],
               transform: Callable[[ChannelGroup, np.ndarray], np.ndarray] | None) -> dict[str, np.ndarray]:
    """``transform(group, float64 scores)`` for every scored group; float64 copies for names not
    in ``groups`` and for every name when ``transform`` is None. Raises CurlpruneError when a
    group's scores are not ``(width,)``."""
    by_name = {g.name: g for g in groups}
    out: dict[str, np.ndarray] = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        group = by_name.get(name)
        if transform is None or group is None:
            out[name] = values.copy()
            continue
        if values.shape != (group.width,):
            raise CurlpruneError(f"scores for group {name!r} have shape {values.shape}, expected ({group.width},): score the same model again")
        out[name] = transform(group, values)
    return out


def cost_weighted(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], power: float = 1.0,
                  *, cost: str = "macs") -> dict[str, np.ndarray]:
    """``score / saved ** power`` per channel, for every scored group.

    Args:
        groups: the model's channel groups (their ``macs_per_channel`` / ``params_per_channel``).
        scores: group name -> float array ``(width,)``; names not in ``groups`` are copied as they are.
        power: exponent of the saving; 0 returns the scores unchanged (as float64 copies).
        cost: ``"macs"`` (:attr:`ChannelGroup.macs_per_channel`: MACs removed by removing that
            channel alone from the full model) or ``"params"`` (``params_per_channel``).

    Returns:
        The weighted scores. A channel of a multi-channel unit (grouped convs) is divided by what
        its whole unit saves, since the unit is removed as one. A channel that saves nothing keeps
        an infinite weighted score (it is never worth removing); -inf (removed earlier, iterative)
        stays -inf.

    Raises:
        CurlpruneError: an unknown ``cost``, or scores of another width than the group.

    Source: docs/method.md §3 (allocation).
    """
    if cost not in COSTS:
        raise CurlpruneError(f"unknown cost {cost!r}: use one of {', '.join(COSTS)}")

    def weigh(group: ChannelGroup, values: np.ndarray) -> np.ndarray:
        saved = np.asarray(group.macs_per_channel if cost == "macs" else group.params_per_channel, dtype=np.float64)
        if group.unit > 1 and group.width % group.unit == 0:  # a unit goes as one: it saves the sum of its channels
            saved = np.repeat(saved.reshape(-1, group.unit).sum(axis=1), group.unit)
        with np.errstate(divide="ignore", invalid="ignore"):
            weighted = np.where(saved > 0, values / np.power(np.maximum(saved, 1e-300), power), np.inf)
        weighted[np.isneginf(values)] = -np.inf  # already removed (iterative) stays first
        return weighted

    return _per_group(groups, scores, None if power == 0 else weigh)


def protect_kind(groups: Sequence[ChannelGroup], kind: str) -> list[str]:
    """Names of the prunable groups of ``kind`` ("inside"/"outside"); [] for "none"."""
    if kind == "none":
        return []
    return [g.name for g in groups if g.prunable and g.kind == kind]


def normalize_scores(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    """Per-channel scores normalised per group as :func:`curlprune.select.search.rank_units` does it, so that
    they can be divided by the cost before ``select`` ranks them (:func:`ranking_scores`).

    Args:
        groups: the model's channel groups.
        scores: group name -> float array ``(width,)``; names not in ``groups`` are copied.
        how: one of ``select.NORMALIZATIONS``; ``"none"`` returns float64 copies unchanged.

    Returns:
        group name -> float array ``(width,)``: every channel of a unit carries its unit's
        normalised mean score (``rank_units(..., normalize="none")`` on them ranks as
        ``rank_units(..., normalize=how)`` on ``scores``).

    Raises:
        CurlpruneError: an unknown normalisation, or scores of the wrong shape.

    Source: docs/method.md §3 (global ranking, allocation).
    """
    if how not in NORMALIZATIONS:
        raise CurlpruneError(f"unknown normalisation {how!r}: use one of {', '.join(NORMALIZATIONS)}")

    def normalise(group: ChannelGroup, values: np.ndarray) -> np.ndarray:
        per_unit = normalize_values(values.reshape(group.width // group.unit, group.unit).mean(axis=1), how)
        return np.repeat(per_unit, group.unit)

    return _per_group(groups, scores, None if how == "none" else normalise)


def ranking_scores(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    allocation: Allocation,
    metric: str = "macs",
) -> tuple[dict[str, np.ndarray], str]:
    """What :func:`curlprune.select.search.select` ranks under ``allocation``: (scores, its ``normalize``).

    With ``cost_power == 0`` the scores go to ``select`` unchanged with the allocation's
    normalisation (CURL's path, bit for bit). Otherwise they are normalised per group first
    (:func:`normalize_scores`), then divided by the saving of ``metric``'s cost
    (:func:`cost_weighted`, :func:`saving_metric`), and ``select`` ranks them as they are: a
    normalisation after the division would cancel the weighting (the saving is the same for every
    channel of most groups).

    Args:
        groups: the model's channel groups.
        scores: group name -> float array ``(width,)``, lower = less important.
        allocation: the allocation (its normalize and cost_power are used here).
        metric: the target's metric ("macs", "params" or "latency").

    Returns:
        (scores to rank, ``normalize`` to pass to ``select``).

    Source: docs/method.md §3 (allocation).
    """
    if allocation.cost_power == 0:
        return {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}, allocation.normalize
    normalized = normalize_scores(groups, scores, allocation.normalize)
    return cost_weighted(groups, normalized, allocation.cost_power, cost=saving_metric(metric)), "none"


def allocate(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    cost_fn: CostFn,
    target: Target,
    allocation: Allocation = PAPER,
    *,
    protect: Iterable[str] = (),
    round_to: int | None = None,
    limits: Mapping[str, float] | None = None,
) -> Selection:
    """One-shot selection of ``scores`` under ``allocation`` (``allocation.steps`` is ignored here).

    Args:
        groups, scores, cost_fn, target: as for :func:`curlprune.select.search.select` (a MACs or params target).
        allocation: how scores become a ranking (:func:`ranking_scores`), the floor and the kind
            of groups protected.
        protect: names of further groups never pruned (``select.resolve_protect``'s result).
        round_to: keep group widths multiples of this many channels (None: off).
        limits: group name -> the largest fraction of its channels it may lose (``max_ratio``).

    Returns:
        ``select``'s :class:`Selection`.

    Raises:
        CurlpruneError: as ``select`` (bad scores, an unreachable target, ...).

    Source: docs/method.md §3 (allocation).
    """
    ranked, normalize = ranking_scores(groups, scores, allocation, target.metric)
    names = protect_kind(groups, allocation.protect)
    names += [name for name in protect if name not in names]
    return select(groups, ranked, cost_fn, target, floor=allocation.floor, protect=names, normalize=normalize,
                  round_to=round_to, limits=limits)
