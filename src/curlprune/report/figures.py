"""Figures of a run directory, and ``write_report(run_dir)``: ``RUN_DIR/report/index.md`` + PNGs.

Reads what the stages wrote (nothing is recomputed):

* prune: ``report.json`` (kept width per group, selection, accuracy, latency when measured),
  ``scores.npz`` (per-channel scores) and ``plan.json`` (kept channels), in ``RUN_DIR/prune/`` of a
  pipeline run or directly in ``RUN_DIR`` of a ``curlprune prune --out RUN_DIR`` run;
* recovery stages: ``<stage>/metrics.jsonl`` (one line per epoch: loss, train/test top-1 %), or
  ``RUN_DIR/metrics.jsonl`` of a single-stage run;
* ``summary.json`` (pipeline: top-1 of the unpruned, pruned and recovered model, MACs, params).

Every figure is built from its own files; a missing or damaged file leaves that figure out and
``index.md`` says which file and why. Figures are drawn with matplotlib's Agg backend (headless);
every file is written atomically, and only when its bytes change (a rerun rewrites nothing).
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from curlprune.errors import CurlpruneError
from curlprune.recover.registry import stage_names
from curlprune.report.group_figures import _Missing, _pyplot, figure_scores, figure_widths
from curlprune.store import (
    METRICS_FILE,
    PLAN_FILE,
    PRUNE_STAGE,
    REPORT_FILE,
    RUN_MARKERS,
    SCORES_FILE,
    SUMMARY_FILE,
    PruneReport,
    RecordError,
    RunSummary,
    TrainStep,
    atomic_write,
    holds_run,
    read_metrics,
    read_prune_report,
    read_run_summary,
    read_stage_summary,
)

REPORT_DIR = "report"


@dataclass
class RunFiles:
    """The readable parts of a run directory (each loaded on demand; errors become notes)."""

    root: Path
    notes: list[str] = field(default_factory=list)

    @property
    def prune_dir(self) -> Path:
        return self.root / PRUNE_STAGE if (self.root / PRUNE_STAGE).is_dir() else self.root

    def json(self, path: Path) -> Any:
        if not path.is_file():
            raise _Missing(f"{self._rel(path)} is missing")
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Missing(f"{self._rel(path)} is not readable JSON ({_short(exc)})") from None

    def _record(self, read: Callable[[Path], Any], folder: Path) -> Any:
        """``read(folder)``, a reader of :mod:`curlprune.store.records`; None when the file is not a JSON object.

        Raises:
            _Missing: the file is missing or not readable JSON (the note says which)."""
        try:
            return read(folder)
        except RecordError as exc:
            if exc.reason == "not-object":
                return None
            problem = "is missing" if exc.reason == "missing" else f"is not readable JSON ({_short(exc.cause)})"
            raise _Missing(f"{self._rel(exc.path)} {problem}") from None

    def prune_report(self) -> PruneReport:
        """The prune stage's report, with its per-group widths."""
        report = self._record(read_prune_report, self.prune_dir)
        if report is None or report.groups is None:
            raise _Missing(f"{self._rel(self.prune_dir / REPORT_FILE)} has no per-group widths")
        return report

    def run_summary(self) -> RunSummary | None:
        """The run's summary; None without one (a prune or stage folder) or when it is not a JSON object."""
        return self._record(read_run_summary, self.root) if (self.root / SUMMARY_FILE).is_file() else None

    def scores(self) -> dict[str, np.ndarray]:
        path = self.prune_dir / SCORES_FILE
        if not path.is_file():
            raise _Missing(f"{self._rel(path)} is missing")
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {k: np.asarray(stored[k], dtype=np.float64) for k in stored.files if not k.startswith("__")}
        except Exception as exc:  # a damaged zip raises many kinds (BadZipFile, ValueError, EOFError, OSError)
            raise _Missing(f"{self._rel(path)} is not a readable scores file ({_short(exc)})") from None

    def plan(self) -> dict[str, list[int]]:
        plan = self.json(self.prune_dir / PLAN_FILE)
        if not isinstance(plan, dict):
            raise _Missing(f"{self._rel(self.prune_dir / PLAN_FILE)} is not a plan (group -> kept channels)")
        return plan

    def metrics(self) -> dict[str, list[dict]]:
        """Per recovery stage found (:func:`curlprune.recover.registry.stage_names`): its epoch records
        (unreadable lines are skipped with a note)."""
        found: dict[str, list[dict]] = {}
        candidates = [(stage, self.root / stage / METRICS_FILE) for stage in stage_names()]
        if (self.root / METRICS_FILE).is_file():
            candidates.append((self._single_stage_name(), self.root / METRICS_FILE))
        for stage, path in candidates:
            if not path.is_file():
                continue
            try:
                records, bad = read_metrics(path)
            except (OSError, UnicodeDecodeError) as exc:
                self.notes.append(f"training curves of {stage}: {self._rel(path)} is not readable ({_short(exc)})")
                continue
            if bad:
                self.notes.append(f"training curves of {stage}: {bad} unreadable line(s) of {self._rel(path)} were skipped")
            if records:
                found[stage] = records
            else:
                self.notes.append(f"training curves of {stage}: {self._rel(path)} has no epoch records")
        return found

    def _single_stage_name(self) -> str:
        """The stage of a stage folder itself: its ``done.json`` names it (else "training")."""
        try:
            stage = read_stage_summary(self.root).stage
        except RecordError:
            stage = None
        return stage if stage is not None else "training"

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


