"""The `curlprune` command: help, inspection commands, export, and one-line errors."""
from __future__ import annotations

import re
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


def help_text(capsys, *args: str) -> str:
    """What ``curlprune ARGS --help`` prints (in this process: argparse exits 0 after printing)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_lists_commands_and_defaults(capsys):
    top = help_text(capsys)
    for command in ("groups", "count", "export", "demo", "run"):
        assert command in top
    sub = help_text(capsys, "groups")
    assert "--input-size" in sub and "default" in sub


def test_no_help_text_shows_a_doubled_percent_sign(capsys):
    """argparse %-formats an argument's help but not a command's description: "50%%" there is printed
    as is. `curlprune demo --help` states what the demo does (prune to 50% of the MACs, then distill)."""
    commands = ["demo", "groups", "count", "export", "prune", "run", "finetune", "distill", "refine", "report"]
    for text in [help_text(capsys)] + [help_text(capsys, command) for command in commands]:
        assert "%%" not in text, text
    demo = " ".join(help_text(capsys, "demo").split())
    assert "prune it to 50% of its MACs" in demo and "(the default stages: prune, distill)" in demo, demo


def test_no_help_text_shows_a_default_of_none_or_two_defaults(capsys):
    """`curlprune groups --help` said "(default: the model's own) (default: None)" for --input-size and
    "(default: None)" for --model and --weights: argparse's default added to help that says it already,
    or to options whose absence means something else than None."""
    commands = ["demo", "groups", "count", "export", "prune", "run", "finetune", "distill", "refine", "report"]
    for command in commands:
        text = " ".join(help_text(capsys, command).split())
        assert "(default: None)" not in text, (command, text)
        assert not re.search(r"\(default:[^)]*\) \(default:", text), (command, text)


def test_the_module_is_a_command_whose_bad_input_is_one_line_and_exit_2():
    """``python -m curlprune.cli`` in a process of its own: exit 2 and one line on stderr, nothing else
    (no traceback, no warning printed at import); the other cases run in this process, below."""
    result = run_cli("groups", "--model", "cifar:resnet57")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith("curlprune: error:"), result.stderr
    assert "unknown model" in result.stderr and result.stdout == ""


def test_python_dash_m_curlprune_is_the_command():
    # `python -m curlprune ...` said "No module named curlprune.__main__; 'curlprune' is a package and
    # cannot be directly executed" (only `python -m curlprune.cli` worked).
    result = subprocess.run([sys.executable, "-m", "curlprune", "groups", "--model", "cifar:resnet20"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "layer1.0.conv1" in result.stdout
    result = subprocess.run([sys.executable, "-m", "curlprune", "groups", "--model", "cifar:resnet57"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("curlprune: error: unknown model")


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


def test_count_of_a_checkpoint_refuses_model_options_it_would_ignore(tmp_path, capsys):
    model = build("cifar:resnet20").eval()
    ckpt = tmp_path / "model.safetensors"
    save(ckpt, "cifar:resnet20", {}, model.state_dict())
    assert main(["count", str(ckpt)]) == 0
    assert "cifar:resnet20" in capsys.readouterr().out
    # --model next to a checkpoint used to be dropped silently (the count was the checkpoint's, not resnet56's)
    assert main(["count", str(ckpt), "--model", "cifar:resnet56"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not both" in err[0]


def test_export_command_writes_onnx(tmp_path, capsys):
    torch.manual_seed(0)
    model = build("cifar:resnet20").eval()
    groups = curlprune.trace(model, torch.zeros(1, 3, 32, 32))
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    ckpt = tmp_path / "model.safetensors"
    save(ckpt, "cifar:resnet20", plan, curlprune.apply(model, groups, plan).state_dict())
    assert main(["export", str(ckpt), str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 10_000
    # the input shape prints as written: rich markup used to eat "[batch, 3, 32, 32]" as a style tag
    assert "input 'input' [batch, 3, 32, 32], output 'logits'" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["groups", "--model", "cifar:resnet57"], "unknown model"),
        (["count", "--model", "cifar:resnet20", "--weights", "/nonexistent/w.th"], "/nonexistent/w.th"),
        (["export", "/nonexistent/model.safetensors", "out.onnx"], "does not exist"),
        (["run", "/nonexistent/config.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    capsys.readouterr()
    assert main(args) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curlprune: error:") and message in lines[0], stderr
