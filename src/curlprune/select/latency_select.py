"""A latency target: select's ranking searched with the measured latency of the sliced model as its
metric (:class:`MeasuredCost`), re-measured afterwards and searched again when noise made it miss,
from above or from below: a target is met when the re-measured latency lies within the tolerance
on either side of it; otherwise the result says by how much it missed and why."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from curlprune.cost import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_MIN_ROUNDS,
    DEFAULT_MIN_TIME_S,
    DEFAULT_TOLERANCE,
    DEFAULT_WARMUP,
    Clock,
    LatencyComparison,
    LatencyTarget,
    compare_latency,
    example_batch,
    prepare,
    torch_threads,
)
from curlprune.errors import CurlpruneError
from curlprune.select.search import DEFAULT_FLOOR, Selection, Target, select
from curlprune.surgery import apply

def _plan_key(plan: Mapping[str, Sequence[int]]) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in plan.items()))


@dataclass
class MeasuredCost:
    """``plan -> measured latency of the sliced model / the unpruned model's`` (cached per plan).

    Build with :func:`measured_cost_fn`. Calling it slices the model with ``curlprune.apply`` and
    times the slice against the unpruned model, interleaved (:func:`time_interleaved`). The empty
    plan costs exactly 1.0 (the reference itself). ``measurements`` holds every comparison made.
    """

    model: nn.Module
    groups: list
    example_input: torch.Tensor
    batch: int = 1
    threads: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    min_rounds: int = DEFAULT_MIN_ROUNDS
    max_rounds: int = DEFAULT_MAX_ROUNDS
    warmup: int = DEFAULT_WARMUP
    min_time_s: float = DEFAULT_MIN_TIME_S
    clock: Clock = time.perf_counter
    device: torch.device | None = None
    cache: dict[tuple, LatencyComparison] = field(default_factory=dict)
    measurements: list[LatencyComparison] = field(default_factory=list)
    _reference: nn.Module | None = field(default=None, repr=False)

    def __call__(self, plan: Mapping[str, Sequence[int]]) -> float:
        return self.compare(plan).ratio if plan else 1.0

    def compare(self, plan: Mapping[str, Sequence[int]], *, fresh: bool = False) -> LatencyComparison:
        """The interleaved comparison of the plan's slice with the unpruned model (cached unless ``fresh``)."""
        key = _plan_key(plan)
        if fresh or key not in self.cache:
            if self._reference is None:
                self._reference = prepare(self.model)
            candidate = prepare(apply(self.model, self.groups, dict(plan))) if plan else self._reference
            result = compare_latency(
                candidate, self._reference, self.example_input, batch=self.batch, threads=self.threads,
                tolerance=self.tolerance, min_rounds=self.min_rounds, max_rounds=self.max_rounds,
                warmup=self.warmup, min_time_s=self.min_time_s, clock=self.clock, prepared=True, device=self.device,
            )
            self.measurements.append(result)
            self.cache[key] = result
        return self.cache[key]

    def reference_ms(self) -> float:
        """Median ms per batch of the unpruned model (from the first comparison; measured if none yet)."""
        if not self.measurements:
            self.compare({}, fresh=True)
        return statistics.median(m.reference_ms for m in self.measurements)


def measured_cost_fn(
    model: nn.Module,
    groups: Sequence,
    example_input: torch.Tensor,
    *,
    batch: int = 1,
    threads: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_rounds: int = DEFAULT_MIN_ROUNDS,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    clock: Clock = time.perf_counter,
    device: torch.device | None = None,
) -> MeasuredCost:
    """A cost function ``plan -> relative latency`` (float; the unpruned model is 1.0).

    Args:
        model: the unpruned model (not modified: it is copied for timing).
        groups: its channel groups (``curlprune.trace``).
        example_input: ``[1, C, H, W]``; the timed batch has ``batch`` seeded random rows.
        batch: images per timed forward pass; threads: intra-op threads (None: current setting).
        tolerance: the relative tolerance the ratios are measured to (rounds stop once the noise
            estimate is below half of it) and the search's tolerance in :func:`select_latency`.
        min_rounds, max_rounds, warmup, min_time_s, clock: see :func:`time_interleaved`.
        device: where both models are timed (sliced on the CPU, then moved); None = the CPU.

    Returns:
        a :class:`MeasuredCost` (callable, cached per plan).
    """
    if not 0 < tolerance < 1:
        raise CurlpruneError(f"latency tolerance must be in (0, 1), got {tolerance}")
    example_batch(example_input, batch)  # validates batch
    with torch_threads(threads):
        pass  # validates threads
    return MeasuredCost(model, list(groups), example_input, batch=batch, threads=threads, tolerance=tolerance,
                        min_rounds=min_rounds, max_rounds=max_rounds, warmup=warmup, min_time_s=min_time_s, clock=clock,
                        device=device)


