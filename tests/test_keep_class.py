"""The pruned model keeps the user's own class (issue 22 item 3): a deep copy of their module with
smaller layers, proven equal to the sliced torch.fx GraphModule, or that GraphModule with the reason.

The model classes below are defined only here (bottleneck + squeeze-excitation residual blocks, not
registered); tests/test_import_path.py writes their source into a module file of its own.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import curlprune
from curlprune.store import checkpoint
from curlprune.cost.analysis import model_cost_fn, trace
from curlprune.criteria import compute_scores
from curlprune.errors import CurlpruneError
from curlprune.surgery.keep_class import TOLERANCE, KeepClassWarning, slice_model
from curlprune.models import build
from curlprune.select.search import Target, select
from curlprune.surgery.surgery import apply as apply_graph
from curlprune.surgery.surgery import mask, random_plan


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a per-channel gate from the pooled features."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(1, channels // reduction), 1)
        self.fc2 = nn.Conv2d(max(1, channels // reduction), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 with BN, SE on the output, identity or projection shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


class MyNet(nn.Module):
    """A residual CNN of bottleneck + SE blocks, with methods of its own."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Bottleneck(width, width // 2, 2 * width), Bottleneck(2 * width, width // 2, 2 * width),
                                    Bottleneck(2 * width, width, 4 * width, stride=2))
        self.head = nn.Linear(4 * width, num_classes)
        self.label = "mynet"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def widths(self) -> list[int]:
        return [m.out_channels for m in self.modules() if isinstance(m, nn.Conv2d)]


class PadNet(MyNet):
    """Its forward widens the features by zero channels, a count written as a constant in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4 * 16 + 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.pad(self.features(x), (0, 8)))


class CheckedNet(MyNet):
    """Its forward checks a channel count written as a constant: it cannot run with fewer channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks[2].conv1.out_channels != 16:
            raise ValueError("MyNet expects 16 channels in the last block")
        return super().forward(x)


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters randomised, so a wrongly sliced channel shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.5 * torch.randn(n, generator=g))
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def half_macs_plan(model: nn.Module, x: torch.Tensor):
    groups = trace(model, x)
    scores = compute_scores("l1", model, groups)
    cost_fn = model_cost_fn(model, x, groups)
    selection = select(groups, scores, cost_fn, Target.parse("macs", 0.5), floor=0.3)
    return groups, selection


def test_own_class_pruned_to_half_the_macs_keeps_class_methods_keys_and_outputs():
    torch.manual_seed(0)
    model = randomised(MyNet())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    groups, selection = half_macs_plan(model, x)
    assert 0.49 <= selection.macs / curlprune.count(model, x[:1])[0] <= 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeepClassWarning)
        small = curlprune.apply(model, groups, selection.plan)
    assert isinstance(small, MyNet) and type(small) is MyNet and not isinstance(small, torch.fx.GraphModule)
    assert small.label == "mynet" and small is not model
    assert sum(small.widths()) < sum(model.widths())  # the custom method runs on the smaller layers
    assert small.features(x).shape[1] == small.head.in_features
    assert list(small.state_dict()) == list(model.state_dict())  # same names, same order
    conv = small.blocks[0].conv2
    assert conv.weight.shape == (conv.out_channels, conv.in_channels, 3, 3)
    assert small.blocks[0].bn2.num_features == conv.out_channels
    graph = apply_graph(model, groups, selection.plan)
    with torch.no_grad():
        with mask(model, groups, selection.plan):
            masked = model(x)
        assert relative_error(small(x), graph(x)) < TOLERANCE
        assert relative_error(small(x), masked) < 1e-4
    assert curlprune.count(small, x[:1]) == (selection.macs, selection.params)
    assert model.blocks[0].conv2.out_channels == 8  # the original is not changed


