"""Data: ImageFolder folders/zips, digits, subsets, transforms, batching and evaluation."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from curlprune.data.data import (
    ImageDataset,
    batches,
    calibration_subset,
    class_balanced_subset,
    evaluate,
    load_digits_dataset,
    load_image_folder,
)
from curlprune.data.transforms import PadCropFlip, build_transform, normalize_batch
from curlprune.errors import CurlpruneError
from curlprune.models import IMAGENET_MEAN, IMAGENET_STD, build, input_spec

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(seed=0)


def _encode(image: torch.Tensor, fmt: str) -> bytes:
    """uint8 [C, H, W] -> image file bytes."""
    array = image.permute(1, 2, 0).squeeze(-1).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _digit_files(digits, layout: str = "split") -> dict[str, bytes]:
    """A small real ImageFolder tree: PNG digits of classes 0, 1, 2 (grayscale, so RGB conversion matters)."""
    files = {}
    for split, ds in digits.items():
        for cls in ("0", "1", "2"):
            members = torch.nonzero(ds.labels == int(cls)).flatten()[:3]
            for j, i in enumerate(members.tolist()):
                prefix = f"{split}/" if layout == "split" else ""
                files[f"{prefix}digit{cls}/{j:03d}.png"] = _encode(ds.images[i], "PNG")
        if layout != "split":
            break
    return files


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ----------------------------------------------------------------------------- image folders


def test_zip_and_folder_load_the_same_images(tmp_path, digits):
    files = _digit_files(digits)
    from_zip = load_image_folder(_write_zip(tmp_path / "d.zip", files))
    from_dir = load_image_folder(_write_dir(tmp_path / "tree", files))
    assert sorted(from_zip) == ["test", "train"]
    for split in ("train", "test"):
        a, b = from_zip[split], from_dir[split]
        assert a.classes == b.classes == ["digit0", "digit1", "digit2"]
        assert a.images.shape == (9, 3, 8, 8) and a.images.dtype == torch.uint8
        assert torch.equal(a.images, b.images) and a.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # PNG is lossless: the decoded RGB channels all equal the original grey digit
    first = torch.nonzero(digits["train"].labels == 0).flatten()[0]
    assert torch.equal(from_zip["train"].images[0], digits["train"].images[first].expand(3, 8, 8))


def test_single_split_layout_and_split_selection(tmp_path, digits):
    single = load_image_folder(_write_zip(tmp_path / "s.zip", _digit_files(digits, layout="classes")))
    assert list(single) == ["all"] and len(single["all"]) == 9
    only_test = load_image_folder(_write_zip(tmp_path / "d.zip", _digit_files(digits)), splits=["test"])
    assert list(only_test) == ["test"]
    with pytest.raises(CurlpruneError, match=r"has no split 'val': it has \['test', 'train'\]"):
        load_image_folder(tmp_path / "d.zip", splits=["val"])


def test_mixed_sizes_keep_per_image_tensors(tmp_path, digits):
    files = _digit_files(digits, layout="classes")
    files["digit0/big.png"] = _encode(torch.zeros(1, 12, 10, dtype=torch.uint8), "PNG")
    ds = load_image_folder(_write_dir(tmp_path / "t", files))["all"]
    assert not ds.uniform and isinstance(ds.images, list) and ds.images[3].shape == (3, 12, 10)
    sub = ds.subset([3, 0])
    assert sub[0][0].shape == (3, 12, 10) and sub.labels.tolist() == [0, 0]


def test_corrupt_jpeg_inside_zip_is_named(tmp_path, digits):
    files = _digit_files(digits)
    good = _encode(digits["train"].images[0].expand(3, 8, 8).contiguous(), "JPEG")
    files["train/digit1/broken.jpg"] = good[: len(good) // 2]
    with pytest.raises(CurlpruneError, match=r"cannot decode image .*d.zip:train/digit1/broken.jpg .*damaged or not an image"):
        load_image_folder(_write_zip(tmp_path / "d.zip", files))


def test_damaged_zip_member_is_named(tmp_path, digits):
    files = _digit_files(digits)
    blob = bytearray(_write_zip(tmp_path / "d.zip", files).read_bytes())
    start = bytes(blob).index(files["test/digit1/000.png"])
    blob[start + 40] ^= 0xFF  # the stored bytes no longer match the CRC in the zip
    (tmp_path / "d.zip").write_bytes(bytes(blob))
    with pytest.raises(CurlpruneError, match=r"cannot read .*d.zip:test/digit1/000.png .*Bad CRC-32"):
        load_image_folder(tmp_path / "d.zip")


def test_non_image_file_is_named(tmp_path, digits):
    files = _digit_files(digits)
    files["test/digit2/notes.txt"] = b"these are not pixels"
    with pytest.raises(CurlpruneError, match=r"cannot decode image .*test/digit2/notes.txt") as err:
        load_image_folder(_write_dir(tmp_path / "t", files))
    assert "BytesIO" not in str(err.value) and " at 0x" not in str(err.value)  # no Python object repr in a user's error


def test_mismatched_classes_across_splits(tmp_path, digits):
    files = {k: v for k, v in _digit_files(digits).items() if not k.startswith("test/digit2/")}
    with pytest.raises(CurlpruneError, match=r"different class folders \(differing: \['digit2'\]\)"):
        load_image_folder(_write_zip(tmp_path / "d.zip", files))


def test_missing_empty_and_flat_paths(tmp_path):
    with pytest.raises(CurlpruneError, match="does not exist"):
        load_image_folder(tmp_path / "nothing.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurlpruneError, match="contains no files"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(CurlpruneError, match=r"not laid out as .*found 'a.png'"):
        load_image_folder(tmp_path / "flat")
    (tmp_path / "cut.zip").write_bytes(_write_zip(tmp_path / "whole.zip", {"a/b.png": b"x" * 100}).read_bytes()[:80])
    with pytest.raises(CurlpruneError, match="cut.zip is not a readable zip file"):
        load_image_folder(tmp_path / "cut.zip")
    (tmp_path / "file.txt").write_text("hi")
    with pytest.raises(CurlpruneError, match="neither a folder nor a zip"):
        load_image_folder(tmp_path / "file.txt")


def test_cifar_jpeg_test_split(cifar_split):
    test = cifar_split("cifar10-jpeg.zip", "test")  # load_image_folder(zip, splits=["test"]), decoded once for the session
    assert test.classes == CIFAR_CLASSES
    assert test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert 100 < test.images.float().mean() < 140  # real photos, not blank decodes


# ----------------------------------------------------------------------------- digits, subsets


def test_digits_split_is_stratified_and_complete(digits):
    train, test = digits["train"], digits["test"]
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    per_class = torch.bincount(train.labels) + torch.bincount(test.labels)
    share = torch.bincount(test.labels) / per_class
    assert per_class.sum() == 1797 and ((share - 0.2).abs() < 0.02).all()
    again = load_digits_dataset(seed=0)["test"]
    other = load_digits_dataset(seed=1)["test"]
    assert torch.equal(again.images, test.images)
    assert not torch.equal(other.images, test.images)


def test_calibration_subset_is_seeded(digits):
    train = digits["train"]
    a, b, c = (calibration_subset(train, 100, seed) for seed in (3, 3, 4))
    assert len(a) == 100 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    rows = {tuple(img.flatten().tolist()) for img in calibration_subset(train, len(train), 0).images}
    assert len(rows) == len({tuple(img.flatten().tolist()) for img in train.images})  # no repeats
    with pytest.raises(CurlpruneError, match="cannot draw 5000 calibration images from a dataset of 1437"):
        calibration_subset(train, 5000, 0)


def test_class_balanced_subset(digits):
    test = digits["test"]
    subset = class_balanced_subset(test, 7, seed=0)
    assert torch.bincount(subset.labels).tolist() == [7] * 10
    assert torch.equal(subset.images, class_balanced_subset(test, 7, seed=0).images)
    with pytest.raises(CurlpruneError, match=r"class '\d' has only \d+ images, fewer than the 40 per class"):
        class_balanced_subset(test, 40, seed=0)


# ----------------------------------------------------------------------------- transforms


def test_pad_crop_flip_takes_windows_of_the_padded_image():
    torch.manual_seed(0)
    image = torch.arange(2 * 6 * 6, dtype=torch.uint8).reshape(2, 6, 6)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
    crops = PadCropFlip(6, 2, flip=True)(image.expand(64, 2, 6, 6))
    flips = 0
    for crop in crops:
        plain = any(torch.equal(crop, w) for w in windows)
        flipped = any(torch.equal(crop.flip(-1), w) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 10 < flips < 54  # about half are flipped
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 20  # crops differ per image
    no_flip = PadCropFlip(6, 2, flip=False)(image)
    assert no_flip.shape == (2, 6, 6) and any(torch.equal(no_flip, w) for w in windows)


def test_small_eval_transform_is_normalisation_only(digits):
    spec = input_spec("cifar:resnet20")
    image = digits["train"].images[:4].expand(4, 3, 8, 8).contiguous()
    image = torch.nn.functional.interpolate(image.float(), size=32).to(torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (image.float() / 255 - mean) / std
    assert torch.allclose(build_transform(spec, train=False)(image[0]), expected[0], atol=1e-6)
    assert torch.allclose(normalize_batch(image, spec), expected, atol=1e-6)
    assert build_transform(spec, train=True)(image[0]).shape == (3, 32, 32)


def test_imagenet_scale_transforms():
    spec = input_spec("torchvision:resnet50")
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    evaluated = build_transform(spec, train=False)(image)
    assert evaluated.shape == (3, 224, 224) and evaluated.dtype == torch.float32
    assert torch.equal(build_transform(spec, train=False)(image), evaluated)  # deterministic
    assert build_transform(spec, train=True)(image).shape == (3, 224, 224)


def test_batches_match_per_image_transform_and_cover_everything(digits):
    spec = input_spec("small:resnet-digits")
    test = digits["test"]
    transform = build_transform(spec, train=False)
    seen = []
    for images, labels in batches(test, spec, 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        seen += labels.tolist()
        assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
    assert sorted(seen) == sorted(test.labels.tolist())
    first, _ = next(batches(test, spec, 5))
    assert torch.allclose(first, torch.stack([transform(test.images[i]) for i in range(5)]))
    assert sum(len(y) for _, y in batches(test, spec, 64, train=True, drop_last=True)) == 320


def test_evaluate_counts_correct_predictions(digits):
    torch.manual_seed(0)
    spec = input_spec("small:resnet-digits")
    model = build("small:resnet-digits").train()
    test = digits["test"]
    accuracy = evaluate(model, test, spec, batch_size=100)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model.eval()(normalize_batch(test.images, spec))
    assert accuracy == int((logits.argmax(1) == test.labels).sum()) / len(test)


def test_image_dataset_basics():
    ds = ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), [2, 0, 1], ["a", "b", "c"])
    image, label = ds[0]
    assert image.shape == (1, 4, 4) and label == 2 and isinstance(label, int) and len(ds) == 3
    assert ds.subset([2, 1]).labels.tolist() == [1, 0]