# ----------------------------------------------------------------------------------------------
# the latency target search


@dataclass
class LatencySelection:
    """The chosen plan for a latency target: select's Selection (MACs/params of the plan) + latency."""

    selection: Any  # curlprune.select.search.Selection, with real MACs and params
    target: LatencyTarget
    goal: float  # target as a fraction of the unpruned latency
    achieved: float  # re-measured latency fraction of the chosen plan (fresh timings)
    achieved_ms: float
    reference_ms: float
    noise: float
    tolerance: float
    batch: int
    threads: int
    evaluations: int  # plans measured during the search
    searches: int
    note: str = ""

    @property
    def plan(self):
        return self.selection.plan

    @property
    def met(self) -> bool:
        """Whether the re-measured latency is within the tolerance of the goal, above or below it
        (or the goal is at least the unpruned latency and the plan prunes nothing)."""
        if self.goal >= 1.0 and not self.plan:
            return True
        return self.goal * (1.0 - self.tolerance) <= self.achieved <= self.goal * (1.0 + self.tolerance)

    @property
    def missed_by(self) -> float:
        """0 when met, else achieved / goal - 1 (negative: faster than asked)."""
        return 0.0 if self.met else self.achieved / self.goal - 1.0

    def latency_dict(self) -> dict[str, Any]:
        """The ``latency`` entry of report.json."""
        return {
            "target": self.target.as_dict(),
            "goal_fraction": round(self.goal, 6),
            "achieved_fraction": round(self.achieved, 6),
            "achieved_ms": round(self.achieved_ms, 4),
            "reference_ms": round(self.reference_ms, 4),
            "noise": round(self.noise, 6),
            "tolerance": self.tolerance,
            "met": self.met,
            "missed_by": round(self.missed_by, 6),
            "batch": self.batch,
            "threads": self.threads,
            "evaluations": self.evaluations,
            "searches": self.searches,
            "note": self.note,
        }

    def as_dict(self) -> dict[str, Any]:
        """Selection.as_dict() with the target replaced by the latency target, plus ``latency``."""
        d = self.selection.as_dict()
        d["target"] = {"metric": "latency", **self.target.as_dict(), "absolute": self.goal * self.reference_ms}
        d["latency"] = self.latency_dict()
        d.update(met=self.met, missed_by=d["latency"]["missed_by"], tolerance=self.tolerance, note=self.note)
        return d


