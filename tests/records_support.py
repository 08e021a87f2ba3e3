"""Shared by tests/test_records.py and tests/test_rundir.py: a run-folder record read with its
reader and written again with its writer (:mod:`curlprune.store.records`), to compare the two files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from curlprune.store import records
from curlprune.store.rundir import DONE_FILE, REPORT_FILE, SUMMARY_FILE

# record file -> (reader, writer), each taking the folder that holds the file
RECORD_IO = {
    REPORT_FILE: (records.read_prune_report, records.write_prune_report),
    DONE_FILE: (records.read_stage_summary, records.write_stage_summary),
    SUMMARY_FILE: (records.read_run_summary, records.write_run_summary),
}


def rewritten(name: str, source: Path, target: Path) -> tuple[Any, bytes, bytes]:
    """Read the record file ``name`` in the folder ``source`` and write it into the folder ``target``.

    Returns:
        ``(record, source file's bytes, written file's bytes)``.
    """
    read, write = RECORD_IO[name]
    record = read(source)
    write(target, record)
    return record, (source / name).read_bytes(), (target / name).read_bytes()
