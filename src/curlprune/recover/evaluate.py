"""Evaluation for the training stages: logits of a dataset, top-1 across processes, class checks.

The batches go through :func:`curlprune.data.data.model_outputs`, the package's one evaluation loop.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from curlprune.data import ImageDataset, build_transform, count_correct, model_outputs
from curlprune.data.streaming import read, streams, workers_of
from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.recover import dist
from curlprune.recover.dist import DistContext

__all__ = ["TransformedDataset", "check_classes", "place_model", "predict", "prepare_teacher", "top1_accuracy"]


class TransformedDataset(Dataset):
    """``(transform(image), label, index)`` for every item of a dataset of ``(uint8 image, label, ...)``."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.base[index]
        return self.transform(item[0]), int(item[1]), index


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device`` (in place) in channels_last layout when asked."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def predict(
    model: nn.Module,
    dataset: Dataset,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
    channels_last: bool = True,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``model`` in eval mode on every item of ``dataset``.

    Args:
        model: the classifier (its train/eval mode is restored after).
        dataset: items ``(uint8 image [C, H, W], label, ...)``.
        transform: uint8 image -> float input (e.g. the eval transform); for a streamed dataset it
            runs in the worker processes, so it must draw no random number.
        batch_size, num_workers: of the DataLoader; a streamed dataset (:mod:`curlprune.data.streaming`)
            is read in its own ``data_workers`` instead.
        device: default: the model's.
        channels_last: feed images in channels_last layout.
    Returns:
        ``(logits [N, classes] float32 on CPU, labels [N] int64)``; empty tensors for an empty dataset.
    """
    if streams(dataset):  # decoded in the data's own workers; a damaged file is one line
        size = len(dataset)
        order = [list(range(start, min(start + batch_size, size))) for start in range(0, size, batch_size)]
        batches = ((x if isinstance(x, torch.Tensor) else torch.stack(x), y) for x, y, _ in read(dataset, transform, order, workers_of(dataset)))
    else:
        batches = ((x, y) for x, y, _ in DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, num_workers=num_workers))
    logits, labels = [], []
    for out, y in model_outputs(model, batches, device=device, channels_last=channels_last):
        logits.append(out.float().cpu())
        labels.append(y)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def top1_accuracy(
    model: nn.Module,
    dataset: ImageDataset,
    spec: InputSpec,
    *,
    ctx: DistContext,
    batch_size: int = 128,
    channels_last: bool = True,
) -> float:
    """Top-1 accuracy (in %) on an ImageDataset with the eval transform, on ``ctx.device``.

    :func:`curlprune.data.data.count_correct` over processes: under torchrun each rank counts a
    contiguous share and the counts are summed.

    Args:
        model: the classifier.
        dataset: uint8 images and labels.
        spec: the model's input recipe.
        ctx: this process's context (device, rank, world size).
        batch_size: images per forward pass.
        channels_last: feed images in channels_last layout.
    Returns:
        Top-1 in % (0-100) over the whole dataset, the same on every rank.
    """
    share = dataset.subset(list(dist.chunk_range(ctx, len(dataset))))
    correct = count_correct(model, share, spec, batch_size, device=ctx.device, channels_last=channels_last)
    correct_total, seen_total = dist.all_reduce_sum(ctx, [float(correct), float(len(share))])
    return 100.0 * correct_total / max(seen_total, 1.0)


def output_classes(model: nn.Module, dataset: Dataset, spec: InputSpec, device: torch.device, channels_last: bool) -> int:
    """Number of logits ``model`` produces for one sample of ``dataset``."""
    logits, _ = predict(model, Subset(dataset, [0]), build_transform(spec, train=False), batch_size=1, device=device, channels_last=channels_last)
    return int(logits.shape[1])


def check_classes(role: str, model: nn.Module, data: Mapping[str, Dataset], spec: InputSpec, device: torch.device, channels_last: bool) -> None:
    """Check that ``model``'s output width is the number of classes of ``data["train"]``.

    Raises:
        CurlpruneError: they differ (``role`` names the model in the message: "teacher", "student").
    """
    train = data["train"]
    expected = len(train.classes) if hasattr(train, "classes") else None
    if expected is None:
        return
    produced = output_classes(model, train, spec, device, channels_last)
    if produced != expected:
        raise CurlpruneError(
            f"{role} outputs {produced} classes but the data has {expected}: "
            f"use a {role} trained on this dataset's classes (or a dataset with {produced} classes)"
        )


def prepare_teacher(teacher: nn.Module, student: nn.Module, data: Mapping[str, Dataset], spec: InputSpec, ctx: DistContext, channels_last: bool) -> None:
    """Put the frozen teacher on the device in eval mode and check that it fits the data.

    Raises:
        CurlpruneError: teacher and student are the same module, or the teacher does not fit the data.
    """
    if teacher is student:
        raise CurlpruneError("teacher and student are the same module: pass a copy of the model as the student (copy.deepcopy)")
    place_model(teacher, ctx.device, channels_last).eval()
    check_classes("teacher", teacher, data, spec, ctx.device, channels_last)
