"""Run-folder I/O, written once and used by every stage (prune, the training stages, the run).

The stage-folder protocol:

* every file is written atomically (:func:`atomic_write`, :func:`write_json`), so a killed
  process never leaves a half-written file behind;
* ``done.json`` (:data:`DONE_FILE`) is written last and holds the settings that defined the
  stage's outputs; a stage whose marker exists is finished, and a rerun compares its settings
  with the marker's (:func:`changed_settings`, :func:`check_same_settings`) before skipping it;
* progress and events are JSON lines (:func:`append_jsonl`, one object per line), either
  time-stamped events (``log.jsonl``) or plain records (``metrics.jsonl``, one per epoch).

What ``model.safetensors`` (:data:`MODEL_FILE`) holds depends on the folder:

* in ``prune/`` and at the run root it is a **curlprune checkpoint** (architecture + plan +
  weights; ``curlprune.load``, ``curlprune export``);
* in a training stage's folder (``distill/``, ``refine/``, ``finetune/``) it is **plain
  weights** (a state dict, with the stage summary as metadata) of the model the stage was given;
  the same stage's ``checkpoint.safetensors`` (:data:`STAGE_CHECKPOINT_FILE`) is its curlprune
  checkpoint.

The names stay as they are so that run folders written by earlier versions keep resuming.
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from curlprune.errors import CurlpruneError

__all__ = [
    "CHECKPOINT_FILE", "CONFIG_FILE", "DONE_FILE", "LOG_FILE", "METRICS_FILE", "MODEL_FILE", "PLAN_FILE",
    "PARTIAL_SCORES_FILE", "PRUNE_STAGE", "REPORT_FILE", "SCORES_FILE", "STAGE_CHECKPOINT_FILE", "STATE_FILE", "STUDENT_FILE", "SUMMARY_FILE",
    "append_jsonl", "atomic_write", "atomic_write_text", "changed_settings", "check_same_settings",
    "copy_if_changed", "default_was", "file_digest", "holds_run", "is_done", "jsonl_text", "optional_file_digest", "read_done", "read_metrics",
    "read_json", "old_default_hint", "saved_with_old_defaults", "write_done", "write_json",
]

# ----- file names (every stage and the run root) ---------------------------------------------
MODEL_FILE = "model.safetensors"
"""prune/ and run root: a curlprune checkpoint (architecture + plan + weights); training-stage
folders: plain weights (state dict) of the stage's model."""
CHECKPOINT_FILE = MODEL_FILE
"""The curlprune checkpoint of ``prune/`` and of the run root (the same name as :data:`MODEL_FILE`)."""
STAGE_CHECKPOINT_FILE = "checkpoint.safetensors"
"""A training stage's curlprune checkpoint (its :data:`MODEL_FILE` is plain weights)."""
DONE_FILE = "done.json"  # the finished-stage marker, written last
STATE_FILE = "state.safetensors"  # a training stage's resumable state
METRICS_FILE = "metrics.jsonl"  # one line per epoch of a training stage
LOG_FILE = "log.jsonl"  # time-stamped events (prune/ and the run root)
STUDENT_FILE = "student.json"  # which model a training stage started from (path and SHA-256)
CONFIG_FILE = "config.json"  # the run's resolved config
SUMMARY_FILE = "summary.json"  # the run's accuracies and costs
SCORES_FILE = "scores.npz"  # prune: the channel scores and their fingerprint
PARTIAL_SCORES_FILE = "scores.partial.npz"  # prune: the groups scored so far (resumable scoring), same form
PLAN_FILE = "plan.json"  # prune: group -> kept channel indices
REPORT_FILE = "report.json"  # prune: selection, costs, accuracy
PRUNE_STAGE = "prune"
"""The prune stage's name in a run config and its folder ``<run_dir>/prune/`` (a recovery stage's
folder is its registered name, :mod:`curlprune.recover.registry`)."""
RUN_MARKERS = (CONFIG_FILE, SUMMARY_FILE, DONE_FILE, LOG_FILE, METRICS_FILE, STATE_FILE, SCORES_FILE, PLAN_FILE, REPORT_FILE)
"""Files of which a folder that holds a curlprune run has at least one at its top: a run directory
(``config.json`` from its start), a ``prune --out`` folder or a stage folder, also one a kill cut short."""


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a curlprune run: a run directory, a ``prune --out`` folder or a stage
    folder (one of :data:`RUN_MARKERS` at its top), finished or not. A dataset folder, an empty
    folder or one of other files does not (``curlprune report`` writes nothing there, issue 18)."""
    return any((Path(folder) / name).is_file() for name in RUN_MARKERS)


# ----- writing ----------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so ``path`` is never half-written.

    Args:
        path: the destination (its folder is created).
        write: ``(tmp_path: str) -> None`` writes the whole file at a temporary path beside ``path``.

    Raises:
        OSError: a filesystem error (e.g. a full disk); one without a file name gets ``path`` as
            its ``filename``, so the one-line message names the file (issue 12).
        Whatever else ``write`` raises. The temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # e.g. a full disk: say which file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_write` for errors)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks).

    For "is this the same model" use :func:`curlprune.store.canonical.content_digest` (tensors +
    metadata, independent of the header's layout).

    Args:
        path: the file.
    Returns:
        The hex digest.
    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_text(value: Any) -> str:
    """The one JSON form of the run folder's ``.json`` files: indent 2, a final newline."""
    return json.dumps(value, indent=2) + "\n"


