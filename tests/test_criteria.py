"""Criteria: the fast exact KL equals the authors' loop; baselines equal independent computations."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curlprune.cost.analysis import trace
from curlprune.criteria import compute_scores, get
from curlprune.criteria.kl import KLStats, kl_scores, kl_scores_naive
from curlprune.criteria.kl_approx import kl_approx_scores
from curlprune.errors import CurlpruneError
from curlprune.models import build

from conftest import SHARED  # noqa: E402
from test_faults import assert_kl_scores_are_sliced_kl  # noqa: E402


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics/affines, so every channel matters differently (eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = _randomized(build("small:resnet-digits"))
    groups = trace(model, torch.zeros(1, 1, 8, 8))
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(12) % 10
    return model, groups, images, labels


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ---------------------------------------------------------------------------------- exact kl


def test_fast_kl_equals_naive_loop_on_cifar_resnet20():
    """A seeded sample of units of every ResNet-20 group; the published weights when ../shared has them."""
    weights = SHARED / "models" / "resnet20-12fca82f.th"
    model = build("cifar:resnet20", weights=str(weights) if weights.exists() else None).eval()
    if not weights.exists():
        _randomized(model)
    groups = trace(model, torch.zeros(1, 3, 32, 32))
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    only = {g.name: rng.choice(g.width, size=4, replace=False).tolist() for g in groups if g.prunable}
    stats = KLStats()
    fast = kl_scores(model, groups, images, stats=stats, only=only)
    naive = kl_scores_naive(model, groups, images, only=only)
    assert _max_diff(fast, naive) < 1e-5
    assert stats.rank1_groups == len(fast) and not stats.fallback_groups
    values = np.concatenate([naive[k][v] for k, v in only.items()])
    assert values.max() > 1e-2 and (values >= 0).all()
    # the scores differ between channels (not a degenerate all-equal result)
    assert len(np.unique(np.round(values, 8))) > 0.9 * len(values)


def test_fast_kl_variants_agree_with_small_memory_budget(digits):
    """Many image blocks and row chunks, with and without the exact shortcuts: same numbers."""
    model, groups, images, _ = digits
    reference = kl_scores_naive(model, groups, images)
    tiny = KLStats()
    fast = kl_scores(model, groups, images, budget_mb=0.05, stats=tiny)
    plain = kl_scores(model, groups, images, rank1=False, skip_inactive=False, channels_last=False, fold_bn=False)
    assert tiny.blocks > 1 and tiny.chunk_rows < len(images)
    assert _max_diff(fast, reference) < 1e-5
    assert _max_diff(plain, reference) < 1e-5


def test_kl_matches_physically_sliced_model(digits):
    """The score of a channel is the KL of the model with that channel sliced away (apply)."""
    model, groups, images, _ = digits
    scores = kl_scores(model, groups, images)
    assert_kl_scores_are_sliced_kl(model, groups, images, scores, abs=1e-6)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "efficientnet_b0", "regnet_x_400mf"])
def test_fast_kl_equals_naive_on_torchvision(arch):
    """Seeded sample of units of every group at 32x32: depthwise ties, projection shortcuts,
    residual streams, squeeze-excitation, grouped convs pruned in units."""
    import torchvision

    torch.manual_seed(0)
    model = _randomized(getattr(torchvision.models, arch)(num_classes=10))
    groups = trace(model, torch.zeros(1, 3, 32, 32))
    rng = np.random.default_rng(0)
    only = {g.name: rng.choice(g.width // g.unit, size=2, replace=False).tolist() for g in groups if g.prunable}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    fast = kl_scores(model, groups, images, only=only)
    naive = kl_scores_naive(model, groups, images, only=only)
    assert _max_diff(fast, naive) < 1e-5
    unit = {g.name: g.unit for g in groups}
    sampled = np.concatenate([naive[k][np.array(v) * unit[k]] for k, v in only.items()])
    assert (sampled > 0).mean() > 0.5


# ---------------------------------------------------------------------------------- kl-approx


def test_kl_approx_is_the_fisher_quadratic_form(digits):
    """Against an independent computation: δ by central differences of the logits when a unit's
    cut inputs are scaled by (1 - s), then ½ δᵀ(diag p − p pᵀ)δ per image, in float64."""
    _, groups, images, _ = digits
    torch.manual_seed(0)
    model = _randomized(build("small:resnet-digits")).double()
    x = images.double()
    approx = kl_approx_scores(model, groups, x, classes=10)
    with torch.no_grad():
        p = F.softmax(model(x), -1)
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for g in (g for g in groups if g.prunable):
        for channel in (1, g.width // 2):
            eps = 1e-6  # small: a central difference must not straddle a ReLU kink
            delta = (_scaled_logits(model, g, channel, x, eps) - _scaled_logits(model, g, channel, x, -eps)) / (2 * eps)
            expected = 0.5 * torch.einsum("nc,ncd,nd->n", delta, fisher, delta).mean().item()
            assert approx[g.name][channel] == pytest.approx(expected, rel=1e-4, abs=1e-12)


def _scaled_logits(model, group, channel, x, s):
    """Logits with the channel's consumer inputs multiplied by (1 - s) (the cuts of the group)."""
    handles = []
    for m in group.members:
        if m.role != "in":
            continue
        module = model.get_submodule(m.module)
        positions = list(m.index[channel])

        def hook(mod, args, positions=positions):
            y = args[0].clone()
            y[:, positions] = y[:, positions] * (1 - s)
            return (y,)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def test_kl_approx_ranks_like_exact(digits):
    from scipy.stats import spearmanr

    model, groups, images, _ = digits
    exact = kl_scores(model, groups, images)
    approx = compute_scores("kl-approx", model, groups, images=images)
    a = np.concatenate([approx[k] for k in exact])
    e = np.concatenate([exact[k] for k in exact])
    assert spearmanr(a, e).statistic > 0.7


