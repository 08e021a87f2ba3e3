"""The published CIFAR ResNet checkpoints score their published accuracy on the lossless CIFAR-10.

``../shared/data/cifar10-png.zip`` is the original CIFAR-10 test set as PNG (same ImageFolder
layout as the JPEG copy); the akamaster checkpoints report 93.39% (ResNet-56) on it. This pins the
package's data loading (PNG decode, class order, eval transform) and model definition to the
numbers published tables are computed with (issue 9's benchmark compares against them).
"""
from __future__ import annotations

import pytest

from curlprune.data.data import evaluate
from curlprune.models import build, input_spec

from conftest import SHARED  # noqa: E402

PNG_ZIP = SHARED / "data" / "cifar10-png.zip"
WEIGHTS = SHARED / "models" / "resnet56-4bfd9763.th"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.shared,
    pytest.mark.skipif(not (PNG_ZIP.is_file() and WEIGHTS.is_file()), reason=f"{PNG_ZIP} or {WEIGHTS} is absent (../shared not mounted)"),
]


def test_published_resnet56_scores_93_39_on_lossless_test_split(cifar_split):
    test = cifar_split("cifar10-png.zip", "test")  # decoded once for the session (tests/test_bn_recalibrate.py too)
    assert len(test) == 10_000 and test.classes[0] == "airplane" and test.classes[-1] == "truck"
    model = build("cifar:resnet56", weights=str(WEIGHTS))
    accuracy = evaluate(model, test, input_spec("cifar:resnet56"))
    assert accuracy == pytest.approx(0.9339, abs=0.001)
