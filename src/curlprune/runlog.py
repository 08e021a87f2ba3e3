"""Event-log lines that a kill cannot lose (issue 18).

A stage is finished when its ``done.json`` exists, and its log line (the run's ``log.jsonl`` line
per stage, prune's ``done`` event) is appended just after. A kill between the two used to lose
the line for good: the rerun found the stage finished and did not log it again. Here a stage found
finished gets its line back when the log holds none written after its ``done.json``; the rebuilt
line carries the marker's time and ``"rebuilt": true``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from curlprune.rundir import DONE_FILE, LOG_FILE, append_jsonl

__all__ = ["log_stage", "restore_lost_line"]

CLOCK_SLACK = 1.0  # seconds: a file's mtime may run a little ahead of time.time()


def _lines(log: Path) -> list[dict[str, Any]]:
    if not log.is_file():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a damaged line is not ours to judge here
        if isinstance(record, dict):
            records.append(record)
    return records


def restore_lost_line(log: str | os.PathLike, done_file: str | os.PathLike, record: Mapping[str, Any],
                      matches: Callable[[Mapping[str, Any]], bool]) -> bool:
    """Append ``record`` to ``log`` when the stage of ``done_file`` finished but the log holds no
    line for it (``matches``) written since.

    Args:
        log: the ``.jsonl`` event log.
        done_file: the stage's finished marker.
        record: the line to restore (``time`` is the marker's, ``rebuilt`` is added).
        matches: whether a line of the log is the stage's.
    Returns:
        Whether a line was appended.
    """
    done_file = Path(done_file)
    if not done_file.is_file():
        return False
    finished = done_file.stat().st_mtime
    if any(matches(line) and isinstance(line.get("time"), (int, float)) and line["time"] >= finished - CLOCK_SLACK
           for line in _lines(Path(log))):
        return False
    append_jsonl(log, {"time": round(finished, 3), **record, "rebuilt": True})
    return True


def log_stage(run_dir: str | os.PathLike, stage: str, seconds: float | None, *, did_work: bool) -> None:
    """The run's ``log.jsonl`` line for a stage.

    Args:
        run_dir: the run folder.
        stage: the stage (its folder is ``run_dir/stage``).
        seconds: how long it worked (None: unknown, e.g. a finished prune stage).
        did_work: the stage ran now: its line is appended; else it was found finished and its line
            is restored only if a kill lost it (:func:`restore_lost_line`).
    """
    log = Path(run_dir) / LOG_FILE
    record = {"stage": stage, "seconds": seconds}
    if did_work:
        append_jsonl(log, record, stamp=True)
    else:
        restore_lost_line(log, Path(run_dir) / stage / DONE_FILE, record, lambda line: line.get("stage") == stage)
