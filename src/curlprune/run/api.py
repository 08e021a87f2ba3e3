"""The library calls for your own model: ``curlprune.prune`` (the prune stage in one call) and
``curlprune.distill`` (the distillation recovery stage), with the command line's defaults.

    pruned = curlprune.prune(model, torch.zeros(1, 3, 32, 32), data=images, target_macs=0.5)
    pruned.model, pruned.plan, pruned.report.accuracy
    student = curlprune.distill(pruned.model, model, "cifar10.zip", input_spec=spec, epochs=30, folder="runs/kd")

:func:`prune` builds the same :class:`~curlprune.run.prune_config.PruneConfig` as ``curlprune prune``
(same defaults and checks) and runs the same function, :func:`curlprune.run.prune_core.prune_model`;
only the run folder (cached scores, checkpoint, report files) is the command's own.
"""
from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.run.prune_config import DEFAULT_CALIB, PruneConfig
from curlprune.run.prune_core import Pruned, prune_model
from curlprune.run.prune_data import SplitImages, load_images
from curlprune.recover.distill import DistillConfig
from curlprune.recover.distill import distill as distill_stage
from curlprune.select.search import DEFAULT_FLOOR

__all__ = ["Pruned", "distill", "prune"]


def prune(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    data: Any = None,
    eval_data: Any = None,
    input_spec: InputSpec | None = None,
    target_macs: float | str | None = None,
    target_params: float | str | None = None,
    target_latency: float | str | None = None,
    criterion: str = "kl",
    allocation: str | None = None,
    calib: int = DEFAULT_CALIB,
    protect: Iterable[str] | None = None,
    floor: float = DEFAULT_FLOOR,
    max_ratio: Mapping[str, float] | None = None,
    round_to: int | None = None,
    normalize: str = "none",
    bn_recalibrate: int | None = None,
    eval_limit: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    show: bool = False,
    keep_class: bool = True,
    **criterion_options: Any,
) -> Pruned:
    """Prune ``model`` to a MACs, parameter or latency target: what ``curlprune prune`` does, in one call.

    Score every channel of every channel group on ``calib`` calibration images (``kl``: the KL
    divergence of the output when the channel is removed), rank all channels globally by the
    criterion's default allocation (``kl``: score per MAC saved), remove the lowest until the
    target is met (floor, ``protect`` and ``max_ratio`` respected), slice the weights, re-estimate
    the batch-norm statistics and measure test top-1 when there are evaluation images.

    Args:
        model: the unpruned model, any ``nn.Module`` the tracer follows (your own class included;
            it is not changed).
        example_input: an input ``[1, C, H, W]`` (shapes only).
        data: training images: a float tensor ``[N, C, H, W]`` as the model takes them
            (normalised), a ``Dataset`` or ``DataLoader`` of ``(image, label)`` (its dataset is
            read by index), or what the command line takes: ``"digits"``, an ImageFolder folder or
            zip (``train/``, ``test/``), with ``input_spec``. Data-free criteria (l1, bn, random)
            need none; without it the BN statistics are left as they are.
        eval_data: evaluation images with labels (a ``Dataset``/``DataLoader`` of ``(image, label)``);
            split data uses its ``test/`` split. None = no accuracy.
        input_spec: how uint8 images are resized and normalised (:class:`curlprune.models.spec.InputSpec`,
            e.g. ``curlprune.models.input_spec("cifar:resnet56")``); needed for split data only.
        target_macs, target_params, target_latency: exactly one: a fraction of the unpruned model
            (0.5) or a count ("62.5M"), a latency fraction or time ("12ms").
        criterion: kl | kl-approx | l1 | bn | taylor | random, or a registered one.
        allocation: "cost-weighted" | "paper" | ...; None = the criterion's default (cost-weighted for kl).
        calib: calibration images (a seeded draw from ``data``; 256 = the paper's).
        protect: group names or globs never pruned; None = none.
        floor: a group is not pruned below this kept fraction (CURL: 0.3).
        max_ratio: ``{pattern: R}``: groups matching the glob lose at most R of their channels.
        round_to: keep widths multiples of this (None = off).
        normalize: per-group score normalisation before ranking (none = CURL).
        bn_recalibrate: training images for the BN re-estimation (None = 2,048 or all when fewer; 0 = off).
        eval_limit: evaluation images (a seeded subset; None = all; 0 = none).
        steps: reach the target in this many steps, scoring the pruned model again between them
            (iterative pruning, docs/method.md §3; the plan is still one of ``model``'s channels);
            None or 1 = one shot. MACs/params targets only.
        seed: seed of the calibration, BN and evaluation draws and of the random criterion.
        device: where the criteria, the BN re-estimation, the evaluation and the latency
            measurement run: "auto" (a CUDA GPU when there is one, else the CPU), "cpu", "cuda",
            "cuda:<i>", as ``curlprune prune --device`` (docs/method.md §10). Tracing, selection and
            slicing run on the CPU (a model elsewhere is copied there); the pruned model is returned
            on the CPU.
        show: print the progress bar, the per-group table and the accuracies.
        keep_class: return an object of the model's own class with smaller layers (proven equal to the
            sliced GraphModule; where its forward cannot run smaller, the GraphModule and the reason in
            ``report.model_class``). False = always the GraphModule.
        criterion_options: the criterion's own options (``budget_mb``, ``approx_classes``).
    Returns:
        :class:`curlprune.run.prune_core.Pruned`: ``model`` (the pruned model), ``plan``, ``groups``,
        ``scores``, ``report`` (MACs/params before and after, accuracies), ``selection``.
    Raises:
        CurlpruneError: a bad setting (the same checks as the command line), no prunable group, an
            unreachable target, a data-driven criterion without data, unusable data, a device that is not auto/cpu/cuda[:i] or a CUDA device where there is none.

    Source: docs/method.md §2 (the KL score), §3 (selection, allocation, limits), §8 (defaults).
    """
    config = PruneConfig(
        criterion=criterion, target_macs=target_macs, target_params=target_params, target_latency=target_latency,
        calib=calib, seed=seed, floor=floor, protect=None if protect is None else list(protect), normalize=normalize,
        allocation=allocation, round_to=round_to, eval_limit=eval_limit, bn_recalibrate=bn_recalibrate, steps=steps,
        max_ratio=None if max_ratio is None else dict(max_ratio), device=device, **criterion_options)
    if not isinstance(model, nn.Module):
        raise CurlpruneError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise CurlpruneError(f"example_input must be a tensor [1, C, H, W], got {type(example_input).__name__}")
    cpu = torch.device("cpu")
    if any(t.device != cpu for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).to(cpu)
    images = load_images(data, input_spec, seed, test=eval_data)
    return prune_model(model.eval(), example_input.to(cpu), config, images, name=type(model).__name__, show=show,
                        keep_class=keep_class)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    input_spec: InputSpec,
    epochs: int = DistillConfig.epochs,
    folder: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    plan: dict[str, list[int]] | None = None,
    **settings: Any,
) -> nn.Module:
    """Recover ``student``'s accuracy by distillation from ``teacher`` (mixup + KD): the ``distill``
    stage of ``curlprune run`` as a library call; returns the trained student.

    Args:
        student: the pruned model, trained in place (and returned).
        teacher: the unpruned model (frozen, eval mode).
        data: ``"digits"``, an ImageFolder folder or zip with ``train/`` and ``test/``, or loaded
            splits ``{"train": ImageDataset, "test": ImageDataset}`` (:mod:`curlprune.data.data`).
        input_spec: the model's input recipe (size, normalisation, train-time augmentation).
        epochs: passes over the training split (the stage's default: the authors' 150).
        folder: the stage's run folder: the stage resumes from it after an interruption and
            returns at once when it holds a finished run with the same settings; None = a
            temporary folder, removed afterwards.
        seed: data order, augmentation and mixup.
        device: "auto" (a GPU when there is one), "cpu", "cuda", ...
        progress: show a progress bar (on a terminal).
        plan: the plan ``student`` was sliced from ``teacher`` by (``pruned.plan``): the channel map of
            feature distillation (``feature_weight``, ``features``); None = the student is unpruned.
        settings: any other :class:`curlprune.recover.distill.DistillConfig` field (``lr``,
            ``batch_size``, ``temperature``, ``alpha``, ``mixup_alpha``, ``feature_weight``, ...);
            ``ce_weight`` defaults to 0.5 (half the paper's loss, half mixed CE on the true labels,
            docs/method.md §8); ``ce_weight=0`` is the paper's loss.
    Returns:
        The trained student (the same object, when it was trained in this call).
    Raises:
        CurlpruneError: bad settings or data, a student that does not fit the data, a folder
            written with other settings.

    Source: docs/method.md §5 (distillation with mixup).
    """
    config = DistillConfig(epochs=epochs, seed=seed, device=device, progress=progress, **settings)
    splits = load_images(data, input_spec, seed)
    if not (isinstance(splits.train, SplitImages) and isinstance(splits.test, SplitImages)):
        raise CurlpruneError(f"distill needs a train and a test split of uint8 images, and {splits.source} has not both: "
                             "give 'digits', an ImageFolder folder/zip with train/ and test/, or {'train': ..., 'test': ...}")
    split_data = {"train": splits.train.ds, "test": splits.test.ds}
    if folder is not None:
        return distill_stage(student, teacher, split_data, input_spec, config, folder, plan=plan).model
    with tempfile.TemporaryDirectory(prefix="curlprune-distill-") as tmp:
        return distill_stage(student, teacher, split_data, input_spec, config, tmp, plan=plan).model

