"""Typed records of a run folder's JSON files, with one reader and one writer each.

    PruneReport    ``report.json`` of the prune stage (``<run_dir>/prune/``, or a ``curlprune prune --out`` folder)
    StageSummary   ``done.json`` of a training stage (``<run_dir>/<stage>/``; also the ``summary`` metadata
                   of that folder's ``model.safetensors``)
    RunSummary     ``summary.json`` at the run root (with a :class:`PruneStep` or :class:`TrainStep` per stage)

A writer writes exactly the JSON that earlier versions wrote (same keys, key order and form,
:func:`curlprune.store.rundir.write_json`), so run folders written before keep resuming without a byte
changed. A reader takes the files of earlier versions: a key a file lacks reads as None, and so
does a value of the wrong type (a damaged or hand-edited file), so that the consumers (the
pipeline, :mod:`curlprune.report.figures`) test for None only. File names are :mod:`curlprune.store.rundir`'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from curlprune.errors import CurlpruneError
from curlprune.store.rundir import DONE_FILE, PRUNE_STAGE, REPORT_FILE, SUMMARY_FILE, write_done, write_json

__all__ = [
    "GroupWidth", "PruneAccuracy", "PruneReport", "PruneStep", "RecordError", "RunSummary", "StageSummary", "TrainStep",
    "read_prune_report", "read_run_summary", "read_stage_summary", "write_prune_report", "write_run_summary",
    "write_stage_summary",
]


class RecordError(CurlpruneError):
    """A record's file is missing, not readable JSON, or not a JSON object.

    Attributes:
        path: the file.
        reason: ``"missing"``, ``"unreadable"`` (an I/O error, not UTF-8, or not JSON) or ``"not-object"``.
        cause: the exception behind ``missing`` / ``unreadable`` (None for ``not-object``).
    The message is one line: the file, what is wrong, and to delete its folder to run the stage again.
    """

    def __init__(self, path: Path, reason: str, cause: BaseException | None = None) -> None:
        self.path, self.reason, self.cause = path, reason, cause
        problem = f"cannot be read ({cause})" if cause is not None else "is not a JSON object"
        super().__init__(f"{path} {problem}: delete {path.parent} to run the stage again")


def _read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        RecordError: the file is missing, unreadable or not a JSON object.
    """
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(path, "unreadable" if path.is_file() else "missing", exc) from None
    if not isinstance(value, dict):
        raise RecordError(path, "not-object")
    return value


def _number(value: Any) -> Any:
    """``value`` when it is a number (int or float), else None."""
    return value if isinstance(value, (int, float)) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


# ----- prune/report.json ------------------------------------------------------------------------
@dataclass
class GroupWidth:
    """One prunable channel group of the report: ``kind`` ("inside" or "outside"), its width
    ``before`` pruning and the channels kept ``after`` (counts)."""

    kind: str | None
    before: int | None
    after: int | None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "before": self.before, "after": self.after}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> GroupWidth:
        return cls(_text(value.get("kind")), _number(value.get("before")), _number(value.get("after")))


@dataclass
class PruneAccuracy:
    """Test top-1 of the prune stage, without any training.

    test_images:   images evaluated (0: no test split, or evaluation turned off).
    top1_before, top1_after: top-1 in % of the unpruned and the sliced model (None without images).
    bn_images:     training images the pruned model's batch-norm statistics were re-estimated on
                   (0: off, no training images or no BN layer; None: a report from before the step existed).
    top1_after_bn: top-1 in % of the pruned model after the re-estimation (the saved model); None
                   without test images or without the re-estimation.
    The last two are left out of the file while None (reports written before them read back equal).
    """

    test_images: int | None = 0
    top1_before: float | None = None
    top1_after: float | None = None
    bn_images: int | None = None
    top1_after_bn: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"test_images": self.test_images, "top1_before": self.top1_before, "top1_after": self.top1_after}
        if self.bn_images is not None:
            out.update(bn_images=self.bn_images, top1_after_bn=self.top1_after_bn)
        return out

    @property
    def top1_final(self) -> float | None:
        """Top-1 % of the model the stage saved: after the BN re-estimation when there was one, else as sliced."""
        return self.top1_after_bn if self.top1_after_bn is not None else self.top1_after

    @classmethod
    def from_json(cls, value: Any) -> PruneAccuracy:
        value = value if isinstance(value, Mapping) else {}
        return cls(*(_number(value.get(k)) for k in ("test_images", "top1_before", "top1_after", "bn_images", "top1_after_bn")))


