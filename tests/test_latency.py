"""Measured latency: target parsing, interleaved timing, and the latency target search.

The search is checked against a deterministic clock that advances with the work the model really
does (conv/linear multiply-accumulates plus a fixed cost per call and a width-rounding penalty), so
the stopping point found by measuring differs from the MACs one and the result is exact."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from curlprune.cost.latency import LatencyTarget, compare_latency, time_interleaved
from curlprune.errors import CurlpruneError
from curlprune.select.latency_select import measured_cost_fn, select_latency


# ------------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize("text, fraction, ms", [
    ("0.5", 0.5, None), (0.25, 0.25, None), ("1", 1.0, None), (" 0.3 ", 0.3, None),
    ("12ms", None, 12.0), ("0.8s", None, 800.0), ("500us", None, 0.5), ("500 µs", None, 0.5), ("2e1ms", None, 20.0),
    ("12MS", None, 12.0),
])
def test_target_parses(text, fraction, ms):
    target = LatencyTarget.parse(text)
    assert target.fraction == (pytest.approx(fraction) if fraction is not None else None)
    assert target.ms == (pytest.approx(ms) if ms is not None else None)


@pytest.mark.parametrize("text, words", [
    ("-0.5", "(0, 1]"), ("0", "(0, 1]"), ("1.5", "(0, 1]"), ("nan", "(0, 1]"), ("inf", "(0, 1]"),
    ("-3ms", "positive duration"), ("0ms", "positive duration"), ("nanms", "positive duration"),
    ("12min", "unknown unit"), ("12 parsecs", "unknown unit"), ("fast", "not a number"), ("", "not a number"),
    (True, "not a number"),
])
def test_bad_targets_are_one_line_errors(text, words):
    with pytest.raises(CurlpruneError) as info:
        LatencyTarget.parse(text)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_goal_fraction_of_an_absolute_target():
    assert LatencyTarget.parse("5ms").goal_fraction(20.0) == pytest.approx(0.25)
    assert LatencyTarget.parse(0.4).goal_fraction(20.0) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------------
# a deterministic clock driven by the work done


class WorkClock(TorchFunctionMode):
    """A clock whose time is the work of the conv/linear calls made so far (in "seconds").

    Each call costs its MACs with the channel counts rounded up to a multiple of 8 (as vector kernels
    pad them), plus a fixed overhead: relative latency is therefore not the MACs ratio."""

    def __init__(self, overhead: float = 20_000.0) -> None:
        super().__init__()
        self.t = 0.0
        self.overhead = overhead
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (F.conv2d, F.linear):
            weight = args[1]
            cout = math.ceil(weight.shape[0] / 8) * 8
            cin = math.ceil(weight.shape[1] / 8) * 8 if weight.dim() > 1 else 1
            positions = out.numel() // out.shape[1] if out.dim() == 4 else out.numel() // out.shape[-1]
            self.t += 1e-9 * (cout * cin * math.prod(weight.shape[2:]) * positions + self.overhead)
            self.calls += 1
        return out

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def digits():
    from curlprune.cost.analysis import trace
    from curlprune.models import build

    torch.manual_seed(0)
    model = build("small:resnet-digits").eval()
    example = torch.zeros(1, 1, 8, 8)
    groups = trace(model, example)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.width) for g in groups if g.prunable}
    return model, example, groups, scores


def test_interleaved_timing_alternates_and_measures_each_runner():
    clock = [0.0]
    order = []

    def runner(name, cost):
        def run():
            order.append(name)
            clock[0] += cost
        return run

    timing = time_interleaved({"a": runner("a", 2.0), "b": runner("b", 1.0)}, reference="a", warmup=0,
                              min_time_s=0.0, min_rounds=5, max_rounds=9, clock=lambda: clock[0])
    assert timing.ratio("b", "a") == pytest.approx(0.5)
    assert timing.median_ms("a") == pytest.approx(2000.0)
    rounds = order[2:]  # after the two calls that choose `number`
    assert rounds[:4] == ["a", "b", "b", "a"]  # alternating order
    assert len(timing.seconds["a"]) == 5  # noise-free: stops at min_rounds


def test_fake_clock_target_is_met_within_tolerance(digits):
    from curlprune.cost.analysis import model_cost_fn

    model, example, groups, scores = digits
    clock = WorkClock()
    with clock:
        measured = measured_cost_fn(model, groups, example, batch=4, threads=1, clock=clock, warmup=0, min_rounds=3)
        chosen = select_latency(groups, scores, measured, model_cost_fn(model, example, groups), LatencyTarget.parse("0.6"))
    assert clock.calls > 0
    assert chosen.goal == pytest.approx(0.6)
    assert chosen.met and chosen.achieved <= 0.6 * (1 + chosen.tolerance)
    assert chosen.achieved == pytest.approx(measured(chosen.plan))  # deterministic: the re-measure agrees
    # it is the stopping point: one ranked unit fewer would miss the goal
    from curlprune.select.search import rank_units, walk

    ranked = rank_units(groups, scores)
    before = walk(ranked, groups, chosen.selection.top_k - 1, 0.3).plan()
    with clock:
        assert measured(before) > 0.6
    # latency is not MACs here: the plan's MACs ratio differs from its latency ratio
    assert chosen.selection.macs / chosen.selection.full_macs != pytest.approx(chosen.achieved, abs=0.01)
    report = chosen.as_dict()
    assert report["target"]["metric"] == "latency" and report["latency"]["met"] is True
    # what curlprune.report.figures reads for the summary figure and table
    assert {"achieved_fraction", "achieved_ms", "reference_ms", "batch", "threads"} <= set(report["latency"])
    assert 0 < report["macs_ratio"] < 1


def test_fake_clock_absolute_target_and_unreachable_target(digits):
    from curlprune.cost.analysis import model_cost_fn

    model, example, groups, scores = digits
    clock = WorkClock()
    with clock:
        measured = measured_cost_fn(model, groups, example, batch=2, clock=clock, warmup=0, min_rounds=3)
        reference_ms = measured.reference_ms()
        chosen = select_latency(groups, scores, measured, model_cost_fn(model, example, groups),
                                LatencyTarget(ms=0.7 * reference_ms))
        assert chosen.goal == pytest.approx(0.7) and chosen.met
        everything = select_latency(groups, scores, measured, model_cost_fn(model, example, groups),
                                    LatencyTarget(ms=2 * reference_ms))
        assert everything.plan == {} and "already meets" in everything.note
        with pytest.raises(CurlpruneError, match="not reachable"):
            select_latency(groups, scores, measured, model_cost_fn(model, example, groups), LatencyTarget(fraction=0.01))


def test_real_clock_runs_on_the_digits_model(digits):
    from curlprune.cost.analysis import model_cost_fn
    from curlprune.surgery.surgery import apply

    model, example, groups, scores = digits
    half = {g.name: list(range(g.width // 2)) for g in groups if g.prunable}
    comparison = compare_latency(apply(model, groups, half), model, example, batch=32, threads=1,
                                 min_rounds=3, max_rounds=5, min_time_s=0.005)
    assert comparison.reference_ms > 0 and comparison.candidate_ms > 0 and comparison.ratio > 0
    assert comparison.rounds >= 3 and comparison.threads == 1 and comparison.batch == 32
    measured = measured_cost_fn(model, groups, example, batch=32, threads=1, min_rounds=3, max_rounds=5, min_time_s=0.005)
    # the fastest plan the floor allows; its measurement is cached, so a goal between it and 1.0 is reachable
    # (a tiny model is overhead-bound, ~0.8 here, and a loaded machine is noisy: the goal adapts)
    from curlprune.select.search import rank_units, walk

    fastest = measured(walk(rank_units(groups, scores), groups, 10**6, 0.3).plan())
    goal = min(1.0, (1.0 + fastest) / 2)
    chosen = select_latency(groups, scores, measured, model_cost_fn(model, example, groups), LatencyTarget(fraction=goal), retries=1)
    assert chosen.reference_ms > 0 and chosen.achieved > 0 and chosen.goal == pytest.approx(goal)
    if goal < 1.0:
        assert chosen.evaluations >= 2 and chosen.searches >= 1
        assert chosen.selection.macs < chosen.selection.full_macs
    else:  # the pruned model measured no faster: the unpruned model is the answer
        assert chosen.plan == {} and "already meets" in chosen.note


def test_threads_are_restored_and_validated(digits):
    model, example, groups, _ = digits
    before = torch.get_num_threads()
    compare_latency(model, model, example, batch=1, threads=2, min_rounds=2, max_rounds=2, min_time_s=0.0, warmup=0)
    assert torch.get_num_threads() == before
    with pytest.raises(CurlpruneError, match="threads"):
        measured_cost_fn(model, groups, example, threads=0)
    with pytest.raises(CurlpruneError, match="batch"):
        measured_cost_fn(model, groups, example, batch=0)
