"""The prune stage: score -> select -> slice -> save, resumable; and the ``curlprune prune`` command.

Outputs in the run's folder (every file written atomically)::

    scores.npz          one float array per group, plus the fingerprint of what they were computed
                        from (model, weights, criterion, calibration images, seed, options)
    plan.json           the Plan: group -> kept channel indices
    model.safetensors   the pruned model (curlprune checkpoint: ``curlprune.load``)
    report.json         selection, MACs/params before and after, test top-1 before and after
    log.jsonl           one JSON line per event (scores computed or reused, selection, eval, done)
    done.json           written last: the settings of the finished run (a rerun with the same
                        settings and ``resume`` returns at once and writes nothing)

``resume`` reuses ``scores.npz`` when its fingerprint matches the current settings and is an error
when it does not (the message names the settings that differ): scores can take hours, so they are
never silently thrown away. Without ``resume``, a folder that already holds a run is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curlprune.checkpoint import file_digest
from curlprune.errors import CurlpruneError
from curlprune.graph import ChannelGroup, Plan

SCORES = "scores.npz"
PLAN = "plan.json"
MODEL = "model.safetensors"
REPORT = "report.json"
LOG = "log.jsonl"
DONE = "done.json"
FINGERPRINT_KEY = "__fingerprint__"
NO_DEFAULT = "%(default).0s"  # formats to nothing: stops the help formatter from adding "(default: None)"


@dataclass
class PruneConfig:
    """Settings of the prune stage (also the ``prune:`` section of a run config).

    criterion:      kl | kl-approx | l1 | bn | taylor | random.
    target_macs:    MACs to keep: a fraction of the unpruned model (<= 1, e.g. 0.5) or a count
                    ("62.5M", 1.11e9). Exactly one of target_macs / target_params.
    target_params:  parameters to keep, same forms.
    calib:          calibration images (seeded draw from the training split, eval transform).
    seed:           seed of the calibration draw, the random criterion and the eval subset.
    floor:          a group is not pruned further once its kept fraction is below this (CURL: 0.3).
    protect:        group names or globs never pruned; None = the model's default (the classifier's
                    input stream for torchvision ResNets), [] = none.
    normalize:      per-group score normalisation before the global ranking (none = CURL).
    round_to:       round kept widths up to a multiple of this (hardware-friendly); None = off.
    eval_limit:     test images for top-1 before/after (seeded subset); None = all, 0 = skip.
    budget_mb:      memory for the stacked ablations of the kl criteria.
    approx_classes: most probable classes summed by kl-approx's Fisher form.
    """

    criterion: str = "kl"
    target_macs: float | str | None = None
    target_params: float | str | None = None
    calib: int = 256
    seed: int = 0
    floor: float = 0.3
    protect: list[str] | None = None
    normalize: str = "none"
    round_to: int | None = None
    eval_limit: int | None = None
    budget_mb: float = 512.0
    approx_classes: int = 5

    def __post_init__(self) -> None:
        from curlprune.criteria import get
        from curlprune.select import NORMALIZATIONS

        get(self.criterion)
        if (self.target_macs is None) == (self.target_params is None):
            raise CurlpruneError("give exactly one target: target_macs (e.g. 0.5 or 62.5M) or target_params")
        self.target()  # parses, raises on a bad value
        if isinstance(self.calib, bool) or not isinstance(self.calib, int) or self.calib < 1:
            raise CurlpruneError(f"calib must be a positive number of images, got {self.calib!r}")
        if not 0.0 <= float(self.floor) < 1.0:
            raise CurlpruneError(f"floor must be in [0, 1) (the smallest kept fraction of a group), got {self.floor}")
        if self.normalize not in NORMALIZATIONS:
            raise CurlpruneError(f"unknown normalize {self.normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise CurlpruneError(f"round_to must be a positive channel count, got {self.round_to!r}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 0):
            raise CurlpruneError(f"eval_limit must be a number of test images >= 0, got {self.eval_limit!r}")
        if isinstance(self.approx_classes, bool) or not isinstance(self.approx_classes, int) or self.approx_classes < 1:
            raise CurlpruneError(f"approx_classes must be a positive number of classes, got {self.approx_classes!r}")
        if isinstance(self.protect, str):
            self.protect = [self.protect]

    def target(self):
        from curlprune.select import Target

        if self.target_macs is not None:
            return Target.parse("macs", self.target_macs)
        return Target.parse("params", self.target_params)


@dataclass
class PruneResult:
    """What the prune stage produced (paths in ``out_dir``) and its headline numbers."""

    out_dir: Path
    checkpoint: Path
    plan: Plan
    report: dict[str, Any]
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
) -> PruneResult:
    """Score, select and slice ``model_name`` (+ ``weights``) to ``config``'s target; save in ``out_dir``.

    ``data`` is "digits", an ImageFolder folder or zip, or already loaded splits
    (``{"train": ImageDataset, "test": ...}``); data-free criteria (l1, bn, random) need none.
    """
    from curlprune.criteria import get

    out = Path(out_dir)
    settings = _settings(config, model_name, weights, data, num_classes)
    finished = _finished(out, settings) if resume else None
    if finished is not None:
        return finished
    if not resume and any((out / name).exists() for name in (SCORES, MODEL, DONE)):
        raise CurlpruneError(f"{out} already holds a prune run: pass --resume to reuse its scores, or choose another --out")
    criterion = get(config.criterion)
    if criterion.needs_data and data is None:
        raise CurlpruneError(f"criterion {config.criterion!r} needs data: pass --data (a dataset folder/zip, or 'digits')")

    model, spec, example = _build(model_name, weights, num_classes)
    groups = _trace(model, example)
    target = config.target()
    protect = _protected(config, model_name, model, groups)
    cost_fn = _cost_fn(model, example, groups)
    _check_reachable(groups, cost_fn, target, config, protect)  # before anything slow is done or written

    splits = _load_splits(data, config.seed) if data is not None else {}
    calib_images, calib_labels = _calibration(splits, spec, config) if criterion.needs_data else (None, None)
    fingerprint = _scores_fingerprint(config, settings, calib_images)
    scores, reused, seconds = _scores(out, resume, fingerprint, config, model, groups, calib_images, calib_labels, show)

    from curlprune.analysis import check_pruned_cost
    from curlprune.select import select

    selection = select(groups, scores, cost_fn, target, floor=config.floor, protect=protect,
                       normalize=config.normalize, round_to=config.round_to)
    pruned = _apply(model, groups, selection.plan)
    check_pruned_cost(pruned, example, (selection.macs, selection.params))
    accuracy = _accuracies(model, pruned, splits, spec, config)
    report = _report(config, settings, selection, accuracy, groups, scores_seconds=seconds, scores_reused=reused)
    checkpoint = _write_outputs(out, model_name, num_classes, example, selection.plan, pruned, report, settings)
    if show:
        _show(groups, selection, accuracy, model_name)
    return PruneResult(out, checkpoint, selection.plan, report, scores_reused=reused, groups=groups)


def _settings(config: PruneConfig, model_name: str, weights: str | None, data: Any, num_classes: int | None) -> dict[str, Any]:
    """Everything that defines the stage's outputs (done.json; a rerun with equal settings is a no-op)."""
    return {
        "model": model_name,
        "weights": weights,
        "weights_sha256": _file_digest(weights),
        "num_classes": num_classes,
        "data": data if isinstance(data, str) or data is None else _splits_digest(data),
        "config": dataclasses.asdict(config),
    }


