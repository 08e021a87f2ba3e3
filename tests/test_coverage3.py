"""Issue 23, coverage round two (the second half): layers that were needlessly unprunable, and
dense-prediction models.

1. weight-standardised convs (timm StdConv2d / StdConv2dSame / ScaledStdConv2d / ScaledStdConv2dSame):
   output channels sliced as a conv's; removing input channels folds the standardisation into a plain
   conv (``Conv2dSame`` for dynamic "same" padding), exact, and a reload gives the same model;
2. ConvNeXt-V2's global response norm: its hidden channels are prunable (zeroed at its input, its
   mean over channels kept over the original count by rescaling weight and eps);
3. fixed per-channel filters (timm BlurPool2d) pass channels through, the filter buffer sliced;
   GCNet's matmul over H*W and CoordAttention's split along H / W do not mix channels;
4. ``out[:, :oup]`` after a cat (GhostNet's GhostModule with odd ``oup``): a constant channel range;
5. torchvision segmentation models (dict outputs) and detector backbones with an FPN.

Every pruned model is checked with the engine's invariants (masked == sliced, plan_cost == count).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_faults import assert_kl_scores_are_sliced_kl, check_invariants, randomise, relative_error
from torch import nn

import curlprune
from curlprune.cost.analysis import trace
from curlprune.criteria import compute_scores
from curlprune.criteria.kl import kl_scores
from curlprune.errors import CurlpruneError
from curlprune.graph.layers import rule_for
from curlprune.store import checkpoint
from curlprune.surgery.surgery import apply, mask

timm = pytest.importorskip("timm", reason="timm (optional extra) is not installed")
from timm.layers import BlurPool2d, Conv2dSame, GlobalContext, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402
from timm.layers.coord_attn import CoordAttn  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402
from timm.models.convnext import ConvNeXt  # noqa: E402


def by_name(groups):
    return {g.name: g for g in groups}


# ----------------------------------------------------------------------------------------------
# 1. weight-standardised convs


class StdConvNet(nn.Module):
    """StdConv2d(3->16) -> BN -> ReLU -> depthwise StdConv2dSame(16) -> Conv2d(16->12, 1x1)
    -> ScaledStdConv2d(12->10) -> StdConv2dSame(10->10, stride 2: dynamic "same" padding)
    -> ScaledStdConv2dSame(10->8, stride 2) -> mean -> Linear(8->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = StdConv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = StdConv2dSame(16, 16, 3, groups=16)
        self.b = nn.Conv2d(16, 12, 1)
        self.c = ScaledStdConv2d(12, 10, 3, padding=1)
        self.d = StdConv2dSame(10, 10, 3, stride=2)
        self.e = ScaledStdConv2dSame(10, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(F.relu(self.bn(self.a(x))))
        y = F.relu(self.d(F.relu(self.c(F.relu(self.b(y))))))
        return self.fc(F.relu(self.e(y)).mean((2, 3)))


def _std_conv_net(seed: int = 1) -> StdConvNet:
    model = randomise(StdConvNet(), seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # gain away from its init of ones, so a gain left unsliced or unfolded is caught
        for conv in (model.c, model.e):
            conv.gain.mul_(0.5 + torch.rand(conv.gain.shape, generator=g))
    return model


def test_std_conv_inputs_and_outputs_are_pruned_exactly():
    model = _std_conv_net()
    x = torch.randn(2, 3, 9, 9)  # odd size: the stride-2 "same" convs pad unevenly
    groups = by_name(trace(model, x))
    assert model.d.same_pad and model.e.same_pad
    for name in ("a", "b", "c", "d", "e"):  # every group a standardised conv reads is prunable now
        assert groups[name].prunable, groups[name].reason
    check_invariants(model, x, list(groups.values()), plans=4)
    # outputs only: still weight-standardised, gain sliced; inputs removed: a plain conv, gain folded
    small = apply(model, list(groups.values()), {"a": [i for i in range(16) if i not in (0, 3, 7)], "c": [0, *range(3, 10)]})
    assert type(small.c) is ScaledStdConv2d and small.c.gain.shape == (8, 1, 1, 1) and small.c.weight.shape == (8, 12, 3, 3)
    assert type(small.dw) is StdConv2dSame and small.dw.weight.shape == (13, 1, 3, 3) and small.dw.groups == 13
    assert type(small.d) is Conv2dSame and small.d.weight.shape == (10, 8, 3, 3)  # dynamic padding kept
    assert type(small.b) is nn.Conv2d and small(x).shape == (2, 4)
    small = apply(model, list(groups.values()), {"b": list(range(1, 12)), "d": [1, 4, 5, 9]})
    assert type(small.c) is nn.Conv2d and not hasattr(small.c, "gain") and small.c.weight.shape == (10, 11, 3, 3)
    assert type(small.e) is Conv2dSame and not hasattr(small.e, "gain") and small.e.weight.shape == (8, 4, 3, 3)
    for size in (9, 12, 15):  # any input size: the folded "same" convs pad as the standardised ones did
        z = torch.randn(1, 3, size, size)
        with torch.no_grad(), mask(model, list(groups.values()), {"b": list(range(1, 12)), "d": [1, 4, 5, 9]}):
            masked = model(z)
        assert relative_error(small(z).detach(), masked) < 1e-5


def test_l1_scores_a_std_conv_by_the_filters_it_convolves_with():
    """l1 reads a weight-standardised conv's standardised filters (times gain * scale when scaled), the
    filters its forward convolves with: scaling a raw filter, which leaves the output as it was, leaves
    its score as it was; a ScaledStdConv2d's gain scales its channel's score."""
    model = _std_conv_net()
    x = torch.randn(2, 3, 9, 9)
    groups = trace(model, x)
    before = compute_scores("l1", model, groups)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.a.weight[0].mul_(50.0)   # a stream channel: producers a and the depthwise dw
        scaled.dw.weight[5].mul_(20.0)
        scaled.c.weight[1].mul_(50.0)   # ScaledStdConv2d
        assert relative_error(scaled(x), model(x)) < 1e-4
        scaled.c.gain[2].mul_(3.0)
    after = compute_scores("l1", scaled, groups)
    for name in ("a", "b", "d"):
        torch.testing.assert_close(torch.from_numpy(after[name]), torch.from_numpy(before[name]), rtol=1e-3, atol=0)
    torch.testing.assert_close(after["c"][[0, 1, *range(3, 10)]], before["c"][[0, 1, *range(3, 10)]], rtol=1e-3, atol=0)
    assert abs(after["c"][2] / before["c"][2] - 3.0) < 1e-3


def test_the_folded_weight_is_the_standardised_full_weight_sliced():
    """What the folded conv holds, computed here from the definition (Qiao et al. 2019; Brock et al.
    2021): per output channel ``(W - mean) / sqrt(var + eps) * gain * gamma / sqrt(fan_in)`` over ALL
    its inputs, then the kept inputs taken."""
    model = _std_conv_net()
    x = torch.randn(1, 3, 8, 8)
    groups = trace(model, x)
    keep = [0, 2, 3, 5, 6, 7, 11]
    small = apply(model, groups, {"b": keep})
    w = model.c.weight.detach().double()
    mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), unbiased=False, keepdim=True)
    fan_in = w[0].numel()
    expected = (w - mean) / torch.sqrt(var + model.c.eps) * model.c.gain.detach().double() * fan_in**-0.5
    assert torch.allclose(small.c.weight.double(), expected[:, keep], rtol=1e-5, atol=1e-6)
    assert small.c.weight.mean((1, 2, 3)).abs().max() > 1e-3  # not standardised again over the kept inputs


def test_a_pruned_std_conv_model_reloads_to_the_same_outputs(tmp_path):
    model = _std_conv_net()
    x = torch.randn(2, 3, 9, 9)
    groups = trace(model, x)
    plan = {"a": [1, 2, 4, 5, 8, 9, 10, 11, 12, 15], "b": [0, 3, 4, 7, 8, 10], "c": [0, 1, 5, 6, 9], "d": [2, 3, 7]}
    small = curlprune.apply(model, groups, plan)
    assert type(small.c) is nn.Conv2d and type(small.d) is Conv2dSame and type(small.e) is Conv2dSame
    path = tmp_path / "std.safetensors"
    checkpoint.save(path, StdConvNet, plan, small.state_dict(), input_shape=[2, 3, 9, 9])
    loaded = curlprune.load(path, model=_std_conv_net(seed=5))  # other weights: all must come from the file
    assert type(loaded.c) is nn.Conv2d and type(loaded.e) is Conv2dSame
    with torch.no_grad():
        for z in (x, torch.randn(1, 3, 13, 13)):
            assert torch.equal(loaded(z), small(z))


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "nf_resnet26"])
def test_bit_and_nfnet_groups_are_prunable(name):
    """BiT (StdConv2d everywhere) and NF-ResNet (ScaledStdConv2d): every group but the model's input
    and output is read by a weight-standardised conv; each is prunable, exactly."""
    model = randomise(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    inner = [g for g in groups if g.reason not in ("model input", "feeds the model output")]
    assert inner and all(g.prunable for g in inner), {g.reason for g in inner if not g.prunable}
    check_invariants(model, x, groups, plans=1)


# ----------------------------------------------------------------------------------------------
# 2. global response norm


def small_convnextv2(conv_mlp: bool = True) -> nn.Module:
    """A one-block-per-stage ConvNeXt-V2 (timm's class, GRN in every MLP): 1x1 convs and a channels-first GRN
    (``conv_mlp``, as convnextv2_atto..nano) or linears and a channels-last GRN (tiny and up)."""
    return ConvNeXt(num_classes=4, depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), use_grn=True, ls_init_value=None, conv_mlp=conv_mlp)


