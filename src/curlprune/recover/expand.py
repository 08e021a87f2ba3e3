"""The 6x data expansion of CURL's label-refinement stage, generated on the fly.

The authors wrote six JPEG versions of every training image (docs/method.md §6); here every
version is computed when it is read, deterministically from (source index, version, seed), so
the expanded set costs no disk and reads the same every time.

Index layout (stable): item ``k`` of an expansion of ``N`` images is version ``k // N`` of
source image ``k % N``; so items ``0 .. N-1`` are the originals in their order, ``N .. 2N-1``
the 2x2 patch shuffles, and so on. Versions (``VERSIONS``):

0. ``original``: unchanged.
1-3. ``shuffle2/3/4``: patch shuffle with a b x b grid (b = 2, 3, 4). The authors resize the
   image to the nearest lower multiple of b; to keep every version the original size (one
   uniform tensor shape for batching) we instead take the CENTRED ``(H//b*b) x (W//b*b)``
   region, cut it into b x b equal tiles, permute the tiles and put the region back; the
   border of ``H - H//b*b`` rows and ``W - W//b*b`` columns (fewer than b, split between the
   two sides) keeps its original pixels. Example: 32x32 with b = 3 shuffles the centred 30x30
   region as 10x10 tiles and keeps one original row/column on each side. An image smaller
   than b pixels is returned unchanged.
4. ``cutout``: alpha ~ U(0.2, 0.5); a ``floor(alpha*H) x floor(alpha*W)`` rectangle (at least
   1x1) at a uniformly random position fully inside the image is set to 0 in uint8 space.
5. ``rotate``: a random integer angle in [0, 360] degrees, counter-clockwise (as PIL), nearest
   neighbour, same canvas, black (0) corners.

Labels are the source image's label.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

VERSIONS = ("original", "shuffle2", "shuffle3", "shuffle4", "cutout", "rotate")
CUTOUT_RANGE = (0.2, 0.5)


def patch_shuffle(image: torch.Tensor, blocks: int, rng: np.random.Generator) -> torch.Tensor:
    """Permute the ``blocks x blocks`` equal tiles of the image's centred tileable region."""
    channels, height, width = image.shape
    tile_h, tile_w = height // blocks, width // blocks
    if tile_h == 0 or tile_w == 0:
        return image.clone()
    region_h, region_w = tile_h * blocks, tile_w * blocks
    top, left = (height - region_h) // 2, (width - region_w) // 2
    region = image[:, top : top + region_h, left : left + region_w]
    tiles = region.reshape(channels, blocks, tile_h, blocks, tile_w).permute(1, 3, 0, 2, 4).reshape(-1, channels, tile_h, tile_w)
    order = torch.from_numpy(rng.permutation(blocks * blocks))
    shuffled = tiles[order].reshape(blocks, blocks, channels, tile_h, tile_w).permute(2, 0, 3, 1, 4).reshape(channels, region_h, region_w)
    out = image.clone()
    out[:, top : top + region_h, left : left + region_w] = shuffled
    return out


def cutout_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, box_h, box_w)`` of a cutout rectangle lying fully inside the image."""
    alpha = rng.uniform(*CUTOUT_RANGE)
    box_h, box_w = max(1, int(alpha * height)), max(1, int(alpha * width))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    return top, left, box_h, box_w


def cutout(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Set a random rectangle of ``alpha`` times the height and width to 0 (alpha ~ U(0.2, 0.5))."""
    top, left, box_h, box_w = cutout_box(image.shape[-2], image.shape[-1], rng)
    out = image.clone()
    out[:, top : top + box_h, left : left + box_w] = 0
    return out


def rotate(image: torch.Tensor, angle: int) -> torch.Tensor:
    """Rotate counter-clockwise by ``angle`` degrees: nearest neighbour, same canvas, black corners."""
    return TF.rotate(image, float(angle), interpolation=InterpolationMode.NEAREST, expand=False, fill=0)


def random_rotate(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Rotate by a random integer angle in [0, 360]."""
    return rotate(image, int(rng.integers(0, 361)))


def expand_image(image: torch.Tensor, version: int, rng: np.random.Generator) -> torch.Tensor:
    """Version ``version`` (index into ``VERSIONS``) of a uint8 ``[C, H, W]`` image."""
    if version == 0:
        return image
    if version in (1, 2, 3):
        return patch_shuffle(image, version + 1, rng)
    if version == 4:
        return cutout(image, rng)
    if version == 5:
        return random_rotate(image, rng)
    raise IndexError(f"expansion version {version} does not exist (0..{len(VERSIONS) - 1})")


def version_rng(seed: int, source: int, version: int) -> np.random.Generator:
    """The generator for one (image, version): independent of reading order."""
    return np.random.default_rng([seed, source, version])


class ExpandedDataset(Dataset):
    """A dataset 6x the size of ``base``: item ``k`` -> ``(uint8 image, label, k)``.

    ``k // len(base)`` is the version (see ``VERSIONS``) and ``k % len(base)`` the source image;
    every item is generated when read, deterministically from (source, version, seed).
    """

    def __init__(self, base: Dataset, seed: int = 0) -> None:
        self.base = base
        self.seed = seed
        self.source_count = len(base)
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(VERSIONS) * self.source_count

    def locate(self, index: int) -> tuple[int, int]:
        """``(source index, version)`` of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for an expanded dataset of {len(self)} items")
        return index % self.source_count, index // self.source_count

    @property
    def labels(self) -> torch.Tensor:
        """Labels of all items (the source labels, repeated once per version)."""
        base_labels = getattr(self.base, "labels", None)
        if base_labels is None:
            base_labels = torch.tensor([int(self.base[i][1]) for i in range(self.source_count)])
        return torch.as_tensor(base_labels, dtype=torch.int64).repeat(len(VERSIONS))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        source, version = self.locate(int(index))
        image, label = self.base[source][:2]
        return expand_image(image, version, version_rng(self.seed, source, version)), int(label), int(index)
