"""Channel-group discovery on real architectures: which channels go together, and why not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import curlprune
from curlprune.channels import ChannelGroup
from curlprune.cost.analysis import trace
from curlprune.cost.cost import count
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.surgery.surgery import apply, validate_plan


def by_name(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.name: g for g in groups}


def member(group: ChannelGroup, module: str, role: str):
    found = [m for m in group.members if m.module == module and m.role == role]
    assert len(found) == 1, f"{module}:{role} not a member of {group.name}"
    return found[0]


@pytest.fixture(scope="module")
def resnet20_groups():
    torch.manual_seed(0)
    model = build("cifar:resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, trace(model, x)


def test_cifar_resnet20_groups(resnet20_groups):
    _, _, groups = resnet20_groups
    g = by_name(groups)
    stream = [x for x in groups if x.kind == "outside"]
    assert [(s.name, s.width) for s in stream] == [("conv1", 16), ("layer2.0.conv2", 16), ("layer3.0.conv2", 32)]
    inside = [x for x in groups if x.kind == "inside" and x.prunable]
    assert sorted(x.width for x in inside) == [16] * 3 + [32] * 3 + [64] * 3
    assert all(x.name.endswith(".conv1") and x.name.startswith("layer") for x in inside)
    assert not g["linear"].prunable and "model output" in g["linear"].reason
    assert not g["x"].prunable and g["x"].reason == "model input"
    assert all(x.prunable for x in stream)


def test_cifar_option_a_offsets(resnet20_groups):
    """Stage-1 stream channel j is channel j+8 of stage 2 and j+24 of stage 3 (zero-pad shortcuts)."""
    _, _, groups = resnet20_groups
    g = by_name(groups)
    s1, s2, s3 = g["conv1"], g["layer2.0.conv2"], g["layer3.0.conv2"]
    assert member(s1, "layer1.1.conv1", "in").index == tuple((j,) for j in range(16))
    assert member(s1, "layer2.1.conv1", "in").index == tuple((j + 8,) for j in range(16))
    assert member(s1, "layer3.1.conv1", "in").index == tuple((j + 24,) for j in range(16))
    assert member(s1, "linear", "in").index == tuple((j + 24,) for j in range(16))
    # stage 2's padded positions 0-7 and 24-31 continue as 16-23 and 40-47 of stage 3
    assert member(s2, "layer2.1.conv1", "in").index == tuple((p,) for p in [*range(8), *range(24, 32)])
    assert member(s2, "layer3.1.conv1", "in").index == tuple((p,) for p in [*range(16, 24), *range(40, 48)])
    assert member(s3, "layer3.1.conv1", "in").index == tuple((p,) for p in [*range(16), *range(48, 64)])
    # conv2 of the first stage-2 block produces both stage-1 and stage-2 channels
    assert member(s1, "layer2.0.conv2", "out").index == tuple((j + 8,) for j in range(16))
    roles = {(m.module, m.role) for m in s2.node_members}
    assert roles == {("pad", "pad_front"), ("pad", "pad_back")}


def test_per_channel_savings_match_counted_models(resnet20_groups):
    """macs/params_per_channel equal count(full) - count(model without that channel)."""
    model, x, groups = resnet20_groups
    full = count(model, x)
    for g in (by_name(groups)["conv1"], by_name(groups)["layer2.0.conv2"], by_name(groups)["layer3.0.conv1"]):
        for ch in (0, g.width - 1):
            plan = {g.name: [i for i in range(g.width) if i != ch]}
            macs, params = count(apply(model, groups, plan), x)
            assert (full[0] - macs, full[1] - params) == (g.macs_per_channel[ch], g.params_per_channel[ch])


def test_resnet50_groups():
    model = torchvision.models.resnet50().eval()
    groups = trace(model, torch.randn(1, 3, 64, 64))
    g = by_name(groups)
    stream = [x for x in groups if x.kind == "outside"]
    assert [x.width for x in stream] == [256, 512, 1024, 2048]
    inside = [x for x in groups if x.kind == "inside" and x.name.startswith("layer")]
    assert len(inside) == 32 and all(x.prunable for x in inside)
    assert sorted({x.name.rsplit(".", 1)[1] for x in inside}) == ["conv1", "conv2"]
    # the stem is its own prunable inside group: it feeds maxpool, then layer1.0's conv1 and downsample
    assert g["conv1"].width == 64 and g["conv1"].prunable and g["conv1"].kind == "inside"
    assert {(m.module, m.role) for m in g["conv1"].members} == {
        ("conv1", "out"), ("bn1", "channel"), ("layer1.0.conv1", "in"), ("layer1.0.downsample.0", "in")}
    stage1 = stream[0]
    modules = {(m.module, m.role) for m in stage1.members}
    assert {("layer1.0.downsample.0", "out"), ("layer1.0.downsample.1", "channel"), ("layer1.0.bn3", "channel"),
            ("layer1.2.bn3", "channel"), ("layer1.1.conv1", "in"), ("layer2.0.conv1", "in"),
            ("layer2.0.downsample.0", "in")} <= modules
    assert member(stream[3], "fc", "in").index == tuple((c,) for c in range(2048))
    assert not g["fc"].prunable
    assert len(groups) == 4 + 32 + 3  # + stem, input, classifier output


def test_mobilenet_v2_expansion_tied_to_depthwise():
    model = torchvision.models.mobilenet_v2().eval()
    g = by_name(trace(model, torch.randn(1, 3, 64, 64)))
    hidden = g["features.2.conv.0.0"]
    assert hidden.width == 96 and hidden.kind == "inside" and hidden.unit == 1
    assert member(hidden, "features.2.conv.1.0", "out").index == tuple((c,) for c in range(96))  # depthwise
    assert not [m for m in hidden.members if m.module == "features.2.conv.1.0" and m.role == "in"]
    row = g["features.2.conv.2"]  # the (6, 24, 2, 2) row: one outside group through the identity shortcut
    assert row.width == 24 and row.kind == "outside"
    assert {"features.3.conv.2", "features.2.conv.2"} <= {m.module for m in row.members if m.role == "out"}


@pytest.mark.parametrize("arch,block", [("efficientnet_b0", "features.2.0.block"), ("mobilenet_v3_small", "features.4.block")])
def test_squeeze_excitation_tied(arch, block):
    model = getattr(torchvision.models, arch)().eval()
    g = by_name(trace(model, torch.randn(1, 3, 64, 64)))
    hidden = g[f"{block}.0.0"]
    roles = {(m.module, m.role) for m in hidden.members}
    se = block + (".2" if arch == "efficientnet_b0" else ".2")
    assert {(f"{block}.1.0", "out"), (f"{se}.fc1", "in"), (f"{se}.fc2", "out")} <= roles
    assert hidden.prunable


def test_grouped_conv_units_resnext():
    model = torchvision.models.resnext50_32x4d().eval()
    groups = trace(model, torch.randn(1, 3, 64, 64))
    inner = by_name(groups)["layer1.0.conv1"]
    assert inner.width == 128 and inner.unit == 4 and inner.prunable
    assert member(inner, "layer1.0.conv2", "out").index == tuple((c,) for c in range(128))
    with pytest.raises(CurlpruneError, match="whole units of 4"):
        validate_plan(groups, {"layer1.0.conv1": list(range(2, 128))})
    validate_plan(groups, {"layer1.0.conv1": list(range(4, 128))})


def test_densenet_concat_offsets():
    model = torchvision.models.densenet121().eval()
    g = by_name(trace(model, torch.randn(1, 3, 32, 32)))
    first = g["features.denseblock1.denselayer1.conv2"]
    assert first.width == 32 and first.prunable
    # every later layer of the block reads it at offset 64 (after the 64 stem channels)
    for layer in (2, 6):
        assert member(first, f"features.denseblock1.denselayer{layer}.norm1", "channel").index == tuple((64 + j,) for j in range(32))
        assert member(first, f"features.denseblock1.denselayer{layer}.conv1", "in").index == tuple((64 + j,) for j in range(32))
    assert member(first, "features.transition1.conv", "in").index == tuple((64 + j,) for j in range(32))


def test_vgg_flatten_maps_channel_to_block():
    model = torchvision.models.vgg11_bn().eval()
    g = by_name(trace(model, torch.randn(1, 3, 32, 32)))
    last = g["features.25"]
    assert member(last, "classifier.0", "in").index[3] == tuple(range(3 * 49, 4 * 49))


class ChannelsLastNorm(nn.Module):
    """conv -> LayerNorm over channels -> conv: the normalised channels cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.conv_b = nn.Conv2d(8, 8, 1)
        self.conv_c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.norm(self.conv_a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_c(F.relu(self.conv_b(y))).mean((2, 3))


def reverse_channels(x: torch.Tensor) -> torch.Tensor:
    """A user function fx keeps opaque (wrapped): the tracer cannot see what it does to channels."""
    return x.flip(1)


torch.fx.wrap("reverse_channels")


class Odd(nn.Module):
    """Three branches through ops a pruner cannot slice, and one clean branch."""

    def __init__(self) -> None:
        super().__init__()
        self.rolled = nn.Conv2d(3, 8, 1)
        self.split = nn.Conv2d(3, 16, 1)
        self.custom = nn.Conv2d(3, 8, 1)
        self.clean = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        a = torch.roll(self.rolled(x), 1, 1)
        b = self.split(x)[:, ::2]  # a strided selection ([:, :8] is followed: test_coverage3)
        c = reverse_channels(self.custom(x))
        d = F.relu(self.clean(x))
        return self.head(torch.cat([a, b, c, d], 1)).flatten(1)


def test_layer_norm_makes_group_unprunable():
    g = by_name(trace(ChannelsLastNorm().eval(), torch.randn(1, 3, 8, 8)))
    assert not g["conv_a"].prunable
    assert g["conv_a"].reason == "normalised across channels by LayerNorm at norm"
    assert g["conv_b"].prunable  # after the norm, plain channels again


def test_unsupported_ops_make_groups_unprunable_with_reason():
    g = by_name(trace(Odd().eval(), torch.randn(1, 3, 4, 4)))
    assert not g["rolled"].prunable and "unsupported op" in g["rolled"].reason and "roll" in g["rolled"].reason
    assert not g["split"].prunable and "channel selection [::2]" in g["split"].reason
    assert not g["custom"].prunable and "reverse_channels" in g["custom"].reason
    assert g["clean"].prunable and g["clean"].reason == ""
    with pytest.raises(CurlpruneError, match="not prunable .*roll"):
        validate_plan(list(g.values()), {"rolled": [0, 1]})


def test_validate_plan_errors(resnet20_groups):
    _, _, groups = resnet20_groups
    cases = [
        ({"layer9.conv": [0]}, "unknown group 'layer9.conv'.*'conv1'"),
        ({"layer1.0.conv1": [0, 16]}, "out of range 0..15"),
        ({"layer1.0.conv1": [3, 1]}, "sorted"),
        ({"layer1.0.conv1": [1, 1]}, "duplicates"),
        ({"layer1.0.conv1": []}, "keeps 0 channels"),
        ({"linear": [0, 1]}, "not prunable \\(feeds the model output\\)"),
        ({"layer1.0.conv1": [0.5]}, "list of channel indices"),
        (["layer1.0.conv1"], "must be a dict"),
    ]
    for plan, message in cases:
        with pytest.raises(CurlpruneError, match=message):
            validate_plan(groups, plan)
    validate_plan(groups, {"linear": list(range(10)), "layer1.0.conv1": [0, 5]})  # whole unprunable group is fine


def test_trace_keeps_modes_and_statistics():
    model = build("cifar:resnet20").train()
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, torch.randn(4, 3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trace_rejects_bad_input():
    for wrong in (torch.randn(1, 5, 32, 32), torch.randn(3, 32, 32)):
        with pytest.raises(CurlpruneError, match="example input") as err:
            trace(build("cifar:resnet20"), wrong)
        assert "\n" not in str(err.value)  # one line for the user
    with pytest.raises(CurlpruneError, match="nn.Module"):
        trace("resnet", torch.randn(1, 3, 32, 32))


def test_public_api_exports_trace():
    assert curlprune.trace is trace


def test_trace_sees_a_replaced_module():
    model = build("cifar:resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    assert by_name(trace(model, x))["linear"].width == 10
    model.linear = nn.Linear(64, 200)
    assert by_name(trace(model, x))["linear"].width == 200


class Blocked(nn.Module):
    """conv -> ``op`` -> conv/linear: ``op`` decides whether the first conv's channels can go."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(1, 8)  # one norm group: every channel's statistics read all
        self.head = nn.Linear(8 * 16, 4) if op == "constant_view" else nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.op == "constant_view":
            return self.head(y.view(1, 8 * 16))
        y = self.norm(y) if self.op == "group_norm" else F.softmax(y, dim=1) if self.op == "softmax" else F.softmax(y, dim=-1)
        return self.head(y).flatten(1)


@pytest.mark.parametrize("op,reason", [
    ("constant_view", "reshape to a constant size 128 over channels at node view"),
    ("group_norm", "normalised across channels by GroupNorm at norm"),
    ("softmax", "normalised across channels by softmax at node softmax"),
    ("spatial_softmax", ""),
])
def test_ops_that_block_pruning(op, reason):
    groups = by_name(trace(Blocked(op).eval(), torch.randn(1, 3, 4, 4)))
    assert groups["conv"].reason == reason
    assert groups["conv"].prunable == (not reason)
