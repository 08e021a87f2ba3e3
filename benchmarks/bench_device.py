"""Where the ResNet-56 benchmark (issue 21) runs: ``--device`` / ``--amp`` checked before anything
is loaded, the evaluation batch per device type and the recovery's DataLoader workers on a GPU."""
from __future__ import annotations

import re

import torch

from curlprune.errors import CurlpruneError
from curlprune.recover.amp import canonical_amp, check_amp
from curlprune.recover.dist import resolve_device

EVAL_BATCH = {"cpu": 256, "cuda": 1024}  # evaluation batch (images) by device type
GPU_WORKERS = 4  # DataLoader workers of the recovery on a GPU (--workers); the CPU rows use none
DEVICE_FORMAT = re.compile(r"auto|cpu|cuda(:\d+)?")


def choose_device(device: str, amp: str) -> tuple[torch.device, str | None]:
    """The torch device of ``--device`` (auto | cpu | cuda | cuda:<i>) and the canonical ``--amp``
    (None = off), checked before anything is loaded.

    Raises:
        CurlpruneError: a malformed device, CUDA (or that GPU) absent here, or an amp the device
            cannot run (one line each; docs/method.md §10, §11).
    """
    if not DEVICE_FORMAT.fullmatch(device):
        raise CurlpruneError(f"--device {device!r}: give auto, cpu, cuda or cuda:<index>")
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise CurlpruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s): "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    canonical = canonical_amp(amp)
    check_amp(canonical, resolved)
    return resolved, canonical
