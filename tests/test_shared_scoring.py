"""Scoring shared by torchrun ranks (issue 20, item 2): ``torchrun --nproc_per_node=2 -m curlprune.cli
prune`` (gloo, CPU, one thread per process) splits ``kl``'s groups (balanced by ablation MACs) and
``kl-approx``'s calibration image blocks over the two ranks, gathers them on rank 0, and writes the
scores of a one-process run, bit for bit, and the same plan; each rank scored only its share (its own
record in log.jsonl). A torchrun scoring killed with SIGKILL continues from rank 0's
scores.partial.npz, with 1 or 2 processes, to the same scores. Real computation: cifar:resnet20
(seeded init) on the real digits as RGB PNGs at 16 px."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from curlprune.criteria import Criterion, compute_scores, register_criterion
from curlprune.criteria.base import BlockShare
from curlprune.errors import CurlpruneError
from curlprune.cost.analysis import trace
from curlprune.models import build
from curlprune.run.prune_shard import ablation_costs, assign_groups
from curlprune.store.scores_io import read_scores

from scoring_support import MODEL, ONE_THREAD, kill_tree, one_process, setup, torchrun  # noqa: F401 (setup: the fixture)


def _argv(weights: Path, data: Path, out: Path, criterion: str, calib: int, *extra: str) -> list[str]:
    return ["prune", "--model", MODEL, "--weights", str(weights), "--input-size", "16", "--data", str(data),
            "--criterion", criterion, "--calib", str(calib), "--target-macs", "0.5", "--eval-limit", "0",
            "--bn-recalibrate", "0", "--no-report", "--device", "cpu", "--out", str(out), *extra]


def _scores_event(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [e for e in lines if e.get("event") == "scores"][-1]


def _assert_equal_scores(got: Path, expected: Path) -> None:
    a, _ = read_scores(got / "scores.npz")
    b, _ = read_scores(expected / "scores.npz")
    assert list(a) == list(b)
    for name in b:
        assert np.array_equal(a[name], b[name]), name
    assert json.loads((got / "plan.json").read_text()) == json.loads((expected / "plan.json").read_text())


def test_groups_are_split_by_ablation_cost():
    """Every group to one rank; the split by MACs downstream is balanced where a split by units is not."""
    model = build(MODEL).eval()
    groups = [g for g in trace(model, torch.zeros(1, 3, 16, 16)) if g.prunable]
    costs = ablation_costs(model, groups, torch.zeros(1, 3, 16, 16))
    first, last = groups[0], groups[-1]  # the stem's stream (cut at the first block) vs a group of the last stage
    assert costs[first.name] / (first.width // first.unit) > 2 * costs[last.name] / (last.width // last.unit)
    shares = assign_groups(groups, costs, 2)
    assert sorted(g.name for share in shares for g in share) == sorted(g.name for g in groups)
    loads = [sum(costs[g.name] for g in share) for share in shares]
    assert max(loads) / min(loads) < 1.1  # longest first: within one small group's cost


@pytest.mark.parametrize("criterion", ["kl-approx", "taylor"])
def test_image_blocks_run_by_two_ranks_add_up_to_one_process_bit_for_bit(criterion):
    """What each rank of ``_per_block`` does, in one process: rank r runs blocks r, r+2, ...; their sums,
    given to rank 0, are added in block order: equal (np.array_equal) to all blocks run at once."""
    torch.manual_seed(0)
    model = build(MODEL).eval()
    groups = trace(model, torch.zeros(1, 3, 16, 16))
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # blocks of 16, 16, 8
    y = torch.arange(40) % 10
    whole = compute_scores(criterion, model, groups, images=x, labels=y)
    shares = [BlockShare(rank, 2) for rank in range(2)]
    for share in shares:
        compute_scores(criterion, model, groups, images=x, labels=y, blocks=share)
    assert sorted(shares[0].sums) == [0, 2] and sorted(shares[1].sums) == [1]  # each rank its own blocks only
    given = {**shares[0].sums, **shares[1].sums}
    combined = compute_scores(criterion, model, groups, images=x, labels=y, blocks=BlockShare(0, 1, given))
    assert list(combined) == list(whole)
    for name in whole:
        assert np.array_equal(combined[name], whole[name]), name
        assert np.any(whole[name] > 0), name


def test_a_per_block_criterion_must_take_blocks():
    def scores(model, groups, images):
        return {}
    with pytest.raises(CurlpruneError, match="blocks"):
        register_criterion(Criterion("no-blocks", scores, "x", needs_data=True, per_block=True))


def test_two_torchrun_processes_share_kl_and_write_the_one_process_scores(setup, tmp_path):
    weights, data = setup
    shared, single = tmp_path / "shared", tmp_path / "single"
    done = subprocess.run(torchrun(_argv(weights, data, shared, "kl", 32)), env=ONE_THREAD, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scoring split over 2 ranks" in " ".join(done.stdout.split()), done.stdout[-2000:]
    one_process(_argv(weights, data, single, "kl", 32))
    _assert_equal_scores(shared, single)
    event = _scores_event(shared)
    assert event["ranks"] == 2 and event["split"] == "groups"
    shares = {s["rank"]: s for s in event["shares"]}
    assert sorted(shares) == [0, 1] and all(s["groups"] for s in shares.values())  # both ranks scored
    assert not set(shares[0]["groups"]) & set(shares[1]["groups"])  # each its own groups only
    expected, _ = read_scores(single / "scores.npz")
    assert sorted(shares[0]["groups"] + shares[1]["groups"]) == sorted(expected)
    assert shares[0]["units"] + shares[1]["units"] == sum(len(v) for v in expected.values())  # resnet20: one channel per unit
    assert _scores_event(single)["ranks"] == 1


def test_two_torchrun_processes_share_kl_approx_image_blocks_bit_for_bit(setup, tmp_path):
    weights, data = setup
    shared, single = tmp_path / "shared", tmp_path / "single"
    done = subprocess.run(torchrun(_argv(weights, data, shared, "kl-approx", 32)), env=ONE_THREAD, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scoring split over 2 ranks" in " ".join(done.stdout.split()), done.stdout[-2000:]
    one_process(_argv(weights, data, single, "kl-approx", 32))
    _assert_equal_scores(shared, single)  # the block sums are added in block order on rank 0: no tolerance needed
    event = _scores_event(shared)
    assert event["ranks"] == 2 and event["split"] == "image blocks"
    shares = {s["rank"]: s["blocks"] for s in event["shares"]}
    assert shares == {0: [0], 1: [1]}  # 32 images = two blocks of 16, one per rank


def test_a_killed_torchrun_scoring_continues_with_one_or_two_processes(setup, tmp_path):
    weights, data = setup
    whole = tmp_path / "whole"
    one_process(_argv(weights, data, whole, "kl", 48))
    killed = tmp_path / "killed"
    partial = killed / "scores.partial.npz"
    process = subprocess.Popen(torchrun(_argv(weights, data, killed, "kl", 48)), env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not partial.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert partial.exists(), "the run ended (or hung) before rank 0 saved a first block of groups"
        kill_tree(process.pid)  # both ranks (torchrun starts them in sessions of their own) and torchrun, at once
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
    assert not (killed / "scores.npz").exists()
    saved, _ = read_scores(partial)
    expected, _ = read_scores(whole / "scores.npz")
    assert 0 < len(saved) < len(expected)
    for name, values in saved.items():  # whole groups, gathered from both ranks, already the final values
        assert np.array_equal(values, expected[name]), name
    again = tmp_path / "again"
    shutil.copytree(killed, again)
    (again / ".lock").unlink(missing_ok=True)

    done = subprocess.run(torchrun(_argv(weights, data, killed, "kl", 48, "--resume")), env=ONE_THREAD, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one_process(_argv(weights, data, again, "kl", 48, "--resume"))
    for out in (killed, again):
        _assert_equal_scores(out, whole)
        event = _scores_event(out)
        assert event["groups_resumed"] == len(saved) and event["groups_scored"] == len(expected) - len(saved)
        assert not (out / "scores.partial.npz").exists()
    assert _scores_event(killed)["ranks"] == 2 and _scores_event(again)["ranks"] == 1
