"""Iterative pruning (issue 22 item 7): ``steps`` in ``curlprune.prune``, ``curlprune prune --steps``
and the ``prune:`` config, on the digits ResNet trained on the real scikit-learn digits.

The composed plan is a plan of the original model (masked == sliced, plan_cost == count), the floor
and max_ratio hold relative to the original widths, steps=1 is today's one-shot plan, and the CLI
(with its per-step scores files, resumable) gives the API's plan.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import curlprune
from curlprune.cli import main
from curlprune.cost.cost import count
from curlprune.errors import CurlpruneError
from curlprune.models import input_spec
from curlprune.run.prune_config import PruneConfig
from curlprune.run.run_config import parse_config
from curlprune.surgery.surgery import apply, mask

MODEL = "small:resnet-digits"
X = torch.zeros(1, 1, 8, 8)


@pytest.fixture(scope="module")
def digits_model(trained_digits) -> nn.Module:
    """The digits ResNet trained on the real digits for a few seconds (trained once per session)."""
    return trained_digits(15)


def _prune(model: nn.Module, **settings):
    return curlprune.prune(model, X, data="digits", input_spec=input_spec(MODEL), calib=64, **settings)


def test_steps_one_is_exactly_the_one_shot_plan(digits_model):
    one_shot = _prune(digits_model, target_macs=0.5, bn_recalibrate=0, eval_limit=0)
    one_step = _prune(digits_model, target_macs=0.5, bn_recalibrate=0, eval_limit=0, steps=1)
    assert one_step.plan == one_shot.plan
    assert one_step.report.selection == one_shot.report.selection and "steps" not in one_shot.report.selection


def test_three_steps_reach_the_target_with_a_plan_of_the_original(digits_model):
    floor, limit = 0.55, 0.25
    pruned = _prune(digits_model, target_macs=0.5, steps=3, floor=floor, max_ratio={"layer2.0.conv2": limit}, eval_limit=0)
    groups = pruned.groups  # the ORIGINAL model's groups
    full_macs, _ = count(digits_model, X)
    macs, params = count(pruned.model, X)
    assert 0.99 * 0.5 * full_macs <= macs <= 0.5 * full_macs  # within select's tolerance of the target
    assert curlprune.plan_cost(digits_model, X, groups, pruned.plan) == (macs, params)
    steps = pruned.report.selection["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["fraction"] for s in steps] == pytest.approx([0.5 ** (1 / 3), 0.5 ** (2 / 3), 0.5], abs=1e-6)  # geometric schedule
    assert steps[0]["macs"] > steps[1]["macs"] > steps[2]["macs"] == macs
    for g in groups:  # floor and limit relative to the original widths
        if g.prunable:
            kept = len(pruned.plan.get(g.name, range(g.width)))
            assert all(0 <= i < g.width for i in pruned.plan.get(g.name, []))
            assert kept >= math.ceil(floor * g.width) - g.unit, g.name
    assert 32 - len(pruned.plan.get("layer2.0.conv2", range(32))) <= limit * 32
    probe = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sliced = apply(digits_model, groups, pruned.plan).eval()
    with torch.no_grad():
        expected = sliced(probe)
        with mask(digits_model, groups, pruned.plan):
            masked = digits_model(probe)
        assert torch.allclose(expected, masked, atol=1e-4)  # masked(original) == sliced(original)
    one_shot = _prune(digits_model, target_macs=0.5, floor=floor, max_ratio={"layer2.0.conv2": limit}, eval_limit=0)
    assert pruned.plan != one_shot.plan  # the later steps ranked the re-scored, pruned model


def test_cli_and_api_give_the_same_iterative_plan_and_resume_per_step(tmp_path, digits_model, capsys):
    weights = tmp_path / "digits.pt"
    torch.save(digits_model.state_dict(), weights)
    out = tmp_path / "run"
    argv = ["prune", "--model", MODEL, "--weights", str(weights), "--data", "digits", "--target-params", "0.5",
            "--calib", "64", "--steps", "3", "--out", str(out), "--no-report"]
    assert main(argv) == 0
    plan = {k: list(v) for k, v in json.loads((out / "plan.json").read_text()).items()}
    report = json.loads((out / "report.json").read_text())
    api = _prune(digits_model, target_params=0.5, steps=3)
    assert api.plan == plan
    assert api.report.to_json()["selection"] == report["selection"]
    assert len(report["selection"]["steps"]) == 3
    assert all((out / name).is_file() for name in ("scores.npz", "scores_step2.npz", "scores_step3.npz"))
    # a resumed run (finished marker removed) reuses every step's scores and lands on the same plan
    (out / "done.json").unlink()
    assert main(argv + ["--resume"]) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    reused = [e["file"] for e in events if e.get("event") == "scores" and e.get("source") == "reused"]
    assert reused == ["scores.npz", "scores_step2.npz", "scores_step3.npz"]
    assert {k: list(v) for k, v in json.loads((out / "plan.json").read_text()).items()} == plan
    # other steps: step 1's scores still match (they do not depend on steps), step 2's were scored under another plan
    (out / "done.json").unlink()
    assert main(argv[:-5] + ["--steps", "2", "--out", str(out), "--no-report", "--resume"]) == 2
    assert "scores_step2.npz was computed with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("settings, message", [
    ({"target_macs": 0.5, "steps": 0}, "steps must be"),
    ({"target_macs": 0.5, "steps": True}, "steps must be"),
    ({"target_macs": 0.5, "steps": 1000}, "steps"),
    ({"target_latency": 0.5, "steps": 2}, "latency target"),
])
def test_bad_steps_are_one_line(settings, message):
    with pytest.raises(CurlpruneError, match=message):
        PruneConfig(**settings)


def test_a_run_config_sets_steps_in_its_prune_section():
    cfg = parse_config({"model": MODEL, "stages": ["prune"], "prune": {"target_macs": 0.5, "steps": 3}}, "c.yaml")
    assert cfg.sections["prune"].steps == 3 and cfg.sections["prune"].resolved_steps() == 3
    with pytest.raises(CurlpruneError, match="steps"):
        parse_config({"model": MODEL, "stages": ["prune"], "prune": {"target_macs": 0.5, "steps": 0}}, "c.yaml")
