"""The header of a curlprune checkpoint, checked as a whole before anything is built from it (issue 18).

A checkpoint's safetensors metadata holds JSON strings (:mod:`curlprune.store.checkpoint`): ``model_ref``,
``plan``, ``input_shape`` and ``extra``. A file that was edited or damaged inside its header (which
safetensors itself does not look into) must end in one line naming the file and the field, in
``count``, ``export``, ``--student`` and ``curlprune.load`` alike, never in a raw exception.

* :func:`parse_header`: every field present (``extra`` may be absent), valid JSON and of the right
  form;
* :func:`header_field`: a step that builds from one field (the architecture from ``model_ref``,
  tracing at ``input_shape``, slicing by ``plan``) and fails names the file and that field.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from curlprune.errors import CurlpruneError, exception_summary

__all__ = ["FIELDS", "header_field", "parse_header"]

FIELDS = ("model_ref", "plan", "input_shape", "extra")
_FIX = "the file is damaged or was edited; re-create it (`curlprune prune`, or curlprune.save)"


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problem(field: str, value: Any) -> str | None:
    """What is wrong with a decoded field's form (None: nothing)."""
    if field == "model_ref":
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
            return 'is not {"name": "<registry name>", "kwargs": {...}}'
        if not isinstance(value.get("kwargs", {}), dict):
            return "has kwargs that are not a mapping"
    elif field == "plan":
        if not isinstance(value, dict):
            return "is not a mapping of group names to kept channel indices"
        bad = next((k for k, v in value.items() if not isinstance(v, list) or not all(_whole(i) and i >= 0 for i in v)), None)
        if bad is not None:
            return f"keeps channels of group {bad!r} that are not a list of channel indices"
    elif field == "input_shape":
        if not isinstance(value, list) or len(value) != 4 or not all(_whole(d) and d >= 1 for d in value):
            return f"is {value!r}, not [batch, channels, height, width] of positive whole numbers"
    elif field == "extra" and not isinstance(value, dict):
        return "is not a mapping"
    return None


def parse_header(path: str | Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """Decode and check the JSON fields of a checkpoint's metadata.

    Args:
        path: the checkpoint (named in the message).
        metadata: its safetensors metadata (strings).
    Returns:
        ``{"model_ref": {"name", "kwargs"}, "plan": {...}, "input_shape": [N, C, H, W], "extra": {...}}``.
    Raises:
        CurlpruneError: a field is missing (``extra`` may be), not JSON, or not of its form; one line
            naming ``path`` and the field.
    """
    decoded: dict[str, Any] = {}
    for field in FIELDS:
        text = metadata.get(field)
        if text is None and field == "extra":
            text = "{}"
        if text is None:
            raise CurlpruneError(f"checkpoint {path}: the header field {field!r} is missing: {_FIX}")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise CurlpruneError(f"checkpoint {path}: the header field {field!r} is not JSON ({exception_summary(exc, 60)}): {_FIX}") from None
        problem = _problem(field, value)
        if problem:
            raise CurlpruneError(f"checkpoint {path}: the header field {field!r} {problem}: {_FIX}")
        decoded[field] = value
    decoded["model_ref"] = {"name": decoded["model_ref"]["name"], "kwargs": dict(decoded["model_ref"].get("kwargs", {}))}
    return decoded


@contextlib.contextmanager
def header_field(source: str | Path | None, field: str) -> Iterator[None]:
    """Name the checkpoint and the header field when the step inside fails.

    Args:
        source: the checkpoint file; None: errors pass through unchanged (a model built from values
            given in Python, not read from a file).
        field: the header field the step builds from.
    Raises:
        CurlpruneError: ``checkpoint SOURCE: the header field FIELD does not fit: <the error>: <fix>``,
            for a CurlpruneError or any other exception of the step.
    """
    if source is None:
        yield
        return
    try:
        yield
    except CurlpruneError as exc:
        raise CurlpruneError(f"checkpoint {source}: the header field {field!r} does not fit ({exc}); {_FIX}") from None
    except Exception as exc:  # the step's own errors (torch, the model's forward)
        raise CurlpruneError(f"checkpoint {source}: the header field {field!r} does not fit ({exception_summary(exc)}); {_FIX}") from None
