"""Issue 23, coverage: RMS norms across the channels are prunable exactly.

An RMS norm (``x / sqrt(mean_c(x^2) + eps) * w``, no mean subtracted) over the channel dim: the
removed channels are zeroed at its input (an ``"in"`` member), so they add nothing to the sum of
squares, and the sliced norm keeps dividing by the original count (weight times ``sqrt(C/C')``,
eps times ``C/C'``). timm's ``RmsNorm2d`` (channels first: MobileNet-V5, Gemma 3n's vision
encoder), ``RmsNorm`` (channels last), their ``Fp32`` and ``Act`` forms, and ``torch.nn.RMSNorm``.
Norms that subtract the mean (LayerNorm, timm's SimpleNorm ``x / std(x)``), an RMS norm without a
weight and the functional ``F.rms_norm`` over the channels stay unprunable, each with its reason.

Every pruned model is checked with the engine's invariants (masked == sliced, plan_cost == count).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_faults import assert_kl_scores_are_sliced_kl, check_invariants, randomise, relative_error
from torch import nn

import curlprune
from curlprune.cost.analysis import trace
from curlprune.criteria.kl import kl_scores
from curlprune.graph.layers import rule_for
from curlprune.store import checkpoint
from curlprune.surgery.surgery import apply

timm = pytest.importorskip("timm", reason="timm (optional extra) is not installed")
from timm.layers import LayerNorm2d, RmsNorm, RmsNorm2d, RmsNorm2dFp32, RmsNormAct, RmsNormAct2d, RmsNormFp32, SimpleNorm2d  # noqa: E402
from timm.models._efficientnet_blocks import UniversalInvertedResidual  # noqa: E402

FIRST = {  # channels-first norms of 12 channels (NCHW, over dim 1)
    "RmsNorm2d": lambda c: RmsNorm2d(c),
    "RmsNorm2dFp32": lambda c: RmsNorm2dFp32(c, eps=1e-5),
    "RmsNormAct2d": lambda c: RmsNormAct2d(c, act_layer=nn.GELU),
}
LAST = {  # channels-last norms of 16 channels (NHWC, over the last dim)
    "RmsNorm": lambda c: RmsNorm(c),
    "RmsNormFp32": lambda c: RmsNormFp32(c),
    "RmsNormAct": lambda c: RmsNormAct(c, act_layer=nn.SiLU),
    "nn.RMSNorm": lambda c: nn.RMSNorm(c, eps=1e-5),
    "nn.RMSNorm(eps=None)": lambda c: nn.RMSNorm(c),
}


class RmsNet(nn.Module):
    """conv a(3->12, 3x3) -> norm1 -> conv b(12->10, 1x1) -> ReLU -> NHWC -> fc1(10->16) -> norm2
    -> GELU -> fc2(16->4) -> mean over H, W. ``kind`` names the RMS norm: a channels-first one is
    norm1 (norm2 an Identity), a channels-last one norm2 (norm1 a BatchNorm)."""

    def __init__(self, kind: str = "RmsNorm2d") -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.norm1 = FIRST[kind](12) if kind in FIRST else nn.BatchNorm2d(12)
        self.b = nn.Conv2d(12, 10, 1)
        self.fc1 = nn.Linear(10, 16)
        self.norm2 = LAST[kind](16) if kind in LAST else nn.Identity()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b(self.norm1(self.a(x)))).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(self.norm2(self.fc1(y)))).mean((1, 2))


def rms_net(kind: str = "RmsNorm2d", seed: int = 1) -> RmsNet:
    """An ``RmsNet`` whose vector parameters (the norms' weights among them) are away from their init."""
    return randomise(RmsNet(kind), seed)


@pytest.mark.parametrize("kind", [*FIRST, *LAST])
def test_rms_norm_channels_are_pruned_exactly_and_reload(kind, tmp_path):
    model = rms_net(kind)
    x = torch.randn(2, 3, 6, 6)
    groups = {g.name: g for g in trace(model, x)}
    normed, norm = ("a", "norm1") if kind in FIRST else ("fc1", "norm2")
    assert groups[normed].prunable, groups[normed].reason
    assert {(m.module, m.role) for m in groups[normed].members} >= {(norm, "channel"), (norm, "in")}
    check_invariants(model, x, list(groups.values()), plans=3)
    plan = {"a": [0, 2, 3, 7, 8, 11], "fc1": [1, 4, 5, 6, 9, 10, 14]}
    small = curlprune.apply(model, list(groups.values()), plan)
    sliced = small.get_submodule(norm)
    width, kept = (12, 6) if kind in FIRST else (16, 7)
    eps = model.get_submodule(norm).eps or torch.finfo(torch.float32).eps
    assert sliced.weight.shape == (kept,) and tuple(sliced.normalized_shape) == (kept,)
    assert sliced.eps == pytest.approx(eps * width / kept)
    full_weight = model.get_submodule(norm).weight.detach()[plan[normed]]
    assert torch.allclose(sliced.weight.detach(), full_weight * math.sqrt(width / kept))
    path = tmp_path / "rms.safetensors"
    checkpoint.save(path, {"name": "test_rms_norm:rms_net", "kwargs": {"kind": kind}}, plan, small.state_dict(), input_shape=[2, 3, 6, 6])
    loaded = curlprune.load(path, model=rms_net(kind, seed=7))  # other weights: all must come from the file
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
        assert loaded.get_submodule(norm).eps == sliced.eps


@pytest.mark.parametrize("norm", [RmsNorm2d(6), RmsNorm(6), nn.RMSNorm(6, eps=1e-6)], ids=["RmsNorm2d", "RmsNorm", "nn.RMSNorm"])
def test_a_sliced_rms_norm_divides_by_the_original_channel_count(norm):
    """Masked (channel 2 zeroed at the input) == sliced by the rule; a plainly sliced norm (the kept
    weights, its mean over C - 1 channels) is not, so the rule's rescaling is what makes it exact."""
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6))
    first = isinstance(norm, RmsNorm2d)
    dim = 1 if first else -1
    x = torch.randn(2, 6, 4, 4) if first else torch.randn(2, 4, 4, 6)
    keep = torch.tensor([0, 1, 3, 4, 5])
    zero = (torch.arange(6) != 2).float()
    masked = norm(x * (zero.view(1, -1, 1, 1) if first else zero)).index_select(dim, keep)
    plain = type(norm)(5, eps=1e-6)
    with torch.no_grad():
        plain.weight.copy_(norm.weight[keep])
    assert (plain(x.index_select(dim, keep)) - masked).abs().max() > 1e-3
    sliced = copy.deepcopy(norm)
    rule_for(sliced).slice(sliced, {"channel": [2], "in": [2]})
    assert relative_error(sliced(x.index_select(dim, keep)).detach(), masked.detach()) < 1e-6


