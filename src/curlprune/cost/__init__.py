"""Measuring a model: MACs and parameters (counted and analytic, per plan) and latency.

    cost.py        count: measured MACs and params in the paper's convention
    cost_plan.py   the per-node cost table behind the analytic cost of a plan
    analysis.py    trace / analyse / plan_cost / model_cost_fn: groups and costs together, cached
    latency.py     interleaved latency measurement (of the optimised models), latency-target parsing

The per-op counter itself (:mod:`curlprune.graph.op_cost`) sits in the graph package, whose layer
rules and shape pass use it.
"""
from curlprune.cost.analysis import check_pruned_cost, model_cost_fn, plan_cost, trace
from curlprune.cost.cost import count
from curlprune.cost.latency import (
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

__all__ = [
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_MIN_ROUNDS",
    "DEFAULT_MIN_TIME_S",
    "DEFAULT_TOLERANCE",
    "DEFAULT_WARMUP",
    "Clock",
    "LatencyComparison",
    "LatencyTarget",
    "check_pruned_cost",
    "compare_latency",
    "count",
    "example_batch",
    "model_cost_fn",
    "plan_cost",
    "prepare",
    "torch_threads",
    "trace",
]
