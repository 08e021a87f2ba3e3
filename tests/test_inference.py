"""The inference copy (BN folded, residual adds in place) computes what the model computes."""
from __future__ import annotations

import operator
import random

import torch
from torch import nn

import curlprune
from curlprune.cost.latency import prepare
from curlprune.models import build
from curlprune.surgery.inference import add_in_place, inplace_adds, optimize_for_inference
from curlprune.surgery.surgery import random_plan


def nontrivial_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return model.eval()


def iadds(gm) -> int:
    """In-place adds: ``operator.iadd`` (shapes known) or ``add_in_place`` (checked at each call)."""
    return sum(n.op == "call_function" and n.target in (operator.iadd, add_in_place) for n in gm.graph.nodes)


def test_resnet_inference_copy_folds_every_bn_and_adds_in_place():
    torch.manual_seed(0)
    model = nontrivial_bn(build("cifar:resnet20"))
    x = torch.randn(4, 3, 32, 32)
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert iadds(fast) == 9  # one residual add per block
    assert not fast.training
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_pruned_model_inference_copy_matches_the_sliced_model():
    torch.manual_seed(1)
    model = nontrivial_bn(build("cifar:resnet20"))
    x = torch.randn(2, 3, 32, 32)
    groups = curlprune.trace(model, x[:1])
    sliced = curlprune.apply(model, groups, random_plan(groups, random.Random(3))).eval()
    fast = prepare(sliced)
    assert iadds(fast) == 9 and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), sliced(x), atol=1e-4, rtol=1e-4)
    plain = prepare(sliced, optimize=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


class Shared(nn.Module):
    """conv output read twice (must stay out of place), and a BN output added to a larger tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.pool_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = y + x  # y is read again below: an in-place add would change it
        pooled = self.pool_bn(x.mean((2, 3), keepdim=True))
        w = pooled + z  # [N, 3, 1, 1] + [N, 3, H, W]: the sum does not fit in the first operand
        return w * y


def test_adds_that_are_not_safe_in_place_stay_out_of_place():
    torch.manual_seed(2)
    model = nontrivial_bn(Shared())
    x = torch.randn(2, 3, 8, 8)
    fast = optimize_for_inference(model, x)
    assert iadds(fast) == 0
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_inplace_adds_rewrites_a_fresh_bn_output():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + x)

    model = nontrivial_bn(Block())
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = model(x)
        assert inplace_adds(gm) == 1
        assert torch.equal(gm(x), expected)  # the same arithmetic, written into the BN's output
        assert inplace_adds(gm) == 0  # nothing left to rewrite


def test_every_spelling_of_a_residual_add_is_made_in_place():
    """``identity + out``, ``out.add(identity)`` and ``torch.add(out, identity)`` are the same
    residual add; each is written into the conv/BN output, and ``alpha=`` is left alone."""

    class Spellings(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(4))
            self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(4))

        def forward(self, x):
            a, b, c, d = (bn(conv(x)) for conv, bn in zip(self.convs, self.bns))
            x = torch.relu(x + a)  # the fresh output is the second operand
            x = torch.relu(b.add(x))  # tensor method
            x = torch.relu(torch.add(c, x))
            return torch.add(d, x, alpha=0.5)  # a keyword: not rewritten

    torch.manual_seed(3)
    model = nontrivial_bn(Spellings())
    x = torch.randn(2, 4, 6, 6)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        assert inplace_adds(gm) == 3
        assert torch.allclose(gm(x), expected, atol=1e-6)
        assert {n.target for n in gm.graph.nodes if n.op == "call_method"} == set()
        assert sum(n.target is torch.add for n in gm.graph.nodes) == 1
