"""The prune stage's scores file (``scores.npz``): one float64 array per channel group, plus the
fingerprint of what they were computed from (model, weights, criterion, calibration images, seed,
options) under the key ``__fingerprint__`` (a JSON string). Scores can take hours, so a stored file
is reused when its fingerprint matches and is never silently replaced when it does not.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from curlprune.errors import CurlpruneError
from curlprune.rundir import atomic_write

if TYPE_CHECKING:  # types only: prune.py imports this module
    from curlprune.prune import PruneConfig

FINGERPRINT_KEY = "__fingerprint__"


def scores_fingerprint(config: PruneConfig, settings: dict[str, Any], images: torch.Tensor | None) -> dict[str, Any]:
    """What the scores depend on; a stored scores.npz is reused only when this matches.

    Args:
        config: the prune stage's settings (criterion, seed, approx_classes).
        settings: the stage's identity (model, weights, weights_sha256, num_classes).
        images: the calibration batch ``[N, C, H, W]`` (float, eval transform), or None for
            data-free criteria.
    Returns:
        A JSON-able mapping.
    """
    fingerprint = {
        "model": settings["model"],
        "weights": settings["weights_sha256"] or settings["weights"],
        "num_classes": settings["num_classes"],
        "criterion": config.criterion,
        "seed": config.seed if config.criterion == "random" else None,
    }
    if images is not None:
        fingerprint.update(calib=len(images), seed=config.seed,
                           calib_sha256=hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest())
    if config.criterion == "kl-approx":
        fingerprint["approx_classes"] = config.approx_classes
    return fingerprint


def changed_fingerprint(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: stored (now current)"`` for every entry of ``current`` that the stored fingerprint lacks or differs in."""
    return [f"{k}: {stored.get(k)!r} (now {v!r})" for k, v in current.items() if stored.get(k) != v]


def write_scores(path: str | Path, scores: dict[str, np.ndarray], fingerprint: dict) -> None:
    """Save scores and their fingerprint, atomically.

    Args:
        path: the ``.npz`` file.
        scores: group name -> one score per channel ``[width]`` (stored as float64).
        fingerprint: from :func:`scores_fingerprint`.
    """
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}
    arrays[FINGERPRINT_KEY] = np.array(json.dumps(fingerprint, sort_keys=True))

    def write(tmp: str) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        Path(tmp).write_bytes(buffer.getvalue())

    atomic_write(path, write)


def read_scores(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`write_scores`.

    Returns:
        ``(scores, fingerprint)``: group name -> float64 ``[width]``, and the fingerprint ({} when absent).
    Raises:
        CurlpruneError: the file cannot be read as a scores file.
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            fingerprint = json.loads(str(stored[FINGERPRINT_KEY])) if FINGERPRINT_KEY in stored.files else {}
            return {k: stored[k] for k in stored.files if k != FINGERPRINT_KEY}, fingerprint
    except (OSError, ValueError) as exc:
        raise CurlpruneError(f"{path} is not a readable scores file ({exc}): delete it to score again") from None
