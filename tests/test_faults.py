"""Silent faults found in the field (issue 8), each as the input that showed it, and their kinds.

1. the analytic cost must equal the measured cost of the pruned model, for every op ``count`` counts
   (transposed convs, functional convs/linears, attention projections) and for random plans;
2. a parameter shared by several modules (tied weights) must stay one tensor after ``apply``;
3. a channel count read at run time (``y.size(1)``) must be followed or block the group, never give a
   pruned model that computes something else;
4. structures worth pruning: SENet-style squeeze-excitation (Linear + view + expand_as), depthwise
   convs with a channel multiplier, PixelShuffle.

Every test checks the two invariants that hold the engine together on the fault's model: masked ==
sliced and ``plan_cost(plan) == count(apply(plan))``, for seeded random plans.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from test_equivalence import MODELS as EQUIVALENCE_ZOO
from test_equivalence import make_model, relative_error
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.cost.analysis import plan_cost, trace
from curlprune.cost.cost import count
from curlprune.surgery.surgery import apply, mask, random_plan


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Norm statistics and every vector parameter away from their init values (ones/zeros hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def assert_kl_scores_are_sliced_kl(model: nn.Module, groups: list[ChannelGroup], images: torch.Tensor,
                                   scores: dict, **tolerance) -> None:
    """Each prunable group's first and last channel score (``scores[name][c]``, the KL criterion's)
    equals the KL(sliced || full) of ``model`` with that one channel removed by ``apply``, on
    ``images``; ``tolerance``: ``pytest.approx``'s ``rel`` / ``abs``."""
    with torch.no_grad():
        logp = F.log_softmax(model(images).double(), -1)
        for g in (g for g in groups if g.prunable):
            for channel in (0, g.width - 1):
                small = apply(model, groups, {g.name: [c for c in range(g.width) if c != channel]})
                logq = F.log_softmax(small(images).double(), -1)
                kl = (logq.exp() * (logq - logp)).sum(1).mean().item()
                assert scores[g.name][channel] == pytest.approx(kl, **tolerance), (g.name, channel)


def check_invariants(model: nn.Module, x: torch.Tensor, groups: list[ChannelGroup], plans: int = 3, seed: str = "") -> None:
    """masked == sliced and plan_cost == count(apply) for the empty plan and ``plans`` random plans."""
    assert plan_cost(model, x, groups, {}) == count(model, x), "the analytic cost of the unpruned model is not its count"
    rng = random.Random(seed or type(model).__name__)
    for _ in range(plans):
        plan = random_plan(groups, rng, single_unit_share=0.3)
        with torch.no_grad():
            with mask(model, groups, plan):
                masked = model(x)
            small = apply(model, groups, plan)
            sliced = small(x)
        assert relative_error(sliced, masked) < 1e-5, f"masked != sliced for plan {plan}"
        assert plan_cost(model, x, groups, plan) == count(small, x), f"plan_cost != count(apply) for plan {plan}"


# ----------------------------------------------------------------------------------------------
# 1. analytic cost == measured cost


class EncoderDecoder(nn.Module):
    """conv(3->8, stride 2) -> ConvTranspose2d(8->8, kernel 4, stride 2) -> conv(8->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn2(self.up(F.relu(self.bn1(self.down(x)))))))


def test_transposed_conv_is_in_the_analytic_cost():
    model = randomise(EncoderDecoder())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    # 3*8*9*4*4 + 8*8*16*4*4 (input positions of the transposed conv) + 8*3*9*8*8
    assert count(model, x)[0] == 3456 + 16384 + 13824 == 33664
    assert plan_cost(model, x, groups, {}) == count(model, x)
    check_invariants(model, x, groups)


class FunctionalOps(nn.Module):
    """Convs and a linear called through torch.nn.functional with parameters of the module."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.bn = nn.BatchNorm2d(8)
        self.w2 = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.3)
        self.fc_w = nn.Parameter(torch.randn(5, 6) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(F.conv2d(x, self.w1, self.b1, padding=1)))
        y = F.relu(F.conv2d(y, self.w2, padding=1))
        return F.linear(y.mean((2, 3)), self.fc_w)


