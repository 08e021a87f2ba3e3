"""Issue 23: models torch.fx cannot trace symbolically are traced against the example input.

timm's VGG head (``if x.shape[-2] < 7``), MobileViT's blocks (``if new_h != H``) and the TF "same"
padding of NASNet / PNASNet (``max(pad, 0)``) branch on shapes; Torch-Pruning prunes them by
following a concrete forward. Here the graph is specialised to the example input (guards check it
at each run), a submodule whose forward branches on tensor values is kept whole with the reason,
and every pruned model is checked with the engine's invariants (masked == sliced,
plan_cost == count), the user's own class included.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_faults import check_invariants, randomise
from torch import nn

import curlprune
from curlprune.cli import main
from curlprune.cost.analysis import analyse, trace
from curlprune.criteria import compute_scores
from curlprune.errors import CurlpruneError
from curlprune.graph.capture import SpecialisedTraceWarning, capture
from curlprune.graph.concrete import SpecialisedInputError
from curlprune.graph.tracing import symbolic_trace
from curlprune.surgery.surgery import apply as apply_graph

timm = pytest.importorskip("timm", reason="timm (optional extra) is not installed")
from timm.layers import ClassifierHead, ConvNormAct  # noqa: E402
from timm.models.nasnet import NASNetALarge  # noqa: E402
from timm.models.pnasnet import Cell, CellStem0  # noqa: E402
from timm.models.vgg import VGG, ConvMlp  # noqa: E402


def traced(model: nn.Module, x: torch.Tensor):
    """``trace`` that must say the model was traced against its example input (one warning line)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        groups = trace(model, x)
    said = [str(w.message) for w in seen if issubclass(w.category, SpecialisedTraceWarning)]
    assert len(said) == 1 and "\n" not in said[0] and "traced against the example input" in said[0], said
    assert analyse(model, x).capture.specialised
    return groups


def prunable_channels(groups) -> int:
    return sum(g.width for g in groups if g.prunable)


