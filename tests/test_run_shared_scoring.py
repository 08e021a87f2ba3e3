"""The ``curlprune run`` pipeline's prune stage shares its scoring under torchrun (issue 20, item 2):
``torchrun --nproc_per_node=2 -m curlprune.cli run`` (gloo, CPU, one thread per process) splits
``kl``'s groups over both ranks, every step's with ``steps: 2``, and writes the scores and the plan
of a one-process ``run``, bit for bit; a rerun of the finished run under torchrun does nothing and
ends (no rank left in a collective). Real computation: cifar:resnet20 (seeded init) on the real
digits as RGB PNGs at 16 px (the fixture of tests/test_shared_scoring.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from curlprune.store.scores_io import read_scores

from scoring_support import MODEL, ONE_THREAD, descendants, kill_tree, one_process, setup, torchrun  # noqa: F401 (setup: the fixture)

TIMEOUT = 240  # a rank left waiting fails the test instead of blocking it


def _config(tmp_path: Path, weights: Path, data: Path, name: str, **prune) -> Path:
    config = tmp_path / f"{name}.yaml"
    section = {"criterion": "kl", "target_macs": 0.5, "calib": 32, "eval_limit": 0, "bn_recalibrate": 0, "device": "cpu", **prune}
    config.write_text(yaml.safe_dump({"model": MODEL, "weights": str(weights), "data": str(data), "input_size": 16, "seed": 0,
                                      "run_dir": str(tmp_path / name), "stages": ["prune"], "prune": section}))
    return config


def _torchrun(config: Path) -> tuple[int, str]:
    """(exit status, stdout and stderr) of ``torchrun --nproc_per_node=2 ... run config``; one that has not
    ended after :data:`TIMEOUT` fails the test with each rank's Python stack (faulthandler, on SIGABRT)."""
    command = torchrun(["run", str(config), "--no-report"])
    log = config.with_name(f"{config.stem}.{time.time_ns()}.log")
    with log.open("w") as out:
        process = subprocess.Popen(command, env={**ONE_THREAD, "PYTHONFAULTHANDLER": "1"}, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for rank in descendants(process.pid):
                os.kill(rank, signal.SIGABRT)  # each rank prints where it waits
            time.sleep(3)
            kill_tree(process.pid)
            process.wait()
            pytest.fail(f"torchrun did not end within {TIMEOUT} s:\n{log.read_text()[-6000:]}")
    return code, log.read_text()


def _one_process(config: Path) -> None:
    one_process(["run", str(config), "--no-report"])


def _events(prune_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (prune_dir / "log.jsonl").read_text().splitlines()]
    return [e for e in lines if e.get("event") == kind]


def _assert_same(got: Path, expected: Path, files: tuple[str, ...]) -> None:
    for name in files:
        a, _ = read_scores(got / name)
        b, _ = read_scores(expected / name)
        assert list(a) == list(b), name
        for group in b:
            assert np.array_equal(a[group], b[group]), (name, group)
    assert json.loads((got / "plan.json").read_text()) == json.loads((expected / "plan.json").read_text())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_split(event: dict, expected: dict) -> None:
    """Both ranks scored, each its own groups only, together every group."""
    assert event["ranks"] == 2 and event["split"] == "groups", event
    shares = {s["rank"]: s["groups"] for s in event["shares"]}
    assert sorted(shares) == [0, 1] and shares[0] and shares[1]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(expected)


@pytest.fixture(scope="module")
def shared_run(setup, tmp_path_factory) -> tuple[Path, str, Path]:
    """(run directory of a 2-process ``run`` with kl, its output, run directory of the 1-process ``run``)."""
    weights, data = setup
    root = tmp_path_factory.mktemp("runshare")
    code, output = _torchrun(_config(root, weights, data, "shared"))
    assert code == 0, output[-3000:]
    _one_process(_config(root, weights, data, "single"))
    return root / "shared", output, root / "single"


def test_two_torchrun_processes_share_the_run_prune_stage_and_write_the_one_process_scores(shared_run):
    shared, output, single = shared_run
    assert "scoring split over 2 ranks" in " ".join(output.split()), output[-2000:]
    _assert_same(shared / "prune", single / "prune", ("scores.npz",))
    expected, _ = read_scores(single / "prune" / "scores.npz")
    _assert_split(_events(shared / "prune", "scores")[-1], expected)
    assert _events(single / "prune", "scores")[-1]["ranks"] == 1
    assert len(_events(shared / "prune", "done")) == 1  # one writer
    assert [json.loads(line)["stage"] for line in (shared / "log.jsonl").read_text().splitlines()] == ["prune"]
    assert json.loads((shared / "summary.json").read_text())["macs_ratio"] <= 0.5


def test_a_rerun_of_the_finished_run_under_torchrun_does_nothing_and_ends(shared_run):
    shared, _, _ = shared_run
    before = _snapshot(shared)
    code, output = _torchrun(Path(str(shared) + ".yaml"))  # a rank left waiting fails here, after TIMEOUT
    assert code == 0, output[-3000:]
    assert "scoring" not in output
    assert _snapshot(shared) == before  # prune/ reused on every rank; nothing scored, nothing written


def test_iterative_pruning_shares_every_step_under_torchrun(setup, tmp_path):
    weights, data = setup
    code, output = _torchrun(_config(tmp_path, weights, data, "shared", steps=2, calib=16))
    assert code == 0, output[-3000:]
    assert " ".join(output.split()).count("scoring split over 2 ranks") == 2, output[-2000:]
    _one_process(_config(tmp_path, weights, data, "single", steps=2, calib=16))
    _assert_same(tmp_path / "shared" / "prune", tmp_path / "single" / "prune", ("scores.npz", "scores_step2.npz"))
    events = _events(tmp_path / "shared" / "prune", "scores")
    assert [e.get("file") for e in events] == [None, "scores_step2.npz"]
    for event, name in zip(events, ("scores.npz", "scores_step2.npz")):
        _assert_split(event, read_scores(tmp_path / "single" / "prune" / name)[0])
