"""Run folders: a folder written by an earlier version still resumes (nothing trained, no file
rewritten), and the one run-folder I/O module writes what the old code wrote."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curlprune.errors import CurlpruneError
from curlprune.recover import load_label_store
from curlprune.rundir import (
    DONE_FILE,
    LOG_FILE,
    METRICS_FILE,
    append_jsonl,
    changed_settings,
    check_same_settings,
    is_done,
    jsonl_text,
    read_done,
    write_json,
)

OLD_RUN = Path(__file__).parent / "data" / "run-v0.1"


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_run_folder_from_an_earlier_version_resumes_without_work(tmp_path):
    work = tmp_path / "old"
    shutil.copytree(OLD_RUN, work)
    before = snapshot(work / "run")
    done = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", "config.yaml"], cwd=work, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    after = snapshot(work / "run")
    # no file of the earlier version rewritten, not even touched; the one addition is the report
    # (report/, written at the end of every run since reports exist)
    assert {k: v for k, v in after.items() if not k.startswith("report/")} == before
    assert {k for k in after if k.startswith("report/")} >= {"report/index.md", "report/widths.png"}
    again = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", "config.yaml"], cwd=work, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert snapshot(work / "run") == after  # a second rerun touches nothing, the report included
    assert "epoch" not in done.stderr  # no stage trained
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["stages"]["refine"]["epochs"] == 1 and summary["stages"]["distill"]["epochs"] == 2
    assert summary["macs_ratio"] <= 0.5
    for stage in ("prune", "distill", "refine"):
        assert is_done(work / "run" / stage)
    # the refine stage's own tensors (the refined labels) are still readable: one row per expanded image
    labels = load_label_store(work / "run")
    assert labels.shape[0] == 6 * 30 * 10 and labels.shape[1] == 10


def test_json_forms_are_those_of_the_old_files(tmp_path):
    old_refine = OLD_RUN / "run" / "refine"
    records = [json.loads(line) for line in (old_refine / METRICS_FILE).read_text().splitlines()]
    assert jsonl_text(records) == (old_refine / METRICS_FILE).read_text()
    done = read_done(old_refine)
    write_json(tmp_path / DONE_FILE, done)
    assert (tmp_path / DONE_FILE).read_text() == (old_refine / DONE_FILE).read_text()
    append_jsonl(tmp_path / "sub" / LOG_FILE, {"event": "x"}, stamp=True)
    append_jsonl(tmp_path / "sub" / METRICS_FILE, {"epoch": 1})
    event = json.loads((tmp_path / "sub" / LOG_FILE).read_text())
    assert list(event) == ["time", "event"] and event["event"] == "x"
    assert (tmp_path / "sub" / METRICS_FILE).read_text() == '{"epoch": 1}\n'


def test_write_json_only_if_changed_leaves_an_equal_file_alone(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"a": 1})
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    write_json(path, {"a": 1}, only_if_changed=True)
    assert path.stat().st_mtime_ns == stamp - 10**9
    write_json(path, {"a": 2}, only_if_changed=True)
    assert json.loads(path.read_text()) == {"a": 2}


def test_settings_comparison_names_what_differs():
    assert changed_settings({"a": [1, 2], "b": 1}, {"a": (1, 2), "b": 1}) == []  # tuples compare as their JSON lists
    assert changed_settings({"a": 1}, {"a": 2, "c": None}) == ["a=1 (now 2)"]
    with pytest.raises(CurlpruneError, match=r"^x: a=1 \(now 2\), b=None \(now 3\); fix$"):
        check_same_settings({"a": 1}, {"a": 2, "b": 3}, "x: {differ}; fix")
