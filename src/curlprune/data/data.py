"""Datasets held in memory as uint8 tensors: ImageFolder folders or zips, sklearn digits,
seeded calibration subsets, batching with the model's transforms, and top-1 evaluation.

Images are decoded once and kept as uint8 (CIFAR-10 train: 50k x 3 x 32 x 32 = 154 MB), so
epochs never decode again and whole batches are transformed with a few tensor ops.
"""
from __future__ import annotations

import contextlib
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from curlprune.data.decode import decode_rgb, read_file
from curlprune.data.imagetree import folder_files, zip_files
from curlprune.data.transforms import build_transform, transforms_batches
from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.progress import progress

LAYOUT = "<split>/<class>/<image> or <class>/<image>"
SINGLE_SPLIT = "all"


class ImageDataset(torch.utils.data.Dataset):
    """Labelled uint8 images in memory; ``ds[i] -> (uint8 [C, H, W], int label)``.

    images:  uint8 ``[N, C, H, W]`` when all images share a size, else a list of ``[C, H, W]``.
    labels:  int64 ``[N]``, indices into ``classes``.
    classes: class names; label ``k`` is ``classes[k]``.
    """

    def __init__(self, images: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor | Sequence[int], classes: Sequence[str]) -> None:
        if not isinstance(images, torch.Tensor):
            images = list(images)
            if images and all(img.shape == images[0].shape for img in images):
                images = torch.stack(images)
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes = list(classes)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def uniform(self) -> bool:
        """True when all images share one size (``images`` is one tensor)."""
        return isinstance(self.images, torch.Tensor)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """A new dataset with the images at ``indices``, in that order."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        images = self.images[indices] if self.uniform else [self.images[i] for i in indices.tolist()]
        return ImageDataset(images, self.labels[indices], self.classes)

    def __repr__(self) -> str:
        shape = list(self.images.shape[1:]) if self.uniform else "mixed sizes"
        return f"ImageDataset({len(self)} images, {shape}, {len(self.classes)} classes)"


# ----------------------------------------------------------------------------- image folders


def load_image_folder(path: str | Path, splits: Sequence[str] | None = None) -> dict[str, ImageDataset]:
    """Load an ImageFolder tree (a folder or a .zip) into memory, one ImageDataset per split.

    Layout ``<split>/<class>/<image>`` gives one dataset per split; ``<class>/<image>`` gives the
    single split ``"all"``. Classes are the sorted class folder names and must be the same in every
    split. Images become RGB. Symlinked split, class and image entries are followed, in folders
    and in zips (entries stored by ``zip -y``); a symlink cycle is refused.

    Args:
        path: a folder or a ``.zip`` with that layout.
        splits: decode only these splits (e.g. ``["test"]``); None = all.
    Returns:
        split name -> :class:`ImageDataset` of uint8 ``[3, H, W]`` images.
    Raises:
        CurlpruneError: a missing path or split, a bad layout, differing classes, an unreadable image,
            a symlink cycle or a broken symlink.
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        files, reader = open_tree(path, stack)
        tree = parse_layout(path, files)
        classes = common_classes(path, tree)
        return {split: _decode_split(path, tree[split], classes, reader) for split in wanted_splits(path, tree, splits)}


def wanted_splits(path: Path, tree: dict[str, dict[str, list[str]]], splits: Sequence[str] | None) -> list[str]:
    """The splits to load: ``splits``, or every split of ``tree`` when None.

    Raises:
        CurlpruneError: a split asked for is not in the tree (the message lists those it has).
    """
    wanted = list(tree) if splits is None else list(splits)
    for split in wanted:
        if split not in tree:
            raise CurlpruneError(f"{path} has no split {split!r}: it has {sorted(tree)}; lay the images out as {split}/<class>/<image>")
    return wanted


def split_names(path: str | Path) -> list[str]:
    """The splits of an ImageFolder tree (a folder or a .zip), without decoding any image:
    the ``<split>`` folder names, or ``["all"]`` for a ``<class>/<image>`` layout.

    Raises:
        CurlpruneError: as :func:`load_image_folder` for a missing path or a bad layout.
    """
    with contextlib.ExitStack() as stack:
        files, _ = open_tree(Path(path), stack)
        return sorted(parse_layout(Path(path), files))


