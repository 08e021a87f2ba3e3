"""The paper's scale (issue 20, item 6): what exact KL, kl-approx, torchrun and streaming cost at 224x224.

    .venv/bin/python benchmarks/scale.py                         # every part not yet in scale.json, then scale.md
    .venv/bin/python benchmarks/scale.py --parts resnet50 --redo resnet50
    .venv/bin/python benchmarks/scale.py --report                # scale.md from scale.json alone
    .venv/bin/python benchmarks/scale.py --device cuda           # the same figures on a GPU

Parts (each saved to ``benchmarks/results/scale.json`` as soon as it finishes; a finished part is
never recomputed unless ``--redo`` names it; a part that was skipped, e.g. for absent inputs, is
tried again on the next run):

* ``resnet50``, ``mobilenet_v2``: torchvision models at 224x224 with **random weights** and
  **randomised BN running statistics** (no ImageNet weights or data here), on seeded random
  normal images. Each runs in its own spawned process (so its peak RSS is its own). Measured:
  the KL units (units of the prunable channel groups, ``trace``); curlprune's exact ``kl``
  (``criteria/kl.kl_scores``, the fast path ``prune`` uses) on a seeded sample of ``--per-group``
  units of every prunable group and ``--images`` images, timed with and without the sample
  (``only={}``: set-up and the two reference passes alone), so that the ablations' own time is the
  difference; it is split over the groups by their measured ablation seconds and extrapolated
  per group (x units / sampled units) and to 256 images (linear); ``kl-approx`` on every unit with
  ``--approx-images`` images, extrapolated linearly to 256; peak RSS (and on CUDA
  ``max_memory_allocated``).
* ``sharing``: CIFAR ResNet-56's 1 vs 2 torchrun processes ratio, read from
  ``benchmarks/results/scale_scoring.json`` (``--fresh``: ``scale_scoring.measure()`` is run).
  Two torchrun processes of ResNet-50 are not measured here (hours on 2 loaded cores); the ratio
  of ResNet-56 is applied to the ResNet-50 extrapolation as an estimate, and labelled so.
* ``streaming``: in-memory vs streaming images/s and peak memory of one distill epoch over a
  generated 20,000-JPEG ImageFolder, read from ``benchmarks/results/scale_streaming.json``
  (``--fresh``: ``scale_streaming.measure()`` is run).

Timings on a shared machine vary with the other processes' load; the load average before and
after each part, the CPU count and the threads are recorded with it.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curlprune.cost.analysis import trace
from curlprune.criteria.base import prunable
from curlprune.criteria.kl import KLStats, kl_scores
from curlprune.criteria.kl_approx import kl_approx_scores
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.recover.dist import resolve_device
from curlprune.store.rundir import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL_PARTS = ("resnet50", "mobilenet_v2")
PARTS = (*MODEL_PARTS, "sharing", "streaming")
TARGET_IMAGES = 256  # the paper's calibration set


def randomise_bn(model: nn.Module, generator: torch.Generator) -> None:
    """Random BN running statistics and affine parameters (mean ~ N(0, 0.1), var ~ U(0.5, 2),
    weight ~ U(0.5, 1.5), bias ~ N(0, 0.1)): a random-weight model whose BN layers are not identities."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=generator) * 0.1)


