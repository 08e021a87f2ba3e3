"""Batch-norm re-estimation: recompute the running statistics of a (pruned) model's BN layers from
training images, without training (docs/method.md §8; the tier-0 figures of
benchmarks/results/cifar_resnet56.md are measured after it).

Slicing a model keeps each BN layer's statistics of the channels it keeps, but the inputs of the
layers after a pruned one have changed, so those statistics are stale; a forward pass over a few
thousand training images with the BN layers in training mode and a cumulative average
(``momentum=None``) replaces them. Nothing else changes: no gradient, no parameter update.
"""
from __future__ import annotations

from collections.abc import Sized
from typing import Any

import torch
from torch import nn

from curlprune.errors import CurlpruneError

DEFAULT_BN_IMAGES = 2048  # training images for the re-estimation (the benchmark's setting, benchmarks/cifar_resnet56.py)
BN_BATCH = 256


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers (any ``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm) that
    keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def draw_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """``n`` of ``range(total)`` drawn without replacement (seeded; the same draw as
    :func:`curlprune.data.data.calibration_subset`), or all of them in order when ``n >= total``."""
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def images_of(data: Any) -> Sized:
    """Index-able images: a float tensor ``[N, C, H, W]`` as it is, the dataset of a ``DataLoader``,
    or a map-style ``Dataset`` (items ``image`` or ``(image, label)``).

    Raises:
        CurlpruneError: ``data`` is none of these.
    """
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or not data.is_floating_point():
            raise CurlpruneError(f"images must be a float tensor [N, C, H, W] (as the model takes them), got {data.dtype} {list(data.shape)}")
        return data
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise CurlpruneError(f"data must be a float tensor of images, a Dataset or a DataLoader of (image, label), got {type(data).__name__}")
    return data


def stack_images(data: Sized, indices: torch.Tensor) -> torch.Tensor:
    """The images ``data[i]`` for ``i`` in ``indices`` as one float tensor (the image of an
    ``(image, label)`` item)."""
    if isinstance(data, torch.Tensor):
        return data[indices]
    items = [data[int(i)] for i in indices]
    images = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    if not all(isinstance(x, torch.Tensor) for x in images):
        raise CurlpruneError("the dataset's items must be image tensors or (image tensor, label) pairs")
    return torch.stack(images).float()


def recalibrate_bn(model: nn.Module, data: Any, n: int = DEFAULT_BN_IMAGES, *, seed: int = 0,
                   batch_size: int = BN_BATCH) -> nn.Module:
    """Re-estimate the running mean and variance of every batch-norm layer of ``model`` in place.

    Each BN layer's statistics are reset and recomputed as the cumulative average over the batches
    (``momentum=None``) of a forward pass over ``n`` images, with only the BN layers in training
    mode (dropout and the rest stay as they are) and no gradient; every module's mode and every BN
    layer's momentum are restored afterwards. Weights and biases are not changed.

    Args:
        model: the model (on any device; the images follow it).
        data: float images ``[N, C, H, W]`` as the model takes them (already normalised), or a
            ``Dataset`` / ``DataLoader`` of ``(image, label)`` (its dataset is read by index).
        n: images to use: a seeded draw of ``n`` of them, all when ``n >= N``; 0 = do nothing.
        seed: seed of the draw.
        batch_size: images per forward pass (the average is over batches).
    Returns:
        ``model`` itself.
    Raises:
        CurlpruneError: ``n`` is negative, ``data`` holds no images or is not a tensor/dataset.

    Source: the BN re-estimation of benchmarks/cifar_resnet56.py (tier 0), also known as "BN
    recalibration" in the pruning literature (e.g. EagleEye, Li et al. ECCV 2020).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise CurlpruneError(f"bn_recalibrate must be a number of images >= 0 (0 = off), got {n!r}")
    layers = bn_layers(model)
    if n == 0 or not layers:
        return model
    images = images_of(data)
    if len(images) == 0:
        raise CurlpruneError("no images for the batch-norm re-estimation: give training images, or n=0 to skip it")
    picked = draw_indices(len(images), n, seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for start in range(0, len(picked), batch_size):
                model(stack_images(images, picked[start : start + batch_size]).to(device))
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
    return model
