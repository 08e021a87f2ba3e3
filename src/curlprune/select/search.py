"""Global channel selection: turn per-channel scores into a Plan that meets a MACs/params target
(or, with a measured ``metric_fn``, a latency target: :func:`curlprune.select.latency_select.select_latency`).

CURL's rule (docs/method.md §3), made automatic:

1. Rank every unit (one channel, or ``unit`` channels of a grouped conv) of every prunable,
   unprotected group by its raw score, ascending, across all groups (optionally normalised per
   group first).
2. Walk the first ``top_k`` ranked units; remove a unit unless its group's kept fraction is already
   below ``floor`` (checked *before* the removal, as in the authors' code, so a group of width n can
   end at ceil(floor*n) - 1 channels) or it is the group's last unit.
3. Choose ``top_k`` automatically: cost (MACs or params of the sliced network) never increases with
   ``top_k``, so a bisection finds the smallest ``top_k`` whose cost is at or below the target. When
   that last removal overshoots by more than ``tolerance`` (a wide group, or with ``round_to`` a
   whole rounded unit), the result is brought into ``[target * (1 - tolerance), target]``
   (:mod:`curlprune.select.select_fit`): first the next-ranked units whose removal lands inside are tried
   in rank order (a "fill" step), then whole (rounded) units of removed channels are added back,
   the most important first (a "give-back" step), or exchanged between groups. A target no plan
   meets within the tolerance is kept from above and the Selection says by how much it missed and
   why (``met``, ``missed_by``, ``note``).

With ``metric_fn`` (``plan -> float``, e.g. the measured relative latency of the sliced model) the
bisection and the fill compare ``metric_fn(plan)`` relative to ``metric_fn({})`` instead of the MACs
or params; the ranking and the walk are unchanged.
"""
from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from curlprune.channels import ChannelGroup, Plan
from curlprune.errors import CurlpruneError
from curlprune.report import human
from curlprune.select.select_fit import settle

CostFn = Callable[[Plan], tuple[float, float]]
"""``plan -> (macs, params)`` of the model sliced by ``plan``."""

NORMALIZATIONS = ("none", "mean", "max", "l2")
METRICS = ("macs", "params", "latency")
DEFAULT_FLOOR = 0.3
DEFAULT_TOLERANCE = 0.01
UNAMBIGUOUS_COUNT = 1000.0  # a target value above 1 and below this is neither a fraction nor a plausible count
_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Target:
    """A compression target: ``metric`` ("macs", "params" or "latency") at ``value``.

    ``value <= 1`` is a fraction of the unpruned model, larger values are absolute counts. A
    "latency" target is always a fraction (of ``metric_fn({})`` in :func:`select`). What a user
    writes goes through :meth:`parse`, which refuses values that could be either.
    """

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise CurlpruneError(f"unknown target metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if not (self.value > 0 and math.isfinite(self.value)):
            raise CurlpruneError(f"target {self.metric} must be a positive number (a fraction like 0.5 or a count like 62.5M), got {self.value}")
        if self.metric == "latency" and self.value > 1:
            raise CurlpruneError(f"a latency target for select is a fraction of the unpruned latency in (0, 1], got {self.value:g}")

    @classmethod
    def parse(cls, metric: str, text: str | float) -> Target:
        """``"0.5"`` (fraction), ``"62.5M"``, ``"1.11G"``, ``"6e7"`` (absolute) -> Target.

        A value above 1 and below ``UNAMBIGUOUS_COUNT`` (1000), with or without a unit, is an error:
        ``1.5`` is neither a fraction (at most 1) nor a plausible count of MACs or parameters.
        """
        if isinstance(text, bool):
            raise CurlpruneError(f"target {metric} {text!r} is not a number: write a fraction (0.5) or a count (62.5M, 1.11G)")
        if isinstance(text, (int, float)):
            return cls._unambiguous(metric, float(text))
        match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtT]?)\s*", str(text))  # a sign: refused by value, below
        if not match:
            raise CurlpruneError(f"target {metric} {text!r} is not a number: write a fraction (0.5) or a count (62.5M, 1.11G)")
        return cls._unambiguous(metric, float(match.group(1)) * _SUFFIXES[match.group(2).lower()])

    @classmethod
    def _unambiguous(cls, metric: str, value: float) -> Target:
        if 1.0 < value < UNAMBIGUOUS_COUNT:
            raise CurlpruneError(
                f"target {metric} {value:g} is ambiguous: a fraction of the unpruned model is at most 1 (e.g. 0.5) "
                f"and a count carries a unit or is large (e.g. 62.5M, 1.2G, 300k, 60000000)")
        return cls(metric, value)

    @property
    def is_fraction(self) -> bool:
        return self.value <= 1.0

    def absolute(self, full_macs: float, full_params: float) -> float:
        """The target as an absolute count, given the unpruned model's cost."""
        full = full_macs if self.metric == "macs" else full_params
        return self.value * full if self.is_fraction else self.value

    def describe(self) -> str:
        return f"{self.value:g} of the {self.metric}" if self.is_fraction else f"{self.value:,.0f} {self.metric}"


