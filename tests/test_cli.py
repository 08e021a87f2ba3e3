"""The `curlprune` command: help, inspection commands, export, and one-line errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import curlprune
from curlprune.cli import main
from curlprune.models import build
from curlprune.store.checkpoint import save


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curlprune.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands_and_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("groups", "count", "export", "demo", "run"):
        assert command in result.stdout
    sub = run_cli("groups", "--help")
    assert sub.returncode == 0 and "--input-size" in sub.stdout and "default" in sub.stdout


def test_groups_command_prints_the_residual_streams(capsys):
    assert main(["groups", "--model", "cifar:resnet20"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "outside" in out
    assert "12 prunable" in out  # 3 stream groups + 9 inside groups


def test_count_command_reports_resnet56_macs(capsys):
    assert main(["count", "--model", "cifar:resnet56"]) == 0
    out = capsys.readouterr().out
    macs = int(out.split("(")[1].split(" /")[0].replace(",", ""))
    assert abs(macs - 125e6) / 125e6 < 0.01


def test_export_command_writes_onnx(tmp_path):
    torch.manual_seed(0)
    model = build("cifar:resnet20").eval()
    groups = curlprune.trace(model, torch.zeros(1, 3, 32, 32))
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    ckpt = tmp_path / "model.safetensors"
    save(ckpt, "cifar:resnet20", plan, curlprune.apply(model, groups, plan).state_dict())
    result = run_cli("export", str(ckpt), str(tmp_path / "model.onnx"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model.onnx").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["groups", "--model", "cifar:resnet57"], "unknown model"),
        (["count", "--model", "cifar:resnet20", "--weights", "/nonexistent/w.th"], "/nonexistent/w.th"),
        (["export", "/nonexistent/model.safetensors", "out.onnx"], "does not exist"),
        (["run", "/nonexistent/config.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curlprune: error:") and message in lines[0], result.stderr
