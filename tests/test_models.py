"""Model registry: architectures, published checkpoints, weights errors, input specs, ModelRef."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from curlprune.data.data import class_balanced_subset, evaluate, load_digits_dataset
from curlprune.data.digits import train_digits_model
from curlprune.errors import CurlpruneError
from curlprune.models import (
    IMAGENET_MEAN,
    ModelRef,
    ZeroPadShortcut,
    build,
    build_from_ref,
    input_spec,
)

from conftest import SHARED  # noqa: E402
needs_shared = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"{SHARED} (published checkpoints, CIFAR-10 JPEG) is absent")


@pytest.fixture(scope="module")
def cifar_test_split(cifar_split):
    return cifar_split("cifar10-jpeg.zip", "test")


@pytest.fixture(scope="module")
def cifar_test_subset(cifar_test_split):
    """A fixed class-balanced 2,000 of the 10,000 JPEG test images (200 per class, seed 0): the JPEG
    accuracies below are pinned on it (the published top-1 on the full lossless split is
    tests/test_published.py's)."""
    return class_balanced_subset(cifar_test_split, 200, seed=0)


# ----------------------------------------------------------------------------- CIFAR ResNets


@pytest.mark.parametrize("depth,blocks", [(20, 3), (56, 9)])
def test_cifar_resnet_layout(depth, blocks):
    names = dict(build(f"cifar:resnet{depth}").named_modules())
    for stage, width in zip((1, 2, 3), (16, 32, 64)):
        assert f"layer{stage}.{blocks - 1}.conv2" in names and f"layer{stage}.{blocks}" not in names
        assert names[f"layer{stage}.0.conv2"].out_channels == width
    assert names["conv1"].in_channels == 3 and names["linear"].in_features == 64
    assert names["layer2.0.conv1"].stride == (2, 2) and names["layer2.1.conv1"].stride == (1, 1)
    assert isinstance(names["layer3.0.downsample"], ZeroPadShortcut) and names["layer1.0"].downsample is None


def test_zero_pad_shortcut_moves_channel_j_to_j_plus_quarter():
    x = torch.randn(2, 16, 6, 6)
    out = ZeroPadShortcut(32)(x)
    assert out.shape == (2, 32, 3, 3)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_cifar_resnet_traces_shortcut_as_getitem_and_pad():
    model = build("cifar:resnet20").eval()
    gm = fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(F.pad) == 2  # one per stage change
    assert not any("downsample" in str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(gm(x), model(x))


@needs_shared
def test_published_checkpoint_keys_load_strictly():
    raw = torch.load(SHARED / "models" / "resnet56-4bfd9763.th", map_location="cpu", weights_only=True)["state_dict"]
    model = build("cifar:resnet56", weights=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    assert {k.removeprefix("module.") for k in raw} == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert torch.equal(model.layer3[8].conv2.weight, raw["module.layer3.8.conv2.weight"])


@needs_shared
def test_published_resnet56_accuracy_on_jpeg_test_split(cifar_test_split, cifar_test_subset):
    """Measured: 83.20% on all 10,000 JPEG test images, 83.30% on the fixed 2,000."""
    model = build("cifar:resnet56", weights=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    accuracy = evaluate(model, cifar_test_subset, input_spec("cifar:resnet56"))
    assert len(cifar_test_split) == 10_000 and len(cifar_test_subset) == 2_000
    assert torch.bincount(cifar_test_subset.labels).tolist() == [200] * 10
    assert accuracy == pytest.approx(0.8330, abs=0.003)


@needs_shared
def test_jpeg_adapted_resnet20_accuracy(cifar_test_subset):
    """Measured: 88.13% on all 10,000 JPEG test images, 90.00% on the fixed 2,000."""
    model = build("cifar:resnet20", weights=str(SHARED / "models" / "resnet20-cifar10jpeg.pt"))
    assert evaluate(model, cifar_test_subset, input_spec("cifar:resnet20")) == pytest.approx(0.9000, abs=0.003)


# ----------------------------------------------------------------------------- weights files


def test_weights_wrapped_and_prefixed_load_exactly(tmp_path):
    source = build("cifar:resnet20").eval()
    path = tmp_path / "w.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "best_prec1": 1.0}, path)
    loaded = build("cifar:resnet20", weights=str(path)).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))


def test_safetensors_weights_load(tmp_path):
    from safetensors.torch import save_file

    source = build("small:resnet-digits").eval()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(build("small:resnet-digits", weights=str(path)).eval()(x), source(x))


def test_weights_of_another_architecture_are_named(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(build("cifar:resnet20").state_dict(), path)
    with pytest.raises(CurlpruneError, match=r"r20.pt does not match model cifar:resnet56: 180 missing keys, 0 unexpected keys \(e.g. missing layer1.3"):
        build("cifar:resnet56", weights=str(path))


def test_weights_with_other_shapes_are_named(tmp_path):
    path = tmp_path / "r20-100.pt"
    torch.save(build("cifar:resnet20", num_classes=100).state_dict(), path)
    with pytest.raises(CurlpruneError, match=r"2 tensors differ in shape \(e.g. linear.weight: file \[100, 64\], model \[10, 64\]\)"):
        build("cifar:resnet20", weights=str(path))
    assert build("cifar:resnet20", weights=str(path), num_classes=100).linear.out_features == 100


def test_corrupt_and_missing_weights_files(tmp_path):
    damaged = tmp_path / "damaged.th"
    torch.save(build("cifar:resnet20").state_dict(), damaged)
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with pytest.raises(CurlpruneError, match="damaged.th cannot be read .*damaged or not a PyTorch state-dict file"):
        build("cifar:resnet20", weights=str(damaged))
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CurlpruneError, match="holds no state dict"):
        build("cifar:resnet20", weights=str(not_a_dict))
    with pytest.raises(CurlpruneError, match="nowhere.th does not exist"):
        build("cifar:resnet20", weights=str(tmp_path / "nowhere.th"))


# ----------------------------------------------------------------------------- names, torchvision


def test_unknown_names_list_the_known_ones():
    for name in ("cifar:resnet21", "resnet50", "torchvision:fasterrcnn_resnet50_fpn", "small:nope"):
        with pytest.raises(CurlpruneError, match=r"unknown model .*cifar:resnet\{20,32,44,56,110,1202\}.*torchvision:.*small:resnet-digits"):
            build(name)


def test_torchvision_model_with_classes_and_weights_file(tmp_path):
    model = build("torchvision:resnet18", num_classes=7).eval()
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    x = torch.randn(1, 3, 64, 64)
    assert build("torchvision:resnet18", weights=str(path), num_classes=7).eval()(x).shape == (1, 7)
    assert torch.equal(build("torchvision:resnet18", weights=str(path), num_classes=7).eval()(x), model(x))
    with pytest.raises(CurlpruneError, match=r"IMAGENET1K_V9.*one of \['IMAGENET1K_V1', 'DEFAULT'\]"):
        build("torchvision:resnet18", weights="IMAGENET1K_V9")


def test_input_specs():
    cifar = input_spec("cifar:resnet56")
    assert (cifar.size, cifar.channels, cifar.mean, cifar.resize, cifar.num_classes, cifar.flip) == (32, 3, IMAGENET_MEAN, None, 10, True)
    r50 = input_spec("torchvision:resnet50")  # the original (V1) recipe: Resize 256, CenterCrop 224
    assert (r50.size, r50.resize, r50.num_classes, r50.mean) == (224, 256, 1000, IMAGENET_MEAN)
    assert input_spec("torchvision:resnet50", weights="IMAGENET1K_V2").resize == 232
    assert (input_spec("torchvision:inception_v3").size, input_spec("torchvision:inception_v3").resize) == (299, 342)
    digits = input_spec("small:resnet-digits")
    assert (digits.size, digits.channels, digits.flip, digits.crop_padding, len(digits.mean)) == (8, 1, False, 1, 1)
    assert input_spec("cifar:resnet20", num_classes=100).num_classes == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        cifar.size = 64


def test_model_ref_round_trip_builds_the_same_architecture():
    ref = ModelRef("cifar:resnet32", {"num_classes": 100})
    again = ModelRef.from_json(ref.to_json())
    assert again == ref
    shapes = {k: v.shape for k, v in build_from_ref(again).state_dict().items()}
    assert shapes == {k: v.shape for k, v in build("cifar:resnet32", num_classes=100).state_dict().items()}
    with pytest.raises(CurlpruneError, match="not valid"):
        ModelRef.from_json('{"kwargs": {}}')


# ----------------------------------------------------------------------------- digits demo model


def test_digits_model_trains_to_95_percent():
    start = time.perf_counter()
    model = train_digits_model(seed=0)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, load_digits_dataset(seed=0)["test"], input_spec("small:resnet-digits"))
    print(f"digits: {accuracy:.4f} test accuracy after {seconds:.1f} s of training")
    assert accuracy >= 0.95
    names = dict(model.named_modules())
    assert names["layer2.0.downsample.0"].kernel_size == (1, 1) and names["linear"].in_features == 32
