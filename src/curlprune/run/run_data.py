"""The splits a run uses: train and test from digits or an ImageFolder directory or zip, the
validation split (a data folder's own val/, or held out of train/), and the class-balanced training
subset. :class:`curlprune.run.pipeline.Run` and the ``prune`` command read their data through here."""
from __future__ import annotations

from typing import Any

from curlprune import data as datasets
from curlprune.errors import CurlpruneError
from curlprune.data.streaming import DataSettings, open_splits
from curlprune.data.valsplit import VAL_SPLIT, check_val_settings, hold_out, images_digest


def load_data(source: str, train_per_class: int | None, seed: int, *, val_per_class: int | None = None,
              val_fraction: float | None = None, settings: DataSettings | None = None) -> dict[str, Any]:
    """The splits of :func:`load_splits` (without the record of the validation split)."""
    return load_splits(source, train_per_class, seed, val_per_class=val_per_class, val_fraction=val_fraction, settings=settings)[0]


def load_splits(source: str, train_per_class: int | None, seed: int, *, val_per_class: int | None = None,
                val_fraction: float | None = None, settings: DataSettings | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The splits a run uses: train and test, and val when there is a validation split.

    Args:
        source: "digits" (sklearn's 8x8 digits), or an ImageFolder directory or zip with train/ and test/
            (and optionally val/: then that is the validation split, :mod:`curlprune.data.valsplit`).
        train_per_class: keep a seeded class-balanced subset of this many training images per class
            (drawn from what remains after the validation split is held out).
        seed: seed of the digits split, of the validation split and of the subset.
        val_per_class, val_fraction: hold this many images per class (or this share of every class)
            out of the training split as the validation split (:func:`curlprune.data.valsplit.hold_out`).
        settings: in memory or streamed (:class:`curlprune.data.streaming.DataSettings`; None = auto).
    Returns:
        ``({"train", "test"} (and "val") uint8 ImageDatasets (or StreamingDatasets), record)``: the record of the validation split
        that ``val_split.json`` holds (:meth:`curlprune.data.valsplit.ValSplit.record`; for a data folder's own
        val/ split its size and digest), None without a validation split.
    Raises:
        CurlpruneError: the data is missing or malformed; bad validation settings, or settings given for
            data that has its own val/ split.
    """
    check_val_settings(val_per_class, val_fraction)
    own_val = source != "digits" and VAL_SPLIT in datasets.split_names(source)
    if own_val and (val_per_class is not None or val_fraction is not None):
        raise CurlpruneError(f"{source} has its own {VAL_SPLIT}/ split, which is the validation split: "
                             "drop val_per_class / val_fraction (or remove the val/ folder to hold images out of train/)")
    # only the splits a run uses are decoded
    splits = open_splits(source, seed, ("train", "test", VAL_SPLIT) if own_val else ("train", "test"), settings)
    splits, record = dict(splits), None
    if VAL_SPLIT in splits:
        record = {"source": f"{VAL_SPLIT}/", "train_images": len(splits["train"]), "indices": None, "sha256": images_digest(splits[VAL_SPLIT])}
    elif val_per_class is not None or val_fraction is not None:
        held = hold_out(splits["train"], seed, per_class=val_per_class, fraction=val_fraction)
        record = held.record(val_per_class, val_fraction, seed, len(splits["train"]))
        splits.update({"train": held.train, VAL_SPLIT: held.val})
    if train_per_class:
        splits["train"] = datasets.class_balanced_subset(splits["train"], int(train_per_class), seed)
    return splits, record
