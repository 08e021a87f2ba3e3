"""The prune stage's device (issue 20, item 1): ``--device``, ``PruneConfig.device`` and
``curlprune.prune(device=...)``. On a machine without CUDA, ``cuda`` is one line and exit 2 with
nothing written, and ``auto`` resolves to the CPU; the device is not part of the run's identity.
Real computation on the digits model (the GPU path itself is checked by benchmarks/gpu_check.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curlprune
from curlprune.cli import main
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.run.prune_config import PruneConfig

MODEL = "small:resnet-digits"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Seeded random weights of the digits model, so that two runs prune the same model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "digits.pt"
    torch.save(build(MODEL).state_dict(), path)
    return path


def _argv(out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", MODEL, "--data", "digits", "--target-macs", "0.5", "--calib", "32", "--eval-limit", "50",
            "--bn-recalibrate", "64", "--no-report", "--out", str(out), *extra]


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, capsys, device):
    out = tmp_path / "run"
    assert main(_argv(out, "--device", device)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0] and "'cpu' or 'auto'" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", ""])
def test_an_unknown_device_is_one_line(tmp_path, capsys, device):
    out = tmp_path / "run"
    assert main(_argv(out, "--device", device)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device must be auto, cpu, cuda or cuda:<index>" in err[0]
    assert not out.exists()
    with pytest.raises(CurlpruneError, match="device must be"):
        PruneConfig(target_macs=0.5, device=device)


@no_cuda
def test_auto_resolves_to_the_cpu_and_the_device_is_not_the_runs_identity(tmp_path, capsys, weights):
    out = tmp_path / "run"
    assert main(_argv(out, "--device", "auto", "--weights", str(weights))) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scored = [e for e in events if e.get("event") == "scores"]
    assert scored and scored[-1]["device"] == "cpu" and scored[-1]["source"] == "computed"
    assert "device" not in json.loads((out / "done.json").read_text())["settings"]["config"]
    capsys.readouterr()
    # the same run asked for on the CPU: already done (where it ran is not what it is)
    assert main(_argv(out, "--device", "cpu", "--resume", "--weights", str(weights))) == 0
    assert "already holds this finished run" in " ".join(capsys.readouterr().out.split())
    # the scores of an explicit cpu run equal auto's (the fingerprint leaves the device out too)
    other = tmp_path / "cpu"
    assert main(_argv(other, "--device", "cpu", "--weights", str(weights))) == 0
    assert (other / "plan.json").read_text() == (out / "plan.json").read_text()


@no_cuda
def test_the_api_takes_a_device():
    torch.manual_seed(0)
    model = build(MODEL).eval()
    example = torch.zeros(1, 1, 8, 8)
    with pytest.raises(CurlpruneError, match="CUDA is not available"):
        curlprune.prune(model, example, data="digits", input_spec=curlprune.models.input_spec(MODEL),
                        target_macs=0.5, calib=16, device="cuda")
    auto = curlprune.prune(model, example, data="digits", input_spec=curlprune.models.input_spec(MODEL),
                           target_macs=0.5, calib=16, eval_limit=0, bn_recalibrate=0)  # device="auto" (the default)
    cpu = curlprune.prune(model, example, data="digits", input_spec=curlprune.models.input_spec(MODEL),
                          target_macs=0.5, calib=16, eval_limit=0, bn_recalibrate=0, device=torch.device("cpu"))
    assert auto.plan == cpu.plan
    assert all(p.device.type == "cpu" for p in auto.model.parameters())


def test_torchrun_prune_starts_and_rank0_alone_writes(tmp_path, weights):
    """``torchrun --nproc_per_node=2 -m curlprune.cli prune ...`` (gloo, CPU): before, both ranks took
    --out's lock and rank 1 stopped with "in use by another run"; now rank 0 alone locks and writes."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "curlprune.cli",
               *_argv(out, "--weights", str(weights), "--device", "cpu")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in use" not in done.stderr
    single = tmp_path / "single"
    assert main(_argv(single, "--weights", str(weights), "--device", "cpu")) == 0
    assert (out / "plan.json").read_text() == (single / "plan.json").read_text()
    assert sum(1 for line in (out / "log.jsonl").read_text().splitlines() if '"event": "done"' in line) == 1  # one writer
