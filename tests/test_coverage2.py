"""Issue 23, coverage round two: five kinds of input that gave a crashing or stale pruned model.

1. reparametrised weights (weight norm, spectral norm, orthogonal; hook-based and parametrize);
2. a view/reshape/expand to a constant channel count;
3. ops with tensor-valued arguments besides their input (clamp bounds);
4. constants folded from buffers by tracing, and attributes a trace left on the user's model;
5. ``optimize_for_inference``'s in-place add into a broadcast destination.

Each kind is tested with the input that showed it and a sibling of the kind; a model that is pruned
is checked with the engine's invariants (masked == sliced, plan_cost == count(apply)).
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_faults import check_invariants, randomise
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from curlprune.cost.analysis import trace
from curlprune.graph import symbolic_trace
from curlprune.surgery.inference import add_in_place, optimize_for_inference
from curlprune.surgery.surgery import apply


def by_name(groups):
    return {g.name: g for g in groups}


# ----------------------------------------------------------------------------------------------
# 1. reparametrised weights


class TwoNormedConvs(nn.Module):
    """``norm(Conv2d(3, 16))`` -> relu -> ``norm(Conv2d(16, 8))`` -> mean -> Linear(8, 4)."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.a = norm(nn.Conv2d(3, 16, 3, padding=1))
        self.b = norm(nn.Conv2d(16, 8, 3, padding=1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(F.relu(self.a(x))).mean((2, 3)))


def _scrambled(model: nn.Module) -> nn.Module:
    """Weight-norm magnitudes away from ||v|| (at init g == ||v||, which hides a wrong g)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("norm", [nn.utils.weight_norm, parametrizations.weight_norm], ids=["hook", "parametrize"])
def test_weight_normalised_convs_are_sliced_through_g_and_v(norm):
    model = _scrambled(TwoNormedConvs(norm))
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(trace(model, x))
    assert groups["a"].prunable and groups["b"].prunable, [g.reason for g in groups.values()]
    check_invariants(model, x, list(groups.values()), plans=4)
    small = apply(model, list(groups.values()), {"a": [1, 4, 9], "b": [0, 5]})
    stored = {n: tuple(p.shape) for n, p in small.named_parameters()}
    if norm is nn.utils.weight_norm:
        assert stored["a.weight_g"] == (3, 1, 1, 1) and stored["b.weight_v"] == (2, 3, 3, 3)
        assert any(type(h).__name__ == "WeightNorm" for h in small.b._forward_pre_hooks.values())
    else:
        assert stored["b.parametrizations.weight.original1"] == (2, 3, 3, 3)
        assert parametrize.is_parametrized(small.b, "weight")
    # the original model is untouched and still runs
    assert model.a.weight.shape == (16, 3, 3, 3) and model(x).shape == (2, 4)


def test_weight_norm_over_another_dim_and_on_a_linear():
    """Sibling: ``dim=1`` (one norm per input channel) and a weight-normalised linear head."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.utils.weight_norm(nn.Conv2d(3, 12, 3, padding=1), dim=1)
            self.b = nn.Conv2d(12, 10, 1)
            self.fc = parametrizations.weight_norm(nn.Linear(10, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))

    model = _scrambled(Head())
    x = torch.randn(2, 3, 6, 6)
    groups = trace(model, x)
    assert by_name(groups)["a"].prunable and by_name(groups)["b"].prunable
    check_invariants(model, x, groups, plans=4)


@pytest.mark.parametrize(
    "norm",
    [nn.utils.spectral_norm, parametrizations.spectral_norm, parametrizations.orthogonal],
    ids=["spectral-hook", "spectral-parametrize", "orthogonal"],
)
def test_other_reparametrisations_keep_their_channels_with_the_true_reason(norm):
    model = TwoNormedConvs(norm).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(trace(model, x))
    for name in ("a", "b"):
        reason = groups[name].reason
        assert not groups[name].prunable and reason.startswith(f"{name}.weight ")
        assert "shared" not in reason
        want = "largest singular value" if "spectral" in norm.__module__ + norm.__name__ else "_Orthogonal"
        assert want in reason
    check_invariants(model, x, list(groups.values()), plans=1)  # the empty plan still holds


# ----------------------------------------------------------------------------------------------
# 2. a constant channel count in a requested shape


class ConstantView(nn.Module):
    """conv 3->16 -> ``y.view(b, 16, -1).mean(-1)`` (16 stored in __init__) -> Linear(16, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.channels = 16
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(x.shape[0], self.channels, -1).mean(-1))


class ConstantReshape(nn.Module):
    """``y.reshape(-1, 16, h, w)`` before a conv: the identity reshape whose -1 takes the slack."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y.reshape(-1, 16, y.shape[2], y.shape[3]))


class ConstantBroadcast(nn.Module):
    """Sibling: ``broadcast_to`` a literal shape whose channel entry is 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv(x).mean((2, 3), keepdim=True)
        return self.head(torch.broadcast_to(s, (2, 16, 6, 6)))


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (ConstantView, "reshape to a constant size 16 over channels at node view"),
        (ConstantReshape, "reshape to a constant size 16 over channels at node reshape"),
        (ConstantBroadcast, "broadcast_to to a constant size 16 over channels at node broadcast_to"),
    ],
)
def test_a_constant_channel_count_in_a_shape_blocks_the_group(model, reason):
    groups = by_name(trace(model().eval(), torch.randn(2, 3, 6, 6)))
    assert not groups["conv"].prunable and groups["conv"].reason == reason


def test_a_channel_count_read_at_run_time_in_the_same_view_is_followed():
    class Followed(ConstantView):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            b, c = y.shape[:2]
            return self.head(F.relu(y.view(b, c, -1).mean(-1)).unsqueeze(-1).unsqueeze(-1))

    model = randomise(Followed())
    x = torch.randn(2, 3, 6, 6)
    groups = trace(model, x)
    assert by_name(groups)["conv"].prunable
    check_invariants(model, x, groups)


# ----------------------------------------------------------------------------------------------
# 3. tensor-valued arguments


class ClampBetween(nn.Module):
    """``torch.clamp(y, min=lo, max=hi)`` with (1, 16, 1, 1) Parameters between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.lo = nn.Parameter(-0.2 - torch.rand(1, 16, 1, 1))
        self.hi = nn.Parameter(0.2 + torch.rand(1, 16, 1, 1))
        self.b = nn.Conv2d(16, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.clamp(self.a(x), min=self.lo, max=self.hi))


def test_clamp_bounds_are_sliced_with_the_group():
    model = randomise(ClampBetween())
    x = torch.randn(2, 3, 8, 8)
    groups = trace(model, x)
    group = by_name(groups)["a"]
    assert group.prunable and {m.module for m in group.members} >= {"lo", "hi"}
    check_invariants(model, x, groups, plans=4)
    small = apply(model, groups, {"a": [2, 3, 11]})
    assert small.lo.shape == small.hi.shape == (1, 3, 1, 1)


def test_a_bound_that_is_another_feature_map_ties_its_channels():
    """Sibling: ``torch.clip(y, min=z)`` with ``z`` another conv's output: the two groups are one."""

    class FeatureBound(ClampBetween):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.clip(self.a(x), min=self.c(x)))

    model = randomise(FeatureBound())
    x = torch.randn(2, 3, 8, 8)
    groups = trace(model, x)
    group = by_name(groups)["a"]
    assert group.prunable and {"a", "c"} <= {m.module for m in group.members}
    check_invariants(model, x, groups, plans=4)


