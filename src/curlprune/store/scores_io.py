"""The prune stage's scores file (``scores.npz``): one float64 array per channel group, plus the
fingerprint of what they were computed from (model, weights, criterion, calibration images, seed,
options) under the key ``__fingerprint__`` (a JSON string). Scores can take hours, so a stored file
is reused when its fingerprint matches and is never silently replaced when it does not.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from curlprune.errors import CurlpruneError
from curlprune.store.rundir import atomic_write

FINGERPRINT_KEY = "__fingerprint__"


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