def sample_units(groups, per_group: int, seed: int) -> dict[str, list[int]]:
    """A seeded sample of ``per_group`` units (indices) of every prunable group."""
    rng = np.random.default_rng(seed)
    return {g.name: sorted(rng.choice(g.width // g.unit, size=min(per_group, g.width // g.unit), replace=False).tolist())
            for g in prunable(groups)}


def _synced(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """(value, wall seconds, this process's CPU seconds), the device synchronised before and after.
    CPU seconds are None on CUDA (the work is not this process's CPU time there)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return value, time.perf_counter() - start, None
    return value, time.perf_counter() - start, time.process_time() - cpu


def extrapolate(sample_s: float, overhead_s: float, group_seconds: dict[str, float], only: dict[str, list[int]],
                units: dict[str, int], images: int) -> dict[str, float]:
    """Exact ``kl`` on every unit and :data:`TARGET_IMAGES` images, from a sampled run.

    Args:
        sample_s: seconds of ``kl_scores`` on the sampled units ``only`` (group -> unit indices);
        overhead_s: seconds of the same call with no unit (set-up, the two reference passes);
        group_seconds: ``KLStats.group_seconds`` of the sampled call (splits the ablation time over
            the groups); units: group -> units; images: images of both calls.
    Returns:
        ``sample_s``, ``overhead_s``, ``ms_per_unit_image_sampled`` (the sampled units' mean),
        ``ms_per_unit_image_all_units`` (each group's time per sampled unit x its units, over every
        unit), ``hours_256`` ((every unit's ablations + overhead) x 256 / images).
    """
    ablation = max(sample_s - overhead_s, 0.0)
    measured = sum(group_seconds.get(g, 0.0) for g in only) or 1.0
    all_units = sum(ablation * group_seconds.get(g, 0.0) / measured * units[g] / len(only[g]) for g in only)
    sampled = sum(len(v) for v in only.values())
    return {"sample_s": round(sample_s, 2), "overhead_s": round(overhead_s, 2),
            "ms_per_unit_image_sampled": round(1000 * ablation / (sampled * images), 2),
            "ms_per_unit_image_all_units": round(1000 * all_units / (sum(units.values()) * images), 2),
            "hours_256": round((all_units + overhead_s) / images * TARGET_IMAGES / 3600, 2)}


def _cuda_peak(device: torch.device) -> float | None:
    """MiB of ``max_memory_allocated`` since the last reset (None on the CPU), then reset."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def measure_model(arch: str, device: str = "cpu", size: int = 224, per_group: int = 2, images: int = 8,
                  approx_images: int = 32, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    """Exact ``kl`` cost per (unit, image) on a sample, extrapolated; ``kl-approx`` time; peak memory.

    Args:
        arch: a torchvision classification model name (``resnet50``, ``mobilenet_v2``).
        device: ``cpu`` or ``cuda[:i]``; size: input side (pixels); per_group: sampled units per
            prunable group; images: images of the exact sample; approx_images: images of the
            kl-approx run (every unit); seed: sample, weights and images; threads: torch threads.
    Returns:
        The counts, the measured seconds, the extrapolation to :data:`TARGET_IMAGES` images
        (``kl_wall`` / ``kl_cpu``: :func:`extrapolate` of wall-clock and CPU seconds; ``kl_approx_*``),
        ``peak_rss_mb`` (this process's, Linux
        ``ru_maxrss``) and ``cuda_peak_mb`` (None on the CPU).

    Source: docs/method.md §2 (the exact score), §10 (scale).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    model = build(f"torchvision:{arch}").eval()
    randomise_bn(model, generator)
    groups, trace_s, _ = _synced(torch.device("cpu"), lambda: trace(model, torch.zeros(1, 3, size, size)))
    units = {g.name: g.width // g.unit for g in prunable(groups)}
    only = sample_units(groups, per_group, seed)
    x = torch.randn(max(images, approx_images), 3, size, size, generator=generator)
    model = model.to(dev)
    exact_x = x[:images].to(dev)
    _cuda_peak(dev)
    _, overhead_wall, overhead_cpu = _synced(dev, lambda: kl_scores(model, groups, exact_x, only={}))
    stats = KLStats()
    _, sample_wall, sample_cpu = _synced(dev, lambda: kl_scores(model, groups, exact_x, only=only, stats=stats))
    kl_cuda_mb = _cuda_peak(dev)
    approx_x = x[:approx_images].to(dev)
    _, approx_wall, approx_cpu = _synced(dev, lambda: kl_approx_scores(model, groups, approx_x))
    approx_cuda_mb = _cuda_peak(dev)
    scale = TARGET_IMAGES / approx_images
    return {
        "model": f"torchvision:{arch}", "input": [3, size, size], "device": str(dev), "threads": threads, "seed": seed,
        "weights": "random init (torchvision), BN running statistics and affine parameters randomised; seeded random normal images",
        "groups": len(units), "units": sum(units.values()), "trace_s": round(trace_s, 2),
        "sample": {"units": sum(len(v) for v in only.values()), "per_group": per_group, "images": images,
                   "rows_total": stats.rows_total, "rows_run": stats.rows_run},
        "kl_wall": extrapolate(sample_wall, overhead_wall, stats.group_seconds, only, units, images),
        "kl_cpu": None if sample_cpu is None else extrapolate(sample_cpu, overhead_cpu, stats.group_seconds, only, units, images),
        "kl_overhead_note": "kl_scores with no unit: set-up, BN folding and the two reference passes over the images",
        "kl_extrapolation": f"per group: ablation seconds x units / sampled units; + the overhead; x {TARGET_IMAGES} / {images} images",
        "kl_approx_images": approx_images, "kl_approx_wall_s": round(approx_wall, 2),
        "kl_approx_cpu_s": None if approx_cpu is None else round(approx_cpu, 2),
        "kl_approx_wall_s_256": round(approx_wall * scale, 1),
        "kl_approx_cpu_s_256": None if approx_cpu is None else round(approx_cpu * scale, 1),
        "kl_approx_extrapolation": f"every unit on {approx_images} images, x {TARGET_IMAGES} / {approx_images} (linear)",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_peak_mb": {"kl": kl_cuda_mb, "kl_approx": approx_cuda_mb} if dev.type == "cuda" else None,
    }


def _in_spawned_process(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_model` in a fresh spawned process (its own peak RSS)."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(measure_model, kwds=kwargs)
    finally:
        pool.close()
        pool.join()


def read_or_measure(module: str, json_name: str, fresh: bool) -> dict[str, Any]:
    """A companion benchmark's result: its committed json, or (``fresh``) its ``measure()`` run now."""
    path = RESULTS / json_name
    if fresh:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        try:
            measured = importlib.import_module(module).measure()
        except ImportError:
            return {"skipped": f"benchmarks/{module}.py is not on this branch yet"}
        return {"source": f"{module}.measure() run by scale.py", **measured}
    if not path.is_file():
        return {"skipped": f"{path.relative_to(ROOT)} absent: run benchmarks/{module}.py (or scale.py --fresh)"}
    return {"source": str(path.relative_to(ROOT)), **json.loads(path.read_text())}


def run_parts(path: Path, parts: list[str], runners: dict[str, Callable[[], dict[str, Any]]],
              redo: set[str] = frozenset(), say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the ``parts`` not already finished in ``path``'s json, saving it after each one.

    A part is finished when its record holds no ``skipped`` key; ``redo`` parts run again anyway.
    Each record gets ``scale_run``: ``finished`` (UTC), ``part_seconds``, the load average before
    and after, the CPU count, the machine and this command line. Returns the whole json.
    """
    results = json.loads(path.read_text()) if path.is_file() else {}
    for part in parts:
        old = results.get(part)
        if old is not None and "skipped" not in old and part not in redo:
            say(f"{part}: finished {old['scale_run']['finished']}, kept (--redo {part} to measure again)")
            continue
        say(f"{part}: running")
        load_before, started = os.getloadavg(), time.perf_counter()
        record = runners[part]()
        record["scale_run"] = {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "part_seconds": round(time.perf_counter() - started, 1),
                               "load_average_before": [round(v, 2) for v in load_before],
                               "load_average_after": [round(v, 2) for v in os.getloadavg()],
                               "cpu_count": os.cpu_count(), "machine": f"{platform.machine()}, torch {torch.__version__}",
                               "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:])}
        results[part] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(results, indent=1) + "\n")
        say(f"{part}: {'skipped: ' + record['skipped'] if 'skipped' in record else 'saved'}")
    return results


def _fmt(v: Any, spec: str = ",.1f") -> str:
    return "—" if v is None else format(v, spec)


def _measured(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [results[p] for p in MODEL_PARTS if p in results and "skipped" not in results[p]]


def _model_rows(results: dict[str, Any], ratio: float | None) -> tuple[list[str], list[str]]:
    """Rows of the exact ``kl`` table and of the ``kl-approx`` table."""
    exact, approx = [], []
    for part in MODEL_PARTS:
        r = results.get(part)
        if r is None or "skipped" in r:
            exact.append(f"| torchvision:{part} | not measured{': ' + r['skipped'] if r else ''} |||||||")
            continue
        s, wall, cpu = r["sample"], r["kl_wall"], r["kl_cpu"] or r["kl_wall"]
        two = f"{cpu['hours_256'] * ratio:,.1f} h" if ratio else "—"
        cuda = "" if not r.get("cuda_peak_mb") else f" (CUDA: kl {_fmt(r['cuda_peak_mb']['kl'])} MB)"
        exact.append(f"| {r['model']} | {r['units']:,} ({r['groups']}) | {s['units']} x {s['images']} "
                     f"({_fmt(cpu['sample_s'], ',.0f')} s) | {cpu['ms_per_unit_image_sampled']:,.1f} ms "
                     f"| {cpu['ms_per_unit_image_all_units']:,.1f} ms | **{cpu['hours_256']:,.1f} h** "
                     f"| {wall['hours_256']:,.1f} h | {two} | {r['peak_rss_mb']:,.0f} MB{cuda} |")
        c_s, c_256 = r["kl_approx_cpu_s"], r["kl_approx_cpu_s_256"]
        approx.append(f"| {r['model']} | {r['kl_approx_images']} | {_fmt(c_s)} s | {r['kl_approx_wall_s']:,.1f} s "
                      f"| **{_fmt(c_256 / 60 if c_256 is not None else None)} min** | {r['kl_approx_wall_s_256'] / 60:,.1f} min |")
    return exact, approx


def _context(results: dict[str, Any]) -> list[str]:
    lines = []
    for part in PARTS:
        r = results.get(part, {}).get("scale_run")
        if r is None:
            continue
        lines.append(f"- `{part}`: `{r['command']}`, finished {r['finished']} in {_fmt(r['part_seconds'])} s; "
                     f"load average {r['load_average_before']} before, {r['load_average_after']} after; "
                     f"{r['cpu_count']} CPUs shared with other jobs; {r['machine']}"
                     f"{' (read from the file named above)' if part in ('sharing', 'streaming') else ''}")
    return lines


def _streaming(s: dict[str, Any] | None) -> str:
    if s is None or "skipped" in s:
        return f"Not measured yet{': ' + s['skipped'] if s else ' (part not run)'}."
    runs, pss = s.get("runs") or [{}], s.get("streaming_peak_pss_mb_small_vs_full") or ["?", "?"]
    rows = [f"| {r.get('mode')} | {r.get('train_images', 0):,} | {r.get('workers')} | {_fmt(r.get('load_s'))} s "
            f"| {_fmt(r.get('epoch_images_per_s'))} | {_fmt(r.get('end_to_end_images_per_s'))} "
            f"| {_fmt(r.get('peak_rss_main_mb'), ',.0f')} MB | {_fmt(r.get('peak_pss_total_mb'), ',.0f')} MB |"
            for r in s.get("runs", [])]
    return ("| mode | training images | workers | load | epoch images/s | end-to-end images/s | peak RSS (main) | peak PSS (all processes) |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
            f"\n\nFrom `{s.get('source')}` (command `{s.get('command', '?')}`, {s.get('machine', '?')}, {s.get('date', '?')}; "
            f"decoded size of the full set {_fmt(s.get('decoded_size_gb'), '.2f')} GB). One distill epoch of a small model "
            f"on generated 256x256 JPEGs resized to a {runs[0].get('side', '?')}-pixel input, batch {runs[0].get('batch', '?')}. "
            f"Streaming, peak PSS of all its processes (main + workers): {pss[0]} MB on {runs[0].get('train_images', 0):,} "
            f"images, {pss[1]} MB on {runs[1].get('train_images', 0):,}; in memory: {_fmt(s.get('memory_peak_rss_main_mb'), ',.0f')} MB "
            f"RSS on {runs[-1].get('train_images', 0):,}. Images/s in memory vs streaming: {s.get('memory_vs_streaming_images_per_s')}.")


def markdown(results: dict[str, Any], source: str = "benchmarks/results/scale.json") -> str:
    """``scale.md`` from ``scale.json``'s records alone (missing parts are said to be missing);
    ``source`` names the json in the page."""
    sharing = results.get("sharing")
    shared_ok = sharing is not None and "skipped" not in sharing
    ratio = sharing.get("ratio") if shared_ok else None
    share = (f"Exact `kl` of CIFAR ResNet-56 ({sharing['weights']}) on {sharing['calib']} images, "
             f"{sharing['threads_per_process']} thread per process: 1 process **{sharing['one_process_s']:.1f} s**, "
             f"{sharing['nproc']} torchrun processes **{sharing['n_process_s']:.1f} s**: **{sharing['ratio']:.3f}x** "
             f"(target {sharing['target_ratio']}x, {'met' if sharing['met'] else 'not met'}); scores equal bit for bit: "
             f"{sharing['scores_equal']}, plan equal: {sharing['plan_equal']}; load average "
             f"{sharing['load_average_before']} before, {sharing['load_average_after']} after, on {sharing['cpu_count']} CPUs. "
             f"From `{sharing['source']}` (`{sharing['command']}`).") if shared_ok else \
        f"Not measured{': ' + sharing['skipped'] if sharing else ' (part not run)'}."
    model = next(iter(_measured(results)), {})
    exact, approx = _model_rows(results, ratio)
    device = model.get("device", "cpu")
    return f"""# At the paper's scale: ResNet-50 and MobileNetV2 at 224x224, torchrun, streaming

Written by `python benchmarks/scale.py --report` from `{source}` alone.
Every figure is **measured here on {device.upper() if device != 'cpu' else 'CPU'}** or **extrapolated** from such a
measurement, as labelled. **No GPU figure has been measured**: no GPU has been lent to this project
yet; `python benchmarks/scale.py --device cuda --redo resnet50 --redo mobilenet_v2` measures them
where one exists (`benchmarks/gpu_check.sh` runs the other GPU checks).

## Exact `kl` at 224x224 (one CPU thread)

| model | KL units (groups) | measured sample: units x images (CPU time) | measured: CPU ms per (unit, image), sampled units | extrapolated: CPU ms per (unit, image), every unit | extrapolated: {TARGET_IMAGES} images, CPU-thread hours | extrapolated: {TARGET_IMAGES} images, wall-clock hours under this load | estimate: 2 torchrun processes | measured: peak RSS (process) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(exact)}

## `kl-approx` at 224x224 (every unit, one CPU thread)

| model | images | measured: CPU time | measured: wall-clock | extrapolated: {TARGET_IMAGES} images, CPU time | extrapolated: {TARGET_IMAGES} images, wall-clock under this load |
|---|---|---|---|---|---|
{chr(10).join(approx)}

- Weights: {model.get('weights', 'random init, BN statistics randomised')}: timing only (no ImageNet weights or
  data here). The share of (unit, image) rows skipped as exactly inactive (a unit zero at every cut,
  KL 0 without running it) depends on weights and data: sample rows run / total:
  {', '.join(f"{r['model']} {r['sample']['rows_run']:,} / {r['sample']['rows_total']:,}" for r in _measured(results))}.
  With trained weights and real images that share differs (dead ReLU rows are skipped), so the cost does too.
- CPU time: the scoring process's CPU seconds (1 thread): about what one thread takes on a quiet
  machine. Wall-clock: the same run's elapsed seconds, inflated by the other jobs on the 2 shared
  cores (load averages below). The per-group split uses the groups' measured (wall-clock) ablation
  seconds as proportions for both.
- Sampling: curlprune's own fast exact `kl` (`criteria/kl.kl_scores`, what `prune --criterion kl` runs) on a seeded
  sample of {model.get('sample', {}).get('per_group', '?')} units of every prunable group and {model.get('sample', {}).get('images', '?')} seeded random images,
  timed, minus the same call with no unit (set-up, BN folding, the two reference passes:
  {', '.join(f"{r['model']} {(r['kl_cpu'] or r['kl_wall'])['overhead_s']} s" for r in _measured(results))}),
  is the ablations' time. It is split over the groups by their measured ablation seconds and each
  group's share is scaled by its units / sampled units (a unit's ablation re-runs the network from
  the group's first cut, so cost differs a lot between groups; the per-group scaling keeps that);
  the whole (plus the reference passes) is scaled linearly to {TARGET_IMAGES} images.
- `kl-approx`: every unit, measured on the stated images, scaled linearly to {TARGET_IMAGES}.
- 2 torchrun processes: **not measured** for these models (hours on 2 loaded cores); the estimate is
  the 1-process extrapolation x the ResNet-56 ratio below ({_fmt(ratio, '.3f')}). N ranks split the
  groups balanced by cost, so with N free cores or GPUs expect about 1/N of the time plus the
  imbalance of the largest group (docs/method.md §10).
- Peak RSS: each model part runs in its own spawned process (Linux `ru_maxrss`), model, trace,
  exact sample and `kl-approx` (default `budget_mb` 512) included.

## Scoring shared by torchrun ranks (measured here on CPU)

{share}

## Data larger than memory: streaming (measured here on CPU)

{_streaming(results.get('streaming'))}

## Commands and machine

{chr(10).join(_context(results))}

Times on this machine vary with the other jobs' load (the load averages above); the per-(unit,
image) costs and the CPU-thread hours are CPU seconds of the one scoring thread, the wall-clock
columns elapsed time under that load.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--redo", action="append", default=[], help="a part to measure again (repeatable)")
    parser.add_argument("--report", action="store_true", help="only write scale.md from scale.json")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i> for the model parts")
    parser.add_argument("--per-group", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--approx-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="sharing/streaming: run their measure() instead of reading their json")
    parser.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts + args.redo) - set(PARTS))
    try:
        if unknown:
            raise CurlpruneError(f"unknown part(s) {unknown}: choose from {list(PARTS)}")
        resolve_device(args.device)
    except CurlpruneError as exc:
        print(f"scale.py: error: {exc}", file=sys.stderr)
        return 2
    if not args.report:
        model = {"device": args.device, "per_group": args.per_group, "images": args.images,
                 "approx_images": args.approx_images, "threads": args.threads}
        runners = {arch: (lambda a=arch: _in_spawned_process({"arch": a, **model})) for arch in MODEL_PARTS}
        runners["sharing"] = lambda: read_or_measure("scale_scoring", "scale_scoring.json", args.fresh)
        runners["streaming"] = lambda: read_or_measure("scale_streaming", "scale_streaming.json", args.fresh)
        run_parts(args.json, parts, runners, set(args.redo))
    if not args.json.is_file():
        print(f"scale.py: error: {args.json} does not exist: run the parts first", file=sys.stderr)
        return 2
    md = args.json.with_suffix(".md")
    json_path = args.json.resolve()
    source = str(json_path.relative_to(ROOT)) if json_path.is_relative_to(ROOT) else str(json_path)
    atomic_write_text(md, markdown(json.loads(args.json.read_text()), source))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