def open_tree(path: Path, stack: contextlib.ExitStack) -> tuple[list[str], Callable[[str], bytes]]:
    """All file paths (POSIX, relative) of a folder or zip, and a function reading one of them.

    Symlinked folders and files are followed (:mod:`curlprune.data.imagetree`); a symlink cycle, a broken
    link or, in a zip, one leading outside the archive is a :class:`CurlpruneError` naming it.
    """
    if not path.exists():
        raise CurlpruneError(f"data path {path} does not exist: pass a folder or .zip laid out as {LAYOUT}")
    if path.is_dir():  # directory symlinks followed, cycles refused (issue 18)
        found = folder_files(path)
        return _visible(list(found)), lambda name: found[name].read_bytes()
    if zipfile.is_zipfile(path):  # symlink entries (zip -y) followed inside the archive
        archive = stack.enter_context(zipfile.ZipFile(path))
        members = zip_files(archive, path)
        return _visible(list(members)), lambda name: archive.read(members[name])
    if path.suffix.lower() == ".zip":
        raise CurlpruneError(f"{path} is not a readable zip file (damaged or incomplete): download or copy it again")
    raise CurlpruneError(f"data path {path} is neither a folder nor a zip file: pass a folder or .zip laid out as {LAYOUT}")


def _visible(files: list[str]) -> list[str]:
    """Drop hidden files and macOS resource forks (``.DS_Store``, ``__MACOSX/``)."""
    return sorted(f for f in files if not any(part.startswith((".", "__MACOSX")) for part in PurePosixPath(f).parts))


def parse_layout(path: Path, files: list[str]) -> dict[str, dict[str, list[str]]]:
    """Group file paths into ``{split: {class: [files]}}``."""
    if not files:
        raise CurlpruneError(f"{path} contains no files: expected images laid out as {LAYOUT}")
    depths = [len(PurePosixPath(f).parts) for f in files]
    usual = max(set(depths), key=depths.count)
    if usual not in (2, 3) or any(d != usual for d in depths):
        odd = next((f for f, d in zip(files, depths) if d != usual), files[0])
        raise CurlpruneError(f"{path} is not laid out as {LAYOUT} (found {odd!r}): move the images into class folders")
    tree: dict[str, dict[str, list[str]]] = {}
    for f in files:
        parts = PurePosixPath(f).parts
        split, cls = (SINGLE_SPLIT, parts[0]) if len(parts) == 2 else parts[:2]
        tree.setdefault(split, {}).setdefault(cls, []).append(f)
    return tree


def common_classes(path: Path, tree: dict[str, dict[str, list[str]]]) -> list[str]:
    """The sorted class names, which every split must share."""
    per_split = {split: sorted(classes) for split, classes in tree.items()}
    first, classes = next(iter(per_split.items()))
    for split, other in per_split.items():
        if other != classes:
            differ = sorted(set(classes) ^ set(other))
            raise CurlpruneError(
                f"{path}: splits {first!r} and {split!r} have different class folders (differing: {differ}): "
                "every split needs the same class folders"
            )
    return classes


def _decode_split(path: Path, by_class: dict[str, list[str]], classes: list[str], reader: Callable[[str], bytes]) -> ImageDataset:
    images, labels = [], []
    total = sum(len(by_class[cls]) for cls in classes)
    with warnings.catch_warnings(), progress(f"loading {path.name}", total, unit="images", final_line=False, plain_only=True) as bar:
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders on every call
        for label, cls in enumerate(classes):
            for name in by_class[cls]:
                images.append(decode_rgb(read_file(reader, name, f"{path}:{name}"), f"{path}:{name}"))
                labels.append(label)
                bar.advance()
    return ImageDataset(images, labels, classes)



# ----------------------------------------------------------------------------- digits


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.2) -> dict[str, ImageDataset]:
    """The 1,797 real 8x8 handwritten digits of scikit-learn, split stratified by class.

    Args:
        seed: seed of the stratified split.
        test_fraction: share of the images in the test split.
    Returns:
        ``{"train", "test"}`` :class:`ImageDataset` s of uint8 ``[1, 8, 8]`` images (0..16 scaled to 0..255).
    """
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only the digits need it
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy((digits.images * (255 / 16)).round()).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    full = ImageDataset(images, labels, [str(d) for d in range(10)])
    return {"train": full.subset(sorted(train_idx)), "test": full.subset(sorted(test_idx))}


def load_splits(source: str | Path, seed: int = 0, splits: Sequence[str] | None = None) -> dict[str, ImageDataset]:
    """The datasets of a data source: ``"digits"`` (:func:`load_digits_dataset`) or an ImageFolder
    folder or zip (:func:`load_image_folder`); the one loader of the prune stage and the run.

    Args:
        source: ``"digits"``, or a folder or ``.zip`` laid out as :data:`LAYOUT`.
        seed: seed of the digits' train/test split (a folder has its own splits).
        splits: decode only these splits of a folder (None = all; the digits have train and test).
    Returns:
        split name -> :class:`ImageDataset`.
    Raises:
        CurlpruneError: as :func:`load_image_folder`.
    """
    if source == "digits":
        return load_digits_dataset(seed=seed)
    return load_image_folder(source, splits)


