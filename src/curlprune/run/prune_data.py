"""The images of the prune stage, however they are given: the calibration draw, the images of the
batch-norm re-estimation and the top-1 evaluation (used by :mod:`curlprune.run.prune`).

Two kinds of source behave alike:

* :class:`SplitImages`: a split of uint8 images (``curlprune.data.data.ImageDataset``: "digits", an
  ImageFolder folder or zip; or a ``curlprune.data.streaming.StreamingDataset``, decoded as drawn) with the model's eval transform (:class:`~curlprune.models.spec.InputSpec`),
  what the command line gives;
* :class:`TensorImages`: images as the model takes them (already normalised): a float tensor
  ``[N, C, H, W]``, or a map-style ``Dataset`` / ``DataLoader`` of ``(image, label)``, what a
  Python caller has.

Both draw ``n`` images with the same seeded permutation (:func:`curlprune.data.data.calibration_subset`),
so the same images give the same calibration set either way.
"""
from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curlprune.data import data as datasets
from curlprune.data.streaming import DataSettings, open_splits
from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.recover.bn import images_of, stack_images

BATCH = 256
NO_DATA = "no data"


class SplitImages:
    """A split of uint8 images with the model's eval transform."""

    def __init__(self, ds: datasets.ImageDataset, spec: InputSpec) -> None:
        self.ds, self.spec = ds, spec

    def __len__(self) -> int:
        return len(self.ds)

    def draw(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` seeded images (all when ``n >= len``), transformed: ``(float [n, C, S, S], int64 labels [n])``."""
        subset = datasets.calibration_subset(self.ds, min(n, len(self.ds)), seed)
        images, labels = zip(*datasets.batches(subset, self.spec, BATCH))
        return torch.cat(images), torch.cat(labels)

    def subset(self, n: int, seed: int) -> SplitImages:
        return SplitImages(datasets.calibration_subset(self.ds, n, seed), self.spec)

    def top1(self, model: nn.Module) -> float:
        """Top-1 in % with the eval transform (:func:`curlprune.data.data.evaluate`)."""
        return 100.0 * datasets.evaluate(model, self.ds, self.spec)


class TensorImages:
    """Images as the model takes them: a float tensor, or a ``Dataset``/``DataLoader`` of ``(image, label)``."""

    def __init__(self, data: Any) -> None:
        self.images: Sized = images_of(data)

    def __len__(self) -> int:
        return len(self.images)

    def labels(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The labels of ``indices`` (None for a bare image tensor)."""
        if isinstance(self.images, torch.Tensor):
            return None
        items = [self.images[int(i)] for i in indices]
        if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            return None
        return torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)

    def draw(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` seeded images (all when ``n >= len``), in the order of :func:`curlprune.data.data.calibration_subset`'s
        draw: ``(float [n, ...], int64 labels [n] or None)``."""
        picked = _permutation(len(self), seed)[:n]
        return stack_images(self.images, picked), self.labels(picked)

    def subset(self, n: int, seed: int) -> TensorImages:
        images, labels = self.draw(n, seed)
        return TensorImages(images if labels is None else torch.utils.data.TensorDataset(images, labels))

    def top1(self, model: nn.Module) -> float:
        """Top-1 in % over all images (batches of 256, eval mode, no gradient)."""
        everything = torch.arange(len(self))
        labels = self.labels(everything)
        if labels is None:
            raise CurlpruneError("the evaluation images have no labels: give a Dataset or DataLoader of (image, label)")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        batches = ((stack_images(self.images, everything[s : s + BATCH]), labels[s : s + BATCH]) for s in range(0, len(self), BATCH))
        correct = sum(int((logits.argmax(1).cpu() == y).sum()) for logits, y in datasets.model_outputs(model, batches, device=device))
        return 100.0 * correct / max(1, len(self))


@dataclass
class PruneImages:
    """The prune stage's images: ``train`` (calibration, BN re-estimation) and ``test`` (top-1); either may be None.

    source: what they were given as, for messages ("digits", a path, "tensor", ...).
    """

    train: SplitImages | TensorImages | None
    test: SplitImages | TensorImages | None
    source: str

    def calibration(self, n: int, seed: int, criterion: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The calibration batch: ``n`` seeded training images and their labels.

        Raises:
            CurlpruneError: no training images, or fewer than ``n``.
        """
        if self.train is None and self.source == NO_DATA:
            raise CurlpruneError(f"criterion {criterion!r} needs data: pass calibration images (data=..., --data), or use a data-free criterion (l1, bn, random)")
        if self.train is None:
            raise CurlpruneError(f"criterion {criterion!r} needs training images and {self.source} has no 'train' split: lay it out as train/<class>/<image>")
        if n > len(self.train):
            raise CurlpruneError(f"calib {n} is more than the {len(self.train)} training images: use --calib {len(self.train)} or fewer")
        return self.train.draw(n, seed)


def _permutation(total: int, seed: int) -> torch.Tensor:
    """The seeded permutation :func:`curlprune.data.data.calibration_subset` draws from."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))


def load_images(data: Any, spec: InputSpec | None, seed: int, test: Any = None, settings: DataSettings | None = None) -> PruneImages:
    """The prune stage's images from what the caller gives.

    Args:
        data: "digits"; an ImageFolder folder or zip (``train/``, ``test/``); loaded splits
            (``{"train": ImageDataset, "test": ...}``); a float tensor of images; a ``Dataset`` or
            ``DataLoader`` of ``(image, label)``; or None.
        spec: the model's input recipe, needed for uint8 splits (the eval transform).
        seed: seed of the digits train/test split.
        test: evaluation images for the tensor/dataset forms (same forms); None = no evaluation,
            except for split data, whose ``test`` split is used.
        settings: how a folder or zip is read, in memory or streamed (:class:`curlprune.data.streaming.DataSettings`;
            None = auto); streamed splits are drawn from alike (the same seeded images).
    Returns:
        :class:`PruneImages`.
    Raises:
        CurlpruneError: a path that does not exist, split data without an input recipe, or a form
            that is none of these.
    """
    if data is None:
        return PruneImages(None, None if test is None else TensorImages(test), NO_DATA)
    if isinstance(data, (str, Path, dict)):
        splits, name = _splits(data, seed, settings), (data if isinstance(data, str) else "the data" if isinstance(data, dict) else str(data))
        if spec is None:
            raise CurlpruneError(f"{name} holds uint8 images: give input_spec= (how the model's images are resized and normalised), "
                                 "or pass the images as a float tensor / Dataset as the model takes them")
        train = splits.get("train", splits.get(datasets.SINGLE_SPLIT))
        return PruneImages(None if train is None else SplitImages(train, spec),
                           SplitImages(splits["test"], spec) if "test" in splits else (None if test is None else TensorImages(test)), str(name))
    return PruneImages(TensorImages(data), None if test is None else TensorImages(test), type(data).__name__)


def _splits(data: str | Path | dict, seed: int, settings: DataSettings | None) -> dict:
    """``{"train", ...}`` uint8 datasets from "digits", an ImageFolder folder/zip (in memory or
    streamed, :func:`curlprune.data.streaming.open_splits`), or given splits."""
    if isinstance(data, dict):
        return data
    if str(data) != "digits" and not Path(data).exists():
        raise CurlpruneError(f"data {data} does not exist: pass an ImageFolder folder or .zip (train/<class>/..., test/<class>/...) or 'digits'")
    return open_splits(data, seed, None, settings)
