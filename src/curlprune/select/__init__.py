"""From per-channel scores to a Plan that meets a MACs, params or latency target.

    search.py           global ranking, floor, protected groups, bisection to a target (select)
    select_fit.py       bringing the bisection's plan into the target's tolerance: fill, give-back, exchange
    allocation.py       what select ranks: the prune stage's allocations (cost-weighted, the default; paper) and variants
    iterative.py        iterative pruning (steps > 1): the schedule, re-scoring the pruned model between steps
    latency_select.py   the latency-target search: select with the measured latency as its metric
"""
from curlprune.select.allocation import ALLOCATIONS, allocate, default_allocation, named_allocation, ranking_scores
from curlprune.select.latency_select import measured_cost_fn, select_latency
from curlprune.select.search import DEFAULT_FLOOR, NORMALIZATIONS, Selection, Target, resolve_protect, select

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_FLOOR",
    "NORMALIZATIONS",
    "Selection",
    "Target",
    "allocate",
    "default_allocation",
    "measured_cost_fn",
    "named_allocation",
    "ranking_scores",
    "resolve_protect",
    "select",
    "select_latency",
]