@pytest.mark.parametrize("conv_mlp", [True, False], ids=["channels_first", "channels_last"])
def test_grn_hidden_channels_are_pruned_exactly_and_reload(conv_mlp, tmp_path):
    model = randomise(small_convnextv2(conv_mlp))  # GRN's weight and bias away from their zeros
    x = torch.randn(2, 3, 32, 32)
    groups = trace(model, x)
    hidden = [g for g in groups if g.name.endswith("mlp.fc1")]
    assert len(hidden) == 4 and all(g.prunable for g in hidden), [g.reason for g in hidden]
    assert all(any(m.module.endswith("mlp.grn") and m.role == "in" for m in g.members) for g in hidden)
    stream = [g for g in groups if not g.prunable and g.reason not in ("model input", "feeds the model output")]
    assert stream and all("normalised across channels by layer_norm" in g.reason for g in stream)  # the residual stream
    check_invariants(model, x, groups, plans=3)
    plan = {hidden[0].name: [0, 5, 9, 17, 30], hidden[2].name: list(range(0, 64, 3))}
    small = curlprune.apply(model, groups, plan)
    grn = small.get_submodule(hidden[0].name.replace("fc1", "grn"))
    assert grn.weight.shape == (5,) and grn.eps == pytest.approx(1e-6 * 32 / 5)
    path = tmp_path / "grn.safetensors"
    checkpoint.save(path, {"name": "test_coverage3:small_convnextv2", "kwargs": {"conv_mlp": conv_mlp}}, plan,
                    small.state_dict(), input_shape=[2, 3, 32, 32])
    loaded = curlprune.load(path, model=randomise(small_convnextv2(conv_mlp), seed=7))
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_a_sliced_grn_averages_over_the_original_channel_count():
    """Masked (channel 2 zeroed at the input) == sliced; the plainly sliced GRN (weight and bias of
    the kept channels, its mean over C - 1) is not, so the rule's rescaling is what makes it exact."""
    grn = GlobalResponseNorm(6, channels_last=False)
    with torch.no_grad():
        grn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        grn.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = torch.randn(2, 6, 4, 4)
    keep = torch.tensor([0, 1, 3, 4, 5])
    masked = grn(x * (torch.arange(6) != 2).float().view(1, -1, 1, 1))[:, keep]
    plain = GlobalResponseNorm(5, channels_last=False)
    with torch.no_grad():
        plain.weight.copy_(grn.weight[keep])
        plain.bias.copy_(grn.bias[keep])
    assert (plain(x[:, keep]) - masked).abs().max() > 1e-3
    sliced = copy.deepcopy(grn)
    rule_for(sliced).slice(sliced, {"channel": [2], "in": [2]})
    assert relative_error(sliced(x[:, keep]).detach(), masked.detach()) < 1e-6


