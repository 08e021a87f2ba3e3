"""Shared test settings: one intra-op thread, and where ../shared (real data and checkpoints) lives."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread for the whole suite.

    On 2 cores that other processes share (the subprocess tests, a developer's other jobs), OpenMP
    spin-waits make two threads 2-100x slower on these small convolutions; one thread is also
    deterministic across machines with different core counts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
