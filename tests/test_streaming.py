"""Streamed data (issue 20 item 4): an ImageFolder folder or zip decoded on the fly in DataLoader
workers gives the same batches as the in-memory path, for any number of workers; a training stage
on it resumes exactly; a damaged image is one line; the dataset object holds no pixels.

The images are real (scikit-learn's digits), tinted to RGB, resized to several sizes and written
as JPEG and PNG files with Pillow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

from curlprune.cli import main
from curlprune.data.data import ImageDataset, batches, class_balanced_subset, load_digits_dataset, load_image_folder
from curlprune.data.streaming import DataSettings, StreamingDataset, open_splits, stream
from curlprune.data.transforms import build_transform
from curlprune.data.valsplit import hold_out
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.models.spec import InputSpec
from curlprune.models.transfer import at_input_size
from curlprune.recover import FinetuneConfig
from curlprune.recover.dist import DistContext
from curlprune.recover.evaluate import TransformedDataset, predict
from curlprune.recover.finetune import FinetuneStage
from curlprune.recover.loop import epoch_batches, train_stage
from curlprune.run.prune_data import load_images
from curlprune.run.run_config import parse_config
from curlprune.store.scores_io import read_scores

SPEC = input_spec("cifar:resnet20")  # 32 px: resize in the workers, pad-crop-flip in the training process
LARGE = at_input_size(SPEC, 72)  # above 64 px: RandomResizedCrop, nothing fixed to run in a worker
CLASSES = 3
JOB = Path(__file__).with_name("stream_job.py")


def _write_tree(root: Path, per_class: dict[str, int], sides: tuple[int, ...]) -> Path:
    """``train/`` and ``test/`` of digits 0..2 as RGB JPEG and PNG files of the given sides."""
    digits = load_digits_dataset(seed=0)
    for split, count in per_class.items():
        ds = digits[split]
        for label in range(CLASSES):
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            for j, i in enumerate(torch.nonzero(ds.labels == label).flatten()[:count].tolist()):
                grey = ds.images[i][0].numpy().astype(np.float32)
                rgb = np.stack([grey, grey * 0.6 + 40, 255 - grey], axis=-1).clip(0, 255).astype(np.uint8)
                side = sides[j % len(sides)]
                image = Image.fromarray(rgb).resize((side, side + 4 * (j % 2)), Image.BILINEAR)
                image.save(folder / f"{j:03d}.{'jpg' if j % 2 else 'png'}", "JPEG" if j % 2 else "PNG")
    return root


def _zip(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder).as_posix())
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Images of several sizes (the in-memory split is a list, transformed image by image)."""
    return _write_tree(tmp_path_factory.mktemp("mixed"), {"train": 8, "test": 3}, (28, 36, 40))


@pytest.fixture(scope="module")
def uniform(tmp_path_factory) -> Path:
    """Images of one size (the in-memory split is one tensor, evaluated a whole batch at a time)."""
    return _write_tree(tmp_path_factory.mktemp("uniform"), {"train": 8, "test": 3}, (36,))


def _streamed(path: Path, workers: int = 2) -> dict[str, StreamingDataset]:
    splits = open_splits(path, settings=DataSettings.of(True, None, workers), say=lambda _: None)
    assert all(isinstance(ds, StreamingDataset) for ds in splits.values())
    return splits


def _same(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(first, second))


def _loop_batches(train_set, spec: InputSpec, workers: int, rank: int = 0, world: int = 1) -> list:
    """The first epoch's batches as the training loop reads them (its index batches, seeded order and
    augmentation RNG): streamed, or through the in-memory DataLoader of TransformedDataset."""
    ctx = DistContext(rank, world, rank, torch.device("cpu"))
    order = epoch_batches(ctx, torch.Generator().manual_seed(3), len(train_set), 4)
    torch.manual_seed(11)
    if isinstance(train_set, StreamingDataset):
        return list(stream(train_set, spec, order, train=True, workers=workers))
    loader = torch.utils.data.DataLoader(TransformedDataset(train_set, build_transform(spec, train=True)), batch_sampler=order)
    return [tuple(item) for item in loader]


