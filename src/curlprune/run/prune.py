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

With ``steps`` > 1 (iterative pruning) every later step's scores go to ``scores_step<k>.npz``, with
the fingerprint of ``scores.npz`` plus steps, k and the digest of the plan the scored model was
sliced by: a resumed run is resumable per step (each step's file is reused when it matches).
While ``kl`` scores, ``scores.partial.npz`` holds the groups finished so far (same form); a killed
run continued with ``resume`` scores only the rest and ends with the same scores, bit for bit.
Under torchrun (``ctx``) every rank calls :func:`run_prune`: rank 0 alone locks the folder, reads
and writes its files (``scores.partial.npz`` included) and selects; the ranks share the scoring
(:mod:`curlprune.run.prune_shard`; every step's with ``steps`` > 1), and a rerun with any number of
processes continues a partial file. Every rank returns (or raises rank 0's error) when rank 0 is done.

``resume`` reuses ``scores.npz`` when its fingerprint matches the current settings and is an error
when it does not (the message names the settings that differ): scores can take hours, so they are
never silently thrown away. Without ``resume``, a folder that already holds a run is an error.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.criteria import get
from curlprune.data.streaming import DataSettings, StreamingDataset
from curlprune.errors import CurlpruneError
from curlprune.models import ModelRef, build_reproducible, by_import_path, default_protect, input_spec
from curlprune.models.spec import InputSpec
from curlprune.models.transfer import at_input_size
from curlprune.recover.dist import DistContext, on_main, resolve_device
from curlprune.report import console
from curlprune.run.prune_config import PruneConfig, canonical_settings, scores_fingerprint, stage_identity
from curlprune.run.prune_core import Compute, prune_model
from curlprune.run.prune_shard import Lead
from curlprune.run.prune_data import load_images
from curlprune.store import (
    DONE_FILE,
    LOG_FILE,
    MODEL_FILE,
    PARTIAL_SCORES_FILE,
    PLAN_FILE,
    SCORES_FILE,
    PruneReport,
    RecordError,
    RunLock,
    append_jsonl,
    atomic_write_text,
    changed_fingerprint,
    changed_settings,
    optional_file_digest,
    read_prune_report,
    read_scores,
    restore_lost_line,
    write_done,
    write_prune_report,
    write_scores,
)
from curlprune.store import checkpoint
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
    model: nn.Module | None = field(default=None, repr=False)  # the pruned model (None when the run was already done)


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
    model_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    ctx: DistContext | None = None,
    data_settings: DataSettings | None = None,
) -> PruneResult | None:
    """Score, select and slice ``model_name`` (+ ``weights``) to ``config``'s target; save in ``out_dir``.

    Args:
        config: the stage's settings.
        out_dir: the stage folder (see the module docstring for what it holds).
        resume: reuse matching scores and skip a finished run with equal settings; without it a
            folder that already holds a run is an error.
        model_name: registry name of the unpruned model, or its import path (``mypkg.nets:MyNet``,
            ``path/to/file.py:build_fn``; :mod:`curlprune.models.import_path`).
        weights: its weights (file or torchvision weight name); None = random init.
        data: "digits", an ImageFolder folder or zip, or already loaded splits
            (``{"train": ImageDataset, "test": ...}``); data-free criteria (l1, bn, random) need none.
        num_classes: classifier outputs when not the model's default.
        show: print the progress bar and the per-group table.
        input_size: square input side when not the model's default (MACs, calibration and
            evaluation all follow it; :func:`curlprune.models.transfer.at_input_size`).
        model_kwargs: keyword arguments the model is built with (an import-path model's own).
        input_shape: ``[C, S, S]``, the input of a model named by import path (required for one).
        ctx: the torchrun ranks (:func:`curlprune.recover.dist.init_distributed`), when every rank
            calls this: rank 0 locks, reads and writes ``out_dir``, the ranks share the scoring
            (every step's, with ``steps`` > 1; docs/method.md §10); an error rank 0 finds is raised
            on every rank, and every rank returns only once rank 0 is done (a finished run found:
            at once, on every rank). None = one process.
        data_settings: whether a data folder or zip is decoded into memory or streamed
            (:class:`curlprune.data.streaming.DataSettings`; None = auto). Not part of the settings:
            both paths draw the same images.
    Returns:
        The :class:`PruneResult` (checkpoint path, plan, report); None on the ranks other than 0
        (also a finished run's result goes to rank 0 only).
    Raises:
        CurlpruneError: ``config.device`` is a CUDA device and there is none, ``out_dir`` is not a writable folder or is in use by another process, or
            lies inside a run directory in use (it is checked and locked,
            :class:`curlprune.store.runlock.RunLock`, before anything is loaded), bad
            settings, an unreachable target, missing data, stored scores computed with other
            settings, or a folder that already holds a run (without ``resume``).

    Source: docs/method.md §2 (the KL score) and §3 (selection, allocation).
    """
    check_value("num_classes", num_classes)  # before the folder is locked or anything is loaded
    ctx = ctx if ctx is not None and ctx.enabled else None
    resolve_device(config.device or "auto", ctx.local_rank if ctx else 0)  # --device cuda without CUDA: one line, nothing written
    lock = RunLock(out_dir)  # one process per folder, also when called from Python (issue 12); under torchrun rank 0's
    _on_main(ctx, lambda: bool(lock.acquire()))
    try:
        result = _run_prune(config, Path(out_dir), resume, model_name, weights, data, num_classes, show and _main(ctx), input_size,
                            dict(model_kwargs or {}), input_shape, ctx, data_settings)
    finally:
        lock.release()  # a no-op where not held
    return result if _main(ctx) else None


def _main(ctx: DistContext | None) -> bool:
    return ctx is None or ctx.is_main


def _on_main(ctx: DistContext | None, work):
    """``work()`` on rank 0, its result (or its error) on every rank; in one process just ``work()``."""
    return work() if ctx is None else on_main(ctx, work)


def _run_prune(config: PruneConfig, out: Path, resume: bool, model_name: str, weights: str | None,
               data: str | dict | None, num_classes: int | None, show: bool, input_size: int | None,
               model_kwargs: dict[str, Any], input_shape: list[int] | None, ctx: DistContext | None,
               data_settings: DataSettings | None = None) -> PruneResult | None:
    """:func:`run_prune` with ``out`` locked (by rank 0)."""
    settings = _settings(config, model_name, weights, data, num_classes)
    own = by_import_path(model_name)  # its build keywords and input are part of its identity, also when unset
    for key, value in (("input_size", input_size), ("model_kwargs", model_kwargs or None), ("input_shape", input_shape)):
        if value is not None or (own and key != "input_size"):  # else only when set: finished runs from before stay valid
            settings[key] = value
    finished = _on_main(ctx, lambda: _claim(out, resume, settings))  # rank 0 reads the folder; its error stops every rank
    if finished is not None:
        return finished
    criterion = get(config.criterion)
    if criterion.needs_data and data is None:
        raise CurlpruneError(f"criterion {config.criterion!r} needs data: pass --data (a dataset folder/zip, or 'digits')")

    model, spec, example = _build(model_name, weights, num_classes, input_size, model_kwargs, input_shape)

    def cache(images: torch.Tensor | None, compute: Compute, step: int, plan: Plan,
              ranks: DistContext | None) -> tuple[dict, bool, float]:
        fingerprint = scores_fingerprint(config, settings, images)
        if step > 1:  # iterative pruning: the scores of the model pruned by the earlier steps (scores_step<k>.npz)
            fingerprint.update(steps=config.resolved_steps(), step=step,
                               plan_sha256=hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest())
        return _scores(out, resume, fingerprint, config, compute, step_scores_file(step), ranks)

    lead = Lead(ctx) if ctx is not None else None
    pruned = prune_model(model, example, config, lambda: load_images(data, spec, config.seed, settings=data_settings), name=model_name,
                         weights=weights, default_protect=lambda m, groups: default_protect(model_name, m, groups),
                         cache=cache, show=show, ctx=ctx, lead=lead)
    if pruned is None:  # a rank other than 0: it shared the scorings and waited for rank 0's files (or raised its error)
        return None
    report = pruned.report
    ref = ModelRef(model_name, {**model_kwargs, **({"num_classes": num_classes} if num_classes else {})})
    with lead.leading() if lead is not None else nullcontext():
        checkpoint = _write_outputs(out, ref, example, pruned.plan, pruned.model, report, settings)
    if lead is not None:
        lead.done()  # the other ranks return once the files are written
    if show and report.latency is not None:
        _print_latency(report.latency)
    return PruneResult(out, checkpoint, pruned.plan, report, scores_reused=report.scores_reused or False, groups=pruned.groups,
                       model=pruned.model)


def _claim(out: Path, resume: bool, settings: dict[str, Any]) -> PruneResult | None:
    """The finished run in ``out`` with these settings (with ``resume``), else None when ``out`` may
    take this run; its "done" event, if a kill after done.json lost it, is restored (issue 18).

    Raises:
        CurlpruneError: ``out`` already holds a prune run and ``resume`` is not set.
    """
    finished = _finished(out, settings) if resume else None
    if finished is not None:
        restore_lost_line(out / LOG_FILE, out / DONE_FILE, {"event": "done", "checkpoint": MODEL_FILE},
                          lambda event: event.get("event") == "done", last_only=True)
        return finished
    if not resume and any((out / name).exists() for name in (SCORES_FILE, PARTIAL_SCORES_FILE, MODEL_FILE, DONE_FILE)):
        raise CurlpruneError(f"{out} already holds a prune run: pass --resume to reuse its scores, or choose another --out")
    return None


def _settings(config: PruneConfig, model_name: str, weights: str | None, data: Any, num_classes: int | None) -> dict[str, Any]:
    """Everything that defines the stage's outputs (done.json; a rerun with equal settings is a no-op)."""
    return {
        "model": model_name,
        "weights": weights,
        "weights_sha256": optional_file_digest(weights),
        "num_classes": num_classes,
        "data": data if isinstance(data, str) or data is None else _splits_digest(data),
        "config": stage_identity(config),  # not the device: where, not what (docs/method.md §10)
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
    """A short identity of loaded splits (sizes, classes and a sample of labels/pixels).

    A streamed split (:class:`~curlprune.data.streaming.StreamingDataset`) decodes the same sample of
    images and hashes it when they share one size, as an in-memory split of one size does: the
    identity does not depend on the path the data was read by."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        ds = splits[name]
        digest.update(f"{name}:{len(ds)}:{ds.classes}".encode())
        digest.update(ds.labels.numpy().tobytes())
        if ds.uniform:
            digest.update(ds.images[:: max(1, len(ds) // 64)].numpy().tobytes())
        elif isinstance(ds, StreamingDataset):
            sample = [ds[i][0] for i in range(0, len(ds), max(1, len(ds) // 64))]
            if len({tuple(image.shape) for image in sample}) == 1:
                digest.update(torch.stack(sample).numpy().tobytes())
    return digest.hexdigest()[:16]


def _build(model_name: str, weights: str | None, num_classes: int | None, input_size: int | None,
           model_kwargs: dict[str, Any], input_shape: list[int] | None) -> tuple[nn.Module, InputSpec, torch.Tensor]:
    spec = at_input_size(input_spec(model_name, weights, num_classes, input_shape=input_shape, model_kwargs=model_kwargs), input_size)
    model = build_reproducible(model_name, weights=weights, num_classes=num_classes, **model_kwargs).eval()  # no weights: one random init
    return model, spec, torch.zeros(1, spec.channels, spec.size, spec.size)


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


def step_scores_file(step: int) -> str:
    """The scores file of iterative pruning's step ``step``: ``scores.npz`` for step 1 (the unpruned
    model's scores, the same as one shot's: they do not depend on ``steps``), ``scores_step<k>.npz``
    for the model pruned by steps 1..k-1 (its fingerprint adds steps, k and the plan's digest)."""
    return SCORES_FILE if step == 1 else f"scores_step{step}.npz"


def _scores(out: Path, resume: bool, fingerprint: dict, config: PruneConfig, compute: Compute, name: str = SCORES_FILE,
            ctx: DistContext | None = None) -> tuple[dict[str, np.ndarray], bool, float]:
    """Reuse matching scores from ``name`` (``scores.npz`` or an iterative step's file; with ``resume``)
    or compute and save them.

    While a per-group criterion (``kl``) scores, the groups finished so far are saved after each
    block in the partial file next to ``name`` (``scores.partial.npz``, atomically, with the
    fingerprint); with ``resume`` a partial file with the same fingerprint is continued (only the
    remaining groups are scored) and one with another fingerprint is an error, as for ``scores.npz``.
    The partial file is removed once ``name`` is written. Under torchrun (``ctx``) rank 0 alone reads
    and writes the files and sends what it found to the others, which score their share of the rest.
    Source: docs/method.md §10.
    """
    path = out / name
    partial = out / (PARTIAL_SCORES_FILE if name == SCORES_FILE else name.replace(".npz", ".partial.npz"))

    def stored() -> dict[str, Any]:  # rank 0: the scores to reuse, or the finished groups to continue from
        if resume and path.is_file():
            return {"reused": _matching(path, fingerprint)[0]}
        return {"done": _matching(partial, fingerprint)[0] if resume and partial.is_file() else {}}

    found = _on_main(ctx, stored)
    main = _main(ctx)
    if "reused" in found:
        if main:
            append_jsonl(out / LOG_FILE, {"event": "scores", "source": "reused", "file": name}, stamp=True)
        return found["reused"], True, 0.0
    done = found["done"]
    started = time.time()
    split: dict[str, Any] = {}
    scores = compute(dict(done), (lambda finished: write_scores(partial, finished, fingerprint)) if main else None, split)
    seconds = time.time() - started
    if not main:
        return scores, False, seconds
    write_scores(path, scores, fingerprint)
    partial.unlink(missing_ok=True)
    resumed = [group for group in scores if group in done]
    append_jsonl(out / LOG_FILE, {"event": "scores", "source": "computed", "criterion": config.criterion, "seconds": round(seconds, 2),
                                  "device": str(resolve_device(config.device or "auto", ctx.local_rank if ctx else 0)),
                                  "groups_resumed": len(resumed), "groups_scored": len(scores) - len(resumed),
                                  "channels_scored": int(sum(len(v) for group, v in scores.items() if group not in done)),
                                  **split, **({} if name == SCORES_FILE else {"file": name})}, stamp=True)
    return scores, False, seconds


def _matching(path: Path, fingerprint: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The scores in ``path`` (``scores.npz`` or its partial file) when their fingerprint matches ``fingerprint``.

    Raises:
        CurlpruneError: unreadable, or computed with other settings (the message names them).
    """
    stored, stored_fp = read_scores(path)
    differ = changed_fingerprint(stored_fp, fingerprint)
    if differ:
        raise CurlpruneError(
            f"{path} was computed with other settings ({'; '.join(differ)[:300]}): delete it to score again, or choose another --out"
        )
    return stored, stored_fp


def _write_outputs(out: Path, ref: ModelRef, example: torch.Tensor, plan: Plan,
                   pruned: nn.Module, report: PruneReport, settings: dict) -> Path:
    atomic_write_text(out / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    written = report.to_json()
    checkpoint.save(out / MODEL_FILE, ref, plan, pruned.state_dict(),
         input_shape=list(example.shape), extra={"prune": {k: written[k] for k in ("criterion", "allocation", "selection", "accuracy")},
                "model_class": report.model_class})
    write_prune_report(out, report)
    log = out / LOG_FILE
    append_jsonl(log, {"event": "selection", **{k: report.selection[k] for k in ("top_k", "removed_channels", "macs", "params", "macs_ratio", "params_ratio", "latency") if k in report.selection}}, stamp=True)
    if report.accuracy.test_images:
        append_jsonl(log, {"event": "eval", **written["accuracy"]}, stamp=True)
    write_done(out, {"settings": settings})
    append_jsonl(log, {"event": "done", "checkpoint": MODEL_FILE}, stamp=True)
    return out / MODEL_FILE