# ----------------------------------------------------------------------------- subsets


def calibration_subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    """``n`` images drawn at random without replacement (the same ``n`` for the same ``seed``).

    Raises:
        CurlpruneError: ``n`` is not in 1..len(ds).
    """
    if not 1 <= n <= len(ds):
        raise CurlpruneError(f"cannot draw {n} calibration images from a dataset of {len(ds)}: choose 1..{len(ds)}")
    generator = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=generator)[:n])


def class_balanced_subset(ds: ImageDataset, per_class: int, seed: int) -> ImageDataset:
    """Exactly ``per_class`` random images of every class (seeded), grouped by class.

    Raises:
        CurlpruneError: a class has fewer than ``per_class`` images.
    """
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label, name in enumerate(ds.classes):
        members = torch.nonzero(ds.labels == label).flatten()
        if len(members) < per_class:
            raise CurlpruneError(
                f"class {name!r} has only {len(members)} images, fewer than the {per_class} per class asked for: "
                f"ask for at most {len(members)} per class"
            )
        picked.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return ds.subset(torch.cat(picked))


# ----------------------------------------------------------------------------- batches, evaluation


def batches(
    ds: ImageDataset,
    spec: InputSpec,
    batch_size: int,
    *,
    train: bool = False,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(float images [B, C, S, S], int64 labels [B])`` with the model's train/eval transform.

    Uniformly sized data is transformed a whole batch at a time where the transform allows it;
    otherwise image by image. Augmentation draws from the global torch RNG, order from ``generator``.
    A dataset that is not held in memory (:class:`curlprune.data.streaming.StreamingDataset`) makes
    its own batches, in the same order, decoded in DataLoader worker processes.
    """
    if not isinstance(ds, ImageDataset):
        yield from ds.batches(spec, batch_size, train=train, shuffle=shuffle, generator=generator, drop_last=drop_last)
        return
    transform = build_transform(spec, train)
    order = torch.randperm(len(ds), generator=generator) if shuffle else torch.arange(len(ds))
    whole_batches = ds.uniform and transforms_batches(spec, train)
    stop = len(ds) - len(ds) % batch_size if drop_last else len(ds)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if whole_batches:
            images = transform(ds.images[idx])
        else:
            images = torch.stack([transform(ds.images[i]) for i in idx.tolist()])
        yield images, ds.labels[idx]


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a batch to ``device``, in channels_last layout for images ``[B, C, H, W]`` when asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def model_outputs(
    model: nn.Module,
    batch_iter: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | None = None,
    channels_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The one evaluation loop of the package: ``(logits [B, classes], labels [B])`` per batch.

    Args:
        model: run in eval mode under ``torch.no_grad`` (its mode is restored when the loop ends).
        batch_iter: ``(inputs [B, C, H, W] float, labels [B])`` batches, already transformed.
        device: where the inputs go; default: the model's.
        channels_last: feed images in channels_last layout.
    Returns:
        An iterator of the model's logits (on ``device``, its dtype) and the labels as given.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, labels in batch_iter:
                yield model(to_input(images, device, channels_last)), labels
    finally:
        model.train(was_training)


def count_correct(
    model: nn.Module,
    ds: ImageDataset,
    spec: InputSpec,
    batch_size: int = 256,
    *,
    device: torch.device | None = None,
    channels_last: bool = True,
) -> int:
    """How many images of ``ds`` ``model`` classifies correctly (top-1) with the eval transform.

    Args:
        model: the classifier (run through :func:`model_outputs`: eval mode, restored after).
        ds: uint8 images and labels.
        spec: the model's input recipe (eval transform).
        batch_size: images per forward pass.
        device: default: the model's.
        channels_last: feed images in channels_last layout.
    Returns:
        The number of correct top-1 predictions (0 .. ``len(ds)``).
    """
    outputs = model_outputs(model, batches(ds, spec, batch_size), device=device, channels_last=channels_last)
    correct = 0
    with progress(f"evaluating on {len(ds)} images", len(ds), unit="images", final_line=False, plain_only=True) as bar:
        for logits, labels in outputs:  # a line every 30 s off a terminal (curlprune.progress)
            correct += int((logits.argmax(1).cpu() == labels).sum())
            bar.advance(len(labels))
    return correct


def evaluate(model: nn.Module, ds: ImageDataset, spec: InputSpec, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``ds`` with the eval transform.

    The model is put in channels_last layout (and stays so); see :func:`count_correct`.

    Returns:
        A fraction in [0, 1] (not %).
    """
    model.to(memory_format=torch.channels_last)
    return count_correct(model, ds, spec, batch_size) / max(1, len(ds))
