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
