"""Image transforms: uint8 ``[C, H, W]`` (or a batch ``[B, C, H, W]``) -> normalised float.

Small inputs (CIFAR, digits): short side resized to the input size (a no-op for images already at
that size), then train = random crop after zero padding + optional flip, eval = centre crop. ImageNet-sized inputs: train = RandomResizedCrop + flip, eval = Resize +
CenterCrop. Every eval transform, and the small-input train transform, also accepts a whole
batch (with a fresh random crop/flip per image), which is how in-memory data is fed fast.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from curlprune.models.spec import InputSpec

SMALL_INPUT = 64  # inputs up to this side are trained with pad-crop instead of resized crops

Transform = Callable[[torch.Tensor], torch.Tensor]


class PadCropFlip:
    """Random ``size`` crop of the zero-padded image, then a random horizontal flip.

    Works on one image ``[C, H, W]`` or a batch ``[B, C, H, W]``; each image of a batch gets its
    own crop and flip (drawn from the global torch RNG), all in a few tensor ops.
    """

    def __init__(self, size: int, padding: int, flip: bool) -> None:
        self.size, self.padding, self.flip = size, padding, flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = images if images.dim() == 4 else images.unsqueeze(0)
        b, _, h, w = batch.shape
        p = self.padding
        padded = torch.nn.functional.pad(batch, (p, p, p, p))
        top = torch.randint(0, h + 2 * p - self.size + 1, (b, 1))
        left = torch.randint(0, w + 2 * p - self.size + 1, (b, 1))
        steps = torch.arange(self.size)
        rows = (top + steps)[:, :, None]  # [B, S, 1]
        cols = (left + steps)[:, None, :]  # [B, 1, S]
        if self.flip:
            flipped = torch.rand(b) < 0.5
            cols = torch.where(flipped[:, None, None], cols.flip(-1), cols)
        out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # [B, S, S, C]
        out = out.permute(0, 3, 1, 2).contiguous()
        return out if images.dim() == 4 else out[0]

    def __repr__(self) -> str:
        return f"PadCropFlip(size={self.size}, padding={self.padding}, flip={self.flip})"


def normalizer(spec: InputSpec) -> v2.Compose:
    """uint8 -> float in [0, 1] -> per-channel (x - mean) / std."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])


def normalize_batch(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Normalise a uint8 batch ``[B, C, H, W]`` (already at the model's size) in one go."""
    return normalizer(spec)(images)


def _steps(spec: InputSpec, train: bool, flip: bool) -> list[Callable]:
    """The geometric steps of the transform (before normalisation), in order."""
    steps: list[Callable] = []
    if spec.size <= SMALL_INPUT:
        # Images of another size (e.g. 96 px photos for a 32 px model) first get their short side
        # resized to ``resize`` (default: the input size); a no-op for images already at that size.
        steps.append(v2.Resize(spec.resize or spec.size, antialias=True))
        steps.append(PadCropFlip(spec.size, spec.crop_padding, flip) if train else v2.CenterCrop(spec.size))
    elif train:
        steps.append(v2.RandomResizedCrop(spec.size, antialias=True))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [v2.Resize(spec.resize or spec.size, antialias=True), v2.CenterCrop(spec.size)]
    return steps


def build_transform(spec: InputSpec, train: bool, flip: bool | None = None) -> Transform:
    """The train or eval transform for a model's InputSpec (``flip`` overrides ``spec.flip``)."""
    return v2.Compose([*_steps(spec, train, spec.flip if flip is None else flip), normalizer(spec)])


def split_transform(spec: InputSpec, train: bool) -> tuple[Transform | None, Transform | None]:
    """:func:`build_transform` cut in two: ``(fixed, random)``, where ``random(fixed(x))`` equals
    ``build_transform(spec, train)(x)`` exactly.

    ``fixed`` is the leading run of steps that draw no random number (resize, centre crop, and the
    normalisation when nothing random follows), so it may run anywhere, e.g. in a DataLoader worker
    process; ``random`` is the rest, which draws from the global torch RNG and so runs where that
    RNG is (the training process) in the order of the batches. Either is None when empty (the eval
    transform has no random part; RandomResizedCrop leaves no fixed part).
    """
    steps = [*_steps(spec, train, spec.flip), normalizer(spec)]
    cut = 0
    while cut < len(steps) and isinstance(steps[cut], (v2.Resize, v2.CenterCrop, v2.Compose)):
        cut += 1  # the normaliser (a Compose of ToDtype, Normalize) draws nothing either
    fixed, random = steps[:cut], steps[cut:]
    return (v2.Compose(fixed) if fixed else None), (v2.Compose(random) if random else None)


def transforms_batches(spec: InputSpec, train: bool) -> bool:
    """Whether ``build_transform(spec, train)`` may be applied to a whole batch at once.

    Eval transforms are deterministic and the small-input train transform draws per image;
    RandomResizedCrop would draw one crop for the whole batch, so it runs per image.
    """
    return not train or spec.size <= SMALL_INPUT