@pytest.mark.parametrize("which", ["mixed", "uniform"])
def test_streamed_batches_equal_the_in_memory_batches(request, which, tmp_path):
    """Same seed, same first-epoch training batches (augmented, per rank of 2 processes too) and same
    evaluation batches: tensors equal, from a folder and from a zip read in 2 worker processes."""
    folder = request.getfixturevalue(which)
    memory = load_image_folder(folder)
    for source in (folder, _zip(folder, tmp_path / "data.zip")):
        streamed = _streamed(source, workers=2)
        assert len(streamed["train"]) == len(memory["train"]) and torch.equal(streamed["train"].labels, memory["train"].labels)
        for spec in (SPEC, LARGE):
            assert _same(_loop_batches(memory["train"], spec, 0), _loop_batches(streamed["train"], spec, 2)), (source, spec.size)
            for rank in (0, 1):  # the per-rank shards under torchrun: the loop's own split, read alike
                assert _same(_loop_batches(memory["train"], spec, 0, rank, 2), _loop_batches(streamed["train"], spec, 2, rank, 2))
            for split in ("train", "test"):
                assert _same(list(batches(memory[split], spec, 5)), list(batches(streamed[split], spec, 5)))


def test_worker_count_does_not_change_the_batches(mixed):
    """0, 1 or 2 workers: the same training batches (the random part of the transform runs in the
    training process) and the same evaluation batches."""
    streamed = _streamed(mixed)["train"]
    first = _loop_batches(streamed, SPEC, 0)
    assert len(first) == 6 and first[0][0].shape == (4, 3, 32, 32)
    for workers in (1, 2):
        assert _same(first, _loop_batches(streamed, SPEC, workers))
    evals = []
    for workers in (0, 2):
        streamed.workers = workers
        evals.append(list(batches(streamed, SPEC, 7)))
    assert _same(*evals)


def test_calibration_and_bn_draws_are_the_same_images(mixed):
    """The prune stage's seeded draws (calibration set, BN images, the evaluation subset) from a
    streamed folder equal those from memory."""
    memory = load_images(str(mixed), SPEC, 0, settings=DataSettings.of(False))
    streamed = load_images(str(mixed), SPEC, 0, settings=DataSettings.of(True, None, 2))
    assert isinstance(streamed.train.ds, StreamingDataset) and isinstance(memory.train.ds, ImageDataset)
    for n, seed in ((10, 0), (24, 1)):  # the calibration draw; the BN draw (seed + 1, all images)
        a, b = memory.calibration(n, seed, "kl"), streamed.calibration(n, seed, "kl")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(memory.test.subset(5, 2).draw(5, 0)[0], streamed.test.subset(5, 2).draw(5, 0)[0])


def test_teacher_logits_read_streamed_data_alike(mixed):
    """``predict`` (refine's teacher logits, the class check) on a share of a streamed split, read in
    its workers, equals the in-memory result."""
    torch.manual_seed(0)
    model = build("cifar:resnet20", num_classes=CLASSES).eval()
    share = list(range(3, 20))
    memory = predict(model, Subset(load_image_folder(mixed)["train"], share), build_transform(SPEC, False), batch_size=5)
    streamed = predict(model, Subset(_streamed(mixed)["train"], share), build_transform(SPEC, False), batch_size=5)
    assert torch.equal(memory[0], streamed[0]) and torch.equal(memory[1], streamed[1]) and memory[0].shape == (17, CLASSES)


def test_validation_split_and_subsets_are_the_same_images(mixed):
    """The validation split held out of a streamed train split, its record (indices, content digest)
    and a class-balanced subset equal the in-memory ones: a run folder may be resumed on either path."""
    memory, streamed = load_image_folder(mixed)["train"], _streamed(mixed)["train"]
    held = [hold_out(ds, 4, per_class=2) for ds in (memory, streamed)]
    assert held[0].record(2, None, 4, 24) == held[1].record(2, None, 4, 24)
    assert isinstance(held[1].train, StreamingDataset) and torch.equal(held[0].train.labels, held[1].train.labels)
    subsets = [class_balanced_subset(split.train, 3, 0) for split in held]
    assert all(torch.equal(subsets[0][i][0], subsets[1][i][0]) for i in range(len(subsets[0])))


