"""A training state is checked as a whole before a stage resumes from it (issue 18).

``state.safetensors`` is written by :class:`curlprune.recover.loop.Trainer` after every epoch. A
file that was edited, damaged in a way its format does not notice, or copied from another run
must not be trusted: a header whose epoch reads 99 for a 2-epoch stage would otherwise make the
run "resume after epoch 99/2", train nothing and report a model that was never trained.
:func:`check_train_state` compares every field of the header and the shapes of the optimizer and
stage tensors with what the stage would have written itself; the first inconsistency is one
:class:`CurlpruneError` line naming the file and the field.
"""
from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.optim import Optimizer

from curlprune.errors import CurlpruneError

__all__ = ["check_train_state", "steps_per_epoch"]

HISTORY_KEYS = ("epoch", "loss", "lr", "train_top1", "test_top1", "seconds")


def steps_per_epoch(train_size: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch on every process (the shards have equal length)."""
    return math.ceil(math.ceil(train_size / world_size) / (batch_size // world_size))


class _Bad(Exception):
    """One inconsistency: the field and what is wrong with it."""


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise _Bad(f"{field} {problem}")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_train_state(
    path: Path,
    meta: Any,
    tensors: Mapping[str, torch.Tensor],
    *,
    stage: str,
    epochs: int,
    batch_size: int,
    train_size: int,
    optimizer: Optimizer,
    stage_shapes: Mapping[str, tuple[int | None, ...]],
) -> None:
    """Check a state header and its optimizer and stage tensors against the stage about to resume.

    Args:
        path: the state file (named in the message).
        meta: its decoded JSON header.
        tensors: its tensors (``model.*``, ``optim.*``, ``stage.*``); the model's own are checked
            when loaded (:func:`curlprune.recover.stage.load_stage_tensors`).
        stage: the stage's name.
        epochs, batch_size: the stage's settings (the other settings are compared by
            :func:`curlprune.recover.stage.check_same_settings`).
        train_size: images in the stage's training set (the refine stage's expanded set).
        optimizer: the optimizer built for this stage (its parameter groups and shapes).
        stage_shapes: the stage's own tensors and their shapes (None: any size), e.g. the refine
            label store ``{"labels": (train_size, classes)}``.
    Raises:
        CurlpruneError: the first field that does not fit, with what to do.
    """
    try:
        _check(meta, tensors, stage, epochs, batch_size, train_size, optimizer, stage_shapes)
    except _Bad as bad:
        raise CurlpruneError(
            f"training state {path} does not fit this stage: {bad}; it was edited, damaged or written by another run: "
            f"delete it to restart the stage from scratch"
        ) from None


def _check(meta: Any, tensors: Mapping[str, torch.Tensor], stage: str, epochs: int, batch_size: int, train_size: int,
           optimizer: Optimizer, stage_shapes: Mapping[str, tuple[int | None, ...]]) -> None:
    _require(isinstance(meta, dict), "the header", f"is {type(meta).__name__}, not a mapping")
    _require(meta.get("stage") == stage, "'stage'", f"is {meta.get('stage')!r}, not {stage!r}")
    _require(isinstance(meta.get("config"), dict), "'config'", "is not a mapping of settings")
    world = meta.get("world_size")
    _require(_whole(world) and world >= 1, "'world_size'", f"is {world!r}, not a number of processes")
    _require(batch_size % world == 0, "'world_size'", f"{world} does not divide the batch size {batch_size}")
    epoch = meta.get("epoch")
    _require(_whole(epoch) and 1 <= epoch <= epochs, "'epoch'", f"is {epoch!r}, outside 1..{epochs} (the stage has {epochs} epochs)")
    steps = epoch * steps_per_epoch(train_size, batch_size, world)
    _require(meta.get("iteration") == steps, "'iteration'",
             f"is {meta.get('iteration')!r}, not {steps} ({epoch} epochs of {train_size} images in batches of {batch_size})")
    _check_history(meta.get("history"), epoch)
    start = meta.get("start_top1")
    _require(start is None or (_number(start) and 0 <= start <= 100), "'start_top1'", f"is {start!r}, not a top-1 in %")
    ranks = meta.get("rank_rng")
    _require(isinstance(ranks, list) and len(ranks) == world and all(isinstance(r, dict) and "global" in r and "stage" in r for r in ranks),
             "'rank_rng'", f"does not hold the random-generator states of {world} process(es)")
    _check_generator(meta.get("order_generator"))
    _check_optimizer(meta.get("optimizer"), tensors, optimizer)
    _check_stage_tensors(tensors, stage_shapes)


def _check_history(history: Any, epoch: int) -> None:
    _require(isinstance(history, list) and len(history) == epoch, "'history'",
             f"holds {len(history) if isinstance(history, list) else history!r} epochs, not {epoch}")
    for i, record in enumerate(history):
        where = f"'history' epoch {i + 1}"
        _require(isinstance(record, dict) and all(_number(record.get(k)) for k in HISTORY_KEYS), where,
                 f"lacks a finite {', '.join(HISTORY_KEYS)}")
        _require(record["epoch"] == i + 1, where, f"is numbered {record['epoch']!r}")
        _require(all(0 <= record[k] <= 100 for k in ("train_top1", "test_top1")), where, "has a top-1 outside 0..100%")
        _require(record["seconds"] >= 0 and record["lr"] >= 0, where, "has a negative lr or time")


def _check_generator(text: Any) -> None:
    size = len(torch.Generator().get_state())
    try:
        decoded = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        decoded = b""
    _require(len(decoded) == size, "'order_generator'", "is not the state of a data-order generator")


def _check_optimizer(meta: Any, tensors: Mapping[str, torch.Tensor], optimizer: Optimizer) -> None:
    groups = optimizer.param_groups
    saved = meta.get("param_groups") if isinstance(meta, dict) else None
    _require(isinstance(saved, list) and isinstance(meta.get("scalars"), dict), "'optimizer'", "lacks its parameter groups")
    _require(len(saved) == len(groups) and all(isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(own["params"])
                                               for g, own in zip(saved, groups)),
             "'optimizer'", f"has other parameter groups than this stage ({[len(g['params']) for g in groups]} parameters)")
    params = [p for group in groups for p in group["params"]]
    for name, tensor in tensors.items():
        if not name.startswith("optim."):
            continue
        index, _, _ = name.removeprefix("optim.").partition(".")
        _require(index.isdigit() and int(index) < len(params), f"tensor {name}", f"names no parameter (this stage has {len(params)})")
        shape = tuple(params[int(index)].shape)
        _require(tuple(tensor.shape) == shape, f"tensor {name}", f"has shape {list(tensor.shape)}, its parameter {list(shape)}")


def _check_stage_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int | None, ...]]) -> None:
    for name, shape in shapes.items():
        tensor = tensors.get(f"stage.{name}")
        _require(tensor is not None, f"tensor stage.{name}", "is missing")
        fits = tensor.dim() == len(shape) and all(want is None or have == want for have, want in zip(tensor.shape, shape))
        expected = [("any" if s is None else s) for s in shape]
        _require(fits, f"tensor stage.{name}", f"has shape {list(tensor.shape)}, not {expected}")
