"""Allocations (curlprune.select.allocation): MACs-weighted scores, kind protection, iterative re-scoring, and the
prune stage's named allocations (cost-weighted, the default; paper)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import curlprune
from curlprune.channels import ChannelGroup
from curlprune.cost.analysis import model_cost_fn
from curlprune.criteria import compute_scores
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.select.allocation import PAPER, Allocation, allocate, cost_weighted, named_allocation, protect_kind
from curlprune.select.iterative import iterative_allocate
from curlprune.select.search import Target, select

from conftest import SHARED  # noqa: E402


def _group(name: str, width: int, macs_each: float, kind: str = "inside") -> ChannelGroup:
    return ChannelGroup(name, width, kind, True, "", 1, [], [macs_each] * width, [1.0] * width)


def _cost(groups):
    """Each group's channel costs its macs_each MACs (independent channels: additive cost)."""

    def cost(plan):
        macs = sum(len(plan.get(g.name, range(g.width))) * g.macs_per_channel[0] for g in groups)
        return float(macs), float(sum(len(plan.get(g.name, range(g.width))) for g in groups))

    return cost


def test_cost_weighting_prunes_expensive_channels_first():
    """Equal damage per channel: raw ranking takes the first group by tie order, weighted takes the 4x-MACs one."""
    groups = [_group("cheap", 64, 1.0), _group("dear", 64, 4.0, kind="outside")]
    scores = {"cheap": np.full(64, 1.0), "dear": np.full(64, 1.0)}
    weighted = cost_weighted(groups, scores, 1.0)
    assert np.allclose(weighted["cheap"], 1.0) and np.allclose(weighted["dear"], 0.25)
    assert np.array_equal(cost_weighted(groups, scores, 0.0)["dear"], scores["dear"])
    cost = _cost(groups)
    target = Target("macs", 0.9)  # full = 64 + 256 = 320 MACs; remove 32
    raw = allocate(groups, scores, cost, target, Allocation())
    by_macs = allocate(groups, scores, cost, target, Allocation(cost_power=1.0))
    assert set(raw.plan) == {"cheap"} and set(by_macs.plan) == {"dear"}
    assert len(raw.plan["cheap"]) == 32 and len(by_macs.plan["dear"]) == 56  # 8 dear channels = 32 MACs: 4x fewer channels removed for the same MACs
    for sel in (raw, by_macs):
        assert 0.99 * 288 <= sel.macs <= 288
    # damage 3x higher on the dear group still loses to 4x the MACs; 5x does not
    assert set(allocate(groups, {"cheap": scores["cheap"], "dear": np.full(64, 3.0)}, cost, target, Allocation(cost_power=1.0)).plan) == {"dear"}
    assert set(allocate(groups, {"cheap": scores["cheap"], "dear": np.full(64, 5.0)}, cost, target, Allocation(cost_power=1.0)).plan) == {"cheap"}


def test_protect_kind_keeps_the_stream_whole():
    groups = [_group("cheap", 64, 1.0), _group("dear", 64, 4.0, kind="outside")]
    scores = {"cheap": np.full(64, 1.0), "dear": np.full(64, 0.1)}
    assert protect_kind(groups, "outside") == ["dear"] and protect_kind(groups, "none") == []
    sel = allocate(groups, scores, _cost(groups), Target("macs", 0.9), Allocation(protect="outside"))
    assert set(sel.plan) == {"cheap"} and sel.protected == ["dear"]


def test_bad_allocation_settings_are_errors():
    for bad in ({"protect": "stream"}, {"cost_power": -1.0}, {"steps": 0}):
        with pytest.raises(CurlpruneError):
            Allocation(**bad)


def _resnet20():
    model = build("cifar:resnet20").eval()
    torch.manual_seed(0)
    for m in model.modules():  # non-trivial BN so that l1/bn scores differ between groups
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.zeros(1, 3, 32, 32)
    return model, x, curlprune.trace(model, x)


def test_iterative_rescoring_meets_the_target_and_nests():
    """Each step's plan contains the previous one; the sliced model's MACs equal the analytic cost."""
    model, x, groups = _resnet20()
    cost_fn = model_cost_fn(model, x, groups)
    calls = []

    def score(m, gs, step, plan):
        calls.append(sum(g.width for g in gs if g.prunable))
        return compute_scores("l1", m, gs)

    alloc = Allocation(cost_power=1.0, steps=3)
    sel, steps = iterative_allocate(model, x, groups, score, cost_fn, Target("macs", 0.4), alloc)
    assert [round(s["fraction"], 3) for s in steps] == [round(0.4 ** (1 / 3), 3), round(0.4 ** (2 / 3), 3), 0.4]  # geometric
    assert calls[0] > calls[1] > calls[2]  # later steps score the smaller, sliced model
    full = cost_fn({})[0]
    assert 0.99 * 0.4 * full <= sel.macs <= 0.4 * full
    assert curlprune.count(curlprune.apply(model, groups, sel.plan), x)[0] == sel.macs
    one_shot, _ = iterative_allocate(model, x, groups, score, cost_fn, Target("macs", 0.4), Allocation(cost_power=1.0))
    assert one_shot.plan == allocate(groups, compute_scores("l1", model, groups), cost_fn, Target("macs", 0.4), Allocation(cost_power=1.0)).plan
    with pytest.raises(CurlpruneError, match="latency"):
        iterative_allocate(model, x, groups, score, cost_fn, Target("latency", 0.5), alloc)


