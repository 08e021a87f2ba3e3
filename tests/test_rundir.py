"""Run folders: a folder written by an earlier version still resumes (nothing trained, no file
rewritten), and the one run-folder I/O module writes what the old code wrote.

The earlier version's folder is not kept in git: ``old_run`` writes it once per test module with
that version's own code, taken from the git history (tests/data/run-v0.1/README.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curlprune.errors import CurlpruneError
from curlprune.recover import load_label_store
from curlprune.store.rundir import (
    DONE_FILE,
    LOG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    append_jsonl,
    changed_settings,
    check_same_settings,
    is_done,
    jsonl_text,
    read_done,
    write_json,
)

from records_support import rewritten

REPO = Path(__file__).resolve().parents[1]
OLD_CONFIG = Path(__file__).parent / "data" / "run-v0.1" / "config.yaml"
OLD_COMMIT = "e1cb30b"  # curlprune 0.1.0, before the run-folder code was reorganised
# the teacher the old folder was made with (once committed as tests/data/run-v0.1/teacher.pt)
OLD_TEACHER = ("import torch; from curlprune.models.small import train_digits_model; "
               "torch.save(train_digits_model(seed=0, epochs=3).state_dict(), 'teacher.pt')")


def old_code(tmp_path_factory) -> Path:
    """``src/`` of curlprune at OLD_COMMIT, extracted from the git history; skip the caller without it."""
    if shutil.which("git") is None or shutil.which("tar") is None:
        pytest.skip(f"needs git and tar to extract curlprune {OLD_COMMIT} from the git history")
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{OLD_COMMIT}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} (curlprune 0.1.0) is not in the git history here "
                    "(no .git, or a shallow clone): the old run folder is written by that commit's code")
    code = tmp_path_factory.mktemp("v0.1-code")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    return code / "src"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A complete run folder (config.yaml, teacher.pt, run/) written by curlprune 0.1.0 alone.

    The teacher and the run come from the old code (PYTHONPATH replaced, not extended): real digits,
    30 images per class, prune -> distill (2 epochs) -> refine (1 epoch); about half a minute.
    """
    src = old_code(tmp_path_factory)
    folder = tmp_path_factory.mktemp("run-v0.1")
    shutil.copy(OLD_CONFIG, folder / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    which = subprocess.run([sys.executable, "-c", "import curlprune; print(curlprune.__file__)"], cwd=folder, env=env,
                           capture_output=True, text=True, check=True)
    # the old code, not an installed one
    assert Path(which.stdout.strip()).resolve().is_relative_to(src.resolve()), which.stdout
    teacher = subprocess.run([sys.executable, "-c", OLD_TEACHER], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", "config.yaml"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refine epoch 1/1" in done.stderr  # the old code trained every stage
    assert not (folder / "run" / "report").exists()  # 0.1.0 wrote no report: a rerun adding one is the one change
    return folder


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_run_folder_from_an_earlier_version_resumes_without_work(old_run, tmp_path):
    work = tmp_path / "old"
    shutil.copytree(old_run, work)
    before = snapshot(work / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its config as it was: the distill loss now defaults to ce_weight 0.5, and the folder was trained
    # with the paper's loss (no ce_weight then): refused in one line that says what to set, nothing written
    refused = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", "config.yaml"], cwd=work, capture_output=True, text=True,
                             timeout=300, env=env)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-3000:]
    assert "ce_weight=0.0 (now 0.5); to continue it set ce_weight: 0 in section 'distill'" in refused.stderr
    assert snapshot(work / "run") == before
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["distill"]["ce_weight"] = 0  # what the message says
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", "config.yaml"], cwd=work, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    after = snapshot(work / "run")
    # no file of the earlier version rewritten, not even touched, but config.json, which now records the
    # loss explicitly (ce_weight 0: the value the folder was trained with, stored once set); the one
    # addition is the report (report/, written at the end of every run since reports exist)
    old_config = json.loads(before["config.json"][1])
    old_config["distill"]["ce_weight"] = 0.0
    assert json.loads(after["config.json"][1]) == old_config
    assert {k: v for k, v in after.items() if not k.startswith("report/") and k != "config.json"} == \
        {k: v for k, v in before.items() if k != "config.json"}
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


@pytest.mark.slow
def test_json_forms_are_those_of_the_old_files(old_run, tmp_path):
    old_refine = old_run / "run" / "refine"
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


@pytest.mark.slow
def test_records_read_and_rewrite_the_old_files_byte_for_byte(old_run, tmp_path):
    """The typed records (curlprune.store.records) of 0.1.0's report.json, done.json and summary.json:
    read, then written again, they are the same bytes."""
    run = old_run / "run"
    report, old, new = rewritten(REPORT_FILE, run / "prune", tmp_path / "prune")
    assert report.allocation is None and report.groups  # 0.1.0 wrote no allocation
    assert new == old
    for stage in ("distill", "refine"):
        summary, old, new = rewritten(DONE_FILE, run / stage, tmp_path / stage)
        assert summary.stage == stage and summary.config is not None
        assert new == old
    _, old, new = rewritten(SUMMARY_FILE, run, tmp_path)
    assert new == old


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
