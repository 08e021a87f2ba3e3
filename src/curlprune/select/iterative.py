"""Iterative pruning: reach the target in ``steps`` steps, scoring the pruned model again between them.

The prune stage's ``steps`` (``curlprune prune --steps N``, ``curlprune.prune(..., steps=N)``) and the
benchmark's "iterative" rows both run :func:`iterative_allocate`. Every step selects on the
*original* model's channel groups, so the floor, ``protect``, ``max_ratio`` and ``round_to`` are
relative to the original widths exactly as in one shot, and the last step's plan is a plan of the
original model (the steps' plans are composed by construction): ``masked(original) == sliced(original)``
and ``plan_cost(plan) == count(sliced)`` hold for it as for a one-shot plan.

Schedule (docs/method.md §3, "iterative pruning"): step k of n keeps ``t ** (k / n)`` of the
unpruned model's cost (``t`` = the final target as a fraction), a geometric schedule: every step
removes the same share of what is left, so the last steps, where each removal hurts most, are not
larger than the first. The last step uses the target as given (a count stays a count).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.cost import trace
from curlprune.errors import CurlpruneError
from curlprune.select.allocation import PAPER, Allocation, allocate, cost_weighted, normalize_scores, protect_kind, saving_metric
from curlprune.select.search import CostFn, Selection, Target, select
from curlprune.surgery import apply

StepScoreFn = Callable[[nn.Module, Sequence[ChannelGroup], int, Plan], Mapping[str, np.ndarray]]
"""``(pruned model, its groups, step number (2..n), the plan of the original model it was sliced by) -> scores``."""


def step_targets(target: Target, full: float, steps: int) -> list[Target]:
    """The target of every step: ``t ** (k / steps)`` of the unpruned cost for k < steps, ``target`` last.

    Args:
        target: the final MACs or params target (a fraction, or a count).
        full: the unpruned model's cost in ``target``'s metric (turns a count into a fraction).
        steps: the number of steps, >= 1.
    Returns:
        ``steps`` targets, falling geometrically from 1 to ``target`` (fractions, the last as given).
    Raises:
        CurlpruneError: a latency target (its steps would each need timing; not offered), steps < 1.

    Source: docs/method.md §3 (iterative pruning: the geometric schedule).
    """
    if target.metric not in ("macs", "params"):
        raise CurlpruneError("iterative pruning (steps > 1) needs a MACs or params target; a latency target is one-shot only")
    if steps < 1:
        raise CurlpruneError(f"steps must be at least 1, got {steps}")
    final = min(1.0, target.value if target.is_fraction else target.value / full)
    return [Target(target.metric, final ** (k / steps)) for k in range(1, steps)] + [target]


def iterative_allocate(
    model: nn.Module,
    example_input: torch.Tensor,
    groups: Sequence[ChannelGroup],
    score_fn: StepScoreFn,
    cost_fn: CostFn,
    target: Target,
    allocation: Allocation = PAPER,
    *,
    steps: int | None = None,
    first_scores: Mapping[str, np.ndarray] | None = None,
    protect: Iterable[str] = (),
    round_to: int | None = None,
    limits: Mapping[str, float] | None = None,
) -> tuple[Selection, list[dict]]:
    """Reach ``target`` in ``steps`` steps, re-scoring the pruned model before every step after the first.

    Step 1 is :func:`curlprune.select.allocation.allocate` on ``first_scores`` (or ``score_fn`` on the
    unpruned model) to the first point of :func:`step_targets`. Step k > 1 slices ``model`` by the
    plan so far (:func:`curlprune.apply`), traces it again (slicing keeps group names), scores it,
    ranks those scores on the pruned model (the allocation's normalisation and cost weighting with
    the pruned model's per-channel savings), lifts them to the original channels (the removed
    ones get -inf, so they go first) and selects on the original groups to the step's target.
    With ``steps == 1`` this is exactly one-shot ``allocate``.

    Args:
        model: the unpruned model (not changed).
        example_input: an input ``[1, C, H, W]`` (tracing the pruned models).
        groups: ``model``'s channel groups.
        score_fn: scores of a pruned model (:data:`StepScoreFn`); for step 1 also of ``model``
            (step 1, plan ``{}``) when ``first_scores`` is None.
        cost_fn: ``plan -> (macs, params)`` of ``model`` sliced by the plan.
        target: the final MACs or params target (fraction or count).
        allocation: ranking, floor and protected kind; ``allocation.steps`` when ``steps`` is None.
        steps: the number of steps (None: ``allocation.steps``).
        first_scores: the unpruned model's scores, when already computed.
        protect, round_to, limits: as for ``allocate`` (relative to the original widths).
    Returns:
        (the last step's Selection, on ``model``'s groups; one record per step: step, fraction
        targeted, MACs, params, channels of earlier steps kept again (``restored``); deterministic, so
        that the command's report and the library's agree).
    Raises:
        CurlpruneError: a latency target, a pruned model whose groups do not match the original's,
            and what ``select`` raises (an unreachable target, bad scores).

    Source: docs/method.md §3 (iterative pruning).
    """
    n = allocation.steps if steps is None else steps
    metric_index = 0 if target.metric == "macs" else 1
    targets = step_targets(target, cost_fn({})[metric_index], n)
    protected = protect_kind(groups, allocation.protect) + [name for name in protect]
    plan: Plan = {}
    records: list[dict] = []
    selection: Selection | None = None
    for k, step_target in enumerate(targets, start=1):
        if k == 1:
            scores = first_scores if first_scores is not None else score_fn(model, groups, 1, {})
            selection = allocate(groups, scores, cost_fn, step_target, allocation, protect=protect, round_to=round_to, limits=limits)
        else:
            pruned = apply(model, groups, plan).eval()
            sub_groups = trace(pruned, example_input)
            ranked = _rank_pruned(sub_groups, score_fn(pruned, sub_groups, k, plan), allocation, target.metric)
            lifted = _lift(groups, plan, ranked)
            selection = select(groups, lifted, cost_fn, step_target, floor=allocation.floor, protect=protected,
                               normalize="none", round_to=round_to, limits=limits)
        restored = sum(len(set(selection.plan.get(name, ())) - set(kept)) for name, kept in plan.items())
        plan = selection.plan
        records.append({"step": k, "fraction": round(step_target.value, 6), "macs": selection.macs, "params": selection.params,
                        "restored": restored})
    assert selection is not None
    return selection, records


def _rank_pruned(sub_groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], allocation: Allocation,
                 metric: str) -> dict[str, np.ndarray]:
    """What ``select`` ranks (with ``normalize="none"``) for a pruned model's scores under ``allocation``:
    normalised per group, then divided by the pruned model's per-channel saving when cost-weighted
    (:func:`curlprune.select.allocation.ranking_scores`' order). Done before lifting, so that the
    -inf of removed channels never enters a normalisation."""
    ranked = normalize_scores(sub_groups, scores, allocation.normalize)
    return cost_weighted(sub_groups, ranked, allocation.cost_power, cost=saving_metric(metric)) if allocation.cost_power else ranked


def _lift(groups: Sequence[ChannelGroup], plan: Plan, sub_scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores of a sliced model's groups back on the original groups; removed channels get -inf.

    Raises CurlpruneError when a prunable group of the original is missing from the pruned model's
    scores or has another number of kept channels (the pruned model was grouped differently)."""
    out: dict[str, np.ndarray] = {}
    for g in groups:
        if not g.prunable:
            continue
        if g.name not in sub_scores:
            raise CurlpruneError(f"group {g.name!r} is not a group of the pruned model any more: iterative pruning cannot "
                                 "re-score this model; use steps: 1")
        kept = plan.get(g.name, list(range(g.width)))
        values = np.asarray(sub_scores[g.name], dtype=np.float64)
        if values.shape != (len(kept),):
            raise CurlpruneError(f"group {g.name!r}: {values.shape[0] if values.ndim else 0} scores for {len(kept)} kept channels "
                                 "after slicing: iterative pruning cannot re-score this model; use steps: 1")
        full = np.full(g.width, -np.inf)
        full[np.asarray(kept, dtype=np.int64)] = values
        out[g.name] = full
    return out