@dataclass(frozen=True)
class RankedUnit:
    """One removable unit in the global ranking."""

    score: float
    group: str
    unit: int  # unit index inside the group (channels unit*size ... unit*size + size - 1)


@dataclass
class Selection:
    """The chosen Plan and what it costs."""

    plan: Plan
    target: Target
    target_value: float  # absolute
    top_k: int  # ranked units walked (skipped ones included, as the authors count)
    removed_channels: int
    macs: float
    params: float
    full_macs: float
    full_params: float
    protected: list[str] = field(default_factory=list)
    floor: float = DEFAULT_FLOOR
    filled: int = 0  # units removed by the fill step beyond the bisection's prefix
    note: str = ""
    given_back: int = 0  # units added back or exchanged between groups (select_fit.give_back, swap)
    tolerance: float = DEFAULT_TOLERANCE  # how far below the target (a fraction of it) still meets it
    met: bool = True  # the searched value lies in [target * (1 - tolerance), target]
    missed_by: float = 0.0  # when not met: searched value / target - 1 (negative: below the target)
    steps: list[dict] = field(default_factory=list)  # iterative pruning: one record per step (select.iterative); [] = one shot

    @property
    def achieved(self) -> float:
        return self.macs if self.target.metric == "macs" else self.params

    def as_dict(self) -> dict:
        return {
            "target": {"metric": self.target.metric, "value": self.target.value, "absolute": self.target_value},
            "top_k": self.top_k,
            "removed_channels": self.removed_channels,
            "macs": self.macs,
            "params": self.params,
            "full_macs": self.full_macs,
            "full_params": self.full_params,
            "macs_ratio": self.macs / self.full_macs,
            "params_ratio": self.params / self.full_params,
            "protected": list(self.protected),
            "floor": self.floor,
            "filled": self.filled,
            "given_back": self.given_back,
            "tolerance": self.tolerance,
            "met": self.met,
            "missed_by": round(self.missed_by, 6),
            "note": self.note,
        } | ({"steps": list(self.steps)} if self.steps else {})


# ----------------------------------------------------------------------------------------------
# protection


def resolve_protect(groups: Sequence[ChannelGroup], patterns: Iterable[str]) -> list[str]:
    """Names of the prunable groups matched by ``patterns`` (exact names or shell globs).

    A pattern that matches no prunable group is an error: a typo must not silently protect nothing.

    Args:
        groups: the model's channel groups.
        patterns: group names or ``fnmatch`` globs (``"layer4.*"``).

    Returns:
        The matched prunable group names, in pattern order, without repeats.

    Raises:
        CurlpruneError: a pattern matches no prunable group.

    Source: docs/method.md §3 (protected groups).
    """
    names = [g.name for g in groups if g.prunable]
    protected: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            example = ", ".join(names[:4])
            raise CurlpruneError(
                f"--protect {pattern!r} matches no prunable group: use a group name or glob "
                f"(e.g. {example}); `curlprune groups --model ...` lists them"
            )
        protected.extend(n for n in hits if n not in protected)
    return protected


