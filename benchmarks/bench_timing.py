"""The timing rows of the ResNet-56 benchmark (issue 21): times measured side by side in one process,
one after the other on one thread, so they can be compared with each other. The CPU seconds that
every other row records are not comparable across rows: the rows ran under different machine load.

* ``timing``: exact kl and kl-approx scoring of the unpruned model (:func:`scoring_row`).
* ``timing-prune@<target>/e0/s0``: each method's way from the unpruned model to its pruned model at
  the target (:func:`prune_row`), everything computed afresh (no score or pruned-model cache is read
  or written). curlprune: tracing and the cost model (once, counted in every curlprune method),
  scoring the calibration images with each criterion (:data:`CURL_METHODS`), then selection
  (``allocate``) and slicing (``curlprune.apply``) with the allocation of that criterion's rows, as
  ``Bench.curl_prune`` does. Torch-Pruning 1.6.1: ``Bench.tp_prune`` of one variant per importance
  (:data:`TP_METHODS`: its benchmark's setting, max_pruning_ratio 1.0, shortcuts out of the
  importance), as the rows run it: the dependency graph, the stepped global pruning stopped at the
  step nearest the target, the benchmark's copy of the model before each step and the gather
  conversion (tp_equivalent.tp_prune). The decoded calibration images are given to both; data
  loading is not timed. The model is on the CPU whatever ``--device`` says (Torch-Pruning's stepped
  pruning runs on the CPU).

The report's section (:func:`timing_lines`): each method's wall and CPU seconds and their ratio to
curlprune kl-approx (kla-best: kl-approx scores, cost-weighted allocation).
"""
from __future__ import annotations

import gc
import importlib
import time
from collections.abc import Callable, Mapping
from importlib.metadata import version

import torch

import bench_plan as bp
import curlprune
from bench_alias import pruned_digest
from curlprune.cost.analysis import model_cost_fn
from curlprune.criteria import compute_scores
from curlprune.run.prune_core import full_float32
from curlprune.select.allocation import allocate, named_allocation
from curlprune.select.search import Target

CURL_METHODS = ("kla-best", "l1", "taylor", "kl-best")  # curlprune families (bench_plan.CURL), kl-approx first
TP_METHODS = ("tp-taylor-free-out", "tp-l1-free-out", "tp-l2-free-out")  # one Torch-Pruning variant per importance
BASE = "kla-best"  # the report's ratios are to curlprune kl-approx
TITLE = "Time to a pruned model at {target:.0%}, side by side (one process, one thread)"


def timed(fn: Callable[[], object]) -> tuple[object, dict]:
    """``fn()`` and its ``{"seconds", "cpu_seconds"}`` (wall clock, CPU time of this process; after a
    garbage collection, so no earlier step's garbage is collected inside the measurement)."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"seconds": round(time.perf_counter() - wall, 3), "cpu_seconds": round(time.process_time() - cpu, 3)}


def _sum(*parts: Mapping) -> dict:
    return {k: round(sum(p[k] for p in parts), 3) for k in ("seconds", "cpu_seconds")}


def versions() -> dict:
    """The versions of torch, torch-pruning and curlprune a timing row ran with."""
    return {"torch": torch.__version__, "torch_pruning": version("torch-pruning"), "curlprune": curlprune.__version__}


def run_timing(bench, row: bp.Row, seed: int) -> dict:
    """The record of a timing row (kind ``timing``) of ``bench`` (cifar_resnet56.Bench);
    ``seed``: the benchmark's split and calibration seed (the seed of the criteria that take one)."""
    return scoring_row(bench) if row.family == "timing" else prune_row(bench, row, seed)


def scoring_row(bench) -> dict:
    """Exact KL and kl-approx scoring of the unpruned model, side by side in this process (one
    thread), through ``bench.scores`` (fresh: the scores cache is rewritten)."""
    seconds = {}
    for criterion in ("kl-approx", "kl"):
        _, seconds[criterion] = bench.scores(criterion, fresh=True)
    return {"id": "timing", "family": "timing", "kind": "timing", "calib": bench.s["calib"], **bench.device_fields(),
            "threads": torch.get_num_threads(), "score_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "score_cpu_seconds": {k: round(bench.score_cpu[k], 1) for k in seconds},
            "teacher": {"val_top1": bench.top1(bench.teacher, "val"), "test_top1": bench.top1(bench.teacher, "test"),
                        "macs": bench.full_macs, "params": bench.full_params},
            "versions": versions(),
            "images": {"train": len(bench.train), "val": len(bench.val), "test": len(bench.test)}}


