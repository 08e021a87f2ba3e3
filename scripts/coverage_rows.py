"""The coverage sweep's resumable rows file, shards and name filters (no torch here).

A row is one model measured by one tool, keyed by ``row["id"]`` = ``"<tool>:<model name>"``
(``curl:timm:dla34``, ``tp:timm:dla34``). tests/test_coverage_table.py checks these on real files.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


class RowsFile:
    """JSON lines, one finished row per line, keyed by ``row["id"]``.

    ``append`` writes a row once: under an exclusive lock it re-reads the file and skips an id that
    is already there, so two shards (or a shard started twice by mistake) never measure into the same
    id twice. ``replace`` (``--redo``) rewrites the whole file through a temporary file and a rename,
    so a reader sees either the old or the new file, never a half-written one. A line cut by a killed
    process is ignored (that row is simply not finished); on read the last line of an id wins.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = self.path.with_name(self.path.name + ".lock")

    def read(self) -> dict[str, dict]:
        """id -> row of every finished row, in file order (the last line of an id wins)."""
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows[row["id"]] = row
        return rows

    @contextlib.contextmanager
    def locked(self):
        """Hold the exclusive lock of the rows file (a sibling ``.lock`` file, ignored by git)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def append(self, row: Mapping) -> bool:
        """Append ``row`` (needs an ``id``) unless that id is already there; True when written."""
        with self.locked():
            if row["id"] in self.read():
                return False
            prefix = ""
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    prefix = "" if fh.read(1) == b"\n" else "\n"  # after a torn last line
            with open(self.path, "a") as fh:
                fh.write(prefix + json.dumps(row, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return True

    def replace(self, row: Mapping) -> None:
        """Put ``row`` in place of the row with its id (or at the end), rewriting the file atomically."""
        with self.locked():
            rows = self.read()
            rows[row["id"]] = dict(row)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            with open(tmp, "w") as fh:
                fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows.values()))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)


def shard(items: Sequence, spec: str | None) -> list:
    """Items of shard ``"i/n"``: every n-th item from the i-th, by list position; None = all.

    Raises:
        ValueError: ``spec`` is not ``i/n`` with ``0 <= i < n``.
    """
    if not spec:
        return list(items)
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: give i/n, e.g. 0/2") from None
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n, e.g. 0/2 and 1/2")
    return [item for position, item in enumerate(items) if position % count == index]


def matching(names: Iterable[str], patterns: str | None) -> list[str]:
    """The names matching any of the comma-separated shell globs (``timm:*,torchvision:resnet*``);
    a pattern without ``:`` also matches the part after the source (``resnet*`` = ``*:resnet*``)."""
    names = list(names)
    if not patterns:
        return names
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    globs += [f"*:{g}" for g in globs if ":" not in g]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def todo(names: Sequence[str], tools: Sequence[str], done: Iterable[str], redo: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(name, tool) pairs still to measure, model by model in ``names`` order: those without a row
    in ``done`` (ids), plus every pair whose model name or id (``tool:name``) is in ``redo``."""
    finished, again = set(done), set(redo)
    return [(n, t) for n in names for t in tools if f"{t}:{n}" not in finished or n in again or f"{t}:{n}" in again]
