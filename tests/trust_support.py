"""Shared by the trust tests (tests/test_trust.py, test_trust_inputs.py, test_trust_runs.py,
test_settings.py, test_nested_lock.py, test_preflight.py): the in-process CLI, the one-line error
check, weights with NaN/inf, and real digits models and run folders built once per module."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from curlprune.store import checkpoint
from curlprune.store.canonical import canonical_bytes
from curlprune.cli import main


MODEL = "small:resnet-digits"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def cli(capsys):
    """``curlprune ARGS`` in this process (no interpreter start-up): a CompletedProcess-like result."""

    def call(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, one line on stderr that contains every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("curlprune: error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def poisoned(state: dict, value: float) -> tuple[dict, str]:
    """A copy of the state dict with one value of one tensor set to ``value`` (NaN, inf); and that tensor's name."""
    state = {k: v.clone() for k, v in state.items()}
    name = "layer1.0.conv2.weight"
    state[name].view(-1)[3] = value
    return state, name


def raw_checkpoint(path: Path, state: dict) -> Path:
    """A curlprune checkpoint written past curlprune.save's own check (as a damaged or foreign file would be)."""
    clean = path.with_suffix(".clean.safetensors")
    checkpoint.save(clean, MODEL, {}, {k: torch.zeros_like(v) for k, v in state.items()})
    metadata = checkpoint.read_metadata(clean)
    header = {"curlprune_format": "1", **{k: json.dumps(v) for k, v in metadata.items()}}
    path.write_bytes(canonical_bytes(state, header))
    clean.unlink()
    return path


TINY = {  # real digits, 50 training images per class (as tests/test_trust.py)
    "model": MODEL, "data": "digits", "train_per_class": 50, "seed": 0,
    "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
}


def write_config(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, teacher) -> Path:
    """A run folder whose prune stage is finished (the digits ResNet at 50% of its MACs)."""
    directory = tmp_path_factory.mktemp("pruned")
    config = write_config(directory / "c.yaml", **TINY, weights=str(teacher), run_dir=str(directory / "run"), stages=["prune"])
    assert main(["run", str(config), "--no-report"]) == 0  # in this process (one thread): no interpreter start-up
    return directory / "run"


def unfinish(stage_dir: Path) -> None:
    """What a kill right after the last epoch's state leaves: the state, no result."""
    for name in ("done.json", "model.safetensors", "checkpoint.safetensors"):
        (stage_dir / name).unlink(missing_ok=True)


def stage_args(stage: str, teacher: Path, out: Path) -> list:
    return [stage, "--model", MODEL, "--weights", teacher, "--train-per-class", 20, "--epochs", 2, "--out", out, "--no-report"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher) -> dict[str, Path]:
    """Finished 2-epoch distill and refine runs (the unpruned digits model, 20 images per class)."""
    base = tmp_path_factory.mktemp("trained")
    runs = {}
    for stage in ("distill", "refine"):
        assert main([str(a) for a in stage_args(stage, teacher, base / stage)]) == 0  # in this process (one thread)
        runs[stage] = base / stage
    return runs
