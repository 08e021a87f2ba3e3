"""A run SIGKILLed in the middle of an epoch resumes after its last completed epoch and ends
bit-identical to an uninterrupted run (weights, label store, metrics)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curlprune.recover import load_label_store

from recover_support import STAGES, kill_mid_epoch, run_job


def metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def without_seconds(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("killed", STAGES)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, recover_runs, killed):
    recover_runs.start(())  # the uninterrupted run (shared with tests/test_amp.py), made while this one is killed
    kill_mid_epoch(tmp_path, "--trip", killed)  # in the middle of the second epoch of `killed`

    stage_dir = tmp_path / killed
    assert not (stage_dir / "done.json").exists()
    first_epoch = metrics(tmp_path, killed)
    assert [r["epoch"] for r in first_epoch] == [1]
    earlier = STAGES[: STAGES.index(killed)]
    stamps = {s: (tmp_path / s / "done.json").stat().st_mtime_ns for s in earlier}

    done = run_job(tmp_path)  # the same command again
    assert done.returncode == 0, done.stderr[-3000:]
    reference = recover_runs.get()

    assert {s: (tmp_path / s / "done.json").stat().st_mtime_ns for s in earlier} == stamps  # finished stages skipped
    assert metrics(tmp_path, killed)[0] == first_epoch[0]  # epoch 1 was not trained again (same seconds)
    for stage in STAGES:
        assert without_seconds(metrics(tmp_path, stage)) == without_seconds(metrics(reference, stage)), stage
        ours, theirs = load_file(str(tmp_path / stage / "model.safetensors")), load_file(str(reference / stage / "model.safetensors"))
        assert ours.keys() == theirs.keys()
        different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not different, f"{stage}: {different[:5]} differ from the uninterrupted run"
    assert torch.equal(load_label_store(tmp_path), load_label_store(reference))
