"""timm:<name> models: built with random weights, input recipe from timm's config, clear errors."""
from __future__ import annotations

import sys

import pytest
import torch

from curlprune.errors import CurlpruneError
from curlprune.models import timm_family


def test_missing_timm_is_one_line_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` does when it is not installed
    for call in (lambda: timm_family.build("resnet18"), lambda: timm_family.input_spec("resnet18")):
        with pytest.raises(CurlpruneError, match=r"pip install curlprune\[timm\]") as info:
            call()
        assert "\n" not in str(info.value)


def test_build_random_weights_and_input_spec():
    pytest.importorskip("timm")
    model = timm_family.build("resnet18", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    spec = timm_family.input_spec("resnet18")
    assert (spec.size, spec.channels, spec.num_classes) == (224, 3, 1000)
    assert spec.resize == round(224 / 0.95)  # the default weights' crop_pct
    inception = timm_family.input_spec("inception_v3")
    assert inception.size == 299 and inception.mean == (0.5, 0.5, 0.5)


def test_unknown_names_and_tags_are_one_line_errors(tmp_path):
    pytest.importorskip("timm")
    with pytest.raises(CurlpruneError, match="did you mean timm:resnet18"):
        timm_family.build("resnet81")
    with pytest.raises(CurlpruneError, match="neither a file nor a timm weight tag.*a1_in1k"):
        timm_family.build("resnet18", weights="nope_in1k")
    state = timm_family.build("resnet18", num_classes=3).state_dict()
    path = tmp_path / "w.pth"
    torch.save(state, path)
    loaded = timm_family.build("resnet18", weights=str(path), num_classes=3)
    assert torch.equal(loaded.fc.weight, state["fc.weight"])


def test_timm_building_blocks_prune_exactly_and_keep_their_train_mode():
    """timm's BatchNormAct2d, Conv2dSame (TF padding) and Linear behave as torch.nn leaves: every group but
    the model's input/output is prunable, masked == sliced, plan_cost == count(apply), and the pruned model
    still switches its norms between batch statistics (train) and running statistics (eval)."""
    pytest.importorskip("timm")
    import random

    from curlprune.cost.cost import count
    from curlprune.cost.analysis import plan_cost, trace
    from curlprune.surgery.surgery import apply, mask, random_plan

    torch.manual_seed(0)
    model = timm_family.build("tf_efficientnet_b0", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = trace(model, x)
    blocked = [g.reason for g in groups if not g.prunable and g.reason not in ("model input", "feeds the model output")]
    assert not blocked, blocked[:3]
    plan = random_plan(groups, random.Random(0))
    with torch.no_grad():
        with mask(model, groups, plan):
            masked = model(x)
        small = apply(model, groups, plan)
        assert float((small(x) - masked).abs().max() / masked.abs().max()) < 1e-4
    assert plan_cost(model, x, groups, plan) == count(small, x)
    bn = small.get_submodule("bn1")
    before = bn.running_mean.clone()
    small.train()
    with torch.no_grad():
        small(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bn.running_mean, before), "the pruned model's norm layers were frozen in eval mode"


def test_cli_prune_groups_count_accept_timm_names(tmp_path, capsys, monkeypatch):
    """`curlprune count/groups/prune timm:<name>` (timm's tiny test_resnet, random weights); the saved pruned
    model loads back at the MACs the selection reported; without timm the same command is one line, exit 2."""
    pytest.importorskip("timm")
    import json

    import curlprune
    from curlprune.cli import main
    from curlprune.cost.cost import count

    assert main(["count", "--model", "timm:test_resnet", "--input-size", "64"]) == 0
    assert "timm:test_resnet at 64x64" in capsys.readouterr().out
    assert main(["groups", "--model", "timm:test_resnet", "--input-size", "64"]) == 0
    assert "prunable" in capsys.readouterr().out
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "timm:test_resnet", "--criterion", "l1", "--target-macs", "0.5", "--out", str(out)]) == 0
    selection = json.loads((out / "report.json").read_text())["selection"]
    assert 0.45 < selection["macs_ratio"] <= 0.5
    model = curlprune.load(out / "model.safetensors")
    assert count(model, torch.zeros(1, 3, 160, 160))[0] == round(selection["macs"])
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["count", "--model", "timm:test_resnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install curlprune[timm]" in err and "\n" not in err
