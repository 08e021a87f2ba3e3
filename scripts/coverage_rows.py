"""The coverage sweep's resumable rows file, shards and name filters (no torch here).

A row is one model measured by one tool, keyed by ``row["id"]`` = ``"<tool>:<model name>"``
(``curl:timm:dla34``, ``tp:timm:dla34``). tests/test_coverage_table.py checks these on real files.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_stats import RowsFile as BenchRowsFile, shard  # noqa: E402  (one rows file for benchmarks and sweeps)

__all__ = ["RowsFile", "shard", "matching", "todo"]


class RowsFile(BenchRowsFile):
    """The benchmarks' rows file (``benchmarks/bench_stats.RowsFile``: JSON lines keyed by ``row["id"]``,
    appended once under an exclusive lock, the first line of an id wins, a torn last line ignored),
    plus ``replace`` for ``--redo``."""

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