def prune_row(bench, row: bp.Row, seed: int) -> dict:
    """Every method's time from the unpruned model to its pruned model at ``row.target``, side by
    side in this process on the CPU (module docstring: what is timed for each).

    Returns the row: ``trace``, ``scoring`` (criterion ->), ``select_slice`` and ``tp`` (family ->)
    hold ``{"seconds", "cpu_seconds"}`` (wall, CPU) of each part, with the pruned model's MACs ratio
    and ``pruned_sha256`` (bench_alias.pruned_digest: the rows' models are the same when equal);
    ``methods``: family -> the seconds of the whole way (curlprune: trace + scoring + selection and
    slicing; Torch-Pruning: its stepped pruning).
    """
    teacher, example = bench.teacher, bench.example
    images, labels = bench.calib
    importlib.import_module("torch_pruning")  # its import is not Torch-Pruning's pruning time
    with torch.no_grad():
        teacher(images[:8])  # one forward pass before any measurement: one-off allocations are nobody's time

    def ratio(model) -> float:
        return round(curlprune.count(model, example)[0] / bench.full_macs, 4)

    def traced():
        groups = curlprune.trace(teacher, example)
        return groups, model_cost_fn(teacher, example, groups)

    (groups, cost_fn), trace = timed(traced)
    scores, scoring = {}, {}
    for family in CURL_METHODS:
        criterion = bp.CURL[family][0]
        with full_float32():  # as Bench.scores (a no-op on the CPU)
            scores[criterion], scoring[criterion] = timed(lambda: compute_scores(criterion, teacher, groups, images=images,
                                                                                labels=labels, seed=seed))
    select_slice, methods = {}, {}
    for family in CURL_METHODS:
        criterion, name, _ = bp.CURL[family]
        allocation = named_allocation(name, floor=bp.FLOOR)
        model, seconds = timed(lambda: curlprune.apply(teacher, groups, allocate(
            groups, scores[criterion], cost_fn, Target("macs", row.target), allocation).plan).eval())
        select_slice[family] = {**seconds, "criterion": criterion, "allocation": name, "macs_ratio": ratio(model),
                                "pruned_sha256": pruned_digest(model)}
        methods[family] = _sum(trace, scoring[criterion], seconds)
    tp = {}
    for family in TP_METHODS:
        (model, info), seconds = timed(lambda: bench.tp_prune(family, row.target))
        tp[family] = {**seconds, **{k: info["tp"][k] for k in ("steps", "of_steps", "within_1pct")},
                      "macs_ratio": ratio(model), "pruned_sha256": pruned_digest(model)}
        methods[family] = _sum(seconds)
    return {"id": row.id, "family": row.family, "kind": row.kind, "target": row.target, "epochs": row.epochs,
            "seed": row.seed, "device": "cpu", "threads": torch.get_num_threads(), "calib": len(images),
            "tp_steps": bench.s["tp_steps"], "trace": trace, "scoring": scoring, "select_slice": select_slice, "tp": tp,
            "methods": methods, "versions": versions()}


def _same_as_rows(rows: Mapping[str, dict], family: str, target: float, digest: str) -> str:
    """"yes" / "no": whether the finished rows of ``family`` at ``target`` that record a pruned
    model's digest have this one; "-" when none records one."""
    found = {r["pruned_sha256"] for r in rows.values() if r.get("family") == family and r.get("target") == target
             and r.get("pruned_sha256")}
    return "-" if not found else ("yes" if found == {digest} else "no")


def timing_lines(rows: Mapping[str, dict]) -> list[str]:
    """The report's section of each finished ``timing-prune`` row (none: no lines): method, the
    parts timed, seconds wall, CPU seconds, the CPU ratio to curlprune kl-approx, the pruned
    model's MACs ratio and whether it is the model of the method's benchmark rows."""
    lines = []
    for r in sorted((r for r in rows.values() if r.get("family") == "timing-prune"), key=lambda r: -r["target"]):
        base, v = r["methods"][BASE]["cpu_seconds"], r["versions"]
        lines += [f"## {TITLE.format(target=r['target'])}", "",
                  f"Each method from the unpruned model to its pruned model at {r['target']:.0%} of the MACs, all "
                  f"measured one after the other in one process on {r['threads']} CPU thread, everything computed afresh "
                  f"(torch {v['torch']}, torch-pruning {v['torch_pruning']}). curlprune: tracing and the cost model, "
                  f"scoring on {r['calib']} calibration images, selection and slicing. Torch-Pruning: its stepped global "
                  f"pruning as the rows run it ({r['tp_steps']}-step schedule stopped at the step nearest the target; "
                  "taylor: a backward pass on the calibration images before each step; the benchmark's copy of the model "
                  "before each step and the gather conversion included). Data loading is not timed. Last column: the pruned "
                  "model's sha256 against the method's finished rows at this target (-: none records one).", "",
                  "| method | parts (wall s) | seconds wall | CPU seconds | CPU ratio to curlprune kl-approx | MACs ratio | "
                  "same pruned model as its rows |", "|---|---|---|---|---|---|---|"]
        for family, m in r["methods"].items():
            if family in r["select_slice"]:
                part = r["select_slice"][family]
                label = f"curlprune {family} ({part['criterion']}, {part['allocation']})"
                parts = (f"trace {r['trace']['seconds']:.2f} + {part['criterion']} scoring "
                         f"{r['scoring'][part['criterion']]['seconds']:.2f} + select and slice {part['seconds']:.2f}")
            else:
                part = r["tp"][family]
                label, parts = f"Torch-Pruning {family}", f"stepped pruning, step {part['steps']} of {part['of_steps']}"
            times = f"{m['cpu_seconds'] / base:.2f}" if base > 0 else "-"
            lines.append(f"| {label} | {parts} | {m['seconds']:.2f} | {m['cpu_seconds']:.2f} | {times} | "
                         f"{part['macs_ratio']:.3f} | {_same_as_rows(rows, family, r['target'], part['pruned_sha256'])} |")
        lines.append("")
    return lines