def test_a_bound_computed_from_a_parameter_blocks_the_group():
    """Sibling: a bound computed from a parameter (not the parameter itself) is not sliced."""

    class Computed(ClampBetween):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.clamp_min(self.a(x), self.lo * 2))

    model = Computed().eval()
    groups = trace(model, torch.randn(2, 3, 8, 8))
    assert not by_name(groups)["a"].prunable
    check_invariants(model, torch.randn(2, 3, 8, 8), groups, plans=1)


# ----------------------------------------------------------------------------------------------
# 4. buffers: folded constants and attributes left on the model


def _snapshot(model: nn.Module) -> tuple:
    attrs = {name: sorted(vars(m)) + sorted(m._buffers) + sorted(m._parameters) for name, m in model.named_modules()}
    return attrs, {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_frozen_batch_norm_resnet_is_pruned_like_batch_norm_and_left_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(norm_layer=torchvision.ops.FrozenBatchNorm2d).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(m, name).copy_(0.5 * torch.randn(m.weight.shape, generator=g) + (name == "weight"))
            m.running_var.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
    x = torch.randn(1, 3, 32, 32)
    before = _snapshot(model)
    groups = trace(model, x)
    assert _same(before, _snapshot(model)), "tracing changed the user's model"
    assert not any(n.target.startswith("_tensor_constant") for n in symbolic_trace(model).graph.nodes if n.op == "get_attr")
    assert _same(before, _snapshot(model))
    group = by_name(groups)["conv1"]
    assert group.prunable and ("bn1", "channel") in {(m.module, m.role) for m in group.members}
    check_invariants(model, x, groups, plans=2)
    small = apply(model, groups, {"conv1": list(range(0, 64, 2))})
    assert _same(before, _snapshot(model)), "apply changed the user's model"
    assert small.state_dict()["bn1.running_mean"].shape == (32,)
    with torch.no_grad():
        y = small(x)
        small.bn1.running_mean.add_(1.0)  # the sliced buffers are what the pruned model computes with
        assert not torch.allclose(small(x), y)


def test_arithmetic_on_a_buffer_stays_tied_to_the_buffer():
    """Sibling: a module of one's own that scales by ``exp`` of a buffer is traced into ops on the
    buffer (no constant folded at trace time), and the model keeps no attribute from the trace."""

    class BufferScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.register_buffer("log_scale", 0.3 * torch.randn(8))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x) * self.log_scale.exp().view(1, -1, 1, 1))

    model = BufferScale().eval()
    x = torch.randn(1, 3, 5, 5)
    before = _snapshot(model)
    gm = symbolic_trace(model)
    groups = trace(model, x)
    assert _same(before, _snapshot(model))
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} == {"log_scale"}
    with torch.no_grad():
        y = gm(x)
        model.log_scale.add_(0.5)
        assert not torch.allclose(gm(x), y)  # the traced model reads the buffer, not a copy of it
    check_invariants(model, x, groups, plans=1)


