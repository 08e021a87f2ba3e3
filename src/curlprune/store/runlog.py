"""Event-log lines that a kill cannot lose (issue 18).

A stage is finished when its ``done.json`` exists, and its log line (the run's ``log.jsonl`` line
per stage, prune's ``done`` event) is appended just after. A kill between the two used to lose
the line for good: the rerun found the stage finished and did not log it again. Here a stage found
finished gets its line back when the log holds none for it; the rebuilt line carries the marker's
time and ``"rebuilt": true``. Lines are recognised by content, not by time stamps, so a run folder
copied without its files' times is not given extra lines:

* the run's line of a training stage: its stage and its seconds (``done.json`` holds them too);
* the run's line of the prune stage: any line of the stage (a finished prune stage logs no seconds);
* prune's ``done`` event: the last event of ``prune/log.jsonl`` (every attempt appends its events,
  and a finished one ends with ``done``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from curlprune.store.rundir import DONE_FILE, LOG_FILE, append_jsonl

__all__ = ["log_stage", "restore_lost_line"]

SECONDS_SLACK = 0.011  # the logged seconds are rounded to 0.01


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
                      matches: Callable[[Mapping[str, Any]], bool], *, last_only: bool = False) -> bool:
    """Append ``record`` to ``log`` when the stage of ``done_file`` finished but no line of the log
    is its line (``matches``).

    Args:
        log: the ``.jsonl`` event log.
        done_file: the stage's finished marker.
        record: the line to restore (``time`` is the marker's, ``rebuilt`` is added).
        matches: whether a line of the log is the stage's.
        last_only: only the log's last line may be the stage's.
    Returns:
        Whether a line was appended.
    """
    done_file = Path(done_file)
    if not done_file.is_file():
        return False
    lines = _lines(Path(log))
    if any(matches(line) for line in (lines[-1:] if last_only else lines)):
        return False
    append_jsonl(log, {"time": round(done_file.stat().st_mtime, 3), **record, "rebuilt": True})
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
        restore_lost_line(log, Path(run_dir) / stage / DONE_FILE, record, lambda line: _is_line_of(line, stage, seconds))


def _is_line_of(line: Mapping[str, Any], stage: str, seconds: float | None) -> bool:
    """Whether a run-log line is ``stage``'s (with these ``seconds``, when known)."""
    if line.get("stage") != stage:
        return False
    logged = line.get("seconds")
    return seconds is None or (isinstance(logged, (int, float)) and abs(logged - seconds) <= SECONDS_SLACK)
