"""MACs/params counter (paper convention) and latency measurement."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from curlprune.cost.cost import count
from curlprune.cost.latency import example_batch, forward_runner, prepare, time_interleaved, torch_threads
from curlprune.models import build


def _meta_model(name: str) -> nn.Module:
    """A torchvision model with no storage: counting needs shapes only."""
    with torch.device("meta"):
        return getattr(torchvision.models, name)()


def test_resnet50_matches_the_paper():
    macs, params = count(_meta_model("resnet50"), torch.zeros(1, 3, 224, 224, device="meta"))
    assert macs == pytest.approx(4.0892e9, rel=0.005)
    assert params == 25_557_032


def test_mobilenet_v2():
    macs, params = count(_meta_model("mobilenet_v2"), torch.zeros(1, 3, 224, 224, device="meta"))
    assert macs == pytest.approx(300.8e6, rel=0.01)
    assert params == sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters())


def test_cifar_resnets():
    r56, r56_params = count(build("cifar:resnet56"), torch.zeros(2, 3, 32, 32))
    r20, _ = count(build("cifar:resnet20"), torch.zeros(1, 3, 32, 32))
    assert r56 == pytest.approx(125e6, rel=0.01)
    assert 40.5e6 <= r20 <= 41e6
    assert r56_params == sum(p.numel() for p in build("cifar:resnet56").parameters())


def test_conv_formula_groups_depthwise_and_transposed():
    x = torch.zeros(1, 8, 10, 10)
    # Cout * Cin/groups * k*k * Hout*Wout
    assert count(nn.Conv2d(8, 16, 3, padding=1), x) == (16 * 8 * 9 * 100, 16 * 8 * 9 + 16)
    assert count(nn.Conv2d(8, 16, 3, stride=2, groups=4, bias=False), x) == (16 * 2 * 9 * 16, 16 * 2 * 9)
    assert count(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), x)[0] == 8 * 9 * 100  # depthwise: C*k*k*H*W
    # transposed: Cin * Cout/groups * k*k * Hin*Win
    assert count(nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False), x)[0] == 8 * 4 * 4 * 100


def test_linear_counts_tokens_and_divides_by_batch():
    layer = nn.Linear(6, 5)
    assert count(layer, torch.zeros(4, 6)) == (30, 35)
    assert count(layer, torch.zeros(3, 7, 7, 6)) == (30 * 49, 35)  # applied at every position of [N, H, W, C]


def test_attention_projections():
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    tokens = torch.zeros(2, 5, 8)
    assert count(attention, (tokens, tokens, tokens)) == (4 * 5 * 8 * 8, 4 * 8 * 8 + 4 * 8)


class _Shared(nn.Module):
    """One conv used twice, a BN, a stray parameter and a module the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.ones(4, 1, 1))
        self.unused = nn.Linear(100, 100)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x))) * self.scale


def test_params_are_the_parameters_the_forward_uses_once():
    model = _Shared().train()
    macs, params = count(model, torch.zeros(1, 4, 3, 3))
    assert macs == 2 * 4 * 4 * 9  # the conv runs twice
    assert params == 16 + 8 + 4  # conv weight once, BN weight+bias (no running stats), scale; not `unused`
    assert model.training  # mode restored


def test_graph_module_meta_and_batch_independence():
    model = build("cifar:resnet20").eval()
    expected = count(model, torch.zeros(1, 3, 32, 32))
    assert count(fx.symbolic_trace(model), torch.zeros(3, 3, 32, 32)) == expected
    assert count(model.to("meta"), torch.zeros(1, 3, 32, 32, device="meta")) == expected


def test_measure_latency():
    model = build("small:resnet-digits").train()
    x = example_batch(torch.zeros(1, 1, 8, 8), 4)
    with torch_threads(None) as threads:
        timing = time_interleaved({"model": forward_runner(prepare(model, optimize=False), x)},
                                  min_rounds=5, max_rounds=5, warmup=1, min_time_s=0.0)
    seconds = timing.seconds["model"]
    assert 0 < min(seconds) * 1e3 <= timing.median_ms("model") <= max(seconds) * 1e3
    assert x.shape[0] == 4 and len(seconds) == 5 and threads >= 1
    assert model.training  # a copy was timed