# ---------------------------------------------------------------------------------- baselines


def test_l1_and_bn_are_the_weights_of_the_producers(digits):
    model, groups, _, _ = digits
    l1 = compute_scores("l1", model, groups)
    bn = compute_scores("bn", model, groups)

    def w1(conv):
        return conv.weight.detach().abs().sum((1, 2, 3)).double().numpy()

    def gamma(b):
        return b.weight.detach().abs().double().numpy()

    inner = model.layer2[1]
    np.testing.assert_allclose(l1["layer2.1.conv1"], w1(inner.conv1), rtol=1e-6)
    np.testing.assert_allclose(bn["layer2.1.conv1"], gamma(inner.bn1), rtol=1e-6)
    # the stage-1 stream: the stem and both blocks' conv2 write into it
    stream1 = w1(model.conv1) + w1(model.layer1[0].conv2) + w1(model.layer1[1].conv2)
    np.testing.assert_allclose(l1["conv1"], stream1, rtol=1e-6)
    np.testing.assert_allclose(bn["conv1"], gamma(model.bn1) + gamma(model.layer1[0].bn2) + gamma(model.layer1[1].bn2), rtol=1e-6)
    # the stage-2 stream: conv2 of both blocks and the projection shortcut
    b0, b1 = model.layer2
    np.testing.assert_allclose(l1["layer2.0.conv2"], w1(b0.conv2) + w1(b0.downsample[0]) + w1(b1.conv2), rtol=1e-6)
    assert set(l1) == set(bn) == {g.name for g in groups if g.prunable}


def test_taylor_equals_per_image_autograd(digits):
    """|Σ a·∂L/∂a| per image and producer (conv outputs), summed over producers, mean over images."""
    model, groups, images, labels = digits
    scores = compute_scores("taylor", model, groups, images=images, labels=labels)
    b0, b1 = model.layer2
    producers = {"layer2.0.conv2": [b0.conv2, b0.downsample[0], b1.conv2], "layer1.1.conv1": [model.layer1[1].conv1]}
    for name, convs in producers.items():
        expected = np.zeros(len(scores[name]))
        for n in range(len(images)):
            outputs = []
            handles = [c.register_forward_hook(lambda m, a, out: outputs.append(out)) for c in convs]
            loss = F.cross_entropy(model(images[n : n + 1]), labels[n : n + 1])
            for h in handles:
                h.remove()
            grads = torch.autograd.grad(loss, outputs)
            for a, g in zip(outputs, grads):
                expected += (a * g).sum((2, 3)).abs()[0].detach().double().numpy()
        np.testing.assert_allclose(scores[name], expected / len(images), rtol=1e-4, atol=1e-9)


def test_random_scores_are_seeded_per_unit(digits):
    model, groups, _, _ = digits
    a = compute_scores("random", model, groups, seed=3)
    b = compute_scores("random", model, groups, seed=3)
    c = compute_scores("random", model, groups, seed=4)
    assert _max_diff(a, b) == 0
    assert _max_diff(a, c) > 0
    assert all(len(v) == g.width for g in groups if g.prunable for k, v in a.items() if k == g.name)


def test_criteria_errors(digits):
    model, groups, _, _ = digits
    with pytest.raises(CurlpruneError, match="unknown criterion"):
        get("entropy")
    with pytest.raises(CurlpruneError, match="needs calibration images"):
        compute_scores("kl", model, groups)
    with pytest.raises(CurlpruneError, match="needs labels"):
        compute_scores("taylor", model, groups, images=torch.zeros(2, 1, 8, 8))


class _ChannelsLastMlp(torch.nn.Module):
    """conv -> permute to NHWC -> Linear(8->12) (a producer whose channels are on the last dim, as
    ConvNeXt's MLP fc1) -> GELU -> Linear(12->8) -> back to NCHW -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc1, self.fc2, self.head = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8), torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(y.mean((2, 3)))


def test_taylor_of_a_channels_last_linear_sums_over_its_positions():
    """A linear on an NHWC tensor (ConvNeXt's MLP) has its channels on the last dim: its Taylor score
    is |Σ_{h,w} a·∂L/∂a| per channel there, as per-image autograd gives it."""
    torch.manual_seed(0)
    model = _ChannelsLastMlp().eval()
    images, labels = torch.randn(6, 1, 5, 5), torch.arange(6) % 10
    groups = trace(model, images[:1])
    scores = compute_scores("taylor", model, groups, images=images, labels=labels)
    expected = np.zeros(12)
    for n in range(len(images)):
        outputs = []
        handle = model.fc1.register_forward_hook(lambda m, a, out: outputs.append(out))
        loss = F.cross_entropy(model(images[n : n + 1]), labels[n : n + 1])
        handle.remove()
        (grad,) = torch.autograd.grad(loss, outputs)
        expected += (outputs[0] * grad).sum((1, 2)).abs()[0].detach().double().numpy()
    np.testing.assert_allclose(scores["fc1"], expected / len(images), rtol=1e-4, atol=1e-9)
