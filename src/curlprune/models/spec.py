"""The input recipe of a model (size, channels, normalisation, train-time augmentation) and the
output contract of a classifier (:func:`is_logits`).

A leaf module: it imports nothing of the package, so data loading and transforms can type their
arguments with :class:`InputSpec` without importing the model registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input, and how its training images are augmented.

    size:         side of the square input.
    channels:     input channels.
    mean, std:    per-channel normalisation of [0, 1] pixels.
    resize:       eval-time resize before the centre crop (ImageNet-style models); None: no resize.
    num_classes:  outputs of the classifier.
    flip:         random horizontal flips when training (off for digits, where they change meaning).
    crop_padding: zero padding of the random crop used to train small-input models.
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None
    num_classes: int
    flip: bool = True
    crop_padding: int = 4


def is_logits(output: Any) -> bool:
    """Whether a model's output is one ``[N, classes]`` logits tensor: what the top-1 evaluation,
    the class count of a model by import path and the criteria that read class probabilities
    (KL, Taylor) need. A dict, a tuple, or a dense ``[N, K, H, W]`` map is not."""
    return isinstance(output, torch.Tensor) and output.dim() == 2