@pytest.mark.skipif(not (SHARED / "models" / "resnet56-4bfd9763.th").exists(), reason="needs ../shared (published ResNet-56)")
@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_resnet56_macs_weighted_meets_target_and_prunes_the_stream(fraction):
    model = build("cifar:resnet56", weights=str(SHARED / "models" / "resnet56-4bfd9763.th")).eval()
    x = torch.zeros(1, 3, 32, 32)
    groups = curlprune.trace(model, x)
    cost_fn = model_cost_fn(model, x, groups)
    scores = compute_scores("l1", model, groups)
    sel = allocate(groups, scores, cost_fn, Target("macs", fraction), Allocation(cost_power=1.0))
    full = cost_fn({})[0]
    assert 0.99 * fraction * full <= sel.macs <= fraction * full
    assert curlprune.count(curlprune.apply(model, groups, sel.plan), x)[0] == sel.macs
    raw = select(groups, scores, cost_fn, Target("macs", fraction))
    outside = [g.name for g in groups if g.kind == "outside"]
    assert not any(name in raw.plan for name in outside)  # raw l1 sums over the stream's many producers: never pruned
    assert any(name in sel.plan for name in outside)  # weighted by the MACs a stream channel costs, it is


# ----- the prune stage's allocations by name: cost-weighted (default) and paper ------------------
def _costed(name: str, macs: list[float], params: list[float] | None = None, unit: int = 1) -> ChannelGroup:
    return ChannelGroup(name, len(macs), "inside", True, "", unit, [], list(macs), list(params or macs))


def _additive(groups, metric: str = "macs"):
    """Every channel costs its own macs/params_per_channel (independent channels: additive cost)."""

    def cost(plan):
        kept = {g.name: plan.get(g.name, range(g.width)) for g in groups}
        macs = sum(g.macs_per_channel[i] for g in groups for i in kept[g.name])
        params = sum(g.params_per_channel[i] for g in groups for i in kept[g.name])
        return float(macs), float(params)

    return cost


@pytest.fixture
def costed():
    """Three groups, channels with known scores and known MACs (46 in all).

    score / MACs ascending: a0 .10, c1 .13, b1 .15, c2 .16, a2 .225, ...
    score ascending:        b1 .15, c1 .26, b0 .30, b4 .35, a0 .40, b5 .45, b2 .50, c0 .50, ...
    """
    groups = [_costed("a", [4.0] * 6), _costed("b", [1.0] * 6), _costed("c", [2.0, 2.0, 6.0, 6.0])]
    scores = {"a": np.array([0.4, 2.0, 0.9, 3.0, 1.6, 2.4]), "b": np.array([0.3, 0.15, 0.5, 0.7, 0.35, 0.45]),
              "c": np.array([0.5, 0.26, 0.96, 1.8])}
    return groups, scores, _additive(groups)


