"""A run SIGKILLed in the middle of an epoch resumes after its last completed epoch and ends
bit-identical to an uninterrupted run (weights, label store, metrics)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curlprune.recover import load_label_store

from recover_support import ENV, JOB, STAGES, TIMEOUT, kill_when_tripped, start_tripped


def metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, recover_runs) -> dict[str, dict]:
    """Per stage: a run SIGKILLed in the middle of that stage's second epoch, and what it held then
    (the killed stage's metrics, the done.json times of the stages before it), after the same command
    ran again. The three runs (and the uninterrupted one, shared with tests/test_amp.py) run side by side."""
    recover_runs.start(())
    dirs = {stage: tmp_path_factory.mktemp(f"killed-{stage}") for stage in STAGES}
    tripped = {stage: start_tripped(dirs[stage], "--trip", stage) for stage in STAGES}
    killed, again = {}, {}
    try:
        for stage in STAGES:
            kill_when_tripped(tripped[stage], dirs[stage])  # in the middle of the second epoch of `stage`
            earlier = STAGES[: STAGES.index(stage)]
            killed[stage] = {"run_dir": dirs[stage], "first_epoch": metrics(dirs[stage], stage),
                             "done_before": (dirs[stage] / stage / "done.json").exists(),
                             "stamps": {s: (dirs[stage] / s / "done.json").stat().st_mtime_ns for s in earlier}}
            again[stage] = subprocess.Popen([sys.executable, str(JOB), str(dirs[stage])], env=ENV, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)  # the same command again
        for stage, process in again.items():
            _, stderr = process.communicate(timeout=TIMEOUT)
            killed[stage]["returncode"], killed[stage]["stderr"] = process.returncode, stderr
    finally:
        for process in [*tripped.values(), *again.values()]:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return killed


@pytest.mark.parametrize("killed", STAGES)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(resumed, recover_runs, killed):
    run = resumed[killed]
    tmp_path, first_epoch = run["run_dir"], run["first_epoch"]
    assert not run["done_before"]  # killed before the stage finished ...
    assert [r["epoch"] for r in first_epoch] == [1]  # ... after its first epoch
    earlier = STAGES[: STAGES.index(killed)]

    assert run["returncode"] == 0, run["stderr"][-3000:]
    reference = recover_runs.get()

    assert {s: (tmp_path / s / "done.json").stat().st_mtime_ns for s in earlier} == run["stamps"]  # finished stages skipped
    assert metrics(tmp_path, killed)[0] == first_epoch[0]  # epoch 1 was not trained again (same seconds)
    for stage in STAGES:
        assert without_seconds(metrics(tmp_path, stage)) == without_seconds(metrics(reference, stage)), stage
        ours, theirs = load_file(str(tmp_path / stage / "model.safetensors")), load_file(str(reference / stage / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{stage}: {different[:5]} differ from the uninterrupted run"
    assert torch.equal(load_label_store(tmp_path), load_label_store(reference))