# ---------------------------------------------------------------------------------------------- figures


def figure_training(stage: str, records: list[dict]):
    """Loss, and train/test (and validation) top-1 (%) per epoch of one recovery stage."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=100)
    epochs = [r["epoch"] for r in records]

    def series(key: str):
        pairs = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return ([e for e, _ in pairs], [v for _, v in pairs]) if pairs else ([], [])

    loss_ax.plot(*series("loss"), marker="o", ms=3, color="C0")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title(f"{stage}: loss")
    for key, label, colour in (("train_top1", "train top-1", "C1"), ("test_top1", "test top-1", "C2"), ("val_top1", "val top-1", "C3")):
        xs, ys = series(key)
        if xs:
            acc_ax.plot(xs, ys, marker="o", ms=3, color=colour, label=label)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("top-1 (%)")
    acc_ax.set_title(f"{stage}: accuracy")
    acc_ax.legend(fontsize=7)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.tight_layout()
    return fig


def summary_numbers(run: RunFiles) -> dict[str, Any]:
    """Top-1 (%) by step, and the pruned model's MACs / params / latency as fractions of the unpruned.

    From summary.json (pipeline; :class:`~curlprune.store.records.RunSummary`) when present, else from the prune
    report.json (:class:`~curlprune.store.records.PruneReport`). The top-1 steps are in time order:
    unpruned, then each stage as it ran (the prune stage as sliced and after the BN re-estimation)."""
    top1: dict[str, float] = {}
    ratios: dict[str, float] = {}
    val: dict[str, float] = {}  # validation top-1 (%) after each training stage (runs with a validation split)
    latency: dict[str, Any] | None = None
    summary = None
    try:
        summary = run.run_summary()
    except _Missing as exc:
        run.notes.append(f"summary: {exc}")
    report = None
    try:
        report = run.prune_report()
    except _Missing:
        pass
    pruned = lambda raw, bn: (("pruned, no training", raw), ("pruned, BN re-estimated", bn))  # noqa: E731
    if summary is not None:  # in time order: a fine-tuning before the prune stage comes before it
        _put(top1, [("unpruned", summary.unpruned_top1)] + [kv for name, step in summary.stages.items() for kv in (
            [(f"after {name}", step.last_top1)] if isinstance(step, TrainStep) else pruned(summary.pruned_top1, step.top1_after_bn))])
        _put(ratios, (("MACs", summary.macs_ratio), ("params", summary.params_ratio)))
        _put(val, ((f"after {name}", step.val_top1) for name, step in summary.stages.items() if isinstance(step, TrainStep)))
    elif report is not None:
        _put(top1, (("unpruned", report.accuracy.top1_before), *pruned(report.accuracy.top1_after, report.accuracy.top1_after_bn)))
    if report is not None:  # what summary.json does not give
        _put(ratios, (("MACs", report.macs_ratio), ("params", report.params_ratio)))
        latency = report.latency
        if latency is not None and isinstance(latency.get("achieved_fraction"), (int, float)):
            ratios["latency"] = float(latency["achieved_fraction"])
    if not top1 and not ratios:
        raise _Missing(f"neither {SUMMARY_FILE} nor the prune {REPORT_FILE} gives accuracy or cost")
    return {"top1": top1, "ratios": ratios, "latency": latency, "val_top1": val}


def _put(into: dict[str, float], pairs: Iterable[tuple[str, float | None]]) -> None:
    """``into[label] = value`` for each pair with a value whose label ``into`` lacks."""
    for label, value in pairs:
        if label not in into and value is not None:
            into[label] = float(value)


def figure_summary(run: RunFiles):
    """Top-1 by step (left) and MACs / params / measured latency of the result vs the unpruned (right)."""
    numbers = summary_numbers(run)
    plt = _pyplot()
    fig, (acc_ax, cost_ax) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    top1 = numbers["top1"]
    bars = acc_ax.bar(range(len(top1)), list(top1.values()), color=[f"C{i}" for i in range(len(top1))])
    acc_ax.bar_label(bars, fmt="%.1f", fontsize=7)
    acc_ax.set_xticks(range(len(top1)), list(top1), rotation=20, fontsize=7)
    acc_ax.set_xlabel("model")
    acc_ax.set_ylabel("test top-1 (%)")
    acc_ax.set_title("accuracy")
    ratios = numbers["ratios"]
    bars = cost_ax.bar(range(len(ratios)), list(ratios.values()), color="C7")
    cost_ax.bar_label(bars, fmt="%.3f", fontsize=7)
    cost_ax.axhline(1.0, color="k", lw=0.8)
    cost_ax.set_xticks(range(len(ratios)), list(ratios), fontsize=8)
    cost_ax.set_xlabel("cost")
    cost_ax.set_ylabel("fraction of the unpruned model")
    cost_ax.set_title("MACs / params / measured latency")
    cost_ax.set_ylim(0, max([1.05, *ratios.values()]) if ratios else 1.05)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Figures:
    """The figures of a run (name -> matplotlib Figure, with a caption) and notes on what is left out."""

    figures: dict[str, Any]
    captions: dict[str, str]
    notes: list[str]
    summary: dict[str, Any] | None = None

    def close(self) -> None:
        plt = _pyplot()
        for fig in self.figures.values():
            plt.close(fig)


def build_figures(run_dir: str | Path) -> Figures:
    """All figures a run directory allows; a part it cannot read is a note, never an exception.

    Args:
        run_dir: a pipeline run directory (``curlprune run``) or a stage's ``--out`` folder.

    Returns:
        :class:`Figures`: ``widths``, ``scores``, ``summary`` and ``training-<stage>`` figures that could be
        drawn, their captions and the notes on the rest.

    Raises:
        CurlpruneError: ``run_dir`` is not a directory.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise CurlpruneError(f"run directory {root} does not exist: pass the --out / run_dir of a curlprune run")
    run = RunFiles(root)
    figures: dict[str, Any] = {}
    captions: dict[str, str] = {}

    def attempt(name: str, what: str, caption: str, make: Callable[[], Any]) -> None:
        try:
            figures[name] = make()
            captions[name] = caption
        except _Missing as exc:
            run.notes.append(f"{what}: left out, {exc}")
        except Exception as exc:  # a damaged file can fail in many ways inside a plot: report, do not crash
            run.notes.append(f"{what}: left out, drawing failed ({type(exc).__name__}: {_short(exc)})")

    attempt("widths", "kept width per group", "Kept channels per prunable group (outline: width before pruning; "
            "blue: inside groups, orange: outside groups that span a residual stream).", lambda: figure_widths(run))
    attempt("scores", "score distribution", "Every channel's score by group on a log scale, kept (green) and removed "
            "(red), with the highest removed score as a dashed line: the cut of the paper allocation; the cost-weighted allocation "
            "ranks score / cost saved, so kept channels of cheap groups can lie below it (zeros are drawn at a tenth of the "
            "smallest positive score).",
            lambda: figure_scores(run))
    metrics = {}
    try:
        metrics = run.metrics()
    except Exception as exc:  # noqa: BLE001 - the report must not crash on a damaged folder
        run.notes.append(f"training curves: left out ({type(exc).__name__}: {_short(exc)})")
    if not metrics:
        run.notes.append("training curves: no recovery stage (finetune/distill/refine metrics.jsonl) in this run")
    for stage, records in metrics.items():
        attempt(f"training-{stage}", f"training curves of {stage}",
                f"{stage}: training loss and train/test top-1 per epoch.", lambda s=stage, r=records: figure_training(s, r))
    summary = None
    try:
        summary = summary_numbers(run)
    except _Missing:
        pass
    attempt("summary", "accuracy / MACs / latency summary", "Test top-1 at each step, and the result's MACs, params "
            "and (when measured) latency as fractions of the unpruned model.", lambda: figure_summary(run))
    return Figures(figures, captions, run.notes, summary)


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report/index.md`` and one PNG per figure; returns the index path.

    A missing or damaged part of the run is left out and ``index.md`` says which file and why.
    Files are written atomically (a reader never sees half a PNG or index).

    Raises:
        CurlpruneError: ``run_dir`` is not a directory, or holds no curlprune run
            (:func:`curlprune.store.rundir.holds_run`: a dataset or an unrelated folder; nothing is written).
    """
    root = Path(run_dir)
    if root.is_dir() and not holds_run(root):
        raise CurlpruneError(f"{root} holds no curlprune run (no {', '.join(RUN_MARKERS[:-1])} or {RUN_MARKERS[-1]}): "
                             "point it at a run folder (the --out of curlprune run, prune or a training stage, e.g. runs/demo)")
    built = build_figures(root)
    out = root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report: {root.resolve().name}", ""]
    lines += _summary_lines(built.summary)
    try:
        for name, fig in built.figures.items():
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.1)  # nothing cut at the edges
            _write_if_changed(out / f"{name}.png", buffer.getvalue(), atomic_write)
            lines += [f"## {name.replace('-', ' ')}", "", built.captions[name], "", f"![{name}]({name}.png)", ""]
    finally:
        built.close()
    for stale in out.glob("*.png"):  # figures of an earlier report that this run no longer allows
        if stale.stem not in built.figures:
            stale.unlink()
    if built.notes:
        lines += ["## Left out", ""] + [f"- {note}" for note in built.notes] + [""]
    index = out / "index.md"
    _write_if_changed(index, "\n".join(lines).encode(), atomic_write)
    return index


def _write_if_changed(path: Path, data: bytes, atomic_write: Callable) -> None:
    """Write ``data`` atomically unless ``path`` already holds exactly it (a rerun rewrites nothing)."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _summary_lines(summary: dict[str, Any] | None) -> list[str]:
    if not summary:
        return []
    lines = ["| | value |", "|---|---|"]
    for label, value in summary["top1"].items():
        lines.append(f"| test top-1, {label} | {value:.2f}% |")
    lines += [f"| validation top-1, {label} | {value:.2f}% |" for label, value in summary.get("val_top1", {}).items()]
    for label, value in summary["ratios"].items():
        lines.append(f"| {label} (fraction of the unpruned model) | {value:.3f} |")
    latency = summary.get("latency")
    if latency and isinstance(latency.get("achieved_ms"), (int, float)):
        lines.append(f"| latency, batch {latency.get('batch')}, {latency.get('threads')} thread(s) | "
                     f"{latency['achieved_ms']:.3g} ms (unpruned {latency.get('reference_ms', float('nan')):.3g} ms) |")
    return lines + [""]
