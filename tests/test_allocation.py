"""Allocations (curlprune.allocation): MACs-weighted scores, kind protection, iterative re-scoring."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import curlprune
from curlprune.allocation import Allocation, allocate, cost_weighted, iterative_allocate, protect_kind
from curlprune.criteria import compute_scores
from curlprune.errors import CurlpruneError
from curlprune.channels import ChannelGroup
from curlprune.models import build
from curlprune.select import Target, model_cost_fn, select

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

    def score(m, gs):
        calls.append(sum(g.width for g in gs if g.prunable))
        return compute_scores("l1", m, gs)

    alloc = Allocation(cost_power=1.0, steps=3)
    sel, steps = iterative_allocate(model, x, groups, score, cost_fn, Target("macs", 0.4), alloc)
    assert [round(s["fraction"], 3) for s in steps] == [0.8, 0.6, 0.4]
    assert calls[0] > calls[1] > calls[2]  # later steps score the smaller, sliced model
    full = cost_fn({})[0]
    assert 0.99 * 0.4 * full <= sel.macs <= 0.4 * full
    assert curlprune.count(curlprune.apply(model, groups, sel.plan), x)[0] == sel.macs
    one_shot, _ = iterative_allocate(model, x, groups, score, cost_fn, Target("macs", 0.4), Allocation(cost_power=1.0))
    assert one_shot.plan == allocate(groups, compute_scores("l1", model, groups), cost_fn, Target("macs", 0.4), Allocation(cost_power=1.0)).plan
    with pytest.raises(CurlpruneError):
        iterative_allocate(model, x, groups, score, cost_fn, Target("params", 0.5), alloc)


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
