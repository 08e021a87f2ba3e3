"""GPU check of the prune stage (issue 20, item 6; run by benchmarks/gpu_check.sh): exact KL scores of
the published CIFAR-10 ResNet-56 on 256 calibration images on the GPU vs the CPU (agreement and
time), then one ``curlprune prune --device cuda`` end to end (BN re-estimation and evaluation on
the GPU). Prints a markdown report and writes it to the path given as the first argument.

Needs ../shared (models/resnet56-4bfd9763.th, data/cifar10-png.zip) beside the repository, or
CURLPRUNE_SHARED; a CUDA GPU. Float32 everywhere (TF32 off, as the prune stage scores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from curlprune.cost.analysis import model_cost_fn, trace
from curlprune.criteria import compute_scores
from curlprune.models import build, input_spec
from curlprune.run.prune_core import full_float32
from curlprune.run.prune_data import load_images
from curlprune.select.allocation import COST_WEIGHTED, allocate
from curlprune.select.search import Target

from bench_paths import CIFAR10_PNG, RESNET56, ROOT as REPO
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu": a dry run of this script on a machine without a GPU (CPU vs CPU)
CALIB = int(os.environ.get("GPU_CHECK_CALIB", "256"))
MODEL, WEIGHTS, DATA = "cifar:resnet56", RESNET56, CIFAR10_PNG


def ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def timed(device: torch.device, model, groups, images) -> tuple[dict, float]:
    model = model.to(device)
    with full_float32():
        if device.type == "cuda":
            compute_scores("kl", model, groups, images=images[:8])  # warm-up: cuDNN plans, allocator
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        scores = compute_scores("kl", model, groups, images=images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return scores, time.perf_counter() - started


def main(out_file: Path) -> None:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False)")
    for path in (WEIGHTS, DATA):
        if not path.exists():
            sys.exit(f"gpu_check: {path} is missing: put ../shared beside the repository or set CURLPRUNE_SHARED")
    lines = ["# GPU check: exact KL on ResNet-56 (CIFAR-10), GPU vs CPU", "",
             f"{torch.cuda.get_device_name(0) if DEVICE.startswith('cuda') else 'DRY RUN on the CPU'}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
             "float32, TF32 off.", ""]
    started = time.perf_counter()
    spec = input_spec(MODEL, str(WEIGHTS))
    images = load_images(str(DATA), spec, 0)
    calib, _ = images.calibration(CALIB, 0, "kl")
    load_s = time.perf_counter() - started
    say(f"loaded {DATA.name} in {load_s:.0f} s; {len(calib)} calibration images")
    model = build(MODEL, weights=str(WEIGHTS)).eval()
    example = torch.zeros(1, spec.channels, spec.size, spec.size)
    groups = trace(model, example)
    gpu, gpu_s = timed(torch.device(DEVICE), model, groups, calib)
    say(f"exact KL on {DEVICE}: {gpu_s:.1f} s")
    cpu, cpu_s = timed(torch.device("cpu"), build(MODEL, weights=str(WEIGHTS)).eval(), groups, calib)
    say(f"exact KL on the CPU: {cpu_s:.1f} s")
    rows, worst_abs, worst_rel = [], 0.0, 0.0
    for name in cpu:
        a, b = cpu[name], gpu[name]
        diff = np.abs(a - b)
        big = np.abs(a) > 1e-6
        rel = float((diff[big] / np.abs(a[big])).max()) if big.any() else 0.0
        worst_abs, worst_rel = max(worst_abs, float(diff.max())), max(worst_rel, rel)
        rows.append((name, len(a), spearman(a, b), float(diff.max()), rel))
    cost_fn = model_cost_fn(model.cpu(), example, groups)
    overlap = {}
    width = {g.name: g.width for g in groups}
    for fraction in (0.5, 0.3):
        plans = [allocate(groups, s, cost_fn, Target("macs", fraction), COST_WEIGHTED).plan for s in (cpu, gpu)]
        removed = [{(g, c) for g, keep in plan.items() for c in set(range(width[g])) - set(keep)} for plan in plans]
        union = removed[0] | removed[1]
        overlap[fraction] = (len(removed[0] & removed[1]) / len(union) if union else 1.0, plans[0] == plans[1])
    lines += [f"Calibration: {CALIB} seeded CIFAR-10 training images (loading the zip: {load_s:.0f} s).", "",
              "| | CPU | GPU | speed-up |", "|---|---|---|---|",
              f"| exact KL, {sum(len(v) for v in cpu.values())} channels | {cpu_s:.1f} s | {gpu_s:.1f} s | {cpu_s / gpu_s:.1f}x |", "",
              f"Largest |GPU - CPU| over all channels: {worst_abs:.3g} nats; largest relative difference (KL > 1e-6): {worst_rel:.3g}; "
              f"smallest Spearman per group: {min(r[2] for r in rows):.6f}.", ""]
    for fraction, (jaccard, same) in overlap.items():
        lines.append(f"- plan at {fraction:.0%} of the MACs (cost-weighted): removed channels overlap (Jaccard) {jaccard:.4f}, "
                     f"identical plan: {same}")
    lines += ["", "| group | channels | Spearman | max abs diff | max rel diff |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {w} | {s:.6f} | {d:.3g} | {r:.3g} |" for n, w, s, d, r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "curlprune.cli", "prune", "--model", MODEL, "--weights", str(WEIGHTS), "--data", str(DATA),
                "--target-macs", "0.5", "--device", DEVICE, "--calib", str(CALIB), "--eval-limit", "2000", "--no-report", "--out", f"{tmp}/run"]
        started = time.perf_counter()
        say("curlprune prune --device " + DEVICE)
        done = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - started
        lines += ["", f"`curlprune prune --device {DEVICE} --target-macs 0.5 --eval-limit 2000`: exit {done.returncode}, {wall:.0f} s wall."]
        if done.returncode == 0:
            report = json.loads(Path(tmp, "run", "report.json").read_text())
            events = [json.loads(x) for x in Path(tmp, "run", "log.jsonl").read_text().splitlines()]
            scored = [e for e in events if e.get("event") == "scores"][-1]
            lines.append(f"scores on {scored.get('device')} in {scored.get('seconds')} s; accuracy {report['accuracy']}; "
                         f"MACs ratio {report['selection']['macs_ratio']:.4f}")
        else:
            lines.append("stderr tail: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
    text = "\n".join(lines) + "\n"
    print(text)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks" / "results" / "gpu_check.md")
