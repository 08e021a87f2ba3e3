"""The validation split: training images held out of every stage, for choosing (early stopping,
settings) on data that the test split never has to supply (issue 21 item 1).

Two settings of a run config (top level) or of the commands that take training data
(``--val-per-class`` / ``--val-fraction``), at most one of them:

* ``val_per_class: N``  holds out N images of every class (class-balanced);
* ``val_fraction: F``   holds out round(F x n_c) images of every class c (stratified; at least one
  per class), F in (0, 1).

The draw is seeded by the run's seed (its own random stream, so it does not move with the other
seeded draws), deterministic across processes and machines (a CPU ``torch.Generator``), and every
class keeps at least one training image. The images held out are removed from the training split
*before* anything else reads it: ``train_per_class`` draws from what remains, the prune stage's
calibration set comes from what remains, and every recovery stage trains on what remains.

A dataset folder with its own ``val/`` split (``val/<class>/<image>`` next to ``train/`` and
``test/``): that split is the validation set, as its authors intended, and ``val_per_class`` /
``val_fraction`` are refused (one line): two validation sets would make "chosen on validation"
ambiguous.

A run folder records its split in ``val_split.json`` (the settings, the indices into the training
split as loaded, and a digest of the held-out images' content); a rerun in the same folder must
draw exactly that split, or it stops with one line (:func:`check_split_record`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from curlprune.data.data import ImageDataset
from curlprune.errors import CurlpruneError

__all__ = ["VAL_SPLIT", "ValSplit", "check_val_settings", "check_split_record", "hold_out", "images_digest"]

VAL_SPLIT = "val"  # the key of the validation split in a run's data mapping, and a data folder's split name
SPLIT_FILE = "val_split.json"
_STREAM = 0x76616C  # "val": the split's own random stream of the run seed


@dataclass
class ValSplit:
    """The result of :func:`hold_out`.

    train:   the training images that remain (an :class:`ImageDataset`, the original order).
    val:     the held-out images, grouped by class.
    indices: the held-out images' indices into the training split given to :func:`hold_out`, sorted.
    """

    train: ImageDataset
    val: ImageDataset
    indices: list[int]

    def record(self, per_class: int | None, fraction: float | None, seed: int, train_size: int) -> dict[str, Any]:
        """What ``val_split.json`` holds: the settings, the size of the training split it was drawn
        from, the indices and :func:`images_digest` of the held-out images."""
        return {"val_per_class": per_class, "val_fraction": fraction, "seed": seed, "train_images": train_size,
                "indices": self.indices, "sha256": images_digest(self.val)}


def check_val_settings(per_class: Any, fraction: Any, where: str = "") -> None:
    """At most one of the two settings, each in its range.

    Args:
        per_class: ``val_per_class`` (None: unset); a whole number >= 1.
        fraction: ``val_fraction`` (None: unset); a number in (0, 1).
        where: a prefix for the message (a file, "command line"), or "".
    Raises:
        CurlpruneError: both set, or either outside its range (one line naming it).
    """
    prefix = f"{where}: " if where else ""
    if per_class is not None and fraction is not None:
        raise CurlpruneError(f"{prefix}give val_per_class or val_fraction, not both (got {per_class!r} and {fraction!r})")
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise CurlpruneError(f"{prefix}val_per_class must be a whole number of images per class >= 1 (got {per_class!r})")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0.0 < float(fraction) < 1.0):
        raise CurlpruneError(f"{prefix}val_fraction must be a number in (0, 1), e.g. 0.1 (got {fraction!r})")


def hold_out(ds: ImageDataset, seed: int, *, per_class: int | None = None, fraction: float | None = None) -> ValSplit:
    """Hold a seeded, class-balanced validation split out of a training split.

    Args:
        ds: the training split (uint8 images, labels, classes).
        seed: the run's seed; the draw uses its own stream of it (``SeedSequence([seed, "val"])``).
        per_class: images held out of every class; or
        fraction: the share held out of every class (round(F x n_c), at least 1).
    Returns:
        :class:`ValSplit`: what remains for training, the held-out images and their indices into ``ds``.
    Raises:
        CurlpruneError: bad settings (:func:`check_val_settings`), neither given, or a class that
            would keep no training image (named, with its size).
    """
    check_val_settings(per_class, fraction)
    if per_class is None and fraction is None:
        raise CurlpruneError("hold_out needs val_per_class or val_fraction")
    state = np.random.SeedSequence([int(seed), _STREAM]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    picked: list[torch.Tensor] = []
    for label, name in enumerate(ds.classes):
        members = torch.nonzero(ds.labels == label).flatten()
        size = len(members)
        take = per_class if per_class is not None else max(1, round(float(fraction) * size))
        if take >= size:
            setting = f"val_per_class {per_class}" if per_class is not None else f"val_fraction {fraction}"
            raise CurlpruneError(
                f"class {name!r} has {size} training image(s): holding out {take} for validation ({setting}) leaves none to "
                f"train on; hold out at most {max(size - 1, 0)} per class"
            )
        picked.append(members[torch.randperm(size, generator=generator)[:take]])
    val_index = torch.cat(picked)
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[val_index] = False
    return ValSplit(ds.subset(torch.nonzero(keep).flatten()), ds.subset(val_index), sorted(val_index.tolist()))


def images_digest(ds: ImageDataset) -> str:
    """SHA-256 of a dataset's content: every image's shape and bytes and its label, in order.

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    for index in range(len(ds)):
        image, label = ds[index]
        digest.update(repr((tuple(image.shape), label)).encode())
        digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_split_record(previous: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """A run folder keeps the validation split it started with (``val_split.json``).

    Args:
        previous: the folder's record (None entries and a missing file mean: no split then).
        current: the record of the split drawn now (:meth:`ValSplit.record`, or the data's own split).
        where: the record's path (for the message).
    Raises:
        CurlpruneError: the held-out images differ (other indices, other content, or a split now
            and none then), naming what differs.
    """
    for key in ("train_images", "indices", "sha256"):
        if previous.get(key) != current.get(key):
            raise CurlpruneError(
                f"{where}: the validation split drawn now differs from the one this run started with ({key} differs; "
                "the data or the split settings changed): use the same data and settings, or another run_dir (--out)"
            )
