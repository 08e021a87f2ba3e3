"""GPU check of mixed precision in the training stages (issue 20 item 5; run by benchmarks/gpu_check.sh):
one epoch of ``distill`` (mixup KD from the CIFAR-10 ResNet-56) on the GPU in float32 and with
``amp: bf16``, from the same pruned student, the same seed and the same batches: epoch time,
training images/s and test top-1 after the epoch. Appends a markdown section to the report given as
the first argument (creating it when missing) and prints it.

Needs ../shared (models/resnet56-cifar10jpeg.pt, data/cifar10-jpeg.zip) beside the repository, or
CURLPRUNE_SHARED, and a CUDA GPU. ``GPU_CHECK_DEVICE=cpu``: a dry run on the CPU (20 training and 20
test images per class, so it ends in about a minute) that checks the script, not the speed.
Float32 here is PyTorch's default on the GPU: convolutions may use TF32 (cuDNN's default).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import curlprune
from curlprune.data.data import class_balanced_subset, load_splits
from curlprune.models import build, input_spec
from curlprune.recover import DistillConfig, distill
from curlprune.recover.evaluate import top1_accuracy
from curlprune.recover.dist import init_distributed

from bench_paths import CIFAR10_JPEG, RESNET56_JPEG, ROOT as REPO
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
DRY = not DEVICE.startswith("cuda")
MODEL, WEIGHTS, DATA = "cifar:resnet56", RESNET56_JPEG, CIFAR10_JPEG
BATCH, LR = 128, 0.02  # one epoch from a pruned student: no warm-up, cosine to 0 within the epoch
WORKERS = 0 if DRY else min(8, max(1, (os.cpu_count() or 2) - 2))  # transforms in worker processes, pinned batches


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def one_epoch(student: torch.nn.Module, teacher: torch.nn.Module, data: dict, spec, plan, amp: str, folder: Path) -> dict:
    """One distill epoch of a copy of ``student``; its record (metrics.jsonl) with the train-only time."""
    cfg = DistillConfig(epochs=1, batch_size=BATCH, lr=LR, warmup_epochs=0.0, seed=0, device=DEVICE, amp=amp,
                        num_workers=WORKERS, progress=False,
                        # ce_weight 0: the paper's loss, as every committed row used, whatever the default (0.5 since issue 19)
                        ce_weight=0.0)
    model = copy.deepcopy(student)
    sync()
    started = time.perf_counter()
    result = distill(model, copy.deepcopy(teacher), data, spec, cfg, folder, plan=plan)
    sync()
    wall = time.perf_counter() - started
    record = json.loads((folder / "distill" / "metrics.jsonl").read_text().splitlines()[-1])
    ctx = init_distributed(DEVICE)
    sync()
    eval_started = time.perf_counter()  # the epoch's seconds include one test evaluation (float32): time one
    top1_accuracy(model, data["test"], spec, ctx=ctx, batch_size=cfg.eval_batch_size)
    sync()
    eval_s = time.perf_counter() - eval_started
    train_s = max(record["seconds"] - eval_s, 1e-9)
    return {"amp": amp, "top1": result.last_top1, "epoch_s": record["seconds"], "train_s": train_s, "wall_s": wall,
            "images_per_s": len(data["train"]) / train_s, "loss": record["loss"]}


def main(out_file: Path) -> None:
    if not DRY and not torch.cuda.is_available():
        sys.exit("gpu_amp: no CUDA device here (torch.cuda.is_available() is False)")
    for path in (WEIGHTS, DATA):
        if not path.exists():
            sys.exit(f"gpu_amp: {path} is missing: put ../shared beside the repository or set CURLPRUNE_SHARED")
    started = time.perf_counter()
    spec = input_spec(MODEL, str(WEIGHTS))
    data = load_splits(str(DATA), 0)
    if DRY:
        data = {"train": class_balanced_subset(data["train"], 20, 0), "test": class_balanced_subset(data["test"], 20, 0)}
    say(f"loaded {DATA.name} in {time.perf_counter() - started:.0f} s: {len(data['train'])} training, {len(data['test'])} test images")
    teacher = build(MODEL, weights=str(WEIGHTS)).eval()
    pruned = curlprune.prune(teacher, torch.zeros(1, spec.channels, spec.size, spec.size), criterion="l1", target_macs=0.5,
                             device=DEVICE)  # data-free: a student that has something to recover
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for amp in ("off", "bf16"):
            say(f"one distill epoch on {DEVICE}, amp {amp}")
            rows.append(one_epoch(pruned.model, teacher, data, spec, pruned.plan, amp, Path(tmp) / amp))
            say(f"  {rows[-1]}")
    name = torch.cuda.get_device_name(0) if not DRY else "DRY RUN on the CPU (not a speed measurement)"
    base = rows[0]
    lines = ["", "## Mixed precision: one `distill` epoch, float32 vs `amp: bf16` (issue 20 item 5)", "",
             f"{name}, torch {torch.__version__}. Teacher: ResNet-56 (CIFAR-10 JPEG copy); student: it pruned to 50% of "
             f"the MACs by `l1` (data-free, BN statistics as they were); {len(data['train'])} training images, global batch "
             f"{BATCH}, lr {LR}, seed 0, {WORKERS} DataLoader workers, channels_last{', pinned memory' if not DRY else ''}. Train time = the epoch's "
             f"seconds less one float32 test evaluation ({len(data['test'])} images) timed after it.", "",
             "| amp | epoch s | train s | train images/s | speed-up | test top-1 after the epoch | mean loss |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['amp']} | {r['epoch_s']:.1f} | {r['train_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{base['train_s'] / r['train_s']:.2f}x | {r['top1']:.2f}% | {r['loss']:.4f} |" for r in rows]
    lines += ["", f"top-1 difference bf16 - float32: {rows[1]['top1'] - base['top1']:+.2f} points (one epoch, one seed)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks" / "results" / "gpu_check.md")