def write_json(path: str | os.PathLike, value: Any, *, only_if_changed: bool = False) -> None:
    """Write ``value`` as JSON (:func:`json_text`) atomically.

    Args:
        path: the file to write; its folder is created.
        value: JSON-able value.
        only_if_changed: leave the file alone when it already holds exactly this text (so a
            rerun rewrites nothing).
    """
    write_text(path, json_text(value), only_if_changed=only_if_changed)


def write_text(path: str | os.PathLike, text: str, *, only_if_changed: bool = False) -> None:
    """Write a text file atomically; with ``only_if_changed``, not when it already holds ``text``."""
    path = Path(path)
    if only_if_changed and path.is_file() and path.read_text() == text:
        return
    atomic_write_text(path, text)


def copy_if_changed(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file atomically unless ``target`` already has the same bytes."""
    source, target = Path(source), Path(target)
    if not target.is_file() or not filecmp.cmp(source, target, shallow=False):
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def jsonl_text(records: list[Mapping[str, Any]]) -> str:
    """Records as JSON lines (compact ``json.dumps``, one per line)."""
    return "".join(json.dumps(dict(record)) + "\n" for record in records)


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any], *, stamp: bool = False) -> None:
    """Append one JSON line to ``path`` (its folder is created).

    Args:
        path: the ``.jsonl`` file.
        record: JSON-able mapping.
        stamp: put ``"time"`` (Unix seconds, 3 decimals) first, as event logs (``log.jsonl``) do;
            per-epoch records (``metrics.jsonl``) are written as given.

    Raises:
        OSError: a filesystem error, with ``path`` as its ``filename`` (so the CLI's one line
            names the file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"time": round(time.time(), 3), **record} if stamp else dict(record)
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    except OSError as exc:
        if exc.filename is None:  # e.g. a full disk met on write: say which file (issue 12)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


# ----- reading ----------------------------------------------------------------------------------
def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file of a stage folder.

    Raises:
        CurlpruneError: the file is missing or damaged (the message says to delete the folder).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CurlpruneError(f"{path} cannot be read ({exc}): delete {path.parent} to run the stage again") from None


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The epoch records of a training stage's ``metrics.jsonl`` (:data:`METRICS_FILE`).

    Returns:
        ``(records, skipped)``: the lines that are JSON objects with a numeric ``"epoch"``, in file
        order, and the number of other non-blank lines (damaged, e.g. cut by a kill mid-write).
    Raises:
        OSError, UnicodeDecodeError: the file cannot be read.
    """
    records, skipped = [], 0
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += bool(line.strip())
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), (int, float)):
            records.append(record)
        elif line.strip():
            skipped += 1
    return records, skipped


def optional_file_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 (hex) of a file, or None when ``path`` is None or not a file (e.g. a torchvision weight name)."""
    return file_digest(path) if path is not None and Path(path).is_file() else None


# ----- done markers -------------------------------------------------------------------------------
def is_done(stage_dir: str | os.PathLike) -> bool:
    """Whether the stage folder holds its finished-stage marker (``done.json``)."""
    return (Path(stage_dir) / DONE_FILE).is_file()


def read_done(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """The finished-stage marker of ``stage_dir`` (see :func:`read_json` for errors)."""
    return read_json(Path(stage_dir) / DONE_FILE)


def write_done(stage_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write the finished-stage marker last, once every other output is in place."""
    write_json(Path(stage_dir) / DONE_FILE, dict(record))


# ----- settings comparison ------------------------------------------------------------------------
# Dataclass field metadata: a setting added after run folders were written; config.json leaves it out
# while it is None, so resuming a folder from an earlier version rewrites nothing
# (curlprune.run.run_config.config_to_dict).
LATER = {"omit_when_none": True}


def default_was(value: Any) -> dict[str, Any]:
    """Dataclass field metadata of a setting whose default changed (e.g. ``ce_weight``, 0 -> 0.5, issue 19).

    A settings record written before the change holds the old value as missing or None (the old
    default was stored so); a resume compares it as ``value`` (:func:`saved_with_old_defaults`), so
    such a folder resumes with the old value set explicitly and is refused, with what to set, under
    the new default. The field's value is always stored (never None), so ``value`` stays expressible.
    """
    return {"default_was": value}


def saved_with_old_defaults(fields: Any, saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with every missing or None setting of a field marked :func:`default_was` set to its old value.

    Args:
        fields: ``dataclasses.fields`` of the settings' dataclass.
        saved: settings read back from a JSON file (``done.json``, a state header).
    """
    out = dict(saved)
    for f in fields:
        if "default_was" in f.metadata and out.get(f.name) is None:
            out[f.name] = f.metadata["default_was"]
    return out


def old_default_hint(fields: Any, saved: Mapping[str, Any], current: Mapping[str, Any], section: str) -> str:
    """What to set to continue a folder written before a default changed, for a config and for the
    Python API: ``"; to continue it set ce_weight: 0 in section 'distill' (ce_weight=0 in Python), the
    value it was trained with"``, or "" when no such setting differs. ``saved`` as
    :func:`saved_with_old_defaults` returns it."""
    keys = [f.name for f in fields if "default_was" in f.metadata and saved.get(f.name) != current.get(f.name)]
    if not keys:
        return ""
    shown = {k: f"{saved[k]:g}" if isinstance(saved[k], float) else repr(saved[k]) for k in keys}
    yaml_form = ", ".join(f"{k}: {v}" for k, v in shown.items())
    python_form = ", ".join(f"{k}={v}" for k, v in shown.items())
    return f"; to continue it set {yaml_form} in section '{section}' ({python_form} in Python), the value it was trained with"


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key=saved (now current)"`` for every current setting whose JSON value differs from the saved one.

    Args:
        saved: settings read back from a JSON file.
        current: settings now; compared after a JSON round trip (tuples -> lists), like the saved copy.
    Returns:
        One entry per differing key, in ``current``'s order; empty when they agree. Inside nested
        mappings an unset (None) entry equals a missing one.
    """
    current = json.loads(json.dumps(current))
    return [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in current.items() if _set_only(saved.get(k)) != _set_only(v)]


def _set_only(value: Any) -> Any:
    """``value`` with unset (None) entries of nested mappings left out: a setting added in a later
    version, unset, equals its absence from a file written before it existed."""
    if isinstance(value, Mapping):
        return {k: _set_only(v) for k, v in value.items() if v is not None}
    return value


def check_same_settings(saved: Mapping[str, Any], current: Mapping[str, Any], message: str) -> None:
    """Raise unless ``saved`` and ``current`` agree (see :func:`changed_settings`).

    Args:
        message: the error, with ``{differ}`` where the differing settings go.
    Raises:
        CurlpruneError: ``message`` with the differing settings, comma-separated.
    """
    differ = changed_settings(saved, current)
    if differ:
        raise CurlpruneError(message.replace("{differ}", ", ".join(differ)))
