"""A run's lock covers its stage folders (issue 18, item 8).

Was: ``curlprune prune --resume`` aimed at the ``prune/`` folder of a run that was working rewrote
5 files under it. Now a command whose ``--out`` lies inside a locked run directory (a stage folder
or deeper) stops at once with one line naming the run that holds it, and a run does not start in
a directory one of whose stage folders another command is working in. The run's own stages (its
prune stage locks ``prune/``) are not affected. Real locks throughout: a second process holding
them, or the lock object held in this process.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curlprune.errors import CurlpruneError
from curlprune.run.prune import PruneConfig, run_prune
from curlprune.store.runlock import RunLock

from trust_support import MODEL, ONE_THREAD, assert_one_line_error, cli  # noqa: F401 (cli: a fixture)


@pytest.fixture
def held():
    """``held(path)``: a second process that holds ``RunLock(path)`` until the test ends (then killed)."""
    holders = []

    def hold(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import time; from curlprune.store.runlock import RunLock; "
                                 f"RunLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                                env=ONE_THREAD, stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in holders:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` but the run's lock file, with its time stamp and bytes."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file() and p != folder / ".lock"}


def test_prune_resume_into_the_prune_folder_of_a_working_run_is_refused(cli, tmp_path, held):
    run_dir = tmp_path / "run"
    prune_dir = run_dir / "prune"
    args = ("prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "0.5", "--no-report")
    assert cli(*args, "--out", prune_dir).returncode == 0  # the run's finished prune stage
    before = _snapshot(run_dir)
    holder = held(run_dir)  # the run is working
    line = assert_one_line_error(cli(*args, "--target-macs", "0.4", "--resume", "--out", prune_dir),
                          str(run_dir), "in use by another run", f"pid {holder.pid}")
    assert "inside" in line
    for out in (run_dir / "distill", prune_dir / "deeper"):  # any folder inside it, existing or not
        assert_one_line_error(cli("distill", "--model", MODEL, "--epochs", "1", "--out", out, "--no-report"), f"pid {holder.pid}")
        assert not out.exists()
    assert _snapshot(run_dir) == before  # nothing under the run was written


def test_the_lock_object_held_in_this_process_covers_its_stage_folders(tmp_path):
    run_dir = tmp_path / "run"
    config = PruneConfig(criterion="l1", target_macs=0.7, eval_limit=0)
    with RunLock(run_dir):
        with pytest.raises(CurlpruneError, match="in use by another run") as info:
            run_prune(config, run_dir / "prune", model_name=MODEL, show=False)
        assert "\n" not in str(info.value)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # prune/ was not even created
    result = run_prune(config, run_dir / "prune", model_name=MODEL, show=False)  # free again
    assert result.checkpoint.is_file()


def test_a_run_does_not_start_while_a_command_works_in_one_of_its_stage_folders(cli, tmp_path, held):
    run_dir = tmp_path / "run"
    holder = held(run_dir / "prune")  # `curlprune prune --out run/prune` is working
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "data": "digits", "stages": ["prune"],
                                      "prune": {"criterion": "l1", "target_macs": 0.5, "eval_limit": 0}}))
    assert_one_line_error(cli("run", config, "--out", run_dir, "--no-report"), "prune", f"pid {holder.pid}")
    assert sorted(p.name for p in run_dir.iterdir()) == ["prune"]  # no config.json, no lock left behind


def test_the_runs_own_prune_stage_and_a_dead_holder_do_not_block(cli, tmp_path):
    """The pipeline locks its run directory and its prune stage locks prune/ inside it; a lock
    file left by a killed run in a parent folder is no obstacle either."""
    run_dir = tmp_path / "run"
    killed = subprocess.Popen([sys.executable, "-c", "import time; from curlprune.store.runlock import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              env=ONE_THREAD, stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "held"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (tmp_path / ".lock").is_file()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "data": "digits", "stages": ["prune"],
                                      "prune": {"criterion": "l1", "target_macs": 0.5, "eval_limit": 0}}))
    proc = cli("run", config, "--out", run_dir, "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "prune" / "done.json").is_file() and not (run_dir / ".lock").exists()
    assert not (run_dir / "prune" / ".lock").exists()
