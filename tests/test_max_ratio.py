"""Per-group limits (issue 22 item 5): ``--max-ratio PATTERN=R`` / ``max_ratio: {PATTERN: R}``: no
group matching PATTERN loses more than R of its channels, and the target is still met."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from curlprune.select.allocation import COST_WEIGHTED, allocate
from curlprune.cost.analysis import model_cost_fn, trace
from curlprune.cli import main
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.run.prune_config import PruneConfig
from curlprune.run.run_config import parse_config
from curlprune.select.search import Target, select
from curlprune.select.limits import parse_max_ratio, resolve_limits

MODEL = "cifar:resnet20"


@pytest.fixture(scope="module")
def resnet20():
    model = build(MODEL).eval()
    x = torch.zeros(1, 3, 32, 32)
    groups = trace(model, x)
    rng = np.random.default_rng(0)
    # layer1's channels look least important: without a limit they go first
    scores = {g.name: rng.random(g.width) * (0.01 if g.name.startswith("layer1") else 1.0) for g in groups if g.prunable}
    return groups, scores, model_cost_fn(model, x, groups)


def _lost(groups, plan, prefix: str) -> dict[str, float]:
    return {g.name: 1 - len(plan.get(g.name, range(g.width))) / g.width for g in groups if g.prunable and g.name.startswith(prefix)}


@pytest.mark.parametrize("how", ["select", "allocate"])
def test_limited_groups_lose_at_most_r_and_the_target_is_met(resnet20, how):
    groups, scores, cost_fn = resnet20
    target = Target("macs", 0.5)

    def run(limits):
        if how == "select":
            return select(groups, scores, cost_fn, target, limits=limits)
        return allocate(groups, scores, cost_fn, target, COST_WEIGHTED, limits=limits)

    free = run(None)
    assert max(_lost(groups, free.plan, "layer1").values()) > 0.5  # the limit below has something to stop
    limits = resolve_limits(groups, {"layer1.*": 0.25})
    assert set(limits) == {g.name for g in groups if g.prunable and g.name.startswith("layer1")}
    limited = run(limits)
    assert max(_lost(groups, limited.plan, "layer1").values()) <= 0.25
    assert limited.met and 0.99 * 0.5 <= limited.macs / limited.full_macs <= 0.5
    assert _lost(groups, limited.plan, "layer3") != _lost(groups, free.plan, "layer3")  # others made up the target


def test_rounding_keeps_the_limit(resnet20):
    groups, scores, cost_fn = resnet20
    limits = resolve_limits(groups, {"layer1.*": 0.25})
    sel = select(groups, scores, cost_fn, Target("macs", 0.5), limits=limits, round_to=4)
    assert max(_lost(groups, sel.plan, "layer1").values()) <= 0.25


def test_an_unreachable_target_under_limits_is_one_line(resnet20):
    groups, scores, cost_fn = resnet20
    limits = resolve_limits(groups, {"*": 0.1})
    with pytest.raises(CurlpruneError, match="not reachable.*max_ratio"):
        select(groups, scores, cost_fn, Target("macs", 0.5), limits=limits)


def test_parsing_and_validation(resnet20):
    groups, _, _ = resnet20
    assert parse_max_ratio(["layer1.*=0.5", "conv1=0"]) == {"layer1.*": 0.5, "conv1": 0.0}
    assert parse_max_ratio({"layer2.*": "0.3"}) == {"layer2.*": 0.3}
    assert parse_max_ratio(None) is None
    for bad, message in ((["layer1.*"], "PATTERN=R"), (["layer1.*=1"], r"in \[0, 1\)"), (["x=-0.1"], r"in \[0, 1\)"),
                         (["x=half"], r"in \[0, 1\)"), ({"x": True}, r"in \[0, 1\)")):
        with pytest.raises(CurlpruneError, match=message):
            parse_max_ratio(bad)
    with pytest.raises(CurlpruneError, match="matches no prunable group"):
        resolve_limits(groups, {"layer9.*": 0.5})
    assert resolve_limits(groups, {"layer1.*": 0.5, "layer1.0.conv1": 0.2})["layer1.0.conv1"] == 0.2  # the smallest wins


def test_config_key(tmp_path):
    cfg = parse_config({"model": MODEL, "data": "digits", "stages": ["prune"],
                        "prune": {"target_macs": 0.5, "criterion": "l1", "max_ratio": {"layer1.*": 0.5}, "bn_recalibrate": 0}})
    assert cfg.sections["prune"].max_ratio == {"layer1.*": 0.5} and cfg.sections["prune"].bn_recalibrate == 0
    with pytest.raises(CurlpruneError, match="max_ratio"):
        PruneConfig(target_macs=0.5, max_ratio=["layer1.*=0.5"])
    with pytest.raises(CurlpruneError, match="max_ratio"):
        PruneConfig(target_macs=0.5, max_ratio={"layer1.*": 1.5})


def test_prune_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "0.5", "--max-ratio", "layer1.*=0.2",
                 "--max-ratio", "layer2.*=0.3", "--out", str(out), "--no-report"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.99 * 0.5 <= report["selection"]["macs_ratio"] <= 0.5
    lost = {name: 1 - g["after"] / g["before"] for name, g in report["groups"].items()}
    assert max(v for k, v in lost.items() if k.startswith("layer1")) <= 0.2
    assert max(v for k, v in lost.items() if k.startswith("layer2")) <= 0.3
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "0.5", "--max-ratio", "layer7.*=0.2",
                 "--out", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "matches no prunable group" in err and len(err.splitlines()) == 1
    assert not bad.exists() or not any(p.name in ("scores.npz", "model.safetensors") for p in bad.iterdir())