# ----------------------------------------------------------------------------------------------
# ranking and the walk


def rank_units(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    *,
    protect: Iterable[str] = (),
    normalize: str = "none",
) -> list[RankedUnit]:
    """All removable units, ascending by (optionally per-group normalised) score.

    A unit's score is the mean of its channels' scores (criteria give every channel of a unit the
    same value). Ties are broken by group order, then unit index, so the ranking is deterministic.

    Args:
        groups: the model's channel groups.
        scores: group name -> float array of shape ``(width,)`` for every prunable group.
        protect: names of groups left out of the ranking.
        normalize: per-group scaling, one of ``NORMALIZATIONS`` (``"none"``: CURL's raw scores).

    Returns:
        Every unit of every prunable, unprotected group, ascending by score.

    Raises:
        CurlpruneError: unknown normalisation, or scores missing, of the wrong shape or with NaN.

    Source: docs/method.md §3 (global ranking).
    """
    if normalize not in NORMALIZATIONS:
        raise CurlpruneError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
    protected = set(protect)
    entries: list[tuple[float, int, int, str]] = []
    for order, g in enumerate(groups):
        if not g.prunable or g.name in protected:
            continue
        if g.name not in scores:
            raise CurlpruneError(f"no scores for prunable group {g.name!r}: the scores were computed for another model; score again")
        s = np.asarray(scores[g.name], dtype=np.float64)
        if s.shape != (g.width,):
            raise CurlpruneError(f"scores for group {g.name!r} have shape {s.shape}, expected ({g.width},): score the same model again")
        if np.isnan(s).any():
            raise CurlpruneError(f"scores for group {g.name!r} contain NaN: the criterion failed on this model; try another criterion")
        per_unit = s.reshape(g.width // g.unit, g.unit).mean(axis=1)
        per_unit = normalize_values(per_unit, normalize)
        entries.extend((float(v), order, u, g.name) for u, v in enumerate(per_unit))
    entries.sort()
    return [RankedUnit(score, name, unit) for score, _, unit, name in entries]


def normalize_values(values: np.ndarray, how: str) -> np.ndarray:
    """One group's (per-unit) scores scaled by ``how`` (``NORMALIZATIONS``); ``none`` keeps CURL's raw global ranking."""
    if how == "none":
        return values
    finite = values[np.isfinite(values)]
    if how == "mean":
        denom = np.abs(finite).mean() if finite.size else 0.0
    elif how == "max":
        denom = np.abs(finite).max() if finite.size else 0.0
    else:
        denom = float(np.sqrt((finite**2).sum())) if finite.size else 0.0
    return values / denom if denom > 0 else values


class _Walk:
    """The state of walking the ranking: which units are removed, in which order."""

    def __init__(self, groups: Sequence[ChannelGroup], floor: float, round_to: int | None = None,
                 limits: Mapping[str, float] | None = None) -> None:
        self.groups = {g.name: g for g in groups}
        self.limits = dict(limits or {})  # group -> the largest fraction of its units it may lose (--max-ratio)
        self.units_total = {g.name: g.width // g.unit for g in groups}
        self.removed: dict[str, list[int]] = {}
        self.floor = floor
        self.round_to = round_to  # set by rounded(): the removed lists already keep rounded widths

    def step(self, name: str) -> int:
        """Units of group ``name`` that make one whole rounded unit (1 without rounding)."""
        unit = self.groups[name].unit
        return math.lcm(self.round_to or 1, unit) // unit

    def rounded(self, round_to: int | None) -> _Walk:
        """A copy whose removed lists are what ``plan(round_to)`` keeps removed."""
        copy = _Walk(list(self.groups.values()), self.floor, round_to, self.limits)
        for name, removed in self.removed.items():
            kept = _round_removed(list(removed), self.units_total[name], self.groups[name].unit, round_to) if round_to else list(removed)
            if kept:
                copy.removed[name] = kept
        return copy

    def allows(self, entry: RankedUnit) -> bool:
        """CURL's rule: skip when the group's kept fraction is already below the floor, or past the group's max_ratio."""
        total = self.units_total[entry.group]
        kept = total - len(self.removed.get(entry.group, ()))
        limit = self.limits.get(entry.group, 1.0)
        return kept > 1 and kept / total >= self.floor and total - kept + 1 <= limit * total + 1e-9

    def remove(self, entry: RankedUnit) -> None:
        self.removed.setdefault(entry.group, []).append(entry.unit)

    def undo(self, entry: RankedUnit) -> None:
        self.removed[entry.group].pop()
        if not self.removed[entry.group]:
            del self.removed[entry.group]

    def plan(self, round_to: int | None = None) -> Plan:
        """Kept channel indices of every group with removals (optionally rounded up in width)."""
        plan: Plan = {}
        for name, removed in self.removed.items():
            g = self.groups[name]
            removed = list(removed)
            if round_to:
                removed = _round_removed(removed, self.units_total[name], g.unit, round_to)
            if not removed:
                continue
            gone = set(removed)
            plan[name] = [c for u in range(self.units_total[name]) if u not in gone for c in range(u * g.unit, (u + 1) * g.unit)]
        return plan


def _round_removed(removed: list[int], units_total: int, unit: int, round_to: int) -> list[int]:
    """Give back the last-removed (highest-scoring) units until the kept width is a multiple of round_to."""
    step = math.lcm(round_to, unit) // unit  # in units
    kept = units_total - len(removed)
    rounded = min(units_total, math.ceil(kept / step) * step)
    return removed[: len(removed) - (rounded - kept)] if rounded > kept else removed


def walk(ranked: Sequence[RankedUnit], groups: Sequence[ChannelGroup], top_k: int, floor: float,
         limits: Mapping[str, float] | None = None) -> _Walk:
    """Walk the first ``top_k`` ranked units, removing those the floor allows.

    Args:
        ranked: ``rank_units(...)``.
        groups: the model's channel groups.
        top_k: how many ranked units to walk (skipped ones count).
        floor: smallest kept fraction of a group, checked before each removal.
        limits: group name -> the largest fraction of its channels it may lose (``max_ratio``).

    Returns:
        The walk's state; ``.plan()`` is the resulting Plan.

    Source: docs/method.md §3 (floor).
    """
    state = _Walk(groups, floor, limits=limits)
    for entry in ranked[:top_k]:
        if state.allows(entry):
            state.remove(entry)
    return state


# ----------------------------------------------------------------------------------------------
# the target search


def select(
    groups: Sequence[ChannelGroup],
    scores: Mapping[str, np.ndarray],
    cost_fn: CostFn,
    target: Target,
    *,
    floor: float = DEFAULT_FLOOR,
    protect: Iterable[str] = (),
    normalize: str = "none",
    round_to: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    metric_fn: Callable[[Plan], float] | None = None,
    fill: bool = True,
    limits: Mapping[str, float] | None = None,
) -> Selection:
    """The Plan that removes the lowest-ranked units until ``target`` is met (at or just below it).

    Args:
        groups: the model's channel groups.
        scores: group name -> float array ``(width,)``, lower = less important.
        cost_fn: ``plan -> (macs, params)`` of the sliced model (``model_cost_fn``).
        target: the MACs or params target (fraction of the unpruned model or absolute count).
        floor: smallest kept fraction of a group, in ``[0, 1)`` (CURL: 0.3).
        protect: names of groups never pruned.
        normalize: per-group score scaling (``NORMALIZATIONS``).
        round_to: keep group widths multiples of this many channels (None: no rounding).
        tolerance: how far below the target (a fraction of it) the result may land.
        metric_fn: ``plan -> float`` searched instead of ``cost_fn``'s MACs/params (the target is
            then a fraction of ``metric_fn({})``; needed for metric "latency"). ``cost_fn`` still
            gives the Selection's MACs and params.
        fill: try the fill and give-back steps when the bisection lands below the tolerance band
            (off: the bisection's plan).
        limits: group name -> the largest fraction of its channels it may lose (``select_limits.resolve_limits``).

    Returns:
        The :class:`Selection`: the plan, its cost, the unpruned cost and how it was found; when
        no plan lands within the tolerance, ``met`` is False and ``missed_by`` and ``note`` say by
        how much and why (the plan is then the closest found below the target).

    Raises:
        CurlpruneError: invalid floor/round_to/normalisation/scores, or a target the floor and the
            protected groups make unreachable.

    Source: docs/method.md §3 (selection, floor, target search).
    """
    if not 0.0 <= floor < 1.0:
        raise CurlpruneError(f"floor must be in [0, 1) (the smallest kept fraction of a group), got {floor}")
    if round_to is not None and round_to < 1:
        raise CurlpruneError(f"round_to must be a positive channel count, got {round_to}")
    protected = list(protect)
    ranked = rank_units(groups, scores, protect=protected, normalize=normalize)
    full_macs, full_params = cost_fn({})
    if metric_fn is None and target.metric == "latency":
        raise CurlpruneError("a latency target needs a measured metric_fn (curlprune.select.latency_select.select_latency)")
    value_fn = metric_fn or (lambda plan: cost_fn(plan)[0 if target.metric == "macs" else 1])
    full = value_fn({})
    goal = target.value * full if target.is_fraction else target.value
    fmt = (lambda v: f"{v / full:.3f} of the unpruned latency") if target.metric == "latency" else human

    def cost_of(state: _Walk) -> float:
        return value_fn(state.plan(round_to))

    def finish(state: _Walk, top_k: int, filled: int = 0, note: str = "", given_back: int = 0) -> Selection:
        plan = state.plan(round_to)
        macs, params = cost_fn(plan)
        removed = sum(state.groups[name].width - len(kept) for name, kept in plan.items())
        value = value_fn(plan)
        met = full <= goal or goal * (1.0 - tolerance) <= value <= goal
        return Selection(
            plan=plan, target=target, target_value=goal, top_k=top_k,
            removed_channels=removed, macs=macs, params=params,
            full_macs=full_macs, full_params=full_params, protected=protected, floor=floor, filled=filled, note=note,
            given_back=given_back, tolerance=tolerance, met=met, missed_by=0.0 if met else value / goal - 1.0,
        )

    if full <= goal:
        return finish(_Walk(groups, floor, limits=limits), 0, note="the unpruned model already meets the target")
    smallest = cost_of(walk(ranked, groups, len(ranked), floor, limits))
    if smallest > goal:
        raise CurlpruneError(
            f"target {target.describe()} ({fmt(goal)}) is not reachable: with floor {floor:g}"
            f"{' and ' + str(len(protected)) + ' protected group(s)' if protected else ''}{' and the max_ratio limits' if limits else ''} the smallest reachable "
            f"{target.metric} is {fmt(smallest)}{'' if target.metric == 'latency' else f' ({smallest / full:.4f} of {fmt(full)})'}; "
            f"raise the target, lower --floor or protect fewer groups"
        )
    lo, hi = 0, len(ranked)  # cost(lo) > goal >= cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost_of(walk(ranked, groups, mid, floor, limits)) <= goal:
            hi = mid
        else:
            lo = mid
    state = walk(ranked, groups, hi, floor, limits)
    if not fill or cost_of(state) >= goal * (1.0 - tolerance):
        return finish(state, hi)
    state, top_k, filled, given, note = settle(ranked, lo, hi, lambda k: walk(ranked, groups, k, floor, limits), round_to,
                                               goal, tolerance, cost_of, fmt)
    return finish(state, top_k, filled=filled, note=note, given_back=given)
