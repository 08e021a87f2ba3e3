"""Resumable scoring (issue 20, item 3): a ``prune --criterion kl`` killed with SIGKILL while it
scores, rerun with ``--resume``, ends with exactly the scores of an uninterrupted run and scores
only the groups that were not saved; a partial file from other settings is refused. Real
computation: cifar:resnet20 (seeded init) on the real digits as RGB PNGs at 16 px."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from curlprune.cli import main
from scoring_support import write_resnet20_and_digits
from curlprune.cost.analysis import trace
from curlprune.criteria import compute_scores
from curlprune.criteria.base import prunable
from curlprune.models import build
from curlprune.run.prune_shard import score_blocks
from curlprune.store.scores_io import read_scores

MODEL = "cifar:resnet20"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(weights of a seeded cifar:resnet20, an ImageFolder of 20 RGB digits per class and split)."""
    return write_resnet20_and_digits(tmp_path_factory.mktemp("resumable"))


def _argv(weights: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", MODEL, "--weights", str(weights), "--input-size", "16", "--data", str(data),
            "--criterion", "kl", "--calib", "96", "--target-macs", "0.5", "--eval-limit", "0", "--bn-recalibrate", "0",
            "--no-report", "--out", str(out), *extra]


def _scores_events(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [e for e in lines if e.get("event") == "scores"]


def test_kl_scores_of_a_group_do_not_depend_on_the_other_groups():
    """The property resumability rests on (Criterion.per_group): each group scored alone = all at once, bit for bit."""
    torch.manual_seed(0)
    model = build(MODEL).eval()
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    groups = trace(model, torch.zeros(1, 3, 16, 16))
    together = compute_scores("kl", model, groups, images=x, budget_mb=0.5)  # several image blocks
    for block in score_blocks("kl", prunable(groups), 40):  # blocks of one to three groups
        alone = compute_scores("kl", model, block, images=x, budget_mb=0.5)
        assert list(alone) == [g.name for g in block]
        for name, values in alone.items():
            assert np.array_equal(values, together[name]), name


def test_a_killed_kl_prune_resumes_and_ends_with_the_same_scores(setup, tmp_path):
    weights, data = setup
    whole = tmp_path / "whole"
    assert main(_argv(weights, data, whole)) == 0
    expected, _ = read_scores(whole / "scores.npz")
    assert not (whole / "scores.partial.npz").exists()  # removed once scores.npz is written
    assert _scores_events(whole)[-1]["groups_resumed"] == 0 and _scores_events(whole)[-1]["groups_scored"] == len(expected)

    killed = tmp_path / "killed"
    partial = killed / "scores.partial.npz"
    process = subprocess.Popen([sys.executable, "-m", "curlprune.cli", *_argv(weights, data, killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not partial.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert partial.exists(), "the run ended (or hung) before it saved a first block of groups"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "scores.npz").exists()
    saved, _ = read_scores(partial)
    assert 0 < len(saved) < len(expected)
    for name, values in saved.items():  # whole groups only, already the final values
        assert np.array_equal(values, expected[name]), name

    assert main(_argv(weights, data, killed)) == 2  # without --resume: the folder holds a (partial) run
    assert main(_argv(weights, data, killed, "--resume")) == 0
    resumed, _ = read_scores(killed / "scores.npz")
    assert list(resumed) == list(expected)
    for name in expected:
        assert np.array_equal(resumed[name], expected[name]), name
    assert not partial.exists()
    event = _scores_events(killed)[-1]
    assert event["groups_resumed"] == len(saved)  # at least what was on disk at the kill (more if it saved again before dying)
    assert event["groups_scored"] == len(expected) - len(saved)
    assert event["channels_scored"] == sum(len(v) for name, v in expected.items() if name not in saved)
    assert json.loads((killed / "plan.json").read_text()) == json.loads((whole / "plan.json").read_text())


def test_a_partial_file_from_other_settings_is_refused(setup, tmp_path, capsys):
    weights, data = setup
    out = tmp_path / "other"
    assert main(_argv(weights, data, out)) == 0
    scores, fingerprint = read_scores(out / "scores.npz")
    (out / "scores.npz").rename(out / "scores.partial.npz")  # as if killed, but scored with another seed
    for name in ("done.json", "model.safetensors"):
        (out / name).unlink()
    before = (out / "scores.partial.npz").read_bytes()
    capsys.readouterr()
    assert main(_argv(weights, data, out, "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith("data ")]  # the data line says how the data was read
    assert len(errors) == 1 and "scores.partial.npz was computed with other settings" in errors[0] and "seed" in errors[0]
    assert (out / "scores.partial.npz").read_bytes() == before and not (out / "scores.npz").exists()