@dataclass
class PruneReport:
    """What the prune stage did (``report.json``).

    model, weights: the unpruned model's registry name and weights (file or weight name; None = random init).
    criterion:      the scoring criterion's name.
    allocation:     the allocation select ranked by; None in reports from before allocations existed
                    (they ranked raw scores, ``"paper"``); left out of the file while None.
    selection:      :meth:`curlprune.select.search.Selection.as_dict` (or the latency search's): target, top_k,
                    MACs and params before/after and their ratios, protected groups, ``latency`` when measured.
    accuracy:       :class:`PruneAccuracy`.
    groups:         group name -> :class:`GroupWidth`, for every prunable group; None when the file has none.
    scores_seconds: seconds spent scoring (0 when reused).   scores_reused: the scores came from scores.npz.
    model_class:    ``{"class", "kept", "reason"}``: whether the saved pruned model is of the model's own
                    class or a torch.fx GraphModule, and why not (:meth:`curlprune.surgery.keep_class.Sliced.as_dict`);
                    None in reports from before it existed (left out of the file while None).
    """

    model: str | None
    weights: str | None
    criterion: str | None
    allocation: str | None
    selection: dict[str, Any] = field(default_factory=dict)
    accuracy: PruneAccuracy = field(default_factory=PruneAccuracy)
    groups: dict[str, GroupWidth] | None = None
    scores_seconds: float | None = None
    scores_reused: bool | None = None
    model_class: dict[str, Any] | None = None

    @property
    def macs_ratio(self) -> float | None:
        """The pruned model's MACs as a fraction of the unpruned model's."""
        return _number(self.selection.get("macs_ratio"))

    @property
    def params_ratio(self) -> float | None:
        """The pruned model's parameters as a fraction of the unpruned model's."""
        return _number(self.selection.get("params_ratio"))

    @property
    def latency(self) -> dict[str, Any] | None:
        """The measured latency (latency target only): ``achieved_fraction``, ``achieved_ms``,
        ``reference_ms`` (ms per batch), ``batch``, ``threads``, ...; None when not measured."""
        return _mapping(self.selection.get("latency"))

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object (key order as written since 0.1.0; ``allocation`` only when set)."""
        out: dict[str, Any] = {"model": self.model, "weights": self.weights, "criterion": self.criterion}
        if self.allocation is not None:
            out["allocation"] = self.allocation
        out.update(selection=self.selection, accuracy=self.accuracy.to_json(),
                   groups={name: g.to_json() for name, g in (self.groups or {}).items()},
                   scores_seconds=self.scores_seconds, scores_reused=self.scores_reused)
        if self.model_class is not None:
            out["model_class"] = self.model_class
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> PruneReport:
        """The report in a JSON object; group entries that are not objects are left out."""
        groups = value.get("groups")
        return cls(
            model=_text(value.get("model")),
            weights=_text(value.get("weights")),
            criterion=_text(value.get("criterion")),
            allocation=_text(value.get("allocation")),
            selection=_mapping(value.get("selection")) or {},
            accuracy=PruneAccuracy.from_json(value.get("accuracy")),
            groups={n: GroupWidth.from_json(g) for n, g in groups.items() if isinstance(g, Mapping)} if isinstance(groups, Mapping) else None,
            scores_seconds=_number(value.get("scores_seconds")),
            scores_reused=value.get("scores_reused") if isinstance(value.get("scores_reused"), bool) else None,
            model_class=_mapping(value.get("model_class")),
        )


def read_prune_report(folder: str | os.PathLike) -> PruneReport:
    """The prune report ``folder/report.json``.

    Raises:
        RecordError: the file is missing, unreadable or not a JSON object.
    """
    return PruneReport.from_json(_read_object(Path(folder) / REPORT_FILE))


def write_prune_report(folder: str | os.PathLike, report: PruneReport) -> None:
    """Write ``folder/report.json`` atomically (:func:`curlprune.store.rundir.write_json`)."""
    write_json(Path(folder) / REPORT_FILE, report.to_json())


# ----- <stage>/done.json ------------------------------------------------------------------------
@dataclass
class StageSummary:
    """A finished training stage (its ``done.json``, the marker written last).

    stage:      the stage folder's name.
    last_top1:  test top-1 in % after the last epoch.   best_top1: the best over the epochs (%).
    epochs:     completed epochs.   seconds: training time, summed over the epochs.
    config:     the result-defining settings (:func:`curlprune.recover.stage.settings`); a rerun
                compares them before it skips the stage.
    val_top1:   validation top-1 in % of the stage's output model (None: no validation split).
    best_val_top1: the best validation top-1 over the epochs (%).
    best_epoch: with early stopping, the epoch whose weights are the output (then ``last_top1`` and
                ``val_top1`` are that epoch's, and ``epochs`` counts the epochs run); None without it.
    The last three are in the file only when set, so summaries without them read as before.
    """

    stage: str | None
    last_top1: float | None
    best_top1: float | None
    epochs: int | None
    seconds: float | None
    config: dict[str, Any] | None
    val_top1: float | None = None
    best_val_top1: float | None = None
    best_epoch: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"stage": self.stage, "last_top1": self.last_top1, "best_top1": self.best_top1, "epochs": self.epochs,
               "seconds": self.seconds, "config": self.config}
        optional = {"val_top1": self.val_top1, "best_val_top1": self.best_val_top1, "best_epoch": self.best_epoch}
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> StageSummary:
        return cls(_text(value.get("stage")), _number(value.get("last_top1")), _number(value.get("best_top1")),
                   _number(value.get("epochs")), _number(value.get("seconds")), _mapping(value.get("config")),
                   _number(value.get("val_top1")), _number(value.get("best_val_top1")), _number(value.get("best_epoch")))


def read_stage_summary(stage_dir: str | os.PathLike) -> StageSummary:
    """The summary of a finished training stage, ``stage_dir/done.json``.

    Raises:
        RecordError: the file is missing, unreadable or not a JSON object.
    """
    return StageSummary.from_json(_read_object(Path(stage_dir) / DONE_FILE))


def write_stage_summary(stage_dir: str | os.PathLike, summary: StageSummary) -> None:
    """Write ``stage_dir/done.json``: the finished-stage marker, last (:func:`curlprune.store.rundir.write_done`)."""
    write_done(stage_dir, summary.to_json())


# ----- summary.json -----------------------------------------------------------------------------
@dataclass
class PruneStep:
    """The prune stage in the run summary: ``criterion``, the pruned model's ``macs_ratio`` and
    ``params_ratio`` (fractions of the unpruned), test top-1 % ``top1_before`` / ``top1_after``
    (unpruned / sliced without training; None without a test split), its ``checkpoint`` path, and
    ``top1_after_bn``: top-1 % after the BN re-estimation (the saved model; None without it, and
    left out of the file then)."""

    criterion: str | None
    macs_ratio: float | None
    params_ratio: float | None
    top1_before: float | None
    top1_after: float | None
    checkpoint: str | None
    top1_after_bn: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"criterion": self.criterion, "macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio,
               "top1_before": self.top1_before, "top1_after": self.top1_after, "checkpoint": self.checkpoint}
        return out if self.top1_after_bn is None else {**out, "top1_after_bn": self.top1_after_bn}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> PruneStep:
        return cls(_text(value.get("criterion")), _number(value.get("macs_ratio")), _number(value.get("params_ratio")),
                   _number(value.get("top1_before")), _number(value.get("top1_after")), _text(value.get("checkpoint")),
                   _number(value.get("top1_after_bn")))


@dataclass
class TrainStep:
    """A training stage in the run summary: ``epochs``, test top-1 % ``last_top1`` / ``best_top1``,
    ``seconds`` of training (1 decimal) and the stage's curlprune ``checkpoint`` path; with a
    validation split ``val_top1`` (% of the output model) and with early stopping ``best_epoch``
    (both in the file only when set)."""

    epochs: int | None
    last_top1: float | None
    best_top1: float | None
    seconds: float | None
    checkpoint: str | None
    val_top1: float | None = None
    best_epoch: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"epochs": self.epochs, "last_top1": self.last_top1, "best_top1": self.best_top1, "seconds": self.seconds,
               "checkpoint": self.checkpoint}
        out.update({k: v for k, v in (("val_top1", self.val_top1), ("best_epoch", self.best_epoch)) if v is not None})
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> TrainStep:
        return cls(_number(value.get("epochs")), _number(value.get("last_top1")), _number(value.get("best_top1")),
                   _number(value.get("seconds")), _text(value.get("checkpoint")), _number(value.get("val_top1")),
                   _number(value.get("best_epoch")))


@dataclass
class RunSummary:
    """A finished run (``summary.json``).

    model:                  the unpruned model's registry name.
    stages:                 stage name -> :class:`PruneStep` (``prune``) or :class:`TrainStep`, in run order.
    macs, params:           the final model's (paper convention, :func:`curlprune.cost.cost.count`).
    base_macs, base_params: the unpruned model's.   macs_ratio, params_ratio: final / unpruned.
    checkpoint:             the final model's path (``<run_dir>/model.safetensors``).
    unpruned_top1, pruned_top1: test top-1 % before any recovery; in the file when the run pruned.
    last_top1, best_top1:   test top-1 % after the last training stage, and the best of the training
                            stages of the pruned model (those after ``prune``: a fine-tuning of the
                            unpruned model before it does not count); in the file when a training
                            stage ran.
    """

    model: str | None
    stages: dict[str, PruneStep | TrainStep]
    macs: float | None
    params: float | None
    base_macs: float | None
    base_params: float | None
    macs_ratio: float | None
    params_ratio: float | None
    checkpoint: str | None
    unpruned_top1: float | None = None
    pruned_top1: float | None = None
    last_top1: float | None = None
    best_top1: float | None = None

    @classmethod
    def build(cls, model: str, stages: Mapping[str, PruneStep | TrainStep], cost: tuple[float, float],
              base_cost: tuple[float, float], checkpoint: str) -> RunSummary:
        """The summary of a run's stage records and the final and unpruned ``(MACs, params)``
        (ratios, and the accuracies before and after recovery, derived from them)."""
        (macs, params), (base_macs, base_params) = cost, base_cost
        pruned = [s for s in stages.values() if isinstance(s, PruneStep)]
        names = list(stages)
        after_prune = names[names.index(PRUNE_STAGE) + 1 :] if PRUNE_STAGE in stages else names
        trained = [stages[n] for n in after_prune if isinstance(stages[n], TrainStep)]
        return cls(model, dict(stages), macs, params, base_macs, base_params, macs / base_macs, params / base_params, checkpoint,
                   unpruned_top1=pruned[0].top1_before if pruned else None, pruned_top1=pruned[0].top1_after if pruned else None,
                   last_top1=trained[-1].last_top1 if trained else None,
                   best_top1=max(s.best_top1 for s in trained) if trained else None)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object (what :meth:`curlprune.run.pipeline.Run.run` returns)."""
        out: dict[str, Any] = {"model": self.model, "stages": {name: s.to_json() for name, s in self.stages.items()},
                               "macs": self.macs, "params": self.params, "base_macs": self.base_macs,
                               "base_params": self.base_params, "macs_ratio": self.macs_ratio,
                               "params_ratio": self.params_ratio, "checkpoint": self.checkpoint}
        if any(isinstance(s, PruneStep) for s in self.stages.values()):
            out.update(unpruned_top1=self.unpruned_top1, pruned_top1=self.pruned_top1)
        if any(isinstance(s, TrainStep) for s in self.stages.values()):
            out.update(last_top1=self.last_top1, best_top1=self.best_top1)
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RunSummary:
        """The summary in a JSON object; stage entries that are not objects are left out."""
        stages = value.get("stages") if isinstance(value.get("stages"), Mapping) else {}
        steps = {name: (PruneStep if name == PRUNE_STAGE else TrainStep).from_json(step)
                 for name, step in stages.items() if isinstance(step, Mapping)}
        numbers = {key: _number(value.get(key)) for key in ("macs", "params", "base_macs", "base_params", "macs_ratio",
                                                            "params_ratio", "unpruned_top1", "pruned_top1", "last_top1", "best_top1")}
        return cls(model=_text(value.get("model")), stages=steps, checkpoint=_text(value.get("checkpoint")), **numbers)


def read_run_summary(run_dir: str | os.PathLike) -> RunSummary:
    """The summary of a finished run, ``run_dir/summary.json``.

    Raises:
        RecordError: the file is missing, unreadable or not a JSON object.
    """
    return RunSummary.from_json(_read_object(Path(run_dir) / SUMMARY_FILE))


def write_run_summary(run_dir: str | os.PathLike, summary: RunSummary) -> None:
    """Write ``run_dir/summary.json`` atomically, and only when its text changes (a rerun of a
    finished run rewrites nothing)."""
    write_json(Path(run_dir) / SUMMARY_FILE, summary.to_json(), only_if_changed=True)
