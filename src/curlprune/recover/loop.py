"""The training loop every recovery stage runs: resumable, deterministic, multi-process.

A stage (fine-tuning, distillation, label refinement) supplies only what differs, as a
:class:`Stage`: its training set, its loss and what happens after the backward pass. This loop
does the rest, identically for all of them:

* SGD (momentum 0.9, weight decay 4e-5 on every parameter, BN included, as in the paper) with
  the per-iteration warm-up + cosine schedule of :mod:`curlprune.recover.schedule`;
* channels_last, a rich progress bar (loss, lr, ETA), and one JSON line per epoch in
  ``<run_dir>/<stage>/metrics.jsonl`` (epoch, mean training loss, lr of the epoch's last step,
  train_top1, test_top1, seconds; accuracies in %, test_top1 with the eval transform);
* after every epoch, ``<run_dir>/<stage>/state.safetensors`` (written atomically): weights,
  optimizer, iteration, every RNG state and the stage's own tensors. A rerun resumes after the
  last completed epoch and then behaves exactly as the uninterrupted run would have;
* at the end, ``model.safetensors`` (final weights) and ``done.json`` (summary). A stage whose
  ``done.json`` exists is skipped: its weights are loaded into the given model;
* under ``torchrun`` (``WORLD_SIZE > 1``): DistributedDataParallel, seeded sharding, files
  written by rank 0 only (see :mod:`curlprune.recover.dist`).

Determinism: the data order comes from a seeded ``torch.Generator``; augmentations draw from
the global torch RNG, seeded from ``(seed, rank)``; stage randomness (mixup) from its own
seeded generator. All of them are saved in the state, so a resumed run matches an
uninterrupted one bit for bit on the same machine and number of processes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from curlprune.checkpoint import atomic_write, atomic_write_text, load_state_strict
from curlprune.errors import CurlpruneError
from curlprune.recover import dist
from curlprune.recover.dist import DistContext
from curlprune.recover.schedule import set_lr, warmup_cosine_lr
from curlprune.recover.state import (
    capture_rng,
    generator_state,
    load_optimizer_state,
    load_state,
    optimizer_state,
    prefixed,
    restore_rng,
    save_state,
    seed_everything,
    set_generator_state,
    unprefixed,
)
from curlprune.transforms import build_transform

STATE_FILE = "state.safetensors"
MODEL_FILE = "model.safetensors"
DONE_FILE = "done.json"
METRICS_FILE = "metrics.jsonl"

RUNTIME = {"runtime": True}  # field metadata: may change between a run and its resume


@dataclass
class TrainConfig:
    """Settings shared by every stage.

    epochs:        passes over the stage's training set.
    batch_size:    GLOBAL batch size (split evenly over torchrun processes; must divide by their number).
    lr:            base learning rate of the warm-up + cosine schedule (per iteration, to 0 at the end).
    warmup_epochs: linear warm-up from 0, in epochs (fractions allowed).
    momentum, weight_decay: SGD; weight decay applies to every parameter, as in the paper.
    seed:          data order, augmentations, mixup, data expansion.
    Runtime settings (may differ when resuming): eval_batch_size, num_workers (DataLoader worker
    processes), device ("auto" = this process's GPU if any, else CPU), channels_last, progress.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 4e-5
    seed: int = 0
    eval_batch_size: int = field(default=128, metadata=RUNTIME)
    num_workers: int = field(default=0, metadata=RUNTIME)
    device: str = field(default="auto", metadata=RUNTIME)
    channels_last: bool = field(default=True, metadata=RUNTIME)
    progress: bool = field(default=True, metadata=RUNTIME)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs must be at least 1 (got {self.epochs})")
        require(self.batch_size >= 1, f"batch_size must be at least 1 (got {self.batch_size})")
        for name in ("lr", "warmup_epochs", "momentum", "weight_decay"):
            require(getattr(self, name) >= 0, f"{name} must be non-negative (got {getattr(self, name)})")
        require(self.eval_batch_size >= 1 and self.num_workers >= 0, "eval_batch_size must be >= 1 and num_workers >= 0")


def require(condition: bool, message: str) -> None:
    """Raise a :class:`CurlpruneError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CurlpruneError(message)


def settings(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that define the result (a resumed or skipped stage must match them)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("runtime")}


@dataclass
class Result:
    """What a stage returns: the trained model and its test top-1 accuracies (in %)."""

    model: nn.Module = field(repr=False)
    last_top1: float
    best_top1: float
    epochs: int
    seconds: float
    stage_dir: Path
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the stage's own (refine: "labels")


class Stage:
    """What one recovery stage adds to the shared loop. Subclasses override what they need."""

    name = "stage"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def train_set(self, train: Dataset) -> Dataset:
        """The dataset the stage trains on; items are ``(uint8 image, label, ...)``."""
        return train

    def prepare(self, ctx: DistContext, model: nn.Module, data: Mapping[str, Dataset], spec: Any) -> None:
        """Checks and device placement before training (fresh start and resume)."""
        check_classes("student", model, data, spec, ctx.device, self.cfg.channels_last)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups. A group's ``lr_mult`` scales the scheduled lr (default 1)
        and ``start_epoch`` holds its lr at 0 before that (fractional) epoch (default 0)."""
        return [{"params": list(model.parameters())}]

    def init_fresh(self, ctx: DistContext, model: nn.Module, train_set: Dataset, spec: Any) -> None:
        """Set up the stage's own state on a fresh start (not on resume)."""

    def seed(self, seed: int) -> None:
        """Seed the stage's own random generator(s) for this process."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, student logits)`` for one batch; ``index`` are the dataset indices."""
        raise NotImplementedError

    def after_backward(self, ctx: DistContext) -> None:
        """Called after ``loss.backward()`` and before the optimizer step."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Stage tensors to keep in the resumable state (identical on every rank)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`."""

    def rng_state(self) -> Any:
        """This process's stage RNG state, as JSON."""
        return None

    def load_rng_state(self, state: Any) -> None:
        """Inverse of :meth:`rng_state`."""


class TransformedDataset(Dataset):
    """``(transform(image), label, index)`` for every item of a dataset of ``(uint8 image, label, ...)``."""

    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.base[index]
        return self.transform(item[0]), int(item[1]), index


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a batch to ``device``, in channels_last layout for images when asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device`` (in place) in channels_last layout when asked."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
    channels_last: bool = True,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels of ``model`` in eval mode on every item of ``dataset``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(TransformedDataset(dataset, transform), batch_size=batch_size, num_workers=num_workers)
    logits, labels = [], []
    for x, y, _ in loader:
        logits.append(model(to_input(x, device, channels_last)).float().cpu())
        labels.append(y)
    model.train(was_training)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def top1_accuracy(
    model: nn.Module,
    dataset: Any,
    spec: Any,
    *,
    ctx: DistContext,
    batch_size: int = 128,
    channels_last: bool = True,
) -> float:
    """Top-1 accuracy (in %) on an ImageDataset with the eval transform, on ``ctx.device``.

    ``curlprune.data.count_correct`` over processes: under torchrun each rank counts a
    contiguous share and the counts are summed.
    """
    from curlprune.data import count_correct

    share = dataset.subset(list(dist.chunk_range(ctx, len(dataset))))
    correct = count_correct(model, share, spec, batch_size, device=ctx.device, channels_last=channels_last)
    correct_total, seen_total = dist.all_reduce_sum(ctx, [float(correct), float(len(share))])
    return 100.0 * correct_total / max(seen_total, 1.0)


def output_classes(model: nn.Module, dataset: Dataset, spec: Any, device: torch.device, channels_last: bool) -> int:
    """Number of logits ``model`` produces for one sample of ``dataset``."""
    logits, _ = predict(model, Subset(dataset, [0]), build_transform(spec, train=False), batch_size=1, device=device, channels_last=channels_last)
    return int(logits.shape[1])


def check_classes(role: str, model: nn.Module, data: Mapping[str, Dataset], spec: Any, device: torch.device, channels_last: bool) -> None:
    """Raise when ``model``'s output width differs from the number of classes of the data."""
    train = data["train"]
    expected = len(train.classes) if hasattr(train, "classes") else None
    if expected is None:
        return
    produced = output_classes(model, train, spec, device, channels_last)
    if produced != expected:
        raise CurlpruneError(
            f"{role} outputs {produced} classes but the data has {expected}: "
            f"use a {role} trained on this dataset's classes (or a dataset with {produced} classes)"
        )


def prepare_teacher(teacher: nn.Module, student: nn.Module, data: Mapping[str, Dataset], spec: Any, ctx: DistContext, channels_last: bool) -> None:
    """Put the frozen teacher on the device in eval mode and check that it fits the data."""
    require(teacher is not student, "teacher and student are the same module: pass a copy of the model as the student (copy.deepcopy)")
    place_model(teacher, ctx.device, channels_last).eval()
    check_classes("teacher", teacher, data, spec, ctx.device, channels_last)


def check_data(data: Mapping[str, Dataset]) -> None:
    """The stages need ``{"train": ..., "test": ...}`` with a non-empty training set."""
    if not isinstance(data, Mapping) or "train" not in data or "test" not in data:
        raise CurlpruneError("data must be a dict with 'train' and 'test' datasets, e.g. curlprune.data.load_digits_dataset(seed)")
    if len(data["train"]) == 0:
        raise CurlpruneError("the training set is empty: check the dataset path and split")


def check_config(cfg: TrainConfig, ctx: DistContext) -> None:
    """The global batch must split evenly over the processes."""
    require(
        cfg.batch_size % ctx.world_size == 0,
        f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({ctx.world_size}): "
        "it is the global batch, split evenly over the processes",
    )


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A 32-bit seed for one process and one random stream, derived from the run seed."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1)[0])


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file written by this loop."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CurlpruneError(f"{path} cannot be read ({exc}): delete {path.parent} to run the stage again") from None


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a stage's state dict into ``model`` strictly; a mismatch is a user mistake, said plainly."""
    load_state_strict(
        model, tensors, f"weights in {source} do not fit the given model",
        f"pass the same architecture (and pruning plan) the stage was run with, or delete {source.parent} to start the stage again",
    )


def load_stage_model(model: nn.Module, run_dir: str | Path, stage: str) -> nn.Module:
    """Load the final weights of a finished stage into ``model`` (same architecture) and return it."""
    path = Path(run_dir) / stage / MODEL_FILE
    if not path.is_file():
        raise CurlpruneError(f"no finished '{stage}' stage in {run_dir} ({path} is missing): run that stage first")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CurlpruneError(f"{path} cannot be read ({exc}): delete {path.parent} and run the '{stage}' stage again") from None
    load_weights(model, tensors, path)
    return model


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key=saved (now current)"`` for every current setting whose JSON value differs from the saved one."""
    current = json.loads(json.dumps(current))  # tuples -> lists, like the saved copy
    return [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in current.items() if saved.get(k) != v]


def check_same_settings(cfg: TrainConfig, saved: Mapping[str, Any], where: Path) -> None:
    """A resumed or skipped stage must have been run with the same result-defining settings."""
    differ = changed_settings(saved, settings(cfg))
    if differ:
        raise CurlpruneError(
            f"{where} was written with different settings: {', '.join(differ)}; "
            f"use the same settings to resume/skip, or delete {where.parent} to run the stage again"
        )


def finished(model: nn.Module, stage_dir: Path, cfg: TrainConfig, device: torch.device) -> Result:
    """The result of a stage that already completed: its weights loaded into ``model``."""
    summary = read_json(stage_dir / DONE_FILE)
    check_same_settings(cfg, summary.get("config", {}), stage_dir / DONE_FILE)
    load_stage_model(model, stage_dir.parent, stage_dir.name)
    place_model(model, device, cfg.channels_last)
    return Result(
        model=model,
        last_top1=summary["last_top1"],
        best_top1=summary["best_top1"],
        epochs=summary["epochs"],
        seconds=summary["seconds"],
        stage_dir=stage_dir,
        tensors=stage_tensors(stage_dir / STATE_FILE),
    )


def stage_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``stage.*`` tensors of a state file (without reading the weights), or none."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name.removeprefix("stage."): handle.get_tensor(name) for name in handle.keys() if name.startswith("stage.")}
    except Exception as exc:
        raise CurlpruneError(f"training state {path} cannot be read ({exc}): delete {path.parent} to run the stage again") from None


@dataclass
class TrainProgress:
    """Where training stands; saved in the state file."""

    epoch: int = 0  # completed epochs
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_top1(self) -> float:
        return max((r["test_top1"] for r in self.history), default=0.0)


def epoch_batches(ctx: DistContext, order_gen: torch.Generator, size: int, local_batch: int) -> list[list[int]]:
    """This rank's batches of dataset indices for one epoch (consumes one permutation of ``order_gen``)."""
    order = dist.shard(ctx, torch.randperm(size, generator=order_gen))
    indices = order.tolist()
    return [indices[i : i + local_batch] for i in range(0, len(indices), local_batch)]


def iterations_per_epoch(ctx: DistContext, size: int, local_batch: int) -> int:
    """Steps per epoch on every rank (the shards have equal length)."""
    return math.ceil(math.ceil(size / ctx.world_size) / local_batch)


class Trainer:
    """Runs one :class:`Stage` on one model; see the module docstring for what it guarantees."""

    def __init__(
        self,
        stage: Stage,
        model: nn.Module,
        data: Mapping[str, Dataset],
        spec: Any,
        run_dir: str | Path,
    ) -> None:
        check_data(data)
        self.stage = stage
        self.cfg = stage.cfg
        self.model = model
        self.data = data
        self.spec = spec
        self.stage_dir = Path(run_dir) / stage.name
        self.ctx = dist.init_distributed(self.cfg.device)
        check_config(self.cfg, self.ctx)
        self.console = Console(stderr=True)

    # ---- the whole stage -------------------------------------------------------------------
    def run(self) -> Result:
        cfg, ctx = self.cfg, self.ctx
        if (self.stage_dir / DONE_FILE).is_file():
            return finished(self.model, self.stage_dir, cfg, ctx.device)
        place_model(self.model, ctx.device, cfg.channels_last)
        self.stage.prepare(ctx, self.model, self.data, self.spec)
        self.train_set = self.stage.train_set(self.data["train"])
        self.optimizer = torch.optim.SGD(self.stage.param_groups(self.model), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        seed_everything(rank_seed(cfg.seed, ctx.rank, 0))
        self.stage.seed(rank_seed(cfg.seed, ctx.rank, 1))
        if (self.stage_dir / STATE_FILE).is_file():
            progress = self.resume()
        else:
            self.stage.init_fresh(ctx, self.model, self.train_set, self.spec)
            progress = TrainProgress()
            if ctx.is_main:
                atomic_write_text(self.stage_dir / METRICS_FILE, "")
        train_model = dist.wrap_ddp(ctx, self.model)
        local_batch = cfg.batch_size // ctx.world_size
        per_epoch = iterations_per_epoch(ctx, len(self.train_set), local_batch)
        total, warmup = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
        transform = build_transform(self.spec, train=True)
        for epoch in range(progress.epoch, cfg.epochs):
            started = time.perf_counter()
            loss, train_top1, lr = self.train_epoch(train_model, epoch, progress, transform, local_batch, total, warmup)
            dist.broadcast_buffers(ctx, self.model)
            top1 = top1_accuracy(self.model, self.data["test"], self.spec, ctx=ctx, batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last)
            record = {
                "epoch": epoch + 1,
                "loss": loss,
                "lr": lr,
                "train_top1": train_top1,
                "test_top1": top1,
                "seconds": time.perf_counter() - started,
            }
            progress.epoch, progress.history = epoch + 1, progress.history + [record]
            self.save(progress)
            if ctx.is_main and cfg.progress:
                self.console.print(
                    f"{self.stage.name} epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, train top-1 {train_top1:.2f}%, "
                    f"test top-1 {top1:.2f}%, {record['seconds']:.1f}s"
                )
        return self.finish(progress)

    # ---- one epoch ---------------------------------------------------------------------------
    def train_epoch(
        self,
        train_model: nn.Module,
        epoch: int,
        progress: TrainProgress,
        transform: Callable[[torch.Tensor], torch.Tensor],
        local_batch: int,
        total: int,
        warmup: int,
    ) -> tuple[float, float, float]:
        """One pass over this rank's shard; returns (mean loss, train top-1 %, last lr) over all ranks."""
        cfg, ctx = self.cfg, self.ctx
        batches = epoch_batches(ctx, self.order_gen, len(self.train_set), local_batch)
        loader = DataLoader(
            TransformedDataset(self.train_set, transform),
            batch_sampler=batches,
            num_workers=cfg.num_workers,
            pin_memory=ctx.device.type == "cuda",
        )
        train_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
        seen, lr = 0, 0.0
        with progress_bar(enabled=cfg.progress and ctx.is_main) as bar:
            task = bar.add_task(f"{self.stage.name} {epoch + 1}/{cfg.epochs}", total=len(batches), loss=float("nan"), lr=0.0)
            for step, (x, y, index) in enumerate(loader):
                lr = warmup_cosine_lr(progress.iteration, total, warmup, cfg.lr)
                set_lr(self.optimizer, lr, epoch=progress.iteration * cfg.epochs / max(total, 1))
                x = to_input(x, ctx.device, cfg.channels_last)
                y = y.to(ctx.device, non_blocking=True)
                loss, logits = self.stage.loss(train_model, x, y, index)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.stage.after_backward(ctx)
                self.optimizer.step()
                progress.iteration += 1
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if step % 10 == 0 or step == len(batches) - 1:
                    bar.update(task, completed=step + 1, loss=float(loss_sum) / seen, lr=lr)
        loss_total, correct_total, seen_total = dist.all_reduce_sum(ctx, [float(loss_sum), float(correct), float(seen)])
        return loss_total / max(seen_total, 1.0), 100.0 * correct_total / max(seen_total, 1.0), lr

    # ---- state -------------------------------------------------------------------------------
    def save(self, progress: TrainProgress) -> None:
        """Write the resumable state and the epoch's metrics line (rank 0), then wait for all ranks."""
        ctx = self.ctx
        rank_states = dist.all_gather_object(ctx, {"global": capture_rng(), "stage": self.stage.rng_state()})
        if ctx.is_main:
            optim_tensors, optim_meta = optimizer_state(self.optimizer)
            tensors = {
                **prefixed("model.", self.model.state_dict()),
                **prefixed("optim.", optim_tensors),
                **prefixed("stage.", self.stage.tensors()),
            }
            meta = {
                "stage": self.stage.name,
                "config": settings(self.cfg),
                "epoch": progress.epoch,
                "iteration": progress.iteration,
                "history": progress.history,
                "optimizer": optim_meta,
                "order_generator": generator_state(self.order_gen),
                "world_size": ctx.world_size,
                "rank_rng": rank_states,
            }
            save_state(self.stage_dir / STATE_FILE, tensors, meta)
            with open(self.stage_dir / METRICS_FILE, "a") as log:
                log.write(json.dumps(progress.history[-1]) + "\n")
        dist.barrier(ctx)

    def resume(self) -> TrainProgress:
        """Restore everything from the state file (every rank reads it)."""
        path = self.stage_dir / STATE_FILE
        tensors, meta = load_state(path)
        check_same_settings(self.cfg, meta.get("config", {}), path)
        load_weights(self.model, unprefixed("model.", tensors), path)
        load_optimizer_state(self.optimizer, unprefixed("optim.", tensors), meta["optimizer"])
        self.stage.load_tensors(unprefixed("stage.", tensors))
        set_generator_state(self.order_gen, meta["order_generator"])
        progress = TrainProgress(epoch=meta["epoch"], iteration=meta["iteration"], history=meta["history"])
        if meta["world_size"] == self.ctx.world_size:
            own = meta["rank_rng"][self.ctx.rank]
            restore_rng(own["global"])
            self.stage.load_rng_state(own["stage"])
        else:  # the shards change anyway; keep going, reproducibly, but say so
            seed_everything(rank_seed(self.cfg.seed, self.ctx.rank, 2 + progress.epoch))
            self.stage.seed(rank_seed(self.cfg.seed, self.ctx.rank, 10_000 + progress.epoch))
            if self.ctx.is_main:
                self.console.print(
                    f"[yellow]{path} was written by {meta['world_size']} process(es), this run has {self.ctx.world_size}: "
                    "resuming with fresh augmentation seeds (not bit-identical to an uninterrupted run)[/yellow]"
                )
        if self.ctx.is_main:
            lines = "".join(json.dumps(record) + "\n" for record in progress.history)
            atomic_write_text(self.stage_dir / METRICS_FILE, lines)
            if self.cfg.progress:
                self.console.print(f"{self.stage.name}: resuming after epoch {progress.epoch}/{self.cfg.epochs} from {path}")
        dist.barrier(self.ctx)
        return progress

    def finish(self, progress: TrainProgress) -> Result:
        """Write the final weights and ``done.json`` (rank 0) and return the result."""
        from safetensors.torch import save_file

        last = progress.history[-1]["test_top1"]
        seconds = sum(r["seconds"] for r in progress.history)
        summary = {
            "stage": self.stage.name,
            "last_top1": last,
            "best_top1": progress.best_top1,
            "epochs": progress.epoch,
            "seconds": seconds,
            "config": settings(self.cfg),
        }
        if self.ctx.is_main:
            weights = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
            atomic_write(self.stage_dir / MODEL_FILE, lambda tmp: save_file(weights, tmp, metadata={"summary": json.dumps(summary)}))
            atomic_write_text(self.stage_dir / DONE_FILE, json.dumps(summary, indent=2) + "\n")
        dist.barrier(self.ctx)
        return Result(self.model, last, progress.best_top1, progress.epoch, seconds, self.stage_dir, self.stage.tensors())


def progress_bar(enabled: bool) -> RichProgress:
    """A rich progress bar with loss, lr and ETA (silent when disabled or not on a terminal)."""
    console = Console(stderr=True)
    return RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )

