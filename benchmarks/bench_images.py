"""Per-image correctness records of the ResNet-56 benchmark (issue 21) and the standard errors
that use them.

A row's top-1 is a mean over a fixed set of images (5,000 val, 10,000 test). The paired standard
error over seeds (bench_stats.paired_difference) sees only the training noise; the noise of having
drawn these images is in none of it, and a single-run comparison (one allocation against another,
one Torch-Pruning variant against another) has no standard error at all. With each row's per-image
correctness kept, both have one:

* :func:`image_difference`: two records on the same images, d_i = a_i - b_i in {-1, 0, 1}: the
  difference of the top-1s, mean(d), and its paired standard error std(d) / sqrt(N) (in points).
* :func:`combined_difference`: seeded rows. The per-image differences are averaged over the paired
  seeds, dbar_i = mean_s d_si; SE_images = std(dbar) / sqrt(N) and the combined standard error is
  sqrt(SE_seeds^2 + SE_images^2). It is slightly conservative: in d_si = mu + seed_s + image_i +
  (seed x image)_si, the interaction's share sigma^2 / (S N) of the variance of the mean is in
  both terms (SE_seeds^2 estimates var(seed)/S + var(inter)/(S N), SE_images^2 estimates
  var(image)/N + var(inter)/(S N)), so it is counted twice.

Records live in a sidecar of the rows file (:func:`sidecar_path`: ``<rows>_images.jsonl``), one
JSON line per row id, ``{"id", "val", "test", "val_top1", "test_top1"}``: the final model's
correctness on val and test, packed (:func:`pack`), and the top-1s it gives. The rows file itself
is never rewritten. A ``same_as`` row (bench_alias) has no line of its own: :func:`record_for`
resolves it to the row it names. A record is used only when its top-1s are the row's (to 0.01
points, :func:`mismatch`): a record of another model is never paired with a row's numbers.
"""
from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from curlprune.data.data import batches, model_outputs

TOLERANCE = 0.01  # points: a record's top-1 must be the row's to this (both are rounded to 0.01)


# ---------------------------------------------------------------------------------- the records


def pack(correct: torch.Tensor | np.ndarray) -> str:
    """``"<N>:<base64>"``: a 1-D bool vector (image i classified correctly) as packed bits (numpy
    ``packbits``, big-endian bit order, the last byte zero-padded) in base64; N keeps the length,
    so any length round-trips (:func:`unpack`). 10,000 images: ~1,700 characters."""
    bits = _vector(correct, bool)
    return f"{bits.size}:{base64.b64encode(np.packbits(bits).tobytes()).decode('ascii')}"


def unpack(text: str) -> torch.Tensor:
    """The bool tensor [N] of :func:`pack`'s string.

    Raises:
        ValueError: not ``"<N>:<base64>"``, or fewer bits than N.
    """
    size, sep, data = text.partition(":")
    if not sep or not size.isdigit():
        raise ValueError(f"not a packed record (<N>:<base64>): {text[:20]!r}")
    bits = np.unpackbits(np.frombuffer(base64.b64decode(data, validate=True), dtype=np.uint8))
    if bits.size < int(size):
        raise ValueError(f"packed record holds {bits.size} bits, says {size}")
    return torch.from_numpy(bits[: int(size)].astype(bool))


def top1_of(correct: torch.Tensor) -> float:
    """Top-1 (%) of a correctness vector, rounded to 0.01 as the benchmark reports it (the same
    arithmetic as ``round(100 * evaluate(...), 2)``: count / N, then x 100)."""
    return round(100.0 * (int(correct.sum()) / max(1, len(correct))), 2)


def correct_mask(model: nn.Module, ds, spec, batch_size: int) -> torch.Tensor:
    """Bool [len(ds)]: image i of ``ds`` classified correctly (top-1) by ``model``, in dataset order.

    The computation of ``curlprune.data.data.evaluate`` image by image: the model in channels_last
    (it stays so), eval transform, batches of ``batch_size`` on the model's device, so
    :func:`top1_of` of it equals the benchmark's ``round(100 * evaluate(...), 2)``.
    """
    model.to(memory_format=torch.channels_last)
    outputs = model_outputs(model, batches(ds, spec, batch_size), channels_last=True)
    return torch.cat([logits.argmax(1).cpu() == labels for logits, labels in outputs])


def image_record(row_id: str, val: torch.Tensor, test: torch.Tensor) -> dict:
    """The sidecar line of a row: its final model's correctness on val and test, and their top-1s."""
    return {"id": row_id, "val": pack(val), "test": pack(test), "val_top1": top1_of(val), "test_top1": top1_of(test)}