def select_latency(
    groups: Sequence,
    scores: Mapping[str, np.ndarray],
    measured: MeasuredCost,
    analytic_cost_fn: Callable[[Mapping[str, Sequence[int]]], tuple[float, float]],
    target: LatencyTarget,
    *,
    floor: float | None = None,
    protect: Iterable[str] = (),
    normalize: str = "none",
    round_to: int | None = None,
    retries: int = 2,
    limits: Mapping[str, float] | None = None,
) -> LatencySelection:
    """The plan, along select's global ranking, whose measured latency meets ``target``.

    Runs :func:`curlprune.select.search.select` (ranking, floor, protection, rounding and bisection over
    the number of ranked units, docs/method.md §3) with ``metric_fn=measured`` (relative latency)
    and ``fill=False``. The chosen plan is then re-measured with fresh timings; when it is
    outside ``goal * (1 -/+ tolerance)`` the search is repeated with the goal moved by that miss
    (lowered when it was too slow, raised when too fast), at most ``retries`` times (the
    measurements of earlier searches are reused). When no re-measured plan lands within the
    tolerance, the closest one not above ``goal * (1 + tolerance)`` is kept (else the fastest), and
    its ``note`` says by how much it missed and why (timings that vary between measurements of
    the same plan, or steps of the ranking larger than the tolerance).

    Args:
        groups, scores, floor, protect, normalize, round_to, limits: as for ``select``.
        measured: from :func:`measured_cost_fn` (its tolerance is the stated tolerance).
        analytic_cost_fn: ``plan -> (macs, params)`` (``select.model_cost_fn``) for the report.
        target: a :class:`LatencyTarget`.

    Returns:
        a :class:`LatencySelection` (plan, MACs/params, goal, re-measured latency, ``met``,
        ``missed_by``, note).

    Raises:
        CurlpruneError: the target is below the smallest reachable latency (floor/protection).
    """
    tol = measured.tolerance
    reference_ms = measured.reference_ms()
    goal = target.goal_fraction(reference_ms)

    def search(fraction: float) -> Selection:
        # select's bisection with the measured relative latency as its metric (no fill step)
        return select(groups, scores, analytic_cost_fn, Target("latency", min(1.0, fraction)), metric_fn=measured,
                      fill=False, floor=DEFAULT_FLOOR if floor is None else floor, protect=list(protect),
                      normalize=normalize, round_to=round_to, limits=limits)

    def result(sel: Selection, comparison: LatencyComparison | None, searches: int, note: str) -> LatencySelection:
        return LatencySelection(
            selection=sel, target=target, goal=goal, achieved=comparison.ratio if comparison else 1.0,
            achieved_ms=comparison.candidate_ms if comparison else reference_ms, reference_ms=reference_ms,
            noise=comparison.noise if comparison else 0.0, tolerance=tol, batch=measured.batch,
            threads=measured.threads or torch.get_num_threads(), evaluations=len(measured.cache), searches=searches,
            note=note,
        )

    if goal >= 1.0:
        return result(search(1.0), None, 0, f"the unpruned model ({reference_ms:.3g} ms) already meets the target")
    low, high = goal * (1.0 - tol), goal * (1.0 + tol)
    search_goal, notes, tried = goal, [], []
    sel = search(goal)  # raises when the goal is below the fastest plan the floor allows
    for attempt in range(1, retries + 2):
        searched = measured(sel.plan) if sel.plan else 1.0  # what the search measured (cached)
        check = measured.compare(sel.plan, fresh=True) if sel.plan else None
        achieved = check.ratio if check else 1.0
        tried.append((sel, check, achieved, abs(achieved / searched - 1.0)))
        if low <= achieved <= high:
            return result(sel, check, attempt, "; ".join(notes))
        notes.append(f"search {attempt} re-measured {achieved:.3f} {'>' if achieved > high else '<'} {goal:.3f} x (1 {'+' if achieved > high else '-'} {tol:g})")
        if attempt == retries + 1:
            break
        search_goal = min(1.0, search_goal * goal / achieved)
        try:
            sel = search(search_goal)
        except CurlpruneError:  # the lowered goal is below the fastest plan: keep the last one
            break
    sel, check, achieved, _ = _closest(tried, high)
    notes.append(_latency_miss(achieved, goal, tol, len(tried), max(t[3] for t in tried)))
    return result(sel, check, len(tried), "; ".join(notes))


def _closest(tried: list[tuple], high: float) -> tuple:
    """Of the re-measured ``(selection, comparison, achieved, drift)``: the slowest at or below
    ``high``, else the fastest."""
    below = [t for t in tried if t[2] <= high]
    return max(below, key=lambda t: t[2]) if below else min(tried, key=lambda t: t[2])


def _latency_miss(achieved: float, goal: float, tol: float, searches: int, drift: float) -> str:
    """The note of a latency target no re-measured plan met: by how much, and why."""
    side = "below" if achieved < goal else "above"
    why = (f"timings on this machine vary by up to {drift:.0%} between measurements of the same plan (a busy "
           "machine? run with fewer other jobs, or raise --latency-batch)") if drift > tol else \
          "one step of the ranking changes the latency by more than the tolerance (try without --round-to)"
    return (f"target missed: the kept plan re-measured {achieved:.3f} of the unpruned latency, {abs(achieved / goal - 1):.1%} "
            f"{side} the goal {goal:.3f} (tolerance {tol:.0%}) after {searches} search(es): {why}")