# ----------------------------------------------------------------------------------------------
# 5. in-place adds into a broadcast destination


class ChannelAdd(nn.Module):
    """GCNet's channel add: ``y + conv1x1(y.mean((2, 3), keepdim=True))``."""

    def __init__(self, swapped: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.transform = nn.Conv2d(16, 16, 1)
        self.swapped = swapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        context = self.transform(y.mean((2, 3), keepdim=True))
        return context + y if self.swapped else y + context


@pytest.mark.parametrize("swapped", [False, True], ids=["y+conv", "conv+y"])
def test_inference_copy_of_a_broadcast_add_runs_and_matches(swapped):
    torch.manual_seed(0)
    model = ChannelAdd(swapped).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        fast = optimize_for_inference(model)  # no example input: checked at each call
        assert torch.allclose(fast(x), expected, atol=1e-5)
        known = optimize_for_inference(model, x)  # shapes known: left out of place
        assert not any(n.target in (operator.iadd, add_in_place) for n in known.graph.nodes)
        assert torch.allclose(known(x), expected, atol=1e-5)


def test_add_in_place_writes_only_when_the_sum_fits():
    a, b = torch.ones(2, 3, 4, 4), torch.ones(2, 3, 1, 1)
    assert add_in_place(a, b) is a and a.sum() == 2 * a.numel()
    small = torch.ones(2, 3, 1, 1)
    out = add_in_place(small, torch.ones(2, 3, 4, 4))
    assert out is not small and out.shape == (2, 3, 4, 4) and small.sum() == small.numel()
    half = torch.ones(2, 3, dtype=torch.float16)
    assert add_in_place(half, torch.ones(2, 3)).dtype == torch.float32  # promotion: out of place


# ----------------------------------------------------------------------------------------------
# needlessly unprunable: GroupNorm


class GroupNormed(nn.Module):
    """conv -> GroupNorm(G, 16) -> relu -> conv -> GroupNorm(8, 8, no affine) -> residual -> head."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn_a = nn.GroupNorm(groups, 16)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.gn_b = nn.GroupNorm(8, 8, affine=False)
        self.skip = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn_b(self.b(F.relu(self.gn_a(self.a(x))))) + self.skip(x)
        return self.head(F.relu(y)).mean((2, 3))


@pytest.mark.parametrize("norm_groups", [4, 16])
def test_group_norm_is_pruned_in_whole_norm_groups(norm_groups):
    model = randomise(GroupNormed(norm_groups))
    x = torch.randn(2, 3, 6, 6)
    groups = by_name(trace(model, x))
    assert groups["a"].prunable and groups["a"].unit == 16 // norm_groups
    assert groups["b"].prunable and groups["b"].unit == 1  # G == C: per channel
    check_invariants(model, x, list(groups.values()), plans=4)
    small = apply(model, list(groups.values()), {"a": list(range(16 // norm_groups)), "b": [0, 3, 5]})
    assert (small.gn_a.num_groups, small.gn_a.num_channels, small.gn_a.weight.shape) == (1, 16 // norm_groups, (16 // norm_groups,))
    assert (small.gn_b.num_groups, small.gn_b.num_channels) == (3, 3)


def test_group_norm_with_one_group_keeps_its_channels():
    model = GroupNormed(1).eval()
    groups = by_name(trace(model, torch.randn(1, 3, 6, 6)))
    assert not groups["a"].prunable and groups["a"].reason == "normalised across channels by GroupNorm at gn_a"


# ----------------------------------------------------------------------------------------------
# needlessly unprunable: split / chunk along the channel dim (YOLOv8's C2f)


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.cv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(F.silu(self.bn(self.cv1(x))))


class C2f(nn.Module):
    """YOLOv8's C2f: ``list(cv1(x).chunk(2, 1))``, bottlenecks on the last part, cat of all, cv2."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.c = 8
        self.cv1 = nn.Conv2d(3, 2 * self.c, 1)
        self.bn1 = nn.BatchNorm2d(2 * self.c)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = nn.Conv2d((2 + n) * self.c, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn1(self.cv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.stem(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.head(F.silu(self.cv2(torch.cat(y, 1))))


class C2fSplit(C2f):
    """C2f's ``forward_split``: ``split((c, c), 1)`` with constant sizes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.stem(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.head(F.silu(self.cv2(torch.cat(y, 1))))


class UnevenUnpacked(C2f):
    """Sibling: unequal parts ``split([5, 11], dim=1)`` unpacked into names, used in another order."""

    def __init__(self) -> None:
        super().__init__(n=0)
        self.p = nn.Conv2d(5, 6, 3, padding=1)
        self.cv2 = nn.Conv2d(6 + 11 + 16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        a, b = torch.split(y, [5, 11], dim=1)
        return self.head(F.silu(self.cv2(torch.cat([self.p(a), b, y], 1))))


@pytest.mark.parametrize("model", [C2f, C2fSplit, UnevenUnpacked])
def test_channel_split_parts_are_pruned_as_their_own_ranges(model):
    model = randomise(model())
    x = torch.randn(2, 3, 8, 8)
    groups = trace(model, x)
    parts = [g for g in groups if any(m.role.startswith("part") for m in g.node_members)]
    assert len(parts) == 2 and all(g.prunable for g in parts), [(g.name, g.reason) for g in groups]
    assert sorted(g.width for g in parts) == ([5, 11] if isinstance(model, UnevenUnpacked) else [8, 8])
    check_invariants(model, x, groups, plans=5)
    plan = {g.name: [0] for g in parts}  # one channel of each part
    small = apply(model, groups, plan)
    assert small.cv1.out_channels == 2


def test_split_along_a_spatial_dim_keeps_the_channels():
    """Sibling: CoordAttention's split along H/W: every part carries all channels."""

    class Coord(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            h, w = y.shape[2], y.shape[3]
            pooled = torch.cat([y.mean(3, keepdim=True), y.mean(2, keepdim=True).permute(0, 1, 3, 2)], 2)
            ph, pw = torch.split(F.relu(self.b(pooled)), [h, w], dim=2)
            return self.head(y * ph.sigmoid() * pw.permute(0, 1, 3, 2).sigmoid())

    model = randomise(Coord())
    x = torch.randn(2, 3, 6, 5)
    groups = by_name(trace(model, x))
    assert groups["a"].prunable, [(g.name, g.reason) for g in groups.values()]
    assert ("b", "out") in {(m.module, m.role) for m in groups["a"].members}  # the attention scales tie b to a
    check_invariants(model, x, list(groups.values()), plans=4)


# ----------------------------------------------------------------------------------------------
# needlessly unprunable: a reshaped per-channel parameter, keepdims=True


class LayerScaled(nn.Module):
    """timm's LayerScale2d (``x * gamma.view(1, -1, 1, 1)``) in a residual block, and an SE whose
    squeeze is spelled ``mean((2, 3), keepdims=True)`` (timm's SqueezeExciteCl)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.conv = nn.Conv2d(12, 12, 3, padding=1)
        self.gamma = nn.Parameter(0.5 + torch.rand(12))
        self.se_reduce = nn.Conv2d(12, 4, 1)
        self.se_expand = nn.Conv2d(4, 12, 1)
        self.head = nn.Conv2d(12, 2, 1)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        gamma = self.gamma.view(1, -1, 1, 1)
        z = self.conv(y)
        y = y + (z.mul_(gamma) if self.inplace else z * gamma)
        s = self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdims=True))))
        return self.head(y * s.sigmoid())


@pytest.mark.parametrize("inplace", [False, True])
def test_layer_scale_view_and_keepdims_are_pruned(inplace):
    model = randomise(LayerScaled(inplace))
    x = torch.randn(2, 3, 6, 6)
    groups = by_name(trace(model, x))
    assert groups["stem"].prunable, [(g.name, g.reason) for g in groups.values()]
    assert ("gamma", "param") in {(m.module, m.role) for m in groups["stem"].members}
    assert groups["se_reduce"].prunable
    check_invariants(model, x, list(groups.values()), plans=4)
    assert apply(model, list(groups.values()), {"stem": [1, 7]}).gamma.shape == (2,)


def test_a_parameter_viewed_to_a_constant_channel_count_blocks():
    class Constant(LayerScaled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            return self.head(y + self.conv(y) * self.gamma.view(1, 12, 1, 1))

    groups = by_name(trace(Constant().eval(), torch.randn(1, 3, 6, 6)))
    assert not groups["stem"].prunable


def test_timm_layer_scale_2d_is_pruned():
    timm_layers = pytest.importorskip("timm.layers")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.ls = timm_layers.LayerScale2d(8, 0.5)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.head(y + self.ls(self.b(y)))

    model = randomise(Block())
    x = torch.randn(2, 3, 6, 6)
    groups = trace(model, x)
    assert by_name(groups)["a"].prunable and ("ls.gamma", "param") in {(m.module, m.role) for m in by_name(groups)["a"].members}
    check_invariants(model, x, groups, plans=3)


class TensorArgs(nn.Module):
    """conv -> ``op`` with tensor arguments besides its input -> conv."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.op == "where":
            y = torch.where(y > 0, y, self.w)
        elif self.op == "lerp":
            y = torch.lerp(y, y.sigmoid(), self.w)
        elif self.op == "addcmul":
            y = torch.addcmul(y, self.w, y)
        else:
            y = F.hardtanh(y, -0.5, 0.5).clamp(max=self.w)
        return self.b(y)


@pytest.mark.parametrize("op", ["where", "lerp", "addcmul", "hardtanh_then_clamp"])
def test_ops_with_tensor_arguments_are_sliced_or_block(op):
    """Sibling kinds of fault 3: each tensor argument is followed (clamp's bound, a Parameter read
    directly, is sliced) or the group is unprunable; no plan builds a model that fails."""
    model = randomise(TensorArgs(op))
    x = torch.randn(2, 3, 6, 6)
    groups = trace(model, x)
    group = by_name(groups)["a"]
    assert group.prunable == (op == "hardtanh_then_clamp"), group.reason
    check_invariants(model, x, groups, plans=3)


def test_timm_group_norm_act_is_a_group_norm():
    """timm's GroupNormAct (efficientnet_b0_gn) calls F.group_norm: kept a leaf, it is a GroupNorm."""
    norm_act = pytest.importorskip("timm.layers.norm_act")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.gn = norm_act.GroupNormAct(16, num_groups=4)
            self.b = nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.gn(self.a(x)))

    model = randomise(Block())
    x = torch.randn(2, 3, 6, 6)
    groups = by_name(trace(model, x))
    assert groups["a"].prunable and groups["a"].unit == 4
    check_invariants(model, x, list(groups.values()), plans=3)
