"""The invariant that holds curlprune together: the masked model computes what the sliced model computes.

For every supported architecture and seeded random plans (including keeping a single channel/unit
of some groups, and keeping everything), ``apply(model, groups, plan)(x)`` equals the output of
``model`` under ``mask(model, groups, plan)``, with BN statistics and affine parameters randomised
first so that a wrongly masked channel cannot hide behind BN's init (gamma 1, beta 0, mean 0).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.utils import _pytree as pytree
import torchvision
from torch import nn

from curlprune.channels import Plan
from curlprune.cost.analysis import trace
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.surgery.surgery import apply, mask, random_plan

MODELS = {
    "cifar:resnet20": (2, 3, 32, 32),
    "cifar:resnet56": (2, 3, 32, 32),
    "resnet18": (2, 3, 32, 32),
    "resnet50": (2, 3, 32, 32),
    "resnext50_32x4d": (2, 3, 32, 32),
    "wide_resnet50_2": (1, 3, 32, 32),
    "mobilenet_v2": (2, 3, 32, 32),
    "mobilenet_v3_small": (2, 3, 32, 32),
    "efficientnet_b0": (2, 3, 32, 32),
    "regnet_x_400mf": (2, 3, 32, 32),
    "densenet121": (2, 3, 32, 32),
    "vgg11_bn": (2, 3, 32, 32),
    "convnext_tiny": (2, 3, 32, 32),
    # families that needed a fix of issue 8 (timm's BatchNormAct2d / Linear / DropPath as leaves;
    # the fault models of tests/test_faults.py cover the other kinds)
    "timm:test_efficientnet": (2, 3, 32, 32),
    # token layouts [N, H, W, C] and fx-wrapped attention (cost measured, MLP hidden groups prunable)
    "swin_t": (1, 3, 32, 32),
}


def make_model(name: str, seed: int = 0) -> nn.Module:
    """The architecture with random weights and randomised norm statistics/affine/layer scales."""
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = build(name) if name.startswith(("cifar:", "timm:")) else getattr(torchvision.models, name)(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
                module.weight.copy_(0.5 + torch.rand(n, generator=g))
                module.bias.copy_(0.5 * torch.randn(n, generator=g))
        for pname, p in model.named_parameters():
            if pname.endswith("layer_scale"):  # ConvNeXt: 1e-6 at init would hide its blocks
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif pname.endswith("bias") and not pname.endswith("bn.bias"):  # zero-init biases hide nothing
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def relative_error(a, b) -> float:
    """Largest relative difference over the tensors of two outputs (a tensor, or a dict/tuple of them:
    segmentation models, detector backbones with an FPN)."""
    left, right = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert len(left) == len(right) and all(p.shape == q.shape for p, q in zip(left, right))
    return max(float((p - q).abs().max() / q.abs().max()) for p, q in zip(left, right))


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_equals_mask(name):
    model = make_model(name)
    x = torch.randn(MODELS[name], generator=torch.Generator().manual_seed(2))
    groups = trace(model, x)
    assert sum(g.prunable for g in groups) >= 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(name)
    with torch.no_grad():
        full = model(x)
        assert torch.isfinite(full).all()
        assert relative_error(apply(model, groups, {})(x), full) < 1e-5
        for share in (0.0, 0.3):
            plan = random_plan(groups, rng, single_unit_share=share)
            with mask(model, groups, plan):
                masked = model(x)
            sliced = apply(model, groups, plan)(x)
            assert sliced.shape == full.shape
            kept = {k: len(v) for k, v in plan.items()}
            assert relative_error(sliced, masked) < 1e-4, f"kept channels per group: {kept}"
            assert relative_error(masked, full) > 1e-3  # the plan really changed the function
        assert relative_error(model(x), full) == 0.0  # hooks are gone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def resnet20_plan() -> Plan:
    return {
        "conv1": list(range(8)),
        "layer1.0.conv1": [1, 2, 3],
        "layer2.0.conv2": [0, 9],  # one channel of each zero-pad region of stage 2
        "layer3.0.conv2": list(range(0, 32, 2)),
        "layer3.2.conv1": [5],
    }


def test_apply_resnet20_shapes_and_original_untouched():
    model = make_model("cifar:resnet20")
    x = torch.randn(2, 3, 32, 32)
    groups = trace(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = apply(model, groups, resnet20_plan())
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    stream2 = 8 + 2  # 8 stage-1 channels + 2 of stage 2's own
    stream3 = stream2 + 16
    assert shapes["conv1.weight"] == (8, 3, 3, 3)
    assert shapes["bn1.running_mean"] == (8,)
    assert shapes["layer1.0.conv1.weight"] == (3, 8, 3, 3)
    assert shapes["layer1.0.conv2.weight"] == (8, 3, 3, 3)
    assert shapes["layer1.1.conv1.weight"] == (16, 8, 3, 3)
    assert shapes["layer2.0.conv1.weight"] == (32, 8, 3, 3)
    assert shapes["layer2.0.conv2.weight"] == (stream2, 32, 3, 3)
    assert shapes["layer3.0.conv2.weight"] == (stream3, 64, 3, 3)
    assert shapes["layer3.2.conv1.weight"] == (1, stream3, 3, 3)
    assert shapes["layer3.2.bn1.weight"] == (1,)
    assert shapes["linear.weight"] == (10, stream3)
    assert set(shapes) == set(before)  # same names as the original, so checkpoints line up
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.conv1.out_channels == 16 and model.layer3[0].downsample.pad == 16
    with torch.no_grad():
        with mask(model, groups, resnet20_plan()):
            masked = model(x)
        assert relative_error(small(x), masked) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mask_removes_hooks_on_exception():
    model = make_model("cifar:resnet20")
    groups = trace(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="boom"):
        with mask(model, groups, resnet20_plan()):
            assert any(m._forward_pre_hooks for m in model.modules())
            raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in model.modules())
    with pytest.raises(CurlpruneError, match="unknown group"):
        with mask(model, groups, {"nope": [0]}):
            pass
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_applied_model_trains_switches_modes_and_copies():
    model = make_model("cifar:resnet20").train()
    groups = trace(model, torch.randn(1, 3, 32, 32))
    small = apply(model, groups, resnet20_plan())
    assert isinstance(small, torch.fx.GraphModule) and small.training and small.layer1[0].bn1.training
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    stats = small.bn1.running_mean.clone()
    weight = small.conv1.weight.clone()
    optim = torch.optim.SGD(small.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(small(x), y)
    loss.backward()
    optim.step()
    assert not torch.equal(small.bn1.running_mean, stats)  # train-mode BN updates its statistics
    assert not torch.equal(small.conv1.weight, weight)
    small.eval()
    twin = copy.deepcopy(small)
    with torch.no_grad():
        assert torch.equal(twin(x), small(x))  # eval mode: deterministic, and the copy is faithful
    assert not small.bn1.training


def test_apply_keeps_frozen_submodule_modes():
    model = make_model("cifar:resnet20").train()
    model.layer2.eval()
    groups = trace(model, torch.randn(1, 3, 32, 32))
    small = apply(model, groups, resnet20_plan())
    assert small.training and small.layer1[0].bn1.training and not small.layer2[0].bn1.training


class Zoo(nn.Module):
    """Many traced paths in one small net: PReLU, affine InstanceNorm, a conv used twice, a get_attr
    scale, depthwise and grouped (units of 4) convs, a cat along a spatial dim, channels-last
    linears, a mean over a spatial dim and a dynamic reshape into the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.prelu = nn.PReLU(12)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.shared = nn.Conv2d(12, 12, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(12, 1, 1) + 0.5)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv2d(12, 12, 1, groups=3)
        self.expand = nn.Conv2d(12, 8, 1)
        self.tokens = nn.Linear(8, 16)
        self.back = nn.Linear(16, 8)
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x):
        a = self.inorm(self.prelu(self.stem(x)))
        c = self.shared(torch.relu(self.shared(a)))
        s = nn.functional.max_pool2d(a + c * self.scale, 2)
        s = self.grouped(self.dw(s)) + s
        t = self.expand(s)
        t = torch.cat([t, 2 * t], dim=2)
        u = self.back(nn.functional.gelu(self.tokens(t.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        v = u.contiguous().mean(2)
        return self.head(v.reshape(v.size(0), -1))


def test_zoo_of_traced_ops():
    from curlprune.cost.cost import count
    from curlprune.cost.analysis import plan_cost

    torch.manual_seed(0)
    model = Zoo().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = trace(model, x)
    g = {grp.name: grp for grp in groups}
    stream = g["stem"]
    assert stream.width == 12 and stream.unit == 4 and stream.kind == "outside" and stream.prunable
    assert {("shared", "in"), ("shared", "out"), ("scale", "param"), ("dw", "out"), ("grouped", "out"),
            ("prelu", "channel"), ("inorm", "channel"), ("expand", "in")} <= {(m.module, m.role) for m in stream.members}
    assert [m.index[1] for m in g["back"].members if m.module == "head"] == [(4, 5, 6, 7)]
    assert [grp.name for grp in groups if grp.prunable] == ["stem", "expand", "tokens", "back"]
    rng = random.Random(0)
    for share in (0.0, 0.5, 1.0):
        plan = random_plan(groups, rng, single_unit_share=share)
        with torch.no_grad():
            with mask(model, groups, plan):
                masked = model(x)
            small = apply(model, groups, plan)
            assert relative_error(small(x), masked) < 1e-4
        assert plan_cost(model, x, groups, plan) == count(small, x)
    assert tuple(small.scale.shape) == (4, 1, 1) and small.grouped.groups == 1 and small.dw.groups == 4