def test_convnextv2_atto_mlp_channels_are_prunable():
    model = randomise(timm.create_model("convnextv2_atto", pretrained=False))
    x = torch.randn(1, 3, 64, 64)
    groups = trace(model, x)
    hidden = [g for g in groups if g.name.endswith("mlp.fc1")]
    assert len(hidden) == 12 and all(g.prunable for g in hidden)  # the MLP hidden channels of the 2+2+6+2 blocks
    assert sum(g.prunable for g in groups) == len(hidden)  # the LayerNorm2d residual streams stay whole
    check_invariants(model, x, groups, plans=1)


@pytest.mark.parametrize("build, size", [(_std_conv_net, 9), (lambda: randomise(small_convnextv2(True)), 32),
                                         (lambda: randomise(small_convnextv2(False)), 32)], ids=["std_conv", "grn_first", "grn_last"])
def test_a_pruned_model_prunes_again_exactly(build, size):
    """Iterative pruning: folded convs are plain convs, a rescaled GRN (weight and eps times C/C')
    is a GRN over its C' channels, so the pruned model traces and prunes exactly again."""
    model = build()
    x = torch.randn(2, 3, size, size)
    groups = trace(model, x)
    small = apply(model, groups, {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable})
    again = trace(small, x)
    assert sum(g.prunable for g in again) == sum(g.prunable for g in groups)
    check_invariants(small, x, again, plans=3)


def _sharpened_convnextv2(conv_mlp: bool) -> nn.Module:
    model = randomise(small_convnextv2(conv_mlp))
    with torch.no_grad():  # timm's init (std 0.02) leaves the logits nearly constant: no KL to compare
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


@pytest.mark.parametrize("build, size", [(_std_conv_net, 9), (lambda: _sharpened_convnextv2(True), 32),
                                         (lambda: _sharpened_convnextv2(False), 32)], ids=["std_conv", "grn_first", "grn_last"])
def test_kl_score_is_the_kl_of_the_sliced_model(build, size):
    """The KL criterion's cuts (zeroing at every ``"in"`` member, a GRN's input included) remove a
    channel as ``apply`` does: folded standardised convs and rescaled GRNs score what they prune."""
    model = build()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    groups = trace(model, images[:1])
    scores = kl_scores(model, groups, images)
    assert_kl_scores_are_sliced_kl(model, groups, images, scores, rel=1e-4, abs=1e-7)


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