def test_kept_class_trains_and_keeps_modes():
    model = MyNet().train()
    x = torch.randn(4, 3, 16, 16)
    groups = trace(model, x)
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    small = curlprune.apply(model, groups, plan)
    assert isinstance(small, MyNet) and small.training and small.blocks[1].bn1.training
    stats = small.stem[1].running_mean.clone()
    loss = F.cross_entropy(small(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert small.head.weight.grad is not None and not torch.equal(small.stem[1].running_mean, stats)


@pytest.mark.parametrize("cls, fragment", [(CheckedNet, "CheckedNet's forward fails with the smaller layers (ValueError: MyNet expects 16"),
                                            (PadNet, "zero-pads channels by a fixed amount")])
def test_constant_channel_count_falls_back_to_the_graph_with_the_reason(cls, fragment):
    model = randomised(cls())
    x = torch.randn(2, 3, 16, 16)
    groups = trace(model, x)
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    sliced = slice_model(model, groups, plan, example_input=x)
    assert not sliced.kept and sliced.model is sliced.graph
    assert fragment in sliced.reason and "\n" not in sliced.reason
    assert sliced.as_dict() == {"class": cls.__name__, "kept": False, "reason": sliced.reason}
    with pytest.warns(KeepClassWarning, match=f"torch.fx.GraphModule, not {cls.__name__}: "):
        small = curlprune.apply(model, groups, plan)
    assert isinstance(small, torch.fx.GraphModule)
    with torch.no_grad(), mask(model, groups, plan):
        assert relative_error(small(x), model(x)) < 1e-4
    assert slice_model(model, groups, plan, keep_class=False).reason == "keep_class=False"


def test_registry_models_keep_their_classes_zero_pad_shortcuts_included():
    x = torch.randn(2, 3, 32, 32)
    model = randomised(torchvision.models.resnet18())
    groups = trace(model, x)
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    sliced = slice_model(model, groups, plan)  # the input shape comes from the trace
    assert sliced.kept and type(sliced.model) is torchvision.models.ResNet
    assert sliced.model.fc.in_features == 256 and sliced.model.layer1[0].conv1.out_channels == 32
    with torch.no_grad():
        assert relative_error(sliced.model(x), sliced.graph(x)) < TOLERANCE


def test_cifar_resnet_option_a_shortcuts_shrink_their_pads_and_keep_the_class():
    """The zero-pad regions of an option-A shortcut lose channels unevenly; the shortcut module
    shrinks its own pad (``shrink_channel_pad``) and the copy equals the graph and the masked model."""
    model = randomised(build("cifar:resnet20"))
    x = torch.randn(2, 3, 32, 32)
    groups = trace(model, x)
    plan = {"conv1": list(range(8)), "layer2.0.conv2": [0, 9], "layer3.0.conv2": list(range(0, 32, 2))}
    sliced = slice_model(model, groups, plan, example_input=x)
    assert sliced.kept, sliced.reason
    shortcut = sliced.model.layer2[0].downsample
    assert type(sliced.model).__name__ == "SmallResNet" and (shortcut.front, shortcut.back) == (1, 1)
    assert model.layer2[0].downsample.front == 8  # the original is not changed
    with torch.no_grad():
        with mask(model, groups, plan):
            masked = model(x)
        assert relative_error(sliced.model(x), masked) < 1e-4
    for seed in range(3):
        plan = random_plan(groups, random.Random(seed), single_unit_share=0.3)
        sliced = slice_model(model, groups, plan, example_input=x)
        assert sliced.kept, sliced.reason
        with torch.no_grad():
            assert relative_error(sliced.model(x), sliced.graph(x)) < TOLERANCE


def test_timm_model_keeps_its_class():
    timm = pytest.importorskip("timm")
    model = randomised(build("timm:test_efficientnet"))
    x = torch.randn(2, 3, 32, 32)
    groups = trace(model, x)
    plan = {g.name: [i for i in range(g.width) if i % 3] for g in groups if g.prunable and g.width >= 3}
    sliced = slice_model(model, groups, plan, example_input=x)
    assert sliced.kept, sliced.reason
    assert type(sliced.model) is timm.models.efficientnet.EfficientNet
    with torch.no_grad():
        assert relative_error(sliced.model(x), sliced.graph(x)) < TOLERANCE


def test_load_with_a_model_reapplies_the_plan_to_it(tmp_path):
    model = randomised(MyNet(num_classes=4))
    x = torch.randn(2, 3, 16, 16)
    groups, selection = half_macs_plan(model, x)
    small = curlprune.apply(model, groups, selection.plan)
    path = tmp_path / "small.safetensors"
    checkpoint.save(path, MyNet, selection.plan, small.state_dict(), input_shape=[1, 3, 16, 16], extra={"model_class": {"kept": True}})
    fresh = MyNet(num_classes=4)
    loaded = curlprune.load(path, model=fresh)
    assert isinstance(loaded, MyNet) and loaded is not fresh and fresh.head.in_features == 64
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    graph = curlprune.load(path, model=MyNet(num_classes=4), keep_class=False)
    assert isinstance(graph, torch.fx.GraphModule)
    with torch.no_grad():
        assert relative_error(graph(x), small(x)) < TOLERANCE
    # the kind the checkpoint records is the kind loaded: a GraphModule saved by prune loads as one
    recorded = tmp_path / "graph.safetensors"
    checkpoint.save(recorded, MyNet, selection.plan, graph.state_dict(), input_shape=[1, 3, 16, 16],
                    extra={"model_class": {"class": "MyNet", "kept": False, "reason": "keep_class=False"}})
    assert isinstance(curlprune.load(recorded, model=MyNet(num_classes=4)), torch.fx.GraphModule)
    assert isinstance(curlprune.load(recorded, model=MyNet(num_classes=4), keep_class=True), MyNet)


def test_save_refuses_what_load_could_not_rebuild_and_writes_nothing(tmp_path):
    class Local(MyNet):
        pass

    path = tmp_path / "m.safetensors"
    state = MyNet().state_dict()
    for ref, fragment in ((Local, "inside a function"), ("cifar:resnet999", "unknown model 'cifar:resnet999'"),
                          ("no_such_module_xyz.nets:MyNet", "module 'no_such_module_xyz.nets' cannot be imported"),
                          ("test_keep_class:NoSuchNet", "has no attribute 'NoSuchNet'")):
        with pytest.raises(CurlpruneError, match="curlprune.load could not rebuild") as info:
            checkpoint.save(path, ref, {}, state, input_shape=[1, 3, 16, 16])
        assert fragment in str(info.value) and "\n" not in str(info.value)
        assert not path.exists() and list(tmp_path.iterdir()) == []
    Local.__module__ = "__main__"
    Local.__qualname__ = "Local"
    with pytest.raises(CurlpruneError, match="defined in __main__"):
        checkpoint.save(path, Local, {}, state, input_shape=[1, 3, 16, 16])
    assert not path.exists()


def test_float64_model_keeps_its_class():
    """A float64 model is checked against its GraphModule with float64 inputs (the seeded random one
    too): its class is kept, not refused for comparing it on a float32 input."""
    model = randomised(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 4, 3, padding=1))).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    groups = trace(model, x)
    plan = {g.name: [i for i in range(g.width) if i % 3] for g in groups if g.prunable}
    sliced = slice_model(model, groups, plan, example_input=x)
    assert sliced.kept, sliced.reason
    assert type(sliced.model) is nn.Sequential and sliced.model[0].weight.dtype == torch.float64
    with torch.no_grad(), mask(model, groups, plan):
        assert (sliced.model(x) - model(x)).abs().max() < 1e-12