def _finished(out: Path, settings: dict[str, Any]) -> PruneResult | None:
    """The result of a finished run with the same settings, read from ``out`` (nothing written)."""
    done = out / DONE
    if not done.is_file() or not (out / MODEL).is_file():
        return None
    try:
        previous = json.loads(done.read_text())
        report = json.loads((out / REPORT).read_text())
        plan = json.loads((out / PLAN).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if previous.get("settings") != json.loads(json.dumps(settings)):
        return None
    return PruneResult(out, out / MODEL, plan, report, scores_reused=True, already_done=True)


def _file_digest(path: str | None) -> str | None:
    """SHA-256 of a weights file; None for no file (e.g. a torchvision weight name)."""
    return file_digest(path) if path is not None and Path(path).is_file() else None


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


def _build(model_name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, Any, torch.Tensor]:
    from curlprune.models import build, input_spec

    model = build(model_name, weights=weights, num_classes=num_classes).eval()
    spec = input_spec(model_name, weights, num_classes)
    return model, spec, torch.zeros(1, spec.channels, spec.size, spec.size)


def _trace(model: nn.Module, example: torch.Tensor) -> list[ChannelGroup]:
    from curlprune.analysis import trace

    groups = trace(model, example)
    if not any(g.prunable for g in groups):
        reasons = "; ".join(sorted({g.reason for g in groups if g.reason})[:3])
        raise CurlpruneError(f"the model has no prunable channel group ({reasons}): nothing can be pruned")
    return groups


def _protected(config: PruneConfig, model_name: str, model: nn.Module, groups: list[ChannelGroup]) -> list[str]:
    from curlprune.models import default_protect
    from curlprune.select import resolve_protect

    if config.protect is None:
        return default_protect(model_name, model, groups)
    return resolve_protect(groups, config.protect)


def _cost_fn(model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup]):
    from curlprune.select import model_cost_fn

    return model_cost_fn(model, example, groups)


