"""Shared test settings: one intra-op thread, where ../shared (real data and checkpoints) lives, and
what several test files use, made once per session: the trained digits model (and, once per module,
its weights file), ../shared's CIFAR-10 splits decoded, and the runs of tests/recover_job.py that
they compare against."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from curlprune.data.data import ImageDataset, load_image_folder
from curlprune.data.digits import train_digits_model

from recover_support import RecoverRuns

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


@pytest.fixture(scope="session")
def recover_runs(tmp_path_factory):
    """:class:`recover_support.RecoverRuns`: finished runs of tests/recover_job.py, one per argument
    list, made once for the session (tests/test_resume.py and tests/test_amp.py compare against the same
    uninterrupted float32 run), in the background while the tests go on."""
    runs = RecoverRuns(tmp_path_factory.mktemp("recover-runs"))
    yield runs
    runs.close()


@pytest.fixture(scope="session")
def cifar_split():
    """``get(zip_name, split)``: a split of ``../shared/data/<zip_name>`` (cifar10-jpeg.zip, cifar10-png.zip)
    as :func:`curlprune.data.data.load_image_folder` decodes it, decoded once for the session (the
    tests only read it); skips the test when the zip is absent."""
    decoded: dict[tuple[str, str], ImageDataset] = {}

    def get(zip_name: str, split: str) -> ImageDataset:
        path = SHARED / "data" / zip_name
        if not path.is_file():
            pytest.skip(f"{path} is absent (../shared not mounted)")
        if (zip_name, split) not in decoded:
            decoded[zip_name, split] = load_image_folder(path, splits=[split])[split]
        return decoded[zip_name, split]

    return get


@pytest.fixture(scope="session")
def trained_digits():
    """``get(epochs)``: ``curlprune.data.digits.train_digits_model(seed=0, epochs=epochs)`` (eval mode),
    trained once per session for each ``epochs``; every call returns a copy of its own and leaves
    torch's global random state as the training itself leaves it (the training seeds it), so a test
    sees what it would see had it trained the model itself."""
    trained: dict[int, tuple[nn.Module, torch.Tensor]] = {}

    def get(epochs: int = 12) -> nn.Module:
        if epochs not in trained:
            model = train_digits_model(seed=0, epochs=epochs)
            trained[epochs] = (model, torch.get_rng_state())
        model, rng = trained[epochs]
        torch.set_rng_state(rng)
        return copy.deepcopy(model).eval()

    return get


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, trained_digits) -> Path:
    """``train_digits_model(seed=0)`` (12 epochs, trained once per session) saved as a plain state
    dict, a file of each test module's own."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(trained_digits(12).state_dict(), path)
    return path
