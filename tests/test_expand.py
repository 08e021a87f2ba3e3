"""The 6x expanded dataset: stable indices, determinism, and what each version does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from curlprune.data.data import load_digits_dataset
from curlprune.recover.expand import (
    CUTOUT_RANGE,
    VERSIONS,
    ExpandedDataset,
    cutout,
    cutout_box,
    patch_shuffle,
    rotate,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(0)["train"].subset(range(50))


def tiles(image: torch.Tensor, blocks: int) -> list[bytes]:
    """The centred region's tiles as sorted byte strings (a multiset)."""
    _, h, w = image.shape
    th, tw = h // blocks, w // blocks
    top, left = (h - th * blocks) // 2, (w - tw * blocks) // 2
    out = []
    for r in range(blocks):
        for c in range(blocks):
            out.append(image[:, top + r * th : top + (r + 1) * th, left + c * tw : left + (c + 1) * tw].numpy().tobytes())
    return sorted(out)


def test_layout_labels_and_length(digits):
    expanded = ExpandedDataset(digits, seed=0)
    n = len(digits)
    assert len(expanded) == len(VERSIONS) * n == 300
    for k in (0, 7, n, n + 7, 4 * n + 3, 6 * n - 1):
        image, label, index = expanded[k]
        assert index == k
        assert expanded.locate(k) == (k % n, k // n)
        assert label == int(digits.labels[k % n])
        assert image.dtype == torch.uint8 and image.shape == digits.images.shape[1:]
    assert torch.equal(expanded.labels, digits.labels.repeat(6))
    assert torch.equal(expanded[5][0], digits.images[5])  # version 0 is the original
    with pytest.raises(IndexError):
        expanded[6 * n]


def test_deterministic_and_order_independent(digits):
    first = ExpandedDataset(digits, seed=3)
    second = ExpandedDataset(digits, seed=3)
    ks = list(range(len(first)))
    forward = [first[k][0] for k in ks]
    backward = {k: second[k][0] for k in reversed(ks)}  # other reading order, other object
    assert all(torch.equal(forward[k], backward[k]) for k in ks)
    other_seed = ExpandedDataset(digits, seed=4)
    differing = sum(not torch.equal(first[k][0], other_seed[k][0]) for k in range(len(digits), len(first)))
    assert differing > 0.5 * (len(first) - len(digits))  # the seed matters for the random versions


def test_versions_change_images(digits):
    expanded = ExpandedDataset(digits, seed=0)
    n = len(digits)
    for version in range(1, 6):
        changed = sum(not torch.equal(expanded[version * n + i][0], digits.images[i]) for i in range(n))
        assert changed >= 0.8 * n, (VERSIONS[version], changed)


@pytest.mark.parametrize("size", [(8, 8), (32, 32), (31, 29)])
@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_patch_shuffle_permutes_tiles(size, blocks):
    generator = torch.Generator().manual_seed(blocks)
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
    out = patch_shuffle(image, blocks, np.random.default_rng(blocks))
    assert out.shape == image.shape
    assert tiles(out, blocks) == tiles(image, blocks)  # same multiset of tiles
    h, w = size
    th, tw = h // blocks, w // blocks
    top, left = (h - th * blocks) // 2, (w - tw * blocks) // 2
    border = torch.ones(h, w, dtype=torch.bool)
    border[top : top + th * blocks, left : left + tw * blocks] = False
    assert torch.equal(out[:, border], image[:, border])  # pixels outside the tiled region are kept
    moved = sum(
        not torch.equal(
            patch_shuffle(image, blocks, np.random.default_rng(s)), image
        )
        for s in range(10)
    )
    assert moved >= 7  # the identity permutation is possible but rare


def test_cutout_box_inside_and_area_bounds():
    h, w = 32, 24
    for seed in range(200):
        image = torch.randint(1, 256, (3, h, w), dtype=torch.uint8)  # no zeros before cutout
        out = cutout(image, np.random.default_rng(seed))
        top, left, bh, bw = cutout_box(h, w, np.random.default_rng(seed))
        zero = (out == 0).all(0)
        assert zero.sum() == bh * bw
        assert zero[top : top + bh, left : left + bw].all()
        assert top >= 0 and left >= 0 and top + bh <= h and left + bw <= w
        assert torch.equal(out[:, ~zero], image[:, ~zero])
        fraction = bh * bw / (h * w)
        assert int(CUTOUT_RANGE[0] * h) * int(CUTOUT_RANGE[0] * w) / (h * w) <= fraction <= CUTOUT_RANGE[1] ** 2


def test_rotation_geometry():
    image = torch.randint(1, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(rotate(image, 0), image)
    assert torch.equal(rotate(image, 360), image)
    assert torch.equal(rotate(image, 180), image.flip(1, 2))
    assert torch.equal(rotate(image, 90), torch.rot90(image, 1, (1, 2)))  # counter-clockwise, as PIL
    corners = rotate(image, 45)
    assert corners.shape == image.shape
    assert (corners[:, 0, 0] == 0).all() and (corners[:, -1, -1] == 0).all()  # black corners
    assert set(corners.unique().tolist()) - {0} <= set(image.unique().tolist())  # nearest: no new values


def test_rotation_version_uses_integer_angles(digits):
    """Version 5 equals the rotation of the source by some integer angle in [0, 360]."""
    expanded = ExpandedDataset(digits, seed=1)
    n = len(digits)
    for i in range(5):
        out = expanded[5 * n + i][0]
        candidates = [a for a in range(361) if torch.equal(rotate(digits.images[i], a), out)]
        assert candidates, f"image {i}: not an integer rotation"
