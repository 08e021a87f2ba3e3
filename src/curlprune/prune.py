"""The prune stage: score -> select -> slice -> save, resumable (a library; the command is :mod:`curlprune.commands.prune`).

Outputs in the run's folder (every file written atomically)::

    scores.npz          one float array per group, plus the fingerprint of what they were computed
                        from (model, weights, criterion, calibration images, seed, options)
    plan.json           the Plan: group -> kept channel indices
    model.safetensors   the pruned model (curlprune checkpoint: ``curlprune.load``)
    report.json         criterion and allocation, selection, MACs/params before and after, test top-1
                        before and after, and (latency target) the measured latency before and after
    log.jsonl           one JSON line per event (scores computed or reused, selection, eval, done)
    done.json           written last: the settings of the finished run (a rerun with the same
                        settings and ``resume`` returns at once and writes nothing)

``resume`` reuses ``scores.npz`` when its fingerprint matches the current settings and is an error
when it does not (the message names the settings that differ): scores can take hours, so they are
never silently thrown away. Without ``resume``, a folder that already holds a run is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from curlprune.store import checkpoint
from curlprune.data import data as datasets
from curlprune.select.allocation import allocate, named_allocation, ranking_scores
from curlprune.criteria import compute_scores, get, work_items
from curlprune.errors import CurlpruneError
from curlprune.select.latency_select import measured_cost_fn, select_latency
from curlprune.cost.analysis import check_pruned_cost
from curlprune.channels import ChannelGroup, Plan
from curlprune.models import build, input_spec
from curlprune.models.spec import InputSpec
from curlprune.models.transfer import at_input_size
from curlprune.report.report import console, print_prune_summary
from curlprune.store.runlock import RunLock
from curlprune.store.runlog import restore_lost_line
from curlprune.store.rundir import (
    DONE_FILE,
    LOG_FILE,
    MODEL_FILE,
    PLAN_FILE,
    SCORES_FILE,
    append_jsonl,
    atomic_write_text,
    changed_settings,
    optional_file_digest,
    write_done,
)
from curlprune.run.prune_check import check_calibration_size, check_needs_data, check_reachable
from curlprune.run.prune_config import PruneConfig, canonical_settings, scores_fingerprint
from curlprune.store.records import GroupWidth, PruneAccuracy, PruneReport, RecordError, read_prune_report, write_prune_report
from curlprune.store.scores_io import changed_fingerprint, read_scores, write_scores
from curlprune.select.search import Target
from curlprune.surgery.surgery import apply
from curlprune.validate import check_value

@dataclass
class PruneResult:
    """What the prune stage produced (paths in ``out_dir``) and its headline numbers."""

    out_dir: Path
    checkpoint: Path
    plan: Plan
    report: PruneReport
    scores_reused: bool = False
    already_done: bool = False
    groups: list[ChannelGroup] = field(default_factory=list, repr=False)


# ----------------------------------------------------------------------------------------------
# the stage


def run_prune(
    config: PruneConfig,
    out_dir: str | Path,
    resume: bool = False,
    *,
    model_name: str,
    weights: str | None = None,
    data: str | dict | None = None,
    num_classes: int | None = None,
    show: bool = True,
    input_size: int | None = None,
) -> PruneResult:
    """Score, select and slice ``model_name`` (+ ``weights``) to ``config``'s target; save in ``out_dir``.

    Args:
        config: the stage's settings.
        out_dir: the stage folder (see the module docstring for what it holds).
        resume: reuse matching scores and skip a finished run with equal settings; without it a
            folder that already holds a run is an error.
        model_name: registry name of the unpruned model.
        weights: its weights (file or torchvision weight name); None = random init.
        data: "digits", an ImageFolder folder or zip, or already loaded splits
            (``{"train": ImageDataset, "test": ...}``); data-free criteria (l1, bn, random) need none.
        num_classes: classifier outputs when not the model's default.
        show: print the progress bar and the per-group table.
        input_size: square input side when not the model's default (MACs, calibration and
            evaluation all follow it; :func:`curlprune.models.transfer.at_input_size`).
    Returns:
        The :class:`PruneResult` (checkpoint path, plan, report).
    Raises:
        CurlpruneError: ``out_dir`` is not a writable folder or is in use by another process, or
            lies inside a run directory in use (it is checked and locked,
            :class:`curlprune.store.runlock.RunLock`, before anything is loaded), bad
            settings, an unreachable target, missing data, stored scores computed with other
            settings, or a folder that already holds a run (without ``resume``).

    Source: docs/method.md §2 (the KL score) and §3 (selection, allocation).
    """
    check_value("num_classes", num_classes)  # before the folder is locked or anything is loaded
    with RunLock(out_dir):  # one process per folder, also when called from Python (issue 12)
        return _run_prune(config, Path(out_dir), resume, model_name, weights, data, num_classes, show, input_size)


def _run_prune(config: PruneConfig, out: Path, resume: bool, model_name: str, weights: str | None,
               data: str | dict | None, num_classes: int | None, show: bool, input_size: int | None) -> PruneResult:
    """:func:`run_prune` with ``out`` locked."""
    settings = _settings(config, model_name, weights, data, num_classes)
    if input_size is not None:  # only when set: finished runs from before the option stay valid
        settings["input_size"] = input_size
    finished = _finished(out, settings) if resume else None
    if finished is not None:  # its "done" event, if a kill after done.json lost it, is restored (issue 18)
        restore_lost_line(out / LOG_FILE, out / DONE_FILE, {"event": "done", "checkpoint": MODEL_FILE},
                          lambda event: event.get("event") == "done", last_only=True)
        return finished
    if not resume and any((out / name).exists() for name in (SCORES_FILE, MODEL_FILE, DONE_FILE)):
        raise CurlpruneError(f"{out} already holds a prune run: pass --resume to reuse its scores, or choose another --out")
    criterion = get(config.criterion)
    check_needs_data(config, data is not None)
    model, spec, example = _build(model_name, weights, num_classes, input_size)
    reach = check_reachable(config, model_name, model, example)  # before anything slow is done or written
    groups, target, protect, cost_fn = reach.groups, reach.target, reach.protect, reach.cost_fn

    splits = _load_splits(data, config.seed) if data is not None else {}
    check_calibration_size(config, splits)  # before scoring writes anything
    calib_images, calib_labels = _calibration(splits, spec, config) if criterion.needs_data else (None, None)
    fingerprint = scores_fingerprint(config, settings, calib_images)
    scores, reused, seconds = _scores(out, resume, fingerprint, config, model, groups, calib_images, calib_labels, show)

    selection, chosen = _select(config, groups, scores, cost_fn, target, protect, model, example)
    pruned = _apply(model, groups, selection.plan)
    check_pruned_cost(pruned, example, (selection.macs, selection.params))  # the numbers reported are the model's
    accuracy = _accuracies(model, pruned, splits, spec, config)
    report = _report(config, settings, chosen, accuracy, groups, scores_seconds=seconds, scores_reused=reused)
    checkpoint = _write_outputs(out, model_name, num_classes, example, selection.plan, pruned, report, settings)
    if show:
        print_prune_summary(groups, selection, accuracy, model_name, allocation=report.allocation)
        if report.latency is not None:
            _print_latency(report.latency)
    return PruneResult(out, checkpoint, selection.plan, report, scores_reused=reused, groups=groups)


def _settings(config: PruneConfig, model_name: str, weights: str | None, data: Any, num_classes: int | None) -> dict[str, Any]:
    """Everything that defines the stage's outputs (done.json; a rerun with equal settings is a no-op)."""
    return {
        "model": model_name,
        "weights": weights,
        "weights_sha256": optional_file_digest(weights),
        "num_classes": num_classes,
        "data": data if isinstance(data, str) or data is None else _splits_digest(data),
        "config": dataclasses.asdict(config),
    }


def _finished(out: Path, settings: dict[str, Any]) -> PruneResult | None:
    """The result of a finished run with the same settings, read from ``out`` (nothing written)."""
    done = out / DONE_FILE
    if not done.is_file() or not (out / MODEL_FILE).is_file():
        return None
    try:
        previous = json.loads(done.read_text())
        report = read_prune_report(out)
        plan = json.loads((out / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError, RecordError):
        return None
    saved = previous.get("settings")
    if not isinstance(saved, dict) or changed_settings({**saved, "config": canonical_settings(saved.get("config"))}, settings):
        return None  # targets compared in one form: "0.5" written before = 0.5 now
    return PruneResult(out, out / MODEL_FILE, plan, report, scores_reused=True, already_done=True)


def _splits_digest(splits: dict) -> str:
    """A short identity of in-memory splits (sizes, classes and a sample of labels/pixels)."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        ds = splits[name]
        digest.update(f"{name}:{len(ds)}:{ds.classes}".encode())
        digest.update(ds.labels.numpy().tobytes())
        if ds.uniform:
            digest.update(ds.images[:: max(1, len(ds) // 64)].numpy().tobytes())
    return digest.hexdigest()[:16]


def _build(model_name: str, weights: str | None, num_classes: int | None,
           input_size: int | None) -> tuple[nn.Module, InputSpec, torch.Tensor]:
    model = build(model_name, weights=weights, num_classes=num_classes).eval()
    spec = at_input_size(input_spec(model_name, weights, num_classes), input_size)
    return model, spec, torch.zeros(1, spec.channels, spec.size, spec.size)


def _select(config: PruneConfig, groups, scores, cost_fn, target: Target | None, protect: list[str], model: nn.Module,
            example: torch.Tensor) -> tuple[Any, Any]:
    """(select's Selection, what report.json shows: the Selection or the LatencySelection).

    Both targets rank the same scores: the config's allocation (:func:`curlprune.select.allocation.ranking_scores`;
    a latency target weighs by MACs), searched by :func:`curlprune.select.search.select`.
    """
    allocation = named_allocation(config.resolved_allocation(), floor=config.floor, normalize=config.normalize)
    if target is not None:
        selection = allocate(groups, scores, cost_fn, target, allocation, protect=protect, round_to=config.round_to)
        return selection, selection
    ranked, normalize = ranking_scores(groups, scores, allocation, "latency")
    measured = measured_cost_fn(model, groups, example, batch=config.latency_batch or 1, threads=config.latency_threads)
    chosen = select_latency(groups, ranked, measured, cost_fn, config.latency_target(), floor=config.floor,
                            protect=protect, normalize=normalize, round_to=config.round_to)
    return chosen.selection, chosen


def _print_latency(latency: dict[str, Any]) -> None:
    console.print(f"measured latency (batch {latency['batch']}, {latency['threads']} thread(s)): {latency['reference_ms']:.3g} ms "
                  f"-> {latency['achieved_ms']:.3g} ms ({latency['achieved_fraction']:.3f}, goal {latency['goal_fraction']:.3f} "
                  f"+/- {latency['tolerance']:.0%}: {_met_words(latency)})" + (f"; {latency['note']}" if latency["note"] else ""))


def _met_words(record: dict[str, Any]) -> str:
    """"met", or "NOT met: 12.3% below" (report.json's ``met`` / ``missed_by``; older reports have no ``missed_by``)."""
    if record["met"]:
        return "met"
    missed = record.get("missed_by") or 0.0
    return f"NOT met: {abs(missed):.1%} {'below' if missed < 0 else 'above'}" if missed else "NOT met"


def _load_splits(data: str | dict, seed: int) -> dict:
    """``{"train", ...}`` uint8 datasets from "digits", an ImageFolder folder/zip, or given splits."""
    if isinstance(data, dict):
        return data
    if data == "digits":
        return datasets.load_digits_dataset(seed=seed)
    if not Path(data).exists():
        raise CurlpruneError(f"data {data} does not exist: pass an ImageFolder folder or .zip (train/<class>/..., test/<class>/...) or 'digits'")
    return datasets.load_image_folder(data)


def _calibration(splits: dict, spec: InputSpec, config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch: ``calib`` seeded training images with the eval transform, and labels."""
    source = splits["train"] if "train" in splits else splits.get("all")
    subset = datasets.calibration_subset(source, config.calib, config.seed)
    images, labels = zip(*datasets.batches(subset, spec, 256))
    return torch.cat(images), torch.cat(labels)


def _scores(out: Path, resume: bool, fingerprint: dict, config: PruneConfig, model: nn.Module, groups,
            images, labels, show: bool) -> tuple[dict[str, np.ndarray], bool, float]:
    """Reuse matching scores from ``scores.npz`` (with ``resume``) or compute and save them."""
    path = out / SCORES_FILE
    if resume and path.is_file():
        stored, stored_fp = read_scores(path)
        differ = changed_fingerprint(stored_fp, fingerprint)
        if differ:
            raise CurlpruneError(
                f"{path} was computed with other settings ({'; '.join(differ)[:300]}): delete it to score again, or choose another --out"
            )
        append_jsonl(out / LOG_FILE, {"event": "scores", "source": "reused", "file": SCORES_FILE}, stamp=True)
        return stored, True, 0.0
    started = time.time()
    scores = _compute(config, model, groups, images, labels, show)
    seconds = time.time() - started
    write_scores(path, scores, fingerprint)
    append_jsonl(out / LOG_FILE, {"event": "scores", "source": "computed", "criterion": config.criterion, "seconds": round(seconds, 2)}, stamp=True)
    return scores, False, seconds


def _compute(config: PruneConfig, model, groups, images, labels, show: bool) -> dict[str, np.ndarray]:
    """The criterion's scores with its declared options from ``config``, with a progress bar when it reports progress."""
    options = config.criterion_options()
    total = work_items(config.criterion, groups)
    if not show or not total:
        return compute_scores(config.criterion, model, groups, images=images, labels=labels, **options)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("units"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        on = "" if images is None else f", {len(images)} images"
        task = bar.add_task(f"scoring ({config.criterion}{on})", total=total)
        scores = compute_scores(config.criterion, model, groups, images=images, labels=labels,
                                progress=lambda done: bar.advance(task, done), **options)
        bar.update(task, completed=total)
    return scores


def _apply(model: nn.Module, groups: list[ChannelGroup], plan: Plan) -> nn.Module:
    return apply(model, groups, plan).eval()


def _accuracies(model: nn.Module, pruned: nn.Module, splits: dict, spec: InputSpec, config: PruneConfig) -> dict[str, float | int | None]:
    """Test top-1 (%) of the unpruned and the pruned model, without fine-tuning, when there is a test split."""
    test = splits.get("test")
    if test is None or config.eval_limit == 0:
        return {"test_images": 0, "top1_before": None, "top1_after": None}
    if config.eval_limit is not None and config.eval_limit < len(test):
        test = datasets.calibration_subset(test, config.eval_limit, config.seed)
    return {
        "test_images": len(test),
        "top1_before": round(100.0 * datasets.evaluate(model, test, spec), 3),
        "top1_after": round(100.0 * datasets.evaluate(pruned, test, spec), 3),
    }


def _report(config: PruneConfig, settings: dict, selection, accuracy: dict, groups, *, scores_seconds: float,
            scores_reused: bool) -> PruneReport:
    widths = {g.name: GroupWidth(g.kind, g.width, len(selection.plan.get(g.name, range(g.width)))) for g in groups if g.prunable}
    return PruneReport(
        model=settings["model"],
        weights=settings["weights"],
        criterion=config.criterion,
        allocation=config.resolved_allocation(),
        selection=selection.as_dict(),
        accuracy=PruneAccuracy(**accuracy),
        groups=widths,
        scores_seconds=round(scores_seconds, 2),
        scores_reused=scores_reused,
    )


def _write_outputs(out: Path, model_name: str, num_classes: int | None, example: torch.Tensor, plan: Plan,
                   pruned: nn.Module, report: PruneReport, settings: dict) -> Path:
    kwargs = {"num_classes": num_classes} if num_classes else {}
    atomic_write_text(out / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    written = report.to_json()
    checkpoint.save(out / MODEL_FILE, {"name": model_name, "kwargs": kwargs}, plan, pruned.state_dict(),
         input_shape=list(example.shape), extra={"prune": {k: written[k] for k in ("criterion", "allocation", "selection", "accuracy")}})
    write_prune_report(out, report)
    log = out / LOG_FILE
    append_jsonl(log, {"event": "selection", **{k: report.selection[k] for k in ("top_k", "removed_channels", "macs", "params", "macs_ratio", "params_ratio", "latency") if k in report.selection}}, stamp=True)
    if report.accuracy.test_images:
        append_jsonl(log, {"event": "eval", **written["accuracy"]}, stamp=True)
    write_done(out, {"settings": settings})
    append_jsonl(log, {"event": "done", "checkpoint": MODEL_FILE}, stamp=True)
    return out / MODEL_FILE