def test_functional_convs_and_linears_are_in_the_analytic_cost():
    model = randomise(FunctionalOps())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    assert count(model, x)[0] == 8 * 27 * 64 + 6 * 72 * 64 + 6 * 5
    assert plan_cost(model, x, groups, {}) == count(model, x)
    check_invariants(model, x, groups)


class Attention(nn.Module):
    """A conv stem, then nn.MultiheadAttention over the positions (a hybrid's attention stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def test_attention_projections_are_in_the_analytic_cost():
    model = randomise(Attention())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    assert plan_cost(model, x, groups, {}) == count(model, x)
    check_invariants(model, x, groups)


FAULT_MODELS = {}  # filled below: name -> (factory, input shape), for the property test


# ----------------------------------------------------------------------------------------------
# 2. tied weights


class TiedConvs(nn.Module):
    """Two conv modules holding the same weight Parameter (each with its own bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(F.relu(self.stem(x)))))))


def test_tied_weights_stay_tied():
    model = randomise(TiedConvs())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    # stem 216 + 8, shared weight 576 once, two biases of 8, head 16 + 2
    assert count(model, x)[1] == 224 + 576 + 8 + 8 + 18 == 834
    assert plan_cost(model, x, groups, {}) == count(model, x)
    rng = random.Random("tied")
    for _ in range(3):
        plan = random_plan(groups, rng)
        small = apply(model, groups, plan)
        assert small.a.weight is small.b.weight, "apply untied the shared weight"
        assert plan_cost(model, x, groups, plan) == count(small, x)
    check_invariants(model, x, groups)


# ----------------------------------------------------------------------------------------------
# 3. a channel count read at run time


class SizeScale(nn.Module):
    """conv -> y * y.size(1) ** -0.5 -> conv: the scale depends on the channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        y = y * y.size(1) ** -0.5
        return self.conv2(y)


def test_channel_count_used_as_a_value_is_followed_or_blocks():
    model = randomise(SizeScale())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    hidden = next(g for g in groups if g.name == "conv1")
    if not hidden.prunable:  # the fix may block the group; then the reason names the node
        assert "size" in hidden.reason, hidden.reason
    check_invariants(model, x, groups)


# ----------------------------------------------------------------------------------------------
# 4. lost opportunities


class LinearSE(nn.Module):
    """The classic SENet squeeze-excitation: Linear layers, view and expand_as."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, c // r)
        self.fc2 = nn.Linear(c // r, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y)))).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SEResNet(nn.Module):
    """A stem and two residual blocks, each ending in a LinearSE before the add."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), LinearSE(c))
            for _ in range(2)
        )
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


def test_senet_linear_se_keeps_the_residual_stream_prunable():
    model = randomise(SEResNet())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    stream = next(g for g in groups if g.kind == "outside")
    assert stream.prunable, stream.reason
    assert all(g.prunable for g in groups if g.name.endswith("fc1")), [g.reason for g in groups if not g.prunable]
    check_invariants(model, x, groups)


class DepthwiseMultiplier(nn.Module):
    """conv(3->8) -> depthwise conv with channel multiplier 2 (groups=8, 8->16) -> conv(16->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.dw(F.relu(self.bn1(self.conv1(x)))))))


def test_depthwise_with_channel_multiplier_prunes_an_input_with_its_outputs():
    model = randomise(DepthwiseMultiplier())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    hidden = next(g for g in groups if g.name == "conv1")
    assert hidden.prunable, hidden.reason
    dw_out = next(m for m in hidden.members if m.module == "dw" and m.role == "out")
    assert dw_out.index[3] == (6, 7)  # input channel 3 owns outputs 6 and 7
    small = apply(model, groups, {"conv1": [0, 2, 5]})
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (3, 6, 3)
    check_invariants(model, x, groups)


