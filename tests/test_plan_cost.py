"""plan_cost is analytic, yet equals counting the physically sliced model."""
from __future__ import annotations

import random

import pytest
import torch
import torchvision

from curlprune.cost.analysis import plan_cost
from curlprune.cost.analysis import trace
from curlprune.cost.cost import count
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.surgery.surgery import apply, random_plan


# each brings something of its own: zero-pad shortcuts, depthwise, grouped units, concat offsets,
# SE scales, linears on [N, H, W, C] with layer-scale parameters
MODELS = ["cifar:resnet20", "mobilenet_v2", "regnet_x_400mf", "densenet121", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", MODELS)
def test_plan_cost_equals_count_of_applied_model(name):
    torch.manual_seed(0)
    model = (build(name) if name.startswith("cifar:") else getattr(torchvision.models, name)()).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = trace(model, x)
    assert plan_cost(model, x, groups, {}) == count(model, x)
    rng = random.Random(name)
    for _ in range(2):
        plan = random_plan(groups, rng, group_share=0.8)
        macs, params = plan_cost(model, x, groups, plan)
        assert (macs, params) == count(apply(model, groups, plan), x)
        assert macs < count(model, x)[0]


def test_plan_cost_follows_input_size_and_validates():
    model = build("cifar:resnet20").eval()
    small, large = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 64, 64)
    groups = trace(model, small)
    plan = {"conv1": list(range(4)), "layer3.0.conv1": list(range(10))}
    macs32, params32 = plan_cost(model, small, groups, plan)
    macs64, params64 = plan_cost(model, large, groups, plan)
    pruned = apply(model, groups, plan)
    assert (macs64, params64) == count(pruned, large) and params64 == params32
    assert macs64 > 3.9 * macs32
    with pytest.raises(CurlpruneError, match="keeps 0 channels"):
        plan_cost(model, small, groups, {"conv1": []})


def test_resnet50_full_cost_matches_paper():
    """The paper's ResNet-50: 4.0892 G MACs and 25.557 M params at 224x224."""
    model = torchvision.models.resnet50().eval()
    x = torch.zeros(1, 3, 224, 224)
    groups = trace(model, x)
    macs, params = plan_cost(model, x, groups, {})
    assert round(macs / 1e9, 4) == 4.0892 and round(params / 1e6, 3) == 25.557
    stage4 = next(g for g in groups if g.kind == "outside" and g.width == 2048)
    # out of 3 conv3 (512 in) and the downsample (1024 in), in of 2 conv1 (512 out) at 7x7, in of fc
    assert stage4.macs_per_channel[0] == (3 * 512 + 1024 + 2 * 512) * 7 * 7 + 1000
