"""The input recipe of a model: size, channels, normalisation and train-time augmentation.

A leaf module: it imports nothing of the package, so data loading and transforms can type their
arguments with :class:`InputSpec` without importing the model registry.
"""
from __future__ import annotations

from dataclasses import dataclass

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
