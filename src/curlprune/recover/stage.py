"""What every recovery stage shares: its settings (:class:`TrainConfig`), its hooks into the
training loop (:class:`Stage`), its :class:`Result`, and its folder ``<run_dir>/<stage>/``.

A stage folder (names and protocol from :mod:`curlprune.store.rundir`): ``metrics.jsonl`` (one line per
epoch), ``state.safetensors`` (the resumable state, after every epoch), and when finished
``model.safetensors`` (**plain weights** of the trained model, a state dict with the summary as
metadata) and ``done.json`` (the summary, with the result-defining settings). A finished stage is
skipped: its weights are loaded into the given model (:func:`finished`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.models.weights import check_finite_weights, load_state_strict
from curlprune.recover import guards
from curlprune.recover.amp import canonical_amp, check_amp
from curlprune.recover.dist import DistContext, resolve_device
from curlprune.recover.evaluate import check_classes, place_model, prepare_teacher
from curlprune.store import (
    DONE_FILE,
    LATER,
    MODEL_FILE,
    STATE_FILE,
    check_same_settings as check_settings_match,
    old_default_hint,
    read_stage_summary,
    saved_with_old_defaults,
)

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
    amp:           mixed precision of the forward passes and losses: "off" (float32, the default,
                   stored as None), "bf16" or "fp16" (with loss scaling); :mod:`curlprune.recover.amp`.
                   It changes the result, so a stage resumes only with the amp it started with.
    Runtime settings (may differ when resuming): eval_batch_size, num_workers (DataLoader worker
    processes for in-memory data; streamed data is decoded in its own ``data_workers``,
    :mod:`curlprune.data.streaming`), device ("auto" = this process's GPU if any, else CPU), channels_last, progress.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 4e-5
    seed: int = 0
    amp: str | bool | None = field(default=None, metadata=LATER)  # YAML reads `amp: off` as false
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
        self.amp = canonical_amp(self.amp)
        guards.check_hyperparameters(self)  # finite, sane ranges (issue 12)


def require(condition: bool, message: str) -> None:
    """Raise a :class:`CurlpruneError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CurlpruneError(message)


def settings(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that define the result (a resumed or skipped stage must match them)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.metadata.get("runtime")}


@dataclass
class Result:
    """What a stage returns: the trained model and its test top-1 accuracies (in %): ``last_top1``
    is the output model's (the best epoch's under early stopping), ``best_top1`` the best epoch's by test top-1."""

    model: nn.Module = field(repr=False)
    last_top1: float
    best_top1: float
    epochs: int
    seconds: float
    stage_dir: Path
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the stage's own (refine: "labels")
    val_top1: float | None = None  # validation top-1 (%) of the output model; None without a validation split
    best_epoch: int | None = None  # early stopping: the epoch whose weights are the output; None without it


class Stage:
    """What one recovery stage adds to the shared loop. Subclasses override what they need."""

    name = "stage"
    # The factor the gradients of the last backward pass carry: 1, or the fp16 loss scale
    # (curlprune.recover.amp); set by the loop before after_backward. A stage that reads the
    # gradients of its own tensors (refine's label store) divides by it.
    grad_scale: float = 1.0

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def use_plan(self, plan: Mapping[str, list[int]] | None) -> None:
        """The plan the student was sliced from the teacher by (group name -> kept channels of the
        original model; None or empty: unpruned), before training; default: not needed."""

    def release(self) -> None:
        """Undo what :meth:`prepare` attached to the models (hooks) when the stage ends in any way."""

    def train_set(self, train: Dataset) -> Dataset:
        """The dataset the stage trains on; items are ``(uint8 image, label, ...)``."""
        return train

    def prepare(self, ctx: DistContext, model: nn.Module, data: Mapping[str, Dataset], spec: InputSpec) -> None:
        """Checks and device placement before training (fresh start and resume)."""
        check_classes("student", model, data, spec, ctx.device, self.cfg.channels_last)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (default: one group of every parameter).

        A group's ``lr_mult`` scales the scheduled lr (default 1) and ``start_epoch`` holds its
        lr at 0 before that (fractional) epoch (default 0); see :func:`curlprune.recover.schedule.set_lr`.
        """
        return [{"params": list(model.parameters())}]

    def init_fresh(self, ctx: DistContext, model: nn.Module, train_set: Dataset, spec: InputSpec) -> None:
        """Set up the stage's own state on a fresh start (not on resume)."""

    def seed(self, seed: int) -> None:
        """Seed the stage's own random generator(s) for this process."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, student logits)`` for one batch; ``index`` are the dataset indices.

        Called under the stage's autocast (``amp``); the loss itself is to be computed in float32
        (:func:`curlprune.recover.amp.full_precision` on float32 logits).
        """
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode for an epoch (default: ``model.train()``)."""
        model.train()

    def after_backward(self, ctx: DistContext) -> None:
        """Called after ``loss.backward()`` and before the optimizer step (gradients carry :attr:`grad_scale`)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Stage tensors to keep in the resumable state (identical on every rank)."""
        return {}

    def state_shapes(self, train_size: int, classes: int | None) -> dict[str, tuple[int | None, ...]]:
        """The shapes :meth:`tensors` has for a training set of ``train_size`` images of ``classes``
        classes (None: unknown); a state file is checked against them before resuming."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`tensors`."""

    def rng_state(self) -> Any:
        """This process's stage RNG state, as JSON."""
        return None

    def load_rng_state(self, state: Any) -> None:
        """Inverse of :meth:`rng_state`."""


class TeacherStage(Stage):
    """A stage that learns from a frozen ``teacher`` (distill, refine): before training the teacher
    is moved to the training device, put in eval mode and checked to fit the data; it is never updated."""

    def __init__(self, cfg: TrainConfig, teacher: nn.Module) -> None:
        super().__init__(cfg)
        self.teacher = teacher

    def prepare(self, ctx: DistContext, model: nn.Module, data: Mapping[str, Dataset], spec: InputSpec) -> None:
        prepare_teacher(self.teacher, model, data, spec, ctx, self.cfg.channels_last)
        super().prepare(ctx, model, data, spec)


def check_data(data: Mapping[str, Dataset]) -> None:
    """The stages need ``{"train": ..., "test": ...}`` with a non-empty training set."""
    if not isinstance(data, Mapping) or "train" not in data or "test" not in data:
        raise CurlpruneError("data must be a dict with 'train' and 'test' datasets, e.g. curlprune.data.data.load_digits_dataset(seed)")
    if len(data["train"]) == 0:
        raise CurlpruneError("the training set is empty: check the dataset path and split")


def check_config(cfg: TrainConfig, ctx: DistContext) -> None:
    """The global batch must split evenly over the processes, and the stage's device must do its ``amp``.

    Raises:
        CurlpruneError: a batch that does not split, or an ``amp`` the stage's device cannot train
            with (:func:`curlprune.recover.amp.check_amp`: one line saying what to use instead).
    """
    require(
        cfg.batch_size % ctx.world_size == 0,
        f"batch_size {cfg.batch_size} must be a multiple of the number of processes ({ctx.world_size}): "
        "it is the global batch, split evenly over the processes",
    )
    if cfg.amp is not None:
        check_amp(cfg.amp, resolve_device(cfg.device, ctx.local_rank))


def load_stage_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a state dict read from a stage folder (its weights or its resumable state) into ``model``, strictly.

    Args:
        model: the architecture (and pruning plan) the stage was run with.
        tensors: parameter/buffer name -> tensor.
        source: the file they came from (for the message).
    Raises:
        CurlpruneError: missing, unexpected or wrong-shape tensors (a user mistake, said plainly), or
            tensors holding NaN or inf (named).
    """
    check_finite_weights(tensors, f"weights in {source}", f"the file is damaged or was edited; delete {source.parent} to run the stage again")
    load_state_strict(
        model, tensors, f"weights in {source} do not fit the given model",
        f"pass the same architecture (and pruning plan) the stage was run with, or delete {source.parent} to start the stage again",
    )


def load_stage_model(model: nn.Module, run_dir: str | Path, stage: str) -> nn.Module:
    """Load the final weights of a finished stage into ``model`` and return it.

    Args:
        model: the same architecture (and plan) the stage trained.
        run_dir: the run directory; the weights are ``<run_dir>/<stage>/model.safetensors`` (plain weights).
        stage: the stage's name ("distill", "refine", "finetune").
    Returns:
        ``model``, with the weights loaded.
    Raises:
        CurlpruneError: the stage has not finished, or its weights cannot be read or do not fit.
    """
    path = Path(run_dir) / stage / MODEL_FILE
    if not path.is_file():
        raise CurlpruneError(f"no finished '{stage}' stage in {run_dir} ({path} is missing): run that stage first")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CurlpruneError(f"{path} cannot be read ({exc}): delete {path.parent} and run the '{stage}' stage again") from None
    load_stage_tensors(model, tensors, path)
    return model


def check_same_settings(cfg: TrainConfig, saved: Mapping[str, Any], where: Path) -> None:
    """A resumed or skipped stage must have been run with the same result-defining settings.

    A setting whose default changed (field metadata :func:`curlprune.store.default_was`, e.g. the
    distill stage's ``ce_weight``) and that ``saved`` lacks or holds as None is compared as its old
    default, and the message then says what to set to continue the folder.

    Args:
        cfg: the stage's settings now.
        saved: the settings of ``where`` (``done.json``'s or a state header's ``config``).
        where: the file they were read from; its folder is named after the stage.
    Raises:
        CurlpruneError: a setting of ``cfg`` differs from ``saved`` (read from ``where``).
    """
    fields = dataclasses.fields(cfg)
    saved, now = saved_with_old_defaults(fields, saved), settings(cfg)
    hint = old_default_hint(fields, saved, now, where.parent.name)
    check_settings_match(saved, now, f"{where} was written with different settings: {{differ}}{hint}; "
                         f"use the same settings to resume/skip, or delete {where.parent} to run the stage again")


def finished(model: nn.Module, stage_dir: Path, cfg: TrainConfig, device: torch.device) -> Result:
    """The result of a stage that already completed: its weights loaded into ``model``.

    Raises:
        CurlpruneError: its ``done.json`` cannot be read (:class:`curlprune.store.records.RecordError`), was
            written with other settings, or its weights do not fit ``model``.
    """
    summary = read_stage_summary(stage_dir)
    check_same_settings(cfg, summary.config if summary.config is not None else {}, stage_dir / DONE_FILE)
    load_stage_model(model, stage_dir.parent, stage_dir.name)
    place_model(model, device, cfg.channels_last)
    return Result(
        model=model,
        last_top1=summary.last_top1,
        best_top1=summary.best_top1,
        epochs=summary.epochs,
        seconds=summary.seconds,
        stage_dir=stage_dir,
        tensors=stage_tensors(stage_dir / STATE_FILE),
        val_top1=summary.val_top1,
        best_epoch=summary.best_epoch,
    )


def stage_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``stage.*`` tensors of a state file (without reading the weights), or none."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name.removeprefix("stage."): handle.get_tensor(name) for name in handle.keys() if name.startswith("stage.")}
    except Exception as exc:
        raise CurlpruneError(f"training state {path} cannot be read ({exc}): delete {path.parent} to run the stage again") from None
