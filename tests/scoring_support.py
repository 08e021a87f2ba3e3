"""A scored setup shared by the scoring tests (tests/test_resumable_scores.py, tests/test_shared_scoring.py,
tests/test_run_shared_scoring.py): a seeded cifar:resnet20 and an ImageFolder of real digits."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from curlprune.data.data import load_digits_dataset
from curlprune.models import build

MODEL = "cifar:resnet20"


def write_resnet20_and_digits(root: Path) -> tuple[Path, Path]:
    """(weights of a seeded cifar:resnet20, an ImageFolder of 20 RGB digits per class and split) under ``root``."""
    torch.manual_seed(0)
    model = build(MODEL).eval()
    for m in model.modules():  # BN statistics away from the init, so that the scores differ per channel
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_var.uniform_(0.5, 2.0)
    weights = root / "r20.pt"
    torch.save(model.state_dict(), weights)
    data = root / "digits-rgb"
    for split, images in load_digits_dataset(seed=0).items():
        for label in range(10):
            folder = data / split / f"digit{label}"
            folder.mkdir(parents=True)
            for j, i in enumerate(torch.nonzero(images.labels == label).flatten()[:20].tolist()):
                Image.fromarray(images.images[i][0].numpy()).convert("RGB").save(folder / f"{j}.png")
    return weights, data