def check_kept_class(model: nn.Module, x: torch.Tensor, groups, cls: type) -> None:
    """``curlprune.apply`` gives the user's class back, equal to the masked model on ``x``."""
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable and g.unit == 1 and g.width > 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error", curlprune.KeepClassWarning)
        small = curlprune.apply(model, groups, plan)
    assert type(small) is cls
    with torch.no_grad():
        with curlprune.mask(model, groups, plan):
            masked = model(x)
        sliced = small(x)
    assert (sliced - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert curlprune.plan_cost(model, x, groups, plan) == curlprune.count(small, x)


# ----------------------------------------------------------------------------------------------
# the four timm families, small faithful variants (the models themselves: the slow test below)


def small_vgg() -> VGG:
    """timm's VGG class (BN variant) with narrow stages and a narrow ConvMlp head (the same classes)."""
    model = VGG([8, "M", 16, "M", 16, "M"], num_classes=10, norm_layer=nn.BatchNorm2d)
    model.pre_logits = ConvMlp(16, 32, 7, drop_rate=0.0)
    model.head = ClassifierHead(32, 10)
    return randomise(model)


class SmallPNASNet(nn.Module):
    """PNASNet5Large's stem (conv_0, cell_stem_0, cell_stem_1) at a twelfth of its widths, same classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_0 = ConvNormAct(3, 8, kernel_size=3, stride=2, padding=0, apply_act=False)
        self.cell_stem_0 = CellStem0(in_chs_left=8, out_chs_left=4, in_chs_right=8, out_chs_right=4, pad_type="same")
        self.cell_stem_1 = Cell(in_chs_left=8, out_chs_left=8, in_chs_right=20, out_chs_right=8, pad_type="same",
                                match_prev_layer_dims=True, is_reduction=True)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_conv_0 = self.conv_0(x)
        x_stem_0 = self.cell_stem_0(x_conv_0)
        x_stem_1 = self.cell_stem_1(x_conv_0, x_stem_0)
        return self.fc(F.relu(x_stem_1).mean((2, 3)))


SMALL = {
    "vgg (timm VGG, ConvMlp head)": (small_vgg, 32),
    "nasnet (NASNetALarge, stem 8, 96 features)": (lambda: randomise(NASNetALarge(num_classes=10, stem_size=8, num_features=96)), 32),
    "pnasnet (PNASNet5Large's stem cells)": (lambda: randomise(SmallPNASNet()), 32),
    "mobilevitv2_050": (lambda: randomise(timm.create_model("mobilevitv2_050", pretrained=False, num_classes=10)), 64),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_timm_families_fx_cannot_trace_are_pruned_exactly(name):
    build, size = SMALL[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, 3, size, size)
    with pytest.raises(CurlpruneError, match="cannot trace"):
        symbolic_trace(model)  # torch.fx alone cannot trace it
    groups = traced(model, x)
    assert prunable_channels(groups) > 0
    check_invariants(model, x, groups, plans=1, seed=name)


@pytest.mark.parametrize("name", ["vgg (timm VGG, ConvMlp head)", "nasnet (NASNetALarge, stem 8, 96 features)"])
def test_the_pruned_timm_model_keeps_its_class(name):
    build, size = SMALL[name]
    model = build()
    x = torch.randn(1, 3, size, size)
    groups = traced(model, x)
    check_kept_class(model, x, groups, type(model))


@pytest.mark.slow
@pytest.mark.parametrize("name,size,least", [("vgg11_bn", 64, 10_000), ("nasnetalarge", 64, 60_000),
                                             ("pnasnet5large", 64, 50_000), ("mobilevitv2_050", 64, 4_000)])
def test_the_timm_models_themselves(name, size, least):
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, pretrained=False, num_classes=10))
    x = torch.randn(1, 3, size, size)
    groups = traced(model, x)
    assert prunable_channels(groups) >= least
    check_invariants(model, x, groups, plans=1, seed=name)


# ----------------------------------------------------------------------------------------------
# a user's model that branches on shapes


class ShapeBranching(nn.Module):
    """conv(3->16) -> pool only when the map is larger than 8 -> as many 3x3 convs (16->16) as
    ``W // 4``, 1 to 2 (a Python int from a size; the third is never used) -> pad to a multiple of 4
    (``max(..., 0)``) -> Linear(16 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        if x.shape[-1] > 8:
            x = F.max_pool2d(x, 2)
        for conv in self.convs[: max(1, min(2, int(x.shape[-1]) // 4))]:
            x = F.relu(conv(x))
        pad = max(4 - x.shape[-1] % 4, 0) % 4
        x = F.pad(x, (0, pad, 0, pad))
        return self.fc(x.mean((2, 3)))


def test_a_forward_that_branches_on_shapes_is_pruned_exactly():
    model = randomise(ShapeBranching())
    x = torch.randn(1, 3, 34, 34)  # pooled to 17: two convs, padded to 20
    groups = traced(model, x)
    assert prunable_channels(groups) == 16 + 16 + 16  # the stem and the two convs used
    check_invariants(model, x, groups, plans=3)
    check_kept_class(model, x, groups, ShapeBranching)
    guards = analyse(model, x).capture.guards
    assert len(guards) == 3 and all("<root> (ShapeBranching), tests/test_trace_fallback.py:" in g for g in guards)
    assert any("if x.shape[-1] > 8" in g and g.endswith("branch True") for g in guards)


def test_a_specialised_graph_refuses_an_input_that_branches_otherwise():
    """The sliced GraphModule checks its guards; the user's own class runs at any size."""
    model = randomise(ShapeBranching())
    x = torch.randn(1, 3, 34, 34)
    groups = traced(model, x)
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    graph = apply_graph(model, groups, plan)
    other = torch.randn(1, 3, 8, 8)  # not pooled: another branch
    with pytest.raises(SpecialisedInputError) as err:
        graph(other)
    assert "\n" not in str(err.value) and "trace the model again with an input of this shape" in str(err.value)
    graph(torch.randn(3, 3, 34, 34))  # another batch size: the same values read from shapes
    with pytest.raises(SpecialisedInputError, match="the value was 17 there and is 18"):
        graph(torch.randn(1, 3, 36, 36))  # int(width) was fixed to 17
    small = curlprune.apply(model, groups, plan)
    with torch.no_grad(), curlprune.mask(model, groups, plan):
        masked = model(other)
    assert (small(other) - masked).abs().max() <= 1e-5 * masked.abs().max()


class CountBranch(nn.Module):
    """conv(3->16) -> doubled when it has more than 8 channels (a channel count in a branch) -> conv(16->8);
    conv(8->6) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        if y.shape[1] > 8 and x.shape[-1] > 4:
            y = y * 2
        return self.fc(F.relu(self.b(y)).mean((2, 3)))


def test_a_channel_count_in_a_branch_keeps_its_channels_whole():
    model = randomise(CountBranch())
    x = torch.randn(1, 3, 8, 8)
    groups = {g.name: g for g in traced(model, x)}
    assert not groups["a"].prunable and "is fixed by the trace at" in groups["a"].reason
    assert groups["b"].prunable
    check_invariants(model, x, list(groups.values()), plans=2)


# ----------------------------------------------------------------------------------------------
# branches on tensor values: the module is kept whole, or one line


class ValueGate(nn.Module):
    """Doubles its input when its mean is positive: a branch on tensor values (no trace holds it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean() > 0 else x


class WithGate(nn.Module):
    def __init__(self, gate_in_forward: bool = False) -> None:
        super().__init__()
        self.gate_in_forward = gate_in_forward
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.gate = ValueGate()
        self.b = nn.Conv2d(12, 10, 3, padding=1)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(F.relu(self.a(x)))
        if self.gate_in_forward and y.sum() > 0:
            y = -y
        return self.fc(F.relu(self.c(F.relu(self.b(y)))).mean((2, 3)))


def test_a_submodule_that_branches_on_values_is_kept_whole():
    model = randomise(WithGate())
    x = torch.randn(1, 3, 8, 8)
    groups = {g.name: g for g in traced(model, x)}
    assert not groups["a"].prunable
    assert groups["a"].reason.startswith("gate (ValueGate) cannot be traced") and "kept whole" in groups["a"].reason
    assert groups["b"].prunable and groups["c"].prunable
    assert set(analyse(model, x).capture.opaque) == {"gate"}
    check_invariants(model, x, list(groups.values()), plans=2)
    check_kept_class(model, x, list(groups.values()), WithGate)


def test_a_model_that_cannot_be_traced_at_all_is_one_line():
    model = randomise(WithGate(gate_in_forward=True))
    with pytest.raises(CurlpruneError) as err:
        trace(model, torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot trace WithGate")
    assert "<root> (WithGate)" in message and "y.sum() > 0" in message and "move that code into a submodule" in message


def test_without_an_example_input_an_untraceable_model_is_one_line():
    class Fresh(ShapeBranching):  # an architecture no trace has met
        pass

    with pytest.raises(CurlpruneError) as err:
        capture(Fresh())
    message = str(err.value)
    assert "\n" not in message and "cannot trace Fresh with torch.fx" in message and "pass an example input" in message


def test_kl_scores_a_specialised_model():
    """The KL criterion runs the graph again (a private copy, traced without an input): it gets the same graph."""
    model = randomise(ShapeBranching())
    x = torch.randn(4, 3, 34, 34)
    groups = traced(model, x[:1])
    scores = compute_scores("kl", model, groups, images=x)
    assert set(scores) == {g.name for g in groups if g.prunable}
    assert all(torch.as_tensor(s).abs().sum() > 0 for s in scores.values())


def test_groups_command_says_the_trace_is_specialised(capsys):
    assert main(["groups", "--model", "timm:mobilevitv2_050", "--input-size", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if "was traced against the example input" in line]
    assert said == [said[0]] and said[0].startswith("timm:mobilevitv2_050 was traced against the example input [(1, 3, 64, 64)]")
    assert "the groups and costs hold at that input size" in said[0]


def test_the_pruned_model_of_an_untraceable_class_is_optimised_for_inference():
    """``optimize_for_inference`` (what ``--target-latency`` times) traces the pruned copy without an input."""
    model = randomise(ShapeBranching())
    x = torch.randn(1, 3, 34, 34)
    groups = traced(model, x)
    small = curlprune.apply(model, groups, {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable})
    assert type(small) is ShapeBranching
    fast = curlprune.optimize_for_inference(small)
    with torch.no_grad():
        assert (fast(x) - small(x)).abs().max() <= 1e-4 * small(x).abs().max()