def test_cost_weighted_removes_the_smallest_score_per_mac_first_and_paper_the_smallest_score(costed):
    groups, scores, cost = costed
    cost_weighted_alloc, paper = named_allocation("cost-weighted"), named_allocation("paper")
    assert cost_weighted_alloc == Allocation(cost_power=1.0) and paper == PAPER
    ratio = {f"{g.name}{i}": scores[g.name][i] / g.macs_per_channel[i] for g in groups for i in range(g.width)}
    raw = {f"{g.name}{i}": scores[g.name][i] for g in groups for i in range(g.width)}
    assert min(ratio, key=ratio.get) == "a0" and min(raw, key=raw.get) == "b1"  # the two rules disagree on the first channel
    assert cost({}) == (46.0, 46.0)
    # one channel's worth of MACs: each allocation removes exactly its first-ranked channel
    first = allocate(groups, scores, cost, Target("macs", 42.0), cost_weighted_alloc)  # 46 - a0's 4 MACs
    assert first.plan == {"a": [1, 2, 3, 4, 5]} and first.macs == 42.0
    first = allocate(groups, scores, cost, Target("macs", 45.0), paper)  # 46 - b1's 1 MAC
    assert first.plan == {"b": [0, 2, 3, 4, 5]} and first.macs == 45.0
    # one target, two plans: 13 MACs removed in the order of each ranking
    target = Target("macs", 33.0)
    by_cost = allocate(groups, scores, cost, target, cost_weighted_alloc)
    assert by_cost.plan == {"a": [1, 2, 3, 4, 5], "b": [0, 2, 3, 4, 5], "c": [0, 3]}  # a0, c1, b1, c2: 4 channels
    by_score = allocate(groups, scores, cost, target, paper)
    assert by_score.plan == {"a": [1, 2, 3, 4, 5], "b": [3], "c": [2, 3]}  # b1, c1, b0, b4, a0, b5, b2, c0: 8 channels
    assert by_score.plan == select(groups, scores, cost, target).plan  # paper is select on the raw scores
    for sel in (by_cost, by_score):
        assert 0.99 * 33.0 <= sel.macs <= 33.0 and sel.macs == cost(sel.plan)[0]
    # the floor still holds: b (width 6) ends at ceil(0.3 * 6) - 1 = 1 channel, as in select's walk
    assert len(by_score.plan["b"]) == math.ceil(0.3 * 6) - 1


def test_cost_weighted_divides_by_params_for_a_params_target():
    """Channels of p cost few MACs but many params, those of q the reverse: the target's metric decides."""
    groups = [_costed("p", [1.0] * 10, [10.0] * 10), _costed("q", [10.0] * 10, [1.0] * 10)]
    scores = {"p": np.full(10, 1.0), "q": np.full(10, 1.0)}
    cost = _additive(groups)
    alloc = named_allocation("cost-weighted")
    by_params = allocate(groups, scores, cost, Target("params", 80.0), alloc)  # 110 params in all: 3 channels of p
    by_macs = allocate(groups, scores, cost, Target("macs", 80.0), alloc)  # 110 MACs in all: 3 channels of q
    assert by_params.plan == {"p": list(range(3, 10))} and by_params.params == 80.0
    assert by_macs.plan == {"q": list(range(3, 10))} and by_macs.macs == 80.0
    assert np.allclose(cost_weighted(groups, scores, cost="params")["p"], 0.1)
    with pytest.raises(CurlpruneError, match="unknown cost"):
        cost_weighted(groups, scores, cost="latency")


def test_cost_weighted_works_with_normalize_protect_round_to_and_units():
    # normalise first, divide after: with identical scores the 4x dearer group goes first; a
    # normalisation after the division would make them tie again (the first group would go first)
    groups = [_costed("first", [1.0] * 8), _costed("second", [4.0] * 8)]
    ramp = np.linspace(0.1, 0.8, 8)
    scores = {"first": ramp, "second": 5.0 * ramp}
    cost = _additive(groups)
    plain = allocate(groups, scores, cost, Target("macs", 36.0), named_allocation("cost-weighted"))
    normed = allocate(groups, scores, cost, Target("macs", 36.0), named_allocation("cost-weighted", normalize="max"))
    assert set(plain.plan) == {"first"}  # 5x the score beats 4x the MACs
    assert set(normed.plan) == {"second"}  # normalised per group, the MACs decide
    # protect by name and round_to keep working with the weighted ranking
    kept = allocate(groups, scores, cost, Target("macs", 37.0), named_allocation("cost-weighted"), protect=["second"], round_to=2)
    assert set(kept.plan) == {"first"} and kept.protected == ["second"]
    assert all(len(v) % 2 == 0 for v in kept.plan.values()) and kept.macs == 36.0  # 5 kept would round up to 6: 38 > 37
    # a unit of two channels is removed as one: its score is divided by what both channels save
    unit = _costed("u", [1.0] * 4, unit=2)
    assert np.allclose(cost_weighted([unit], {"u": np.array([1.0, 1.0, 3.0, 3.0])})["u"], [0.5, 0.5, 1.5, 1.5])
    with pytest.raises(CurlpruneError, match="unknown allocation 'greedy': use one of cost-weighted, paper"):
        named_allocation("greedy")


@pytest.mark.parametrize("criterion, expected", [("kl", "cost-weighted"), ("kl-approx", "cost-weighted"), ("l1", "paper"),
                                                 ("bn", "paper"), ("taylor", "paper"), ("random", "paper")])
def test_the_default_allocation_follows_the_criterion(criterion, expected):
    from curlprune.run.prune_config import PruneConfig

    assert PruneConfig(criterion=criterion, target_macs=0.5).resolved_allocation() == expected
    other = "paper" if expected == "cost-weighted" else "cost-weighted"
    assert PruneConfig(criterion=criterion, target_macs=0.5, allocation=other).resolved_allocation() == other
