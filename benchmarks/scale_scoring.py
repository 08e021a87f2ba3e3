"""Scoring shared by torchrun ranks: exact ``kl`` on CIFAR ResNet-56, 1 process vs N torchrun processes.

    .venv/bin/python benchmarks/scale_scoring.py                 # 32 images, 1 vs 2 processes, 1 thread each
    .venv/bin/python benchmarks/scale_scoring.py --calib 64 --nproc 2 --criterion kl-approx

Both runs are the real command (``curlprune prune``, and ``torchrun --nproc_per_node=N -m
curlprune.cli prune``) on the published ResNet-56 (``../shared/models/resnet56-4bfd9763.th``) with
the same calibration set: a seeded draw from a small ImageFolder cut out of the CIFAR-10 JPEG copy
(``../shared/data/cifar10-jpeg.zip``; 20 training images per class, written to a scratch folder, so
that loading the data takes a second, not the 50,000 images). The time compared is the scoring's
own (``seconds`` of the ``scores`` event in ``log.jsonl``: the criterion and, under torchrun, the
gathering), not the start-up, data loading or selection. The scores of the two runs are compared
with ``np.array_equal`` for every group (docs/method.md §10: equal bit for bit).

The target (issue 20): N=2 takes at most 0.6x the single-process time. Wall-clock times on a shared
machine vary with the other processes' load: the load average and the CPU count are recorded.

:func:`measure` is the function ``benchmarks/scale.py`` calls; the CLI writes
``benchmarks/results/scale_scoring.json`` with its command line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from curlprune.store.scores_io import read_scores

from bench_paths import CIFAR10_JPEG as DATA, RESNET56 as WEIGHTS, RESULTS, ROOT
TARGET_RATIO = 0.6


def small_imagefolder(zip_path: Path, folder: Path, per_class: int = 20) -> Path:
    """``folder``/train/<class>/<image> with the first ``per_class`` training images of each class
    of ``zip_path`` (in the archive's sorted order); returns ``folder``."""
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("train/") and not n.endswith("/"))
        taken: dict[str, int] = {}
        for name in names:
            label = name.split("/")[1]
            if taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    return folder


def prune_argv(model: str, weights: Path, data: Path, out: Path, criterion: str, calib: int) -> list[str]:
    """The ``prune`` command of one measurement (scoring, then a 50% MACs selection; no evaluation)."""
    return ["prune", "--model", model, "--weights", str(weights), "--data", str(data), "--criterion", criterion,
            "--calib", str(calib), "--target-macs", "0.5", "--eval-limit", "0", "--bn-recalibrate", "0",
            "--no-report", "--device", "cpu", "--out", str(out)]


def scores_event(out: Path) -> dict[str, Any]:
    """The last ``scores`` event of ``out``'s log.jsonl."""
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "scores"][-1]


def run(argv: list[str], threads: int, nproc: int) -> float:
    """Run ``curlprune`` (``nproc`` > 1: under torchrun) with ``threads`` threads per process; wall seconds.

    Raises:
        RuntimeError: the command failed (its stderr's tail).
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    launcher = [sys.executable, "-m", "curlprune.cli"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "curlprune.cli"]
    started = time.time()
    done = subprocess.run([*launcher, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stderr[-2000:]}")
    return time.time() - started


def measure(model: str = "cifar:resnet56", weights: Path = WEIGHTS, data: Path = DATA, calib: int = 32,
            criterion: str = "kl", nproc: int = 2, threads: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    """Scoring time of ``criterion`` on ``model`` with 1 process vs ``nproc`` torchrun processes.

    Args:
        model, weights: the model (registry name) and its weights file.
        data: the CIFAR-10 JPEG zip (a small ImageFolder is cut out of it).
        calib: calibration images (the same seeded draw in both runs).
        criterion: ``kl`` (groups split) or ``kl-approx`` / ``taylor`` (image blocks split).
        nproc: torchrun processes; threads: threads per process (both runs).
        workdir: scratch folder (default: a temporary one, removed).
    Returns:
        ``{"skipped": reason}`` when the weights or data are absent; else the settings, the scoring
        seconds of both runs (``one_process_s``, ``n_process_s``) and their ``ratio``, whether it
        meets :data:`TARGET_RATIO`, ``scores_equal`` (np.array_equal for every group), ``plan_equal``,
        the ranks' shares and seconds, the wall times of both commands, the load average before and
        after and the CPU count.
    """
    missing = [str(p) for p in (weights, data) if not Path(p).is_file()]
    if missing:
        return {"skipped": f"absent: {', '.join(missing)} (see ../shared/README.md)"}
    with tempfile.TemporaryDirectory(prefix="scale-scoring-") as tmp:
        scratch = Path(workdir) if workdir is not None else Path(tmp)
        folder = small_imagefolder(Path(data), scratch / "cifar-small")
        load_before = os.getloadavg()
        single, shared = scratch / "one", scratch / f"torchrun{nproc}"
        wall_single = run(prune_argv(model, Path(weights), folder, single, criterion, calib), threads, 1)
        wall_shared = run(prune_argv(model, Path(weights), folder, shared, criterion, calib), threads, nproc)
        load_after = os.getloadavg()
        a, _ = read_scores(single / "scores.npz")
        b, _ = read_scores(shared / "scores.npz")
        one, many = scores_event(single), scores_event(shared)
        equal = list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
        plan_equal = (single / "plan.json").read_text() == (shared / "plan.json").read_text()
    ratio = many["seconds"] / one["seconds"]
    return {"model": model, "weights": Path(weights).name, "criterion": criterion, "calib": calib, "nproc": nproc,
            "threads_per_process": threads, "one_process_s": one["seconds"], "n_process_s": many["seconds"],
            "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
            "scores_equal": equal, "plan_equal": plan_equal, "split": many.get("split"), "shares": many.get("shares"),
            "wall_s": {"one_process": round(wall_single, 1), "n_process": round(wall_shared, 1)},
            "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
            "cpu_count": os.cpu_count(), "machine": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--criterion", default="kl")
    parser.add_argument("--out", default=str(RESULTS / "scale_scoring.json"))
    args = parser.parse_args(argv)
    result = measure(calib=args.calib, criterion=args.criterion, nproc=args.nproc, threads=args.threads)
    result = {"command": "python benchmarks/scale_scoring.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "note": "the machine is shared with other jobs (see load_average_*, cpu_count): times vary with their load",
              **result}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