class Interrupted(Exception):
    pass


class StopAt(FinetuneStage):
    """Fine-tuning that records its batches and stops with an exception at step ``at`` (a kill mid-epoch)."""

    def __init__(self, cfg, at=None):
        super().__init__(cfg)
        self.at, self.steps, self.seen = at, 0, []

    def loss(self, model, x, y, index):
        self.steps += 1
        if self.steps == self.at:
            raise Interrupted
        self.seen.append((x.clone(), y.clone(), index.clone()))
        return super().loss(model, x, y, index)


def _finetune(data, run_dir: Path, at=None):
    torch.manual_seed(0)
    model = build("cifar:resnet20", num_classes=CLASSES)
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0.5, seed=3, progress=False, device="cpu",
                         channels_last=False)
    stage = StopAt(cfg, at)
    train_stage(stage, model, data, SPEC, run_dir, folder="finetune")
    return stage, load_file(str(run_dir / "finetune" / "model.safetensors"))


def test_streamed_training_resumes_exactly_and_equals_in_memory_training(mixed, tmp_path):
    """A fine-tuning stage on streamed data (2 workers) stopped in the middle of its second epoch
    and run again ends with the weights of the uninterrupted streamed run, which are the weights of
    the same stage on the in-memory data (it saw the same batches)."""
    memory_stage, memory_weights = _finetune(load_image_folder(mixed), tmp_path / "memory")
    streamed_stage, streamed_weights = _finetune(_streamed(mixed), tmp_path / "streamed")
    assert _same(memory_stage.seen, streamed_stage.seen) and len(streamed_stage.seen) == 6  # 24 images, batch 8, 2 epochs
    assert all(torch.equal(memory_weights[k], streamed_weights[k]) for k in memory_weights)
    with pytest.raises(Interrupted):
        _finetune(_streamed(mixed), tmp_path / "killed", at=5)  # step 2 of epoch 2
    assert (tmp_path / "killed" / "finetune" / "state.safetensors").is_file()
    _, resumed = _finetune(_streamed(mixed), tmp_path / "killed")
    assert resumed.keys() == streamed_weights.keys() and all(torch.equal(resumed[k], streamed_weights[k]) for k in resumed)