def sidecar_path(rows_path: str | Path) -> Path:
    """``benchmarks/results/cifar_resnet56.jsonl`` -> ``.../cifar_resnet56_images.jsonl``."""
    rows_path = Path(rows_path)
    return rows_path.with_name(f"{rows_path.stem}_images.jsonl")


def mismatch(row: Mapping, record: Mapping) -> str | None:
    """None when ``record``'s val and test top-1 are ``row``'s (to :data:`TOLERANCE`), else the
    one line that says which row differs and by how much (record minus row, points)."""
    diffs = {s: record[f"{s}_top1"] - row[f"{s}_top1"] for s in ("val", "test")}
    if all(abs(d) <= TOLERANCE + 1e-9 for d in diffs.values()):
        return None
    return (f"{row['id']}: recomputed val {record['val_top1']:.2f} / test {record['test_top1']:.2f}, stored "
            f"{row['val_top1']:.2f} / {row['test_top1']:.2f} (differ by {diffs['val']:+.2f} / {diffs['test']:+.2f} "
            f"points): no record written")


def record_for(rows: Mapping[str, dict], images: Mapping[str, dict] | None, row_id: str) -> dict | None:
    """The per-image record of row ``row_id``: its own line, or for a ``same_as`` row the line of
    the row it names (followed to the end); None when there is none or its top-1s are not the row's."""
    if not images or row_id not in rows:
        return None
    row, seen, key = rows[row_id], set(), row_id
    while rows.get(key, {}).get("same_as") and key not in seen:
        seen.add(key)
        key = rows[key]["same_as"]
    record = images.get(key)
    if record is None or row.get("val_top1") is None or mismatch(row, record) is not None:
        return None
    return record


# ---------------------------------------------------------------------------------- standard errors


def _se(values: np.ndarray) -> float | None:
    """std(values, n - 1) / sqrt(n); None for fewer than two values."""
    if values.size < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(values.size))


def _vector(correct, dtype) -> np.ndarray:
    """A correctness vector (tensor, array or list; any shape) as a flat numpy array of ``dtype``."""
    return np.asarray(correct.cpu() if isinstance(correct, torch.Tensor) else correct, dtype=dtype).reshape(-1)


def _as_float(correct) -> np.ndarray:
    return _vector(correct, np.float64)


def image_difference(a, b) -> dict:
    """Top-1 difference a - b of two correctness records on the same N images, in points.

    Args:
        a, b: bool [N] (tensor or array; :func:`unpack` strings' tensors), image i correct.
    Returns:
        ``{"mean", "se", "n"}``: 100 * mean(d), 100 * std(d, N - 1) / sqrt(N) with d_i = a_i - b_i
        (the paired standard error over images; 0 for identical records, None for N = 1), N.
    Raises:
        ValueError: the records have different lengths (not the same images).
    """
    a, b = _as_float(a), _as_float(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"records of {a.size} and {b.size} images: not the same images")
    d = a - b
    se = _se(d)
    return {"mean": 100.0 * float(d.mean()), "se": None if se is None else 100.0 * se, "n": int(d.size)}


def combined_difference(seed_diff: Mapping, pairs: Mapping[int, tuple]) -> dict:
    """The seeded difference a - b with both standard errors (module docstring).

    Args:
        seed_diff: bench_stats.paired_difference of the rows' stored top-1s (``mean``, ``se`` over
            seeds, None with one seed, ``n``, ``seeds``).
        pairs: seed -> (a's record, b's record), bool [N] each, for every seed of ``seed_diff``.
    Returns:
        ``seed_diff``'s fields plus ``se_seeds`` (its ``se``), ``se_images`` (100 * std(dbar) /
        sqrt(N), dbar_i = the per-image difference averaged over the seeds) and ``se`` =
        sqrt(se_seeds^2 + se_images^2), None when ``se_seeds`` is (one seed: no seed SE to add to).
    Raises:
        ValueError: a seed of ``seed_diff`` has no pair, or the records differ in length.
    """
    missing = [s for s in seed_diff["seeds"] if s not in pairs]
    if missing:
        raise ValueError(f"no per-image records for seed(s) {missing}")
    diffs = [_as_float(pairs[s][0]) - _as_float(pairs[s][1]) for s in seed_diff["seeds"]]
    if len({d.shape for d in diffs}) != 1:
        raise ValueError("records of different lengths: not the same images")
    se_images = _se(np.mean(diffs, axis=0))
    se_images = None if se_images is None else 100.0 * se_images
    se_seeds = seed_diff["se"]
    se = None if se_seeds is None or se_images is None else math.hypot(se_seeds, se_images)
    return {**seed_diff, "se_seeds": se_seeds, "se_images": se_images, "se": se}
