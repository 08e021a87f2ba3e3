"""Issue 23, coverage round two (the second half): layers that were needlessly unprunable, and
dense-prediction models.

1. weight-standardised convs (timm StdConv2d / StdConv2dSame / ScaledStdConv2d): output channels
   prunable, input channels kept whole (exactness fails there; the math is checked below);
2. ConvNeXt-V2's global response norm: its normaliser is a mean over channels, so its channels
   stay whole, with that reason (checked numerically);
3. fixed per-channel filters (timm BlurPool2d) pass channels through, the filter buffer sliced;
   GCNet's matmul over H*W and CoordAttention's split along H / W do not mix channels;
4. ``out[:, :oup]`` after a cat (GhostNet's GhostModule with odd ``oup``): a constant channel range;
5. torchvision segmentation models (dict outputs) and detector backbones with an FPN.

Every pruned model is checked with the engine's invariants (masked == sliced, plan_cost == count).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_faults import check_invariants, randomise
from torch import nn

from curlprune.cost.analysis import trace
from curlprune.criteria import compute_scores
from curlprune.errors import CurlpruneError
from curlprune.surgery.surgery import apply

timm = pytest.importorskip("timm", reason="timm (optional extra) is not installed")
from timm.layers import BlurPool2d, GlobalContext, ScaledStdConv2d, StdConv2d, StdConv2dSame  # noqa: E402
from timm.layers.coord_attn import CoordAttn  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402


def by_name(groups):
    return {g.name: g for g in groups}


# ----------------------------------------------------------------------------------------------
# 1. weight-standardised convs


class StdConvNet(nn.Module):
    """StdConv2d(3->16) -> BN -> ReLU -> depthwise StdConv2dSame(16) -> Conv2d(16->12, 1x1)
    -> ScaledStdConv2d(12->10) -> mean -> Linear(10->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = StdConv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = StdConv2dSame(16, 16, 3, groups=16)
        self.b = nn.Conv2d(16, 12, 1)
        self.c = ScaledStdConv2d(12, 10, 3, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(F.relu(self.bn(self.a(x))))
        return self.fc(F.relu(self.c(F.relu(self.b(y)))).mean((2, 3)))


def _std_conv_net() -> StdConvNet:
    model = randomise(StdConvNet())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # gain away from its init of ones, so a gain left unsliced is caught
        model.c.gain.mul_(0.5 + torch.rand(model.c.gain.shape, generator=g))
    return model


def test_std_conv_outputs_are_pruned_and_its_inputs_kept_whole():
    model = _std_conv_net()
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(trace(model, x))
    assert groups["a"].prunable, groups["a"].reason  # read by a depthwise StdConv2dSame and a plain conv
    assert groups["c"].prunable, groups["c"].reason  # read by the linear head
    assert not groups["b"].prunable
    assert groups["b"].reason.startswith("input channels of weight-standardised conv c (ScaledStdConv2d)")
    check_invariants(model, x, list(groups.values()), plans=4)
    small = apply(model, list(groups.values()), {"a": [i for i in range(16) if i not in (0, 3, 7)], "c": [0, *range(3, 10)]})
    assert small.c.gain.shape == (8, 1, 1, 1) and small.c.weight.shape == (8, 12, 3, 3)
    assert small.dw.weight.shape == (13, 1, 3, 3) and small.dw.groups == 13
    assert isinstance(small.c, ScaledStdConv2d) and small(x).shape == (2, 4)


def test_removing_an_input_channel_of_a_std_conv_cannot_be_exact():
    """The reason is true: the standardised kept weights of the full conv do not have mean 0 over
    the kept inputs, while any standardised conv's weights do; so no sliced StdConv2d equals it."""
    conv = StdConv2d(6, 4, 3, padding=1)
    x = torch.randn(1, 6, 5, 5)
    keep = torch.tensor([0, 1, 2, 4, 5])
    masked = conv(x * (torch.arange(6) != 3).float().view(1, -1, 1, 1))
    sliced = StdConv2d(5, 4, 3, padding=1)
    with torch.no_grad():
        sliced.weight.copy_(conv.weight[:, keep])
    assert (sliced(x[:, keep]) - masked).abs().max() > 1e-3
    full = F.batch_norm(conv.weight.reshape(1, 4, -1), None, None, training=True, eps=conv.eps).reshape_as(conv.weight)
    assert full[:, keep].mean((1, 2, 3)).abs().max() > 1e-3  # what a sliced conv would have to produce


def test_std_conv_input_channels_are_refused_by_apply():
    model = _std_conv_net()
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    assert not by_name(groups)["b"].prunable
    with pytest.raises(CurlpruneError):
        apply(model, groups, {"b": list(range(1, 12))})


def test_resnetv2_bit_traces_with_the_true_reason():
    """BiT: every group is read by a StdConv2d (the only prunable side is their outputs, and each
    output is read by another StdConv2d), so nothing is prunable, and each says why."""
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    inner = [g for g in groups if g.reason not in ("model input", "feeds the model output")]
    assert inner and all("weight-standardised conv" in g.reason for g in inner), {g.reason for g in inner}
    check_invariants(model, x, groups, plans=1)


# ----------------------------------------------------------------------------------------------
# 2. global response norm


def test_grn_channels_stay_whole_because_its_normaliser_is_a_mean_over_channels():
    model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    hidden = [g for g in groups if g.name.endswith("mlp.fc1")]
    assert len(hidden) == 12  # the MLP hidden channels of each of the 2+2+6+2 blocks
    assert all("mean over the channel dim" in g.reason and "GlobalResponseNorm" in g.reason for g in hidden)
    assert not any("unsupported op norm" in g.reason for g in groups)  # the L2 norm over H, W passes channels
    check_invariants(model, x, groups, plans=1)


def test_grn_of_the_kept_channels_differs_from_the_masked_grn():
    """The math behind the reason: with channel 2 zeroed the mean of the L2 norms is over C channels,
    sliced it is over C - 1, so the kept channels' outputs change (no per-channel parameter fixes
    the eps term exactly)."""
    grn = GlobalResponseNorm(6, channels_last=False)
    with torch.no_grad():
        grn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        grn.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = torch.randn(2, 6, 4, 4)
    keep = torch.tensor([0, 1, 3, 4, 5])
    masked = grn(x * (torch.arange(6) != 2).float().view(1, -1, 1, 1))[:, keep]
    sliced = GlobalResponseNorm(5, channels_last=False)
    with torch.no_grad():
        sliced.weight.copy_(grn.weight[keep])
        sliced.bias.copy_(grn.bias[keep])
    assert (sliced(x[:, keep]) - masked).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# 3. fixed per-channel filters


class Blurred(nn.Module):
    """conv(3->16) -> BN -> ReLU -> BlurPool2d(16) -> conv(16->12) -> BlurPool2d(None) -> conv(12->8)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.blur = BlurPool2d(16, filt_size=3, stride=2)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.blur2 = BlurPool2d(None, filt_size=5, stride=2)
        self.c = nn.Conv2d(12, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.blur2(F.relu(self.b(self.blur(F.relu(self.bn(self.a(x))))))))


def test_blur_pool_passes_channels_through_and_its_filter_is_sliced():
    model = randomise(Blurred())
    with torch.no_grad():  # a different filter per channel, so a filter sliced wrongly is caught
        model.blur.filt.mul_(torch.linspace(0.5, 1.5, 16).view(-1, 1, 1, 1))
    x = torch.randn(2, 3, 16, 16)
    groups = by_name(trace(model, x))
    assert groups["a"].prunable and groups["b"].prunable, [g.reason for g in groups.values()]
    check_invariants(model, x, list(groups.values()), plans=4)
    small = apply(model, list(groups.values()), {"a": [i for i in range(16) if i not in (2, 5)], "b": list(range(1, 12))})
    assert small.blur.filt.shape == (14, 1, 3, 3) and small.blur.channels == 14
    assert small.blur2.filt.shape == (1, 1, 5, 5)


def test_resnetblur_has_prunable_groups():
    model = randomise(timm.create_model("resnetblur18", pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    assert sum(g.prunable for g in groups) >= 8, [g.reason for g in groups if not g.prunable]
    check_invariants(model, x, groups, plans=1)


# ----------------------------------------------------------------------------------------------
# 4. a channel slice after a cat


class Ghost(nn.Module):
    """GhostNet's GhostModule with an odd ``oup`` (7 of 8 channels of the cat kept), in a small net."""

    def __init__(self, oup: int = 7) -> None:
        super().__init__()
        self.oup = oup
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.primary = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(oup, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(F.relu(self.stem(x)))
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return self.head(out[:, : self.oup, :, :]).mean((2, 3))


def test_slice_after_cat_of_a_ghost_module_with_odd_oup():
    """The cat holds primary channels 0..3 then their cheap copies 0..3; ``[:7]`` drops the copy of 3."""
    model = randomise(Ghost())
    x = torch.randn(2, 3, 8, 8)
    groups = by_name(trace(model, x))
    assert groups["stem"].prunable and groups["primary.0"].prunable, [g.reason for g in groups.values()]
    check_invariants(model, x, list(groups.values()), plans=4)
    small = apply(model, list(groups.values()), {"primary.0": [0, 2, 3]})  # a primary channel inside the range
    assert small.head.weight.shape == (5, 5, 1, 1) and small(x).shape == (2, 5)
    small = apply(model, list(groups.values()), {"primary.0": [0, 1, 2]})  # channel 3: one inside, one after
    assert small.head.weight.shape == (5, 6, 1, 1)


def test_channel_ranges_with_a_start_and_bounds_computed_from_a_size():
    """``y[:, 2:10]`` with constants is followed; ``y[:, : y.shape[1] // 2]`` is not (its bound is a value)."""

    class Ranges(nn.Module):
        def __init__(self, computed: bool) -> None:
            super().__init__()
            self.computed = computed
            self.a = nn.Conv2d(3, 12, 1)
            self.b = nn.Conv2d(8 if not computed else 6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x))
            return self.b(y[:, : y.shape[1] // 2] if self.computed else y[:, 2:10])

    x = torch.randn(2, 3, 5, 5)
    model = randomise(Ranges(False))
    groups = by_name(trace(model, x))
    assert groups["a"].prunable
    check_invariants(model, x, list(groups.values()), plans=4)
    model = randomise(Ranges(True))
    groups = by_name(trace(model, x))
    assert not groups["a"].prunable


def test_ghostnet_100():
    model = randomise(timm.create_model("ghostnet_100", pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    assert sum(g.prunable for g in groups) >= 30
    check_invariants(model, x, groups, plans=1)


# ----------------------------------------------------------------------------------------------
# 5. dense prediction: dict outputs (segmentation) and detector backbones with an FPN


def _segmentation(name):
    return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=5)


def _backbone(name):
    return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None).backbone


DENSE = {
    "lraspp_mobilenet_v3_large": lambda: _segmentation("lraspp_mobilenet_v3_large"),
    "deeplabv3_mobilenet_v3_large": lambda: _segmentation("deeplabv3_mobilenet_v3_large"),
    "fasterrcnn_mobilenet_v3_large_fpn.backbone": lambda: _backbone("fasterrcnn_mobilenet_v3_large_fpn"),
    "ssdlite320_mobilenet_v3_large.backbone": lambda: _backbone("ssdlite320_mobilenet_v3_large"),
}
SLOW_DENSE = {
    "fcn_resnet50": lambda: _segmentation("fcn_resnet50"),
    "retinanet_resnet50_fpn.backbone": lambda: _backbone("retinanet_resnet50_fpn"),
    "fcos_resnet50_fpn.backbone": lambda: _backbone("fcos_resnet50_fpn"),
}


def _check_dense(name, build):
    torch.manual_seed(0)
    model = randomise(build())
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    assert sum(g.prunable for g in groups) >= 10, [g.reason for g in groups if not g.prunable]
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, dict) and len(out) >= 1 or isinstance(out, (tuple, list))  # several outputs
    check_invariants(model, x, groups, plans=2, seed=name)


@pytest.mark.parametrize("name", list(DENSE))
def test_dense_prediction_models_are_pruned_exactly(name):
    _check_dense(name, DENSE[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_DENSE))
def test_dense_prediction_resnet50_models_are_pruned_exactly(name):
    _check_dense(name, SLOW_DENSE[name])


@pytest.mark.parametrize("criterion", ["kl", "kl-approx"])
def test_kl_on_a_segmentation_model_is_refused_naming_the_weight_criteria(criterion):
    model = randomise(_segmentation("lraspp_mobilenet_v3_large"))
    x = torch.randn(2, 3, 64, 64)
    groups = trace(model, x)
    with pytest.raises(CurlpruneError) as err:
        compute_scores(criterion, model, groups, images=x)
    message = str(err.value)
    assert "\n" not in message and "returns a dict of 1 outputs" in message
    assert "l1" in message and "bn" in message and "random" in message and "kl-approx" not in message.split(": ")[-1]
    scores = compute_scores("l1", model, groups, images=x)  # a weight criterion works there
    assert set(scores) == {g.name for g in groups if g.prunable}


# ----------------------------------------------------------------------------------------------
# 3b. ops that contract or split only spatial dims


class WithAttention(nn.Module):
    """conv(3->16) -> BN -> ReLU -> attention block (GCNet's GlobalContext or CoordAttn) -> conv(16->8)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block = block
        self.b = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.block(F.relu(self.bn(self.a(x)))))


def _attention_blocks():
    return {
        "global_context": GlobalContext(16, use_attn=True, fuse_add=True, fuse_scale=True),
        "coord_attn": CoordAttn(16),
    }


@pytest.mark.parametrize("block", ["global_context", "coord_attn"])
def test_spatial_only_attention_passes_channels_through(block):
    model = randomise(WithAttention(_attention_blocks()[block]))
    x = torch.randn(2, 3, 8, 6)  # H != W: CoordAttn's split along H / W
    groups = by_name(trace(model, x))
    assert groups["a"].prunable, groups["a"].reason
    check_invariants(model, x, list(groups.values()), plans=4)


def test_gcresnet33ts():
    model = randomise(timm.create_model("gcresnet33ts", pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    assert sum(g.prunable for g in groups) >= 25
    assert not any("matmul" in g.reason for g in groups)
    check_invariants(model, x, groups, plans=1)
