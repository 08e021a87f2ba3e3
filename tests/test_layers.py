"""Layer types of your own: ``register_layer`` teaches the channel pass, slicing, masking and the
analytic cost a layer curlprune does not know, and the two invariants hold through it
(masked == sliced, ``plan_cost == count(apply(...))``); unregistered layers behave as before."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curlprune
from curlprune.channels import ChannelGroup
from curlprune.cost.analysis import plan_cost, trace
from curlprune.cost.cost import count
from curlprune.criteria.kl import kl_scores, kl_scores_naive
from curlprune.errors import CurlpruneError
from curlprune.graph import ChannelMixing, LayerRule, PerChannel, register_layer, rule_for
from curlprune.surgery.surgery import apply, mask, random_plan


class ScaledConv(nn.Module):
    """A conv with a learned gain per output channel: ``conv2d(x, weight, bias) * scale``.

    weight ``[Cout, Cin, k, k]``, bias and scale ``[Cout]``; fx would trace into its forward, so
    without a rule its channels are opaque to the pass."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.scale = nn.Parameter(0.5 + torch.rand(cout))
        self.padding = k // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding) * self.scale.view(1, -1, 1, 1)


class ChannelAffine(nn.Module):
    """A per-channel affine with a fixed shift buffer: ``(x - shift) * weight + bias``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.5 + torch.rand(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))
        self.register_buffer("shift", 0.2 * torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1)
        return (x - self.shift.view(view)) * self.weight.view(view) + self.bias.view(view)


register_layer(ScaledConv, ChannelMixing({"weight": ("out", "in"), "bias": ("out",), "scale": ("out",)}))
register_layer(ChannelAffine, PerChannel(["weight", "bias", "shift"]))


class TwinScaledConv(ScaledConv):
    """Computes what ScaledConv computes, but is a type nobody registered (a subclass is not a leaf)."""


class ResidualNet(nn.Module):
    """stem -> [conv_a -> affine -> conv_b] + residual -> torch conv + residual -> linear head."""

    def __init__(self, layer: type[ScaledConv] = ScaledConv) -> None:
        super().__init__()
        self.stem = layer(3, 8)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = layer(8, 12)
        self.affine = ChannelAffine(12)
        self.conv_b = layer(12, 8, k=1)
        self.conv_c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn0(self.stem(x)))
        y = y + self.conv_b(F.relu(self.affine(self.conv_a(y))))
        y = y + F.relu(self.conv_c(y))
        return self.head(y.mean((2, 3)))


def _randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn = model.bn0
        bn.running_mean.copy_(0.5 * torch.randn(8, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(8, generator=g))
        bn.bias.add_(0.3 * torch.randn(8, generator=g))
    return model.eval()


def _by_name(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def _roles(group: ChannelGroup) -> set[tuple[str, str, int]]:
    return {(m.module, m.role, m.dim) for m in group.members}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = _randomised(ResidualNet())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    return model, x, trace(model, x)


def test_registered_layer_makes_groups_with_its_members(net):
    _, _, groups = net
    g = _by_name(groups)
    inside, outside = g["conv_a"], g["stem"]
    assert inside.prunable and inside.kind == "inside" and inside.width == 12
    assert _roles(inside) == {("conv_a", "out", 0), ("affine", "channel", 0), ("conv_b", "in", 1)}
    assert outside.prunable and outside.kind == "outside" and outside.width == 8
    assert _roles(outside) == {
        ("stem", "out", 0), ("bn0", "channel", 0), ("conv_a", "in", 1), ("conv_b", "out", 0), ("conv_c", "out", 0),
        ("conv_c", "in", 1), ("head", "in", 1),
    }
    assert not g["x"].prunable and _roles(g["x"]) == {("stem", "in", 1)}


def test_masked_equals_sliced_and_plan_cost_equals_count(net):
    model, x, groups = net
    assert plan_cost(model, x, groups, {}) == count(model, x)
    rng = random.Random(0)
    plans = [random_plan(groups, rng, single_unit_share=0.3) for _ in range(4)]
    plans.append({"conv_a": [0, 5, 11], "stem": [1, 2, 7]})
    for plan in plans:
        assert plan  # both groups are prunable, so every plan prunes
        small = apply(model, groups, plan)
        with torch.no_grad(), mask(model, groups, plan):
            masked = model(x)
        with torch.no_grad():
            sliced = small(x)
        assert float((sliced - masked).abs().max() / masked.abs().max()) < 1e-5, plan
        assert plan_cost(model, x, groups, plan) == count(small, x), plan
    small = apply(model, groups, plans[-1])
    assert small.conv_a.weight.shape == (3, 3, 3, 3) and small.conv_a.scale.shape == (3,)
    assert small.affine.shift.shape == (3,) and small.conv_b.weight.shape == (3, 3, 1, 1)
    assert type(small.conv_a) is ScaledConv and small.conv_a.weight.requires_grad


def test_cost_counts_the_layer_once_per_parameter(net):
    model, x, groups = net
    macs, params = count(model, x)
    convs = 8 * 3 * 9 + 12 * 8 * 9 + 8 * 12 + 8 * 8 * 9  # per output position at 8x8
    assert macs == convs * 64 + 8 * 5
    # the plan that keeps 3 of conv_a's 12 channels: conv_a loses 9*8*9 MACs per position, conv_b 9*8
    cut = {"conv_a": [0, 1, 2]}
    assert plan_cost(model, x, groups, cut)[0] == macs - 9 * 8 * 9 * 64 - 9 * 8 * 64
    # conv_a: 9 filters of 8*9 weights, 9 biases, 9 scales; affine: 9 weights, 9 biases (shift is a buffer)
    assert plan_cost(model, x, groups, cut)[1] == params - 9 * 72 - 9 - 9 - 9 - 9 - 9 * 8


def test_kl_scores_through_the_registered_layer_equal_the_naive_loop(net):
    model, _, groups = net
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    fast = kl_scores(model, groups, images)
    naive = kl_scores_naive(model, groups, images)
    assert fast.keys() == naive.keys() == {"conv_a", "stem"}
    assert max(float(abs(fast[k] - naive[k]).max()) for k in fast) < 1e-5


def test_unregistered_layer_is_traced_through_as_before():
    """The same computation in a type nobody registered: fx traces into its forward, and the
    functional conv on its parameters blocks the channels, with a reason (what curlprune did before
    register_layer existed)."""
    torch.manual_seed(0)
    model = _randomised(ResidualNet(layer=TwinScaledConv))
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    assert rule_for(model.stem) is rule_for(ScaledConv(1, 1))  # the rule is found, but the tracer never calls it
    assert not any(m.module == "conv_a" for grp in groups for m in grp.members)
    inside = next(grp for grp in groups if any(m.module == "affine" for m in grp.members))
    assert not inside.prunable and "unsupported op" in inside.reason and "conv2d" in inside.reason
    assert not any(grp.prunable for grp in groups)
    assert plan_cost(model, x, groups, {}) == count(model, x)


class Pair(nn.Module):
    """A torch.nn leaf without a layer rule (nn.Bilinear) after a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.bil = nn.Bilinear(6, 6, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.head(self.bil(y, y))


def test_unknown_leaf_layer_is_unsupported_with_a_reason():
    model = Pair().eval()
    groups = _by_name(trace(model, torch.randn(1, 3, 4, 4)))
    assert rule_for(model.bil) is None
    assert not groups["conv"].prunable and groups["conv"].reason == "unsupported module Bilinear at bil"


def test_registering_after_a_trace_is_seen_by_the_next_trace():
    class LateConv(ScaledConv):
        """Registered only after a model using it was traced."""

    torch.manual_seed(0)
    model = _randomised(ResidualNet(layer=LateConv))
    x = torch.randn(1, 3, 8, 8)
    assert not any(g.prunable for g in trace(model, x))  # traced through: the functional convs block
    register_layer(LateConv, rule_for(ScaledConv(1, 1)))
    assert _by_name(trace(model, x))["conv_a"].prunable  # the same model object: analysed again


def test_public_api_and_rule_checks():
    assert curlprune.register_layer is register_layer
    assert curlprune.ChannelMixing is ChannelMixing and curlprune.PerChannel is PerChannel
    assert curlprune.LayerRule is LayerRule
    assert rule_for(nn.Conv2d(2, 2, 1)) is rule_for(nn.Conv1d(2, 2, 1))  # found through the MRO (_ConvNd)
    with pytest.raises(CurlpruneError, match="nn.Module subclass"):
        register_layer(int, PerChannel(["weight"]))
    with pytest.raises(CurlpruneError, match="LayerRule"):
        register_layer(ScaledConv, {"weight": ("out", "in")})
    with pytest.raises(CurlpruneError, match="roles"):
        ChannelMixing({"weight": ("out", "out")})
    with pytest.raises(CurlpruneError, match="roles"):
        ChannelMixing({"weight": ("out",)})
    with pytest.raises(CurlpruneError, match="macs"):
        ChannelMixing({"weight": ("out", "in")}, macs="bias")
    with pytest.raises(CurlpruneError, match="dim"):
        ChannelMixing({"weight": ("out", "in")}, dim=2)


class GainConv(nn.Conv2d):
    """A registered subclass of nn.Conv2d whose forward adds a gain: the conv rule's shortcuts
    (the KL score's one-step removal of a unit) must not apply to it."""

    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(0.5 + torch.rand(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain.view(1, -1, 1, 1)


register_layer(
    GainConv, ChannelMixing({"weight": ("out", "in"), "bias": ("out",), "gain": ("out",)}, widths=("in_channels", "out_channels"))
)


def test_registered_conv_subclass_gets_its_own_rule_everywhere():
    torch.manual_seed(0)
    model = _randomised(ResidualNet(layer=GainConv))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    groups = trace(model, x)
    assert rule_for(model.stem) is not rule_for(model.conv_c)  # its own rule, not nn.Conv2d's through the MRO
    g = _by_name(groups)
    assert g["conv_a"].prunable and g["stem"].prunable and ("affine", "channel", 0) in _roles(g["conv_a"])
    plan = {"conv_a": [1, 4, 6, 10], "stem": [0, 3, 5]}
    small = apply(model, groups, plan)
    with torch.no_grad(), mask(model, groups, plan):
        masked = model(x)
    assert torch.allclose(small(x), masked, rtol=1e-5, atol=1e-6)
    assert plan_cost(model, x, groups, plan) == count(small, x)
    assert small.conv_a.out_channels == 4 and small.conv_b.in_channels == 4 and small.conv_a.gain.shape == (4,)
    fast, naive = kl_scores(model, groups, x), kl_scores_naive(model, groups, x)
    assert max(float(abs(fast[k] - naive[k]).max() / abs(naive[k]).max()) for k in fast) < 1e-4


class WrongMacs(ScaledConv):
    """Its rule says a 1x1 conv's MACs, but it runs the conv twice: the cost table must notice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.conv2d(x, self.weight, None, padding=self.padding)


register_layer(WrongMacs, ChannelMixing({"weight": ("out", "in"), "bias": ("out",), "scale": ("out",)}))


class ConvDeclaredPerChannel(ChannelAffine):
    """Declared per-channel, but its forward also runs a (depthwise) conv: MACs a per-channel rule denies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.conv2d(x, self.weight.view(-1, 1, 1, 1), groups=x.shape[1])


register_layer(ConvDeclaredPerChannel, PerChannel(["weight", "bias", "shift"]))


class AffineNet(ResidualNet):
    def __init__(self) -> None:
        super().__init__()
        self.affine = ConvDeclaredPerChannel(12)


@pytest.mark.parametrize("make,group", [(lambda: ResidualNet(layer=WrongMacs), "conv_a"), (AffineNet, "conv_a")])
def test_a_rule_whose_macs_disagree_with_the_measured_ones_makes_its_groups_unprunable(make, group):
    torch.manual_seed(0)
    model = _randomised(make())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    g = _by_name(groups)
    assert not g[group].prunable and "differs from its measured cost" in g[group].reason
    assert plan_cost(model, x, groups, {}) == count(model, x)