def test_two_torchrun_processes_train_alike_in_memory_and_streamed(mixed, tmp_path):
    """Under torchrun (2 gloo processes) a fine-tuning stage on the streamed folder ends with the
    weights of the in-memory one on every rank: each rank read the same shard (the loop's seeded
    per-rank split) and the same pixels; the line naming the path is printed once (rank 0)."""
    weights, said = {}, {}
    for mode in ("false", "true"):
        run_dir = tmp_path / mode
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB), str(mixed), str(run_dir),
                   "--streaming", mode]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        weights[mode] = [load_file(str(run_dir / f"rank{r}.safetensors")) for r in (0, 1)]
        said[mode] = done.stderr
    assert said["true"].count("streamed, decoded on the fly") == 1 and said["false"].count("decoded into memory") == 1
    for rank in (0, 1):
        a, b = weights["false"][rank], weights["true"][rank]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(weights["true"][0][k], weights["true"][1][k]) for k in weights["true"][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_image_is_one_line_naming_the_file(mixed, tmp_path, workers):
    """A damaged file read in a worker process stops with one line naming it, not a worker traceback."""
    folder = tmp_path / "damaged"
    _write_tree(folder, {"train": 4, "test": 1}, (30,))
    bad = folder / "train" / "digit1" / "002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    for source in (folder, _zip(folder, tmp_path / "damaged.zip")):
        train = _streamed(source, workers)["train"]
        with pytest.raises(CurlpruneError) as info:
            list(batches(train, SPEC, 4))
        message = str(info.value)
        assert "\n" not in message and "Traceback" not in message and "train/digit1/002.png" in message, message


def test_the_streamed_dataset_holds_no_pixels(mixed, tmp_path):
    """Bounded memory: a streamed split holds names and labels (a zip also member offsets), a few
    dozen bytes per image, and no tensor larger than one number per image; its subsets alike."""
    memory = load_image_folder(mixed)["train"]
    pixels = sum(image.numel() for image in memory.images)
    for source in (mixed, _zip(mixed, tmp_path / "data.zip")):
        train = _streamed(source)["train"]
        assert train.nbytes() < 100 * len(train) < pixels
        assert not hasattr(train, "images") and train.uniform is False
        assert all(v.numel() <= len(train) for v in vars(train).values() if isinstance(v, torch.Tensor))
        assert all(v.size <= len(train) for v in vars(train).values() if isinstance(v, np.ndarray))
        part = train.subset([5, 1, 7])
        assert isinstance(part, StreamingDataset) and part.nbytes() < 100 * 3
        assert torch.equal(part[1][0], memory[1][0]) and part[0][1] == memory[5][1]


def test_auto_chooses_by_the_estimated_size_and_says_why(mixed):
    """auto: in memory within the budget, streamed above it; each time one line says which and why."""
    said: list[str] = []
    small = open_splits(mixed, settings=DataSettings.of("auto", 1e-6, 0), say=said.append)  # 1 kB
    large = open_splits(mixed, settings=DataSettings.of("auto", 64, 0), say=said.append)
    assert isinstance(small["train"], StreamingDataset) and isinstance(large["train"], ImageDataset)
    assert "more than the memory budget" in said[0] and "streamed" in said[0] and "33 images" in said[0]
    assert "within the memory budget" in said[1] and "into memory" in said[1]
    open_splits(mixed, settings=DataSettings.of(False), say=said.append)
    assert "streaming: false" in said[2]


def test_settings_are_checked_in_the_config_and_refused_for_digits():
    base = {"model": "cifar:resnet20", "stages": ["distill"]}
    cfg = parse_config({**base, "streaming": True, "memory_budget_gb": 2, "data_workers": 3})
    assert (cfg.streaming, cfg.memory_budget_gb, cfg.data_workers) == ("true", 2.0, 3)
    assert parse_config(base).streaming is None
    for key, value, words in (("streaming", "maybe", "streaming must be auto, true or false"),
                              ("memory_budget_gb", 0, "memory_budget_gb must be a positive number"),
                              ("data_workers", -1, "data_workers must be a whole number")):
        with pytest.raises(CurlpruneError, match=words):
            parse_config({**base, key: value}, "run.yaml")
    with pytest.raises(CurlpruneError, match="digits are always held in memory"):
        open_splits("digits", settings=DataSettings.of(True))


def test_prune_command_streams_and_scores_alike(mixed, tmp_path, capsys):
    """``curlprune prune --streaming true`` reads the folder on the fly (and says so) and writes the
    scores, plan and top-1 of ``--streaming false``: the same calibration, BN and test images."""
    torch.manual_seed(0)
    weights = tmp_path / "resnet20.safetensors"
    save_file({k: v.contiguous() for k, v in build("cifar:resnet20", num_classes=CLASSES).state_dict().items()}, str(weights))
    outs = {}
    for mode in ("false", "true"):
        outs[mode] = tmp_path / mode
        assert main(["prune", "--model", "cifar:resnet20", "--num-classes", str(CLASSES), "--weights", str(weights),
                     "--data", str(mixed), "--criterion", "kl-approx",
                     "--calib", "12", "--bn-recalibrate", "16", "--target-macs", "0.7", "--streaming", mode, "--data-workers", "1",
                     "--out", str(outs[mode]), "--no-report"]) == 0
        said = capsys.readouterr().err
        assert ("streamed, decoded on the fly in 1 DataLoader worker" in said) == (mode == "true"), said
    scores = [read_scores(outs[mode] / "scores.npz")[0] for mode in ("false", "true")]
    assert scores[0].keys() == scores[1].keys() and all(np.array_equal(scores[0][k], scores[1][k]) for k in scores[0])
    assert (outs["false"] / "plan.json").read_text() == (outs["true"] / "plan.json").read_text()
    reports = [json.loads((outs[mode] / "report.json").read_text()) for mode in ("false", "true")]
    assert reports[0]["accuracy"] == reports[1]["accuracy"] and reports[0]["accuracy"]["bn_images"] == 16