def test_a_mobilenetv5_block_with_rms_norms_prunes_exactly():
    """timm's universal inverted residual (MobileNet-V4/V5's block) with MobileNet-V5's norm
    (``RmsNorm2d``; ``RmsNormAct2d`` after its convs): the expansion channels are prunable."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), RmsNorm2d(16),
        UniversalInvertedResidual(16, 16, dw_kernel_size_start=3, exp_ratio=4.0, act_layer=nn.GELU, norm_layer=RmsNorm2d, layer_scale_init_value=0.5),
        UniversalInvertedResidual(16, 24, dw_kernel_size_mid=3, stride=2, exp_ratio=2.0, act_layer=nn.GELU, norm_layer=RmsNorm2d),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4),
    )
    model = randomise(model)
    assert any(type(m) is RmsNormAct2d for m in model.modules())
    x = torch.randn(2, 3, 8, 8)
    groups = trace(model, x)
    prunable = [g for g in groups if g.prunable]
    # the residual stream (stem, block 1), both expansions, block 2's output: every group is prunable
    assert len(prunable) == 4 and all(g.prunable for g in groups if g.reason not in ("model input", "feeds the model output"))
    check_invariants(model, x, groups, plans=4)


def test_convnext_atto_rms_residual_streams_are_prunable():
    """timm's ``convnext_atto_rms`` (RmsNorm2d in place of ConvNeXt's LayerNorm2d): its residual
    streams, unprunable under a LayerNorm, are prunable now; every group but the model's input and
    output is (before: 12 prunable groups, the streams blocked by "mean over the channel dim")."""
    model = randomise(timm.create_model("convnext_atto_rms", pretrained=False))
    x = torch.randn(1, 3, 32, 32)
    groups = trace(model, x)
    inner = [g for g in groups if g.reason not in ("model input", "feeds the model output")]
    assert len(inner) == 16 and all(g.prunable for g in inner), {g.reason for g in inner if not g.prunable}
    check_invariants(model, x, groups, plans=1)


@pytest.mark.parametrize("kind", ["RmsNorm2d", "nn.RMSNorm"])
def test_a_pruned_rms_model_prunes_again_exactly(kind):
    """Iterative pruning: a rescaled norm is an RMS norm over its C' channels."""
    model = rms_net(kind)
    x = torch.randn(2, 3, 6, 6)
    groups = trace(model, x)
    small = apply(model, groups, {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable})
    again = trace(small, x)
    assert sum(g.prunable for g in again) == sum(g.prunable for g in groups) == 3
    check_invariants(small, x, again, plans=3)