class Shuffle(nn.Module):
    """conv(3->16) -> PixelShuffle(2) (16 -> 4 channels, 2x the size) -> conv(4->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.shuffle(self.conv1(x))))


def test_pixel_shuffle_prunes_blocks_of_r_squared():
    model = randomise(Shuffle())
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    hidden = next(g for g in groups if g.name == "conv1")
    assert hidden.prunable and hidden.width == 4, hidden.reason
    conv1_out = next(m for m in hidden.members if m.module == "conv1" and m.role == "out")
    assert conv1_out.index[1] == (4, 5, 6, 7)
    check_invariants(model, x, groups)


# ----------------------------------------------------------------------------------------------
# the property over the zoo: plan_cost(plan) == count(apply(plan)) for random plans

FAULT_MODELS.update({
    "EncoderDecoder": (EncoderDecoder, (1, 3, 8, 8)),
    "FunctionalOps": (FunctionalOps, (1, 3, 8, 8)),
    "Attention": (Attention, (1, 3, 8, 8)),
    "TiedConvs": (TiedConvs, (1, 3, 8, 8)),
    "SizeScale": (SizeScale, (1, 3, 8, 8)),
    "SEResNet": (SEResNet, (1, 3, 8, 8)),
    "DepthwiseMultiplier": (DepthwiseMultiplier, (1, 3, 8, 8)),
    "Shuffle": (Shuffle, (1, 3, 8, 8)),
})


@pytest.mark.parametrize("name", list(EQUIVALENCE_ZOO) + list(FAULT_MODELS))
def test_plan_cost_equals_count_of_applied_model_for_random_plans(name):
    if name in FAULT_MODELS:
        factory, shape = FAULT_MODELS[name]
        torch.manual_seed(0)
        model = randomise(factory())
    else:
        model, shape = make_model(name), (1,) + EQUIVALENCE_ZOO[name][1:]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    groups = trace(model, x)
    assert plan_cost(model, x, groups, {}) == count(model, x)
    rng = random.Random(name)
    for share in (1.0, 0.5):
        plan = random_plan(groups, rng, group_share=share, single_unit_share=0.2)
        assert plan_cost(model, x, groups, plan) == count(apply(model, groups, plan), x), plan


@pytest.mark.parametrize("name", list(FAULT_MODELS))
def test_selection_cost_is_exact_or_refused_in_one_line(name):
    """select's cost function never reports numbers the measured cost would contradict."""
    from curlprune.errors import CurlpruneError
    from curlprune.cost.analysis import model_cost_fn

    factory, shape = FAULT_MODELS[name]
    torch.manual_seed(0)
    model = randomise(factory())
    x = torch.randn(shape)
    groups = trace(model, x)
    try:
        cost = model_cost_fn(model, x, groups)
    except CurlpruneError as exc:
        assert "\n" not in str(exc) and "measured cost" in str(exc)
        return
    assert cost({}) == tuple(map(float, count(model, x)))


def test_pruned_model_cost_is_checked_against_the_selection():
    """The prune stage's check after apply: the measured cost of the sliced model must be the selection's."""
    from curlprune.cost.analysis import check_pruned_cost
    from curlprune.errors import CurlpruneError

    factory, shape = FAULT_MODELS["TiedConvs"]
    torch.manual_seed(0)
    model = randomise(factory())
    x = torch.randn(shape)
    groups = trace(model, x)
    plan = random_plan(groups, random.Random(3), group_share=1.0)
    pruned = apply(model, groups, plan)
    macs, params = plan_cost(model, x, groups, plan)
    check_pruned_cost(pruned, x, (float(macs), float(params)))  # exact: no error
    with pytest.raises(CurlpruneError, match="but the selection computed") as info:
        check_pruned_cost(pruned, x, (float(macs), float(params + 8)))
    assert "\n" not in str(info.value)
