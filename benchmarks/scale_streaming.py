"""Streamed vs in-memory data: images/s and peak memory of one distill epoch (issue 20 item 4).

    PYTHONPATH=src .venv/bin/python benchmarks/scale_streaming.py            # ~10 min on 2 shared CPU cores
    PYTHONPATH=src .venv/bin/python benchmarks/scale_streaming.py --images 2000 --small 500   # a smoke run

Writes an ImageFolder of ``--images`` JPEG files at 256x256 (10 classes; smooth random colour
fields, ~10 KB each) and a 200-image test split into a scratch folder (default
``runs/scale_streaming/``, ignored by git, reused when present), plus a symlink farm of its first
``--small`` training images. Then, each in a fresh subprocess (one per mode, so peak memory is its
own), it runs one distill epoch of a tiny CNN (teacher and student; inputs resized to ``--side``
px, so the model costs little and the data path dominates):

* ``memory``: the data decoded into memory (``streaming: false``), the default in-memory reading;
* ``streaming``: decoded on the fly in ``--workers`` DataLoader worker processes (``streaming: true``),
  on the full set and on the ``--small`` subset.

Per run: seconds to load (decode everything, or list the files), seconds of the epoch (the
stage's two evaluations included), training images/s over the epoch and over load + epoch, the
peak RSS of the main process and of the largest worker (``getrusage``), and the peak proportional
set size (PSS, shared pages counted once) of the main process and its workers together, sampled
every 0.25 s from ``/proc``. The streamed peaks at ``--small`` and ``--images`` show whether
streaming's memory grows with the dataset.

``measure(...) -> dict`` is the entry point for ``benchmarks/scale.py``; the CLI writes
``benchmarks/results/scale_streaming.json`` (with the command line).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from curlprune.data.streaming import DataSettings, open_splits
from curlprune.models.spec import InputSpec
from curlprune.recover import DistillConfig, distill

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = ROOT / "runs" / "scale_streaming"
CLASSES = 10
SIDE = 256
TEST_PER_CLASS = 20


# ----------------------------------------------------------------------------- the data


def ensure_dataset(scratch: Path, images: int, small: int, seed: int = 0) -> tuple[Path, Path]:
    """``scratch/full`` (``images`` training JPEGs at 256x256 + the test split) and ``scratch/small``
    (symlinks to the first ``small`` of them, the same test split); reused when complete."""
    full, subset = scratch / f"full{images}", scratch / f"small{small}of{images}"
    done = full / ".complete"
    if not done.is_file():
        if full.exists():
            shutil.rmtree(full)
        rng = np.random.default_rng(seed)
        for split, count in (("train", images // CLASSES), ("test", TEST_PER_CLASS)):
            for c in range(CLASSES):
                folder = full / split / f"class{c:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                tint = rng.uniform(0.3, 1.0, 3)
                for i in range(count):
                    coarse = (rng.uniform(0, 255, (16, 16, 3)) * tint).astype(np.uint8)
                    Image.fromarray(coarse).resize((SIDE, SIDE), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
        done.write_text("ok\n")
    if not (subset / ".complete").is_file():
        if subset.exists():
            shutil.rmtree(subset)
        for split, count in (("train", small // CLASSES), ("test", TEST_PER_CLASS)):
            for c in range(CLASSES):
                folder = subset / split / f"class{c:02d}"
                folder.mkdir(parents=True)
                for i in range(count):
                    (folder / f"{i:05d}.jpg").symlink_to(full / split / f"class{c:02d}" / f"{i:05d}.jpg")
        (subset / ".complete").write_text("ok\n")
    return full, subset


# ----------------------------------------------------------------------------- one run (a subprocess)


def tiny_cnn() -> nn.Module:
    """Two strided conv-BN-ReLU layers, global pooling and a classifier (~0.1 M MACs at 32 px)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES),
    )


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PssSampler:
    """Peak PSS (kB) of this process and its descendants (DataLoader workers), sampled every 0.25 s."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss_kb(p) for p in [me, *_descendants(me)]))
            self._stop.wait(0.25)

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_mode(mode: str, data: Path, side: int, workers: int, batch: int) -> dict:
    """One distill epoch on ``data`` read in ``mode`` ("memory" or "streaming"), measured."""
    torch.set_num_threads(1)
    spec = InputSpec(size=side, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize=None,
                     num_classes=CLASSES, flip=True, crop_padding=max(1, side // 8))
    settings = DataSettings.of(mode == "streaming", None, workers)
    said: list[str] = []
    with PssSampler() as sampler:
        start = time.perf_counter()
        splits = open_splits(data, 0, ("train", "test"), settings, say=said.append)
        load = time.perf_counter() - start
        rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        torch.manual_seed(0)
        teacher = tiny_cnn().eval()
        student = copy.deepcopy(teacher)
        cfg = DistillConfig(epochs=1, batch_size=batch, lr=0.01, warmup_epochs=0.0, seed=0, progress=False, device="cpu",
                            # ce_weight 0: the paper's loss, as every committed row used, whatever the default (0.5 since issue 19)
                            channels_last=False, ce_weight=0.0)
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            distill(student, teacher, splits, spec, cfg, run_dir)
            epoch = time.perf_counter() - start
    train = len(splits["train"])
    return {
        "mode": mode, "data": str(data), "train_images": train, "test_images": len(splits["test"]), "side": side,
        "workers": workers if mode == "streaming" else 0, "batch": batch, "choice": said[0] if said else "",
        "load_s": round(load, 2), "epoch_s": round(epoch, 2),
        "epoch_images_per_s": round(train / epoch, 1), "end_to_end_images_per_s": round(train / (load + epoch), 1),
        "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_after_load_mb": round(rss_after_load / 1024, 1),
        "peak_rss_largest_worker_mb": (round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
                                       if mode == "streaming" else None),
        "peak_pss_total_mb": round(sampler.peak / 1024, 1),
    }


def _in_subprocess(mode: str, data: Path, side: int, workers: int, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--data", str(data), "--side", str(side),
                          "--workers", str(workers), "--batch", str(batch)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} run on {data} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the measurement


def measure(images: int = 20_000, small: int = 5_000, side: int = 32, workers: int = 2, batch: int = 64,
            scratch: Path = SCRATCH, say=print) -> dict:
    """Generate (or reuse) the data, then one distill epoch per mode in its own subprocess.

    Args:
        images: training images of the full set (JPEG, 256x256, 10 classes); small: those of the subset.
        side: the model's input side (images are resized to it); workers: streaming's DataLoader workers.
        batch: the training batch; scratch: where the data is written (never committed).
        say: progress lines.
    Returns:
        ``{"runs": [memory on images, streaming on small, streaming on images], "streaming_rss_growth": ..., ...}``.
    """
    started = time.perf_counter()
    full, subset = ensure_dataset(Path(scratch), images, small)
    say(f"data ready in {time.perf_counter() - started:.0f} s: {full}, {subset}")
    runs = []
    for mode, data in (("streaming", subset), ("streaming", full), ("memory", full)):
        runs.append(_in_subprocess(mode, data, side, workers, batch))
        say(json.dumps(runs[-1]))
    stream_small, stream_full, memory = runs
    return {
        "runs": runs,
        "memory_vs_streaming_images_per_s": [memory["epoch_images_per_s"], stream_full["epoch_images_per_s"]],
        "streaming_peak_pss_mb_small_vs_full": [stream_small["peak_pss_total_mb"], stream_full["peak_pss_total_mb"]],
        "streaming_peak_rss_main_mb_small_vs_full": [stream_small["peak_rss_main_mb"], stream_full["peak_rss_main_mb"]],
        "memory_peak_rss_main_mb": memory["peak_rss_main_mb"],
        "decoded_size_gb": round(images * SIDE * SIDE * 3 / 1e9, 2),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scratch", type=Path, default=SCRATCH)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_streaming.json")
    parser.add_argument("--child", choices=("memory", "streaming"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.data, args.side, args.workers, args.batch)))
        return
    result = measure(args.images, args.small, args.side, args.workers, args.batch, args.scratch)
    result.update(command="PYTHONPATH=src python benchmarks/scale_streaming.py " + " ".join(sys.argv[1:]),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}",
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
