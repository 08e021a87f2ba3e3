"""What the scoring tests share (tests/test_resumable_scores.py, tests/test_shared_scoring.py,
tests/test_run_shared_scoring.py): a seeded cifar:resnet20 and an ImageFolder of real digits (the
``setup`` fixture), the ``torchrun`` command of two CPU processes, the one-process run it is compared
with, and killing a process tree."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from curlprune.cli import main
from curlprune.cost.latency import torch_threads
from curlprune.data.data import load_digits_dataset
from curlprune.models import build

MODEL = "cifar:resnet20"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(weights of a seeded cifar:resnet20, an ImageFolder of 20 RGB digits per class and split)."""
    return write_resnet20_and_digits(tmp_path_factory.mktemp("shared"))


def torchrun(argv: list[str]) -> list[str]:
    """The command ``torchrun --standalone --nproc_per_node=2 -m curlprune.cli ARGV`` (run it with :data:`ONE_THREAD`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "curlprune.cli", *argv]


def one_process(argv: list[str]) -> None:
    """``curlprune ARGV`` in this process with one intra-op thread, as each torchrun process
    (bit-exact comparisons need the same float operations); it must exit 0."""
    with torch_threads(1):
        assert main(argv) == 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), nearest first."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, the children first (torchrun starts its ranks in
    sessions of their own, so killing torchrun alone leaves them running)."""
    for victim in [*reversed(descendants(pid)), pid]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