def _check_reachable(groups, cost_fn, target, config: PruneConfig, protect: list[str]) -> None:
    """Raise the impossible-target error before scoring: reachability does not depend on scores."""
    from curlprune.select import select

    zeros = {g.name: np.zeros(g.width) for g in groups if g.prunable}
    select(groups, zeros, cost_fn, target, floor=config.floor, protect=protect, round_to=config.round_to)


def _load_splits(data: str | dict, seed: int) -> dict:
    """``{"train", ...}`` uint8 datasets from "digits", an ImageFolder folder/zip, or given splits."""
    from curlprune import data as datasets

    if isinstance(data, dict):
        return data
    if data == "digits":
        return datasets.load_digits_dataset(seed=seed)
    if not Path(data).exists():
        raise CurlpruneError(f"data {data} does not exist: pass an ImageFolder folder or .zip (train/<class>/..., test/<class>/...) or 'digits'")
    return datasets.load_image_folder(data)


def _calibration(splits: dict, spec, config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch: ``calib`` seeded training images with the eval transform, and labels."""
    from curlprune.data import batches, calibration_subset

    source = splits["train"] if "train" in splits else splits.get("all")
    if source is None:
        raise CurlpruneError(f"the data has no 'train' split (splits: {', '.join(sorted(splits))}): lay it out as train/<class>/<image>")
    if config.calib > len(source):
        raise CurlpruneError(f"calib {config.calib} is more than the {len(source)} training images: use --calib {len(source)} or fewer")
    subset = calibration_subset(source, config.calib, config.seed)
    images, labels = zip(*batches(subset, spec, 256))
    return torch.cat(images), torch.cat(labels)


def _scores_fingerprint(config: PruneConfig, settings: dict[str, Any], images: torch.Tensor | None) -> dict[str, Any]:
    """What the scores depend on; a stored scores.npz is reused only when this matches."""
    fingerprint = {
        "model": settings["model"],
        "weights": settings["weights_sha256"] or settings["weights"],
        "num_classes": settings["num_classes"],
        "criterion": config.criterion,
        "seed": config.seed if config.criterion == "random" else None,
    }
    if images is not None:
        fingerprint.update(calib=len(images), seed=config.seed,
                           calib_sha256=hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest())
    if config.criterion == "kl-approx":
        fingerprint["approx_classes"] = config.approx_classes
    return fingerprint


def _scores(out: Path, resume: bool, fingerprint: dict, config: PruneConfig, model: nn.Module, groups,
            images, labels, show: bool) -> tuple[dict[str, np.ndarray], bool, float]:
    """Reuse matching scores from ``scores.npz`` (with ``resume``) or compute and save them."""
    path = out / SCORES
    if resume and path.is_file():
        stored, stored_fp = read_scores(path)
        differ = [f"{k}: {stored_fp.get(k)!r} (now {v!r})" for k, v in fingerprint.items() if stored_fp.get(k) != v]
        if differ:
            raise CurlpruneError(
                f"{path} was computed with other settings ({'; '.join(differ)[:300]}): delete it to score again, or choose another --out"
            )
        _log(out, {"event": "scores", "source": "reused", "file": SCORES})
        return stored, True, 0.0
    started = time.time()
    scores = _compute(config, model, groups, images, labels, show)
    seconds = time.time() - started
    write_scores(path, scores, fingerprint)
    _log(out, {"event": "scores", "source": "computed", "criterion": config.criterion, "seconds": round(seconds, 2)})
    return scores, False, seconds


def _compute(config: PruneConfig, model, groups, images, labels, show: bool) -> dict[str, np.ndarray]:
    from curlprune.criteria import compute_scores, work_items

    options: dict[str, Any] = {}
    if config.criterion in ("kl", "kl-approx"):
        options["budget_mb"] = config.budget_mb
    if config.criterion == "kl-approx":
        options["classes"] = config.approx_classes
    total = work_items(config.criterion, groups)
    if not show or not total:
        return compute_scores(config.criterion, model, groups, images=images, labels=labels, seed=config.seed, **options)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("units"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(f"scoring ({config.criterion}, {len(images)} images)", total=total)
        scores = compute_scores(config.criterion, model, groups, images=images, labels=labels, seed=config.seed,
                                progress=lambda done: bar.advance(task, done), **options)
        bar.update(task, completed=total)
    return scores


def write_scores(path: str | Path, scores: dict[str, np.ndarray], fingerprint: dict) -> None:
    """Save scores (one array per group) and their fingerprint, atomically."""
    from curlprune.checkpoint import atomic_write

    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}
    arrays[FINGERPRINT_KEY] = np.array(json.dumps(fingerprint, sort_keys=True))

    def write(tmp: str) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        Path(tmp).write_bytes(buffer.getvalue())

    atomic_write(path, write)


def read_scores(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(scores, fingerprint) from a scores.npz written by :func:`write_scores`."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            fingerprint = json.loads(str(stored[FINGERPRINT_KEY])) if FINGERPRINT_KEY in stored.files else {}
            return {k: stored[k] for k in stored.files if k != FINGERPRINT_KEY}, fingerprint
    except (OSError, ValueError) as exc:
        raise CurlpruneError(f"{path} is not a readable scores file ({exc}): delete it to score again") from None


def _apply(model: nn.Module, groups, plan: Plan) -> nn.Module:
    from curlprune.surgery import apply

    return apply(model, groups, plan).eval()


def _accuracies(model: nn.Module, pruned: nn.Module, splits: dict, spec, config: PruneConfig) -> dict[str, float | int | None]:
    """Test top-1 (%) of the unpruned and the pruned model, without fine-tuning, when there is a test split."""
    from curlprune.data import calibration_subset, evaluate

    test = splits.get("test")
    if test is None or config.eval_limit == 0:
        return {"test_images": 0, "top1_before": None, "top1_after": None}
    if config.eval_limit is not None and config.eval_limit < len(test):
        test = calibration_subset(test, config.eval_limit, config.seed)
    return {
        "test_images": len(test),
        "top1_before": round(100.0 * evaluate(model, test, spec), 3),
        "top1_after": round(100.0 * evaluate(pruned, test, spec), 3),
    }


def _report(config: PruneConfig, settings: dict, selection, accuracy: dict, groups, *, scores_seconds: float,
            scores_reused: bool) -> dict[str, Any]:
    widths = {g.name: {"kind": g.kind, "before": g.width, "after": len(selection.plan.get(g.name, range(g.width)))}
              for g in groups if g.prunable}
    return {
        "model": settings["model"],
        "weights": settings["weights"],
        "criterion": config.criterion,
        "selection": selection.as_dict(),
        "accuracy": accuracy,
        "groups": widths,
        "scores_seconds": round(scores_seconds, 2),
        "scores_reused": scores_reused,
    }


def _write_outputs(out: Path, model_name: str, num_classes: int | None, example: torch.Tensor, plan: Plan,
                   pruned: nn.Module, report: dict, settings: dict) -> Path:
    from curlprune.checkpoint import atomic_write_text, save

    kwargs = {"num_classes": num_classes} if num_classes else {}
    atomic_write_text(out / PLAN, json.dumps(plan, indent=1) + "\n")
    save(out / MODEL, {"name": model_name, "kwargs": kwargs}, plan, pruned.state_dict(),
         input_shape=list(example.shape), extra={"prune": {k: report[k] for k in ("criterion", "selection", "accuracy")}})
    atomic_write_text(out / REPORT, json.dumps(report, indent=2) + "\n")
    _log(out, {"event": "selection", **{k: report["selection"][k] for k in ("top_k", "removed_channels", "macs", "params", "macs_ratio", "params_ratio")}})
    if report["accuracy"]["test_images"]:
        _log(out, {"event": "eval", **report["accuracy"]})
    atomic_write_text(out / DONE, json.dumps({"settings": settings}, indent=2) + "\n")
    _log(out, {"event": "done", "checkpoint": MODEL})
    return out / MODEL


def _log(out: Path, record: dict) -> None:
    """Append one JSON line to the run's log."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG, "a") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def _show(groups, selection, accuracy: dict, model_name: str) -> None:
    from curlprune.report import console, human, plan_table

    shares = {g.name: float(sum(g.macs_per_channel)) for g in groups if g.prunable}
    console.print(plan_table(groups, selection.plan, shares))
    s = selection
    console.print(
        f"{model_name}: MACs {human(s.full_macs)} -> {human(s.macs)} ({s.macs / s.full_macs:.3f}), "
        f"params {human(s.full_params)} -> {human(s.params)} ({s.params / s.full_params:.3f}); "
        f"{s.removed_channels} channels removed, top_k {s.top_k}"
        + (f", protected: {', '.join(s.protected)}" if s.protected else "")
    )
    if accuracy["test_images"]:
        console.print(f"test top-1 on {accuracy['test_images']} images, no fine-tuning: "
                      f"{accuracy['top1_before']:.2f}% -> {accuracy['top1_after']:.2f}%")


# ----------------------------------------------------------------------------------------------
# the command


def cmd_prune(args: argparse.Namespace) -> int:
    from curlprune.report import console

    protect = None if args.protect is None else [p for p in args.protect if p.lower() != "none"]
    config = PruneConfig(
        criterion=args.criterion, target_macs=args.target_macs, target_params=args.target_params, calib=args.calib,
        seed=args.seed, floor=args.floor, protect=protect, normalize=args.normalize, round_to=args.round_to,
        eval_limit=args.eval_limit, budget_mb=args.budget_mb, approx_classes=args.approx_classes,
    )
    result = run_prune(config, args.out, resume=args.resume, model_name=args.model, weights=args.weights,
                       data=args.data, num_classes=args.num_classes)
    if result.already_done:
        console.print(f"{args.out} already holds this finished run; nothing to do")
    console.print(f"wrote {result.checkpoint} (load with curlprune.load), {SCORES}, {PLAN}, {REPORT}, {LOG} in {args.out}")
    return 0


def register(subparsers, formatter) -> None:
    from curlprune.criteria import CRITERIA

    p = subparsers.add_parser(
        "prune", help="score channels, select globally to a MACs/params target, slice, save", formatter_class=formatter,
        description="CURL's one-shot pruning: score every channel of every group (kl: KL divergence of the output "
                    "when the channel is removed), rank all scores globally, remove the lowest until the target is "
                    "met (the number of removals is found automatically), slice the weights and save the pruned model. "
                    "Prints a table per group and test top-1 before/after (no fine-tuning).")
    p.add_argument("--model", required=True, help="registry name: cifar:resnet20|32|44|56|110, torchvision:<name>, timm:<name>, small:resnet-digits (required)" + NO_DEFAULT)
    p.add_argument("--weights", default=None, help="weights file (.th/.pt/.pth/.safetensors) or torchvision weight name (default: random init)" + NO_DEFAULT)
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs, when not the model's default (default: the model's)" + NO_DEFAULT)
    p.add_argument("--data", default=None, help="ImageFolder folder or .zip with train/ (and test/) splits, or 'digits' "
                                                "(sklearn digits); not needed by l1, bn, random (default: none)" + NO_DEFAULT)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", default=None, help="MACs to keep: a fraction (0.5) or a count (62.5M, 1.11G); this or --target-params is required" + NO_DEFAULT)
    target.add_argument("--target-params", default=None, help="parameters to keep: a fraction (0.5) or a count (1.2M)" + NO_DEFAULT)
    p.add_argument("--criterion", default="kl", metavar="{" + ",".join(CRITERIA) + "}",
                   help="; ".join(f"{c.name}: {c.summary}" for c in CRITERIA.values()))
    p.add_argument("--calib", type=int, default=256, help="calibration images drawn from the training split (eval transform)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw, random scores and the eval subset")
    p.add_argument("--floor", type=float, default=0.3, help="stop pruning a group once its kept fraction is below this (CURL: 0.3)")
    p.add_argument("--protect", action="append", default=None, metavar="PATTERN",
                   help="group name or glob never pruned (repeatable); 'none' = protect nothing. Default: the model's "
                        "default (torchvision ResNets: the stream feeding the classifier)" + NO_DEFAULT)
    p.add_argument("--normalize", default="none", metavar="{none,mean,max,l2}",
                   help="per-group score normalisation before the global ranking (CURL ranks raw scores)")
    p.add_argument("--round-to", type=int, default=None, help="round kept widths up to a multiple of this, e.g. 8 (default: off)" + NO_DEFAULT)
    p.add_argument("--eval-limit", type=int, default=None, help="test images for top-1 before/after: a seeded subset; 0 skips the evaluation (default: all)" + NO_DEFAULT)
    p.add_argument("--budget-mb", type=float, default=512.0, help="memory for stacked ablations (kl, kl-approx)")
    p.add_argument("--approx-classes", type=int, default=5, help="kl-approx: most probable classes in its Fisher sum")
    p.add_argument("--out", required=True, help="output folder: scores.npz, plan.json, model.safetensors, report.json, log.jsonl (required)" + NO_DEFAULT)
    p.add_argument("--resume", action="store_true", help="reuse scores.npz in --out when it was computed with the same settings (an error when not)" + NO_DEFAULT)
    p.set_defaults(func=cmd_prune)