@pytest.mark.parametrize("kind", ["RmsNorm2d", "RmsNorm"])
def test_kl_score_is_the_kl_of_the_sliced_rms_model(kind):
    """The KL criterion's cuts (zeroing at every ``"in"`` member, the norm's input included) remove
    a channel as ``apply`` does."""
    model = rms_net(kind)
    with torch.no_grad():  # larger weights: logits far enough apart for a KL to compare
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    images = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    groups = trace(model, images[:1])
    scores = kl_scores(model, groups, images)
    assert_kl_scores_are_sliced_kl(model, groups, images, scores, rel=1e-4, abs=1e-7)


class Normed(nn.Module):
    """conv(3->8) -> ``norm`` (on NCHW, or on NHWC when ``last``) -> conv(8->4)."""

    def __init__(self, norm: nn.Module | None, last: bool = False, fn=None) -> None:
        super().__init__()
        self.a, self.norm, self.b, self.last, self.fn = nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 4, 1), last, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = y.permute(0, 2, 3, 1) if self.last else y
        y = self.fn(y) if self.fn is not None else self.norm(y)
        return self.b(y.permute(0, 3, 1, 2) if self.last else y)


@pytest.mark.parametrize("model, reason", [
    (Normed(LayerNorm2d(8)), "normalised across channels by layer_norm"),
    (Normed(nn.LayerNorm(8), last=True), "normalised across channels by LayerNorm at norm"),
    (Normed(SimpleNorm2d(8)), "var over the channel dim"),  # x / std(x): the mean is subtracted
    (Normed(RmsNorm2d(8, affine=False)), "normalised across channels by RmsNorm2d at norm, which has no weight"),
    (Normed(nn.RMSNorm(8, elementwise_affine=False), last=True), "normalised across channels by RMSNorm at norm, which has no weight"),
    (Normed(nn.RMSNorm((6, 8)), last=True), "normalised across channels by RMSNorm at norm (over the channels and 1 more dims)"),
    (Normed(None, last=True, fn=lambda y: F.rms_norm(y, (8,))), "normalised across channels by rms_norm"),
], ids=["LayerNorm2d", "LayerNorm", "SimpleNorm2d", "RmsNorm2d_no_weight", "RMSNorm_no_weight", "RMSNorm_two_dims", "F.rms_norm"])
def test_norms_that_cannot_be_sliced_exactly_keep_their_reason(model, reason):
    groups = {g.name: g for g in trace(model, torch.randn(1, 3, 8, 8))}
    assert not groups["a"].prunable and groups["a"].reason.startswith(reason), groups["a"].reason


def test_rms_norms_over_other_dims_pass_the_channels_through():
    """An RMS norm over W only (channels on dim 1) normalises each channel on its own."""
    for model in (Normed(None, fn=lambda y: F.rms_norm(y, (6,))), Normed(nn.RMSNorm(6))):
        model = randomise(model)
        x = torch.randn(2, 3, 8, 8)
        groups = trace(model, x)
        assert {g.name: g.prunable for g in groups} == {"x": False, "a": True, "b": False}
        check_invariants(model, x, groups, plans=2)
