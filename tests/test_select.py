"""Global selection: CURL's walk (floor, protection, units), the automatic target search, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from curlprune.channels import ChannelGroup, Member
from curlprune.errors import CurlpruneError
from curlprune.models import default_protect
from curlprune.select.search import Target, rank_units, resolve_protect, select, walk

from conftest import SHARED  # noqa: E402


def _group(name: str, width: int, unit: int = 1, kind: str = "inside", prunable: bool = True, members=()) -> ChannelGroup:
    return ChannelGroup(name, width, kind, prunable, "" if prunable else "test", unit, list(members), [1.0] * width, [1.0] * width)


def _chain_cost(groups, input_channels: int = 3, spatial: float = 64.0):
    """MACs/params of a plain conv chain whose i-th conv produces group i: widths multiply."""

    def cost(plan):
        widths = [input_channels] + [len(plan.get(g.name, range(g.width))) for g in groups]
        macs = sum(a * b * 9 * spatial for a, b in zip(widths, widths[1:]))
        params = sum(a * b * 9 for a, b in zip(widths, widths[1:]))
        return float(macs), float(params)

    return cost


@pytest.fixture
def chain():
    rng = np.random.default_rng(0)
    groups = [_group(f"g{i}", w) for i, w in enumerate([16, 64, 128, 256, 512, 64])]
    scores = {g.name: rng.random(g.width) * (i + 1) for i, g in enumerate(groups)}
    return groups, scores


def test_walk_floor_matches_the_authors_edge(chain):
    """The floor is checked before each removal: width n ends at ceil(0.3 n) - 1 (19/64, 38/128, ...)."""
    groups, scores = chain
    ranked = rank_units(groups, scores)
    state = walk(ranked, groups, len(ranked), floor=0.3)
    plan = state.plan()
    for g in groups:
        assert len(plan[g.name]) == math.ceil(0.3 * g.width) - 1
    assert [len(plan[n]) for n in ("g1", "g2", "g3", "g4")] == [19, 38, 76, 153]
    # the removed channels of each group are its lowest-scoring ones
    for g in groups:
        kept = set(plan[g.name])
        removed = [c for c in range(g.width) if c not in kept]
        assert scores[g.name][removed].max() <= scores[g.name][sorted(kept)].min()


def test_ranking_is_global_and_raw():
    """Raw scores rank a low-scale group entirely first; per-group normalisation interleaves them."""
    groups = [_group("small", 20), _group("large", 20)]
    ramp = np.linspace(0.05, 1.0, 20)
    scores = {"small": ramp, "large": 100.0 * ramp[::-1]}
    ranked = rank_units(groups, scores)
    assert [r.score for r in ranked] == sorted(r.score for r in ranked)
    assert [r.group for r in ranked[:20]] == ["small"] * 20
    assert [r.unit for r in ranked[:3]] == [0, 1, 2] and [r.unit for r in ranked[20:23]] == [19, 18, 17]
    normed = rank_units(groups, scores, normalize="max")
    assert {r.group for r in normed[:2]} == {"small", "large"}
    assert max(r.score for r in normed) == pytest.approx(1.0)


@pytest.mark.parametrize("fraction", [0.5, 0.27, 0.1])
def test_target_met_within_one_percent(chain, fraction):
    groups, scores = chain
    cost = _chain_cost(groups)
    sel = select(groups, scores, cost, Target("macs", fraction))
    full = cost({})[0]
    assert sel.macs <= fraction * full
    assert sel.macs >= 0.99 * fraction * full
    assert sel.macs == cost(sel.plan)[0]
    assert sel.full_macs == full


def test_params_target_absolute(chain):
    groups, scores = chain
    cost = _chain_cost(groups)
    goal = 0.4 * cost({})[1]
    sel = select(groups, scores, cost, Target.parse("params", f"{goal / 1e3:.3f}k"))
    assert 0.99 * goal <= sel.params <= goal * 1.000001


def test_protected_group_untouched_and_floor_respected(chain):
    groups, scores = chain
    protect = resolve_protect(groups, ["g3", "g4*"])
    assert protect == ["g3", "g4"]
    sel = select(groups, scores, _chain_cost(groups), Target("macs", 0.85), protect=protect, floor=0.5)
    assert "g3" not in sel.plan and "g4" not in sel.plan
    for name, kept in sel.plan.items():
        width = next(g.width for g in groups if g.name == name)
        assert len(kept) >= math.ceil(0.5 * width) - 1
        assert kept == sorted(kept)


def test_unknown_protect_pattern_is_an_error(chain):
    groups, _ = chain
    with pytest.raises(CurlpruneError, match="matches no prunable group"):
        resolve_protect(groups, ["layer9*"])


def test_impossible_target_states_smallest_reachable(chain):
    groups, scores = chain
    cost = _chain_cost(groups)
    floor_plan = walk(rank_units(groups, scores), groups, 10**9, 0.3).plan()
    smallest = cost(floor_plan)[0]
    from curlprune.report.report import human

    with pytest.raises(CurlpruneError) as err:
        select(groups, scores, cost, Target("macs", 0.01))
    assert human(smallest) in str(err.value)
    assert f"{smallest / cost({})[0]:.4f}" in str(err.value)
    assert "\n" not in str(err.value)


def test_units_removed_whole_and_round_to():
    groups = [_group("a", 32, unit=4), _group("b", 48), _group("c", 24)]
    rng = np.random.default_rng(1)
    scores = {"a": np.repeat(rng.random(8), 4), "b": rng.random(48), "c": rng.random(24)}
    cost = _chain_cost(groups)
    sel = select(groups, scores, cost, Target("macs", 0.4))
    kept = sel.plan.get("a", list(range(32)))
    assert len(kept) % 4 == 0
    assert all(set(range(c - c % 4, c - c % 4 + 4)) <= set(kept) for c in kept)
    rounded = select(groups, scores, cost, Target("macs", 0.4), round_to=8)
    for name, kept in rounded.plan.items():
        assert len(kept) % 8 == 0
    assert rounded.macs <= 0.4 * cost({})[0]


def test_not_prunable_groups_are_ignored_and_unmet_scores_rejected(chain):
    groups, scores = chain
    groups = groups + [_group("fixed", 10, prunable=False)]
    sel = select(groups, scores, _chain_cost(groups), Target("macs", 0.5))
    assert "fixed" not in sel.plan
    bad = dict(scores)
    bad["g2"] = bad["g2"][:5]
    with pytest.raises(CurlpruneError, match="shape"):
        select(groups, bad, _chain_cost(groups), Target("macs", 0.5))


def test_target_parse():
    assert Target.parse("macs", "0.5").value == 0.5
    assert Target.parse("macs", "62.5M").value == 62.5e6
    assert Target.parse("params", "1.5e6").value == 1.5e6
    assert Target.parse("macs", "1.11G").absolute(4e9, 0) == pytest.approx(1.11e9)
    assert Target.parse("macs", "0.27").absolute(4e9, 0) == pytest.approx(1.08e9)
    for bad in ("half", "-1", "0"):
        with pytest.raises(CurlpruneError):
            Target.parse("macs", bad)


def test_a_negative_target_is_named_as_negative_not_as_not_a_number():
    # `--target-macs -0.5` said "'-0.5' is not a number"; it is a number, and not a positive one.
    for text in ("-0.5", "-62.5M", "-1e6"):
        with pytest.raises(CurlpruneError, match="must be a positive number") as exc:
            Target.parse("macs", text)
        assert "not a number" not in str(exc.value)
    assert Target.parse("macs", "+0.5").value == 0.5


def test_default_protect_is_the_classifier_stream_of_torchvision_resnets():
    from torchvision.models import resnet18

    model = resnet18()
    stream = _group("layer4.0.conv2", 512, kind="outside", members=[Member("fc", "in", 1, tuple((i,) for i in range(512)))])
    inner = _group("layer4.1.conv1", 512, members=[Member("layer4.1.conv2", "in", 1, tuple((i,) for i in range(512)))])
    assert default_protect("torchvision:resnet18", model, [inner, stream]) == ["layer4.0.conv2"]
    assert default_protect("torchvision:mobilenet_v2", model, [inner, stream]) == []
    assert default_protect("cifar:resnet56", model, [inner, stream]) == []


# ---------------------------------------------------------------------------------- real models


def _model_selection(name: str, weights: str | None, fraction: float, criterion: str):
    from curlprune.criteria import compute_scores
    from curlprune.cost.analysis import trace
    from curlprune.models import build, input_spec
    from curlprune.cost.analysis import model_cost_fn

    model = build(name, weights=weights).eval()
    spec = input_spec(name)
    x = torch.zeros(1, spec.channels, spec.size, spec.size)
    groups = trace(model, x)
    scores = compute_scores(criterion, model, groups, seed=0)
    protect = default_protect(name, model, groups)
    sel = select(groups, scores, model_cost_fn(model, x, groups), Target("macs", fraction), protect=protect)
    return model, groups, x, sel, protect


def _check_selection(model, groups, x, sel, fraction):
    from curlprune.cost.cost import count
    from curlprune.surgery.surgery import apply

    assert fraction * 0.99 * sel.full_macs <= sel.macs <= fraction * sel.full_macs
    macs, params = count(apply(model, groups, sel.plan), x)
    assert (macs, params) == (sel.macs, sel.params)  # the analytic cost is the sliced model's
    for g in groups:
        kept = len(sel.plan.get(g.name, range(g.width)))
        assert kept >= math.ceil(0.3 * g.width) - 1  # CURL's floor, checked before each removal


@pytest.mark.skipif(not (SHARED / "models" / "resnet56-4bfd9763.th").exists(), reason="needs ../shared (published ResNet-56)")
def test_resnet56_published_to_half_the_macs():
    model, groups, x, sel, protect = _model_selection("cifar:resnet56", str(SHARED / "models" / "resnet56-4bfd9763.th"), 0.5, "l1")
    assert protect == []
    _check_selection(model, groups, x, sel, 0.5)
    assert sel.full_macs == pytest.approx(125e6, rel=0.01)


def test_resnet50_to_27_percent_keeps_the_classifier_stream():
    model, groups, x, sel, protect = _model_selection("torchvision:resnet50", None, 0.27, "random")
    stream = next(g for g in groups if any(m.module == "fc" and m.role == "in" for m in g.members))
    assert protect == [stream.name] and stream.width == 2048
    assert stream.name not in sel.plan
    _check_selection(model, groups, x, sel, 0.27)
    assert sel.full_macs == pytest.approx(4.09e9, rel=0.01)


def test_metric_fn_replaces_the_cost_in_the_search(chain):
    """A measured metric (here: widths padded to 32 plus a fixed overhead, so not the MACs) is searched
    relative to metric_fn({}); the ranking is unchanged and cost_fn still gives the MACs/params."""
    groups, scores = chain
    cost = _chain_cost(groups)

    def padded(plan):
        widths = [3] + [math.ceil(len(plan.get(g.name, range(g.width))) / 32) * 32 for g in groups]
        return 1e5 + sum(a * b for a, b in zip(widths, widths[1:]))

    sel = select(groups, scores, cost, Target("latency", 0.6), metric_fn=padded, fill=False)
    ranked = rank_units(groups, scores)
    assert padded(sel.plan) <= 0.6 * padded({}) < padded(walk(ranked, groups, sel.top_k - 1, 0.3).plan())
    assert sel.filled == 0 and (sel.macs, sel.params) == cost(sel.plan)
    assert sel.macs / sel.full_macs != pytest.approx(0.6, abs=0.02)  # the stopping point is the metric's, not the MACs'
    with pytest.raises(CurlpruneError, match="smallest reachable latency"):
        select(groups, scores, cost, Target("latency", 0.2), metric_fn=padded)
    with pytest.raises(CurlpruneError, match="metric_fn"):
        select(groups, scores, cost, Target("latency", 0.5))
    with pytest.raises(CurlpruneError, match="fraction"):
        Target("latency", 2.0)
