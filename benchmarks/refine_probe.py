"""Why label refinement lowers top-1 in the transfer benchmark (issue 11): refine variants on the
same distilled models.

In benchmarks/results/transfer.md (50 per class), row a (distill + refine) ends below row e (the
same model after distill only). This probe starts from row a's distilled models (seeds 0, 1, 2,
``<root>/a-s<seed>/distill/checkpoint.safetensors``) and the fine-tuned teacher (``<root>/t``), and
refines each with one change at a time, 1 epoch of the 6x expanded set as in row a:

  BN updating   the refine stage as row a ran it (BN in train mode; bn: update)
  labels fixed  label_lr 0: the teacher's logits are the labels, not learned
  BN frozen     batch-norm statistics kept (bn: frozen, BN layers in eval mode while training;
                the product's default since this probe)
  both          label_lr 0 and BN frozen
  no expansion  expand false, 6 epochs on the original images (row f), BN updating
  4 epochs ...  R = 4 epochs of the 6x set, BN frozen: with one epoch every stored label is read
                before its only update, so label refinement cannot act; from the second epoch on
                the student trains on labels it moved. label_lr 1 (default), 0 (fixed), 10
  lr 1e-3 ...   the student's learning rate 10x the authors' 1e-4 (BN frozen), 1 or 4 epochs:
                at 1e-4 one epoch barely moves the weights

    OMP_NUM_THREADS=1 python benchmarks/refine_probe.py --root runs/bench-transfer/32px/500

writes benchmarks/results/refine_probe.{json,md}; resumable (a finished cell is kept).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    # name: RefineConfig changes (1 epoch of the 6x set unless changed)
    "BN updating (as row a ran)": {"bn": "update"},
    "labels fixed": {"label_lr": 0.0, "bn": "update"},
    "BN frozen (the new default)": {"bn": "frozen"},
    "both": {"label_lr": 0.0, "bn": "frozen"},
    "no expansion": {"expand": False, "epochs": 6, "bn": "update"},
    "4 epochs, labels learned (label_lr 1)": {"epochs": 4, "bn": "frozen"},
    "4 epochs, labels fixed (label_lr 0)": {"epochs": 4, "bn": "frozen", "label_lr": 0.0},
    "4 epochs, label_lr 10": {"epochs": 4, "bn": "frozen", "label_lr": 10.0},
    "lr 1e-3": {"lr": 1e-3, "bn": "frozen"},
    "4 epochs, lr 1e-3, labels learned": {"epochs": 4, "lr": 1e-3, "bn": "frozen"},
    "4 epochs, lr 1e-3, labels fixed": {"epochs": 4, "lr": 1e-3, "bn": "frozen", "label_lr": 0.0},
}
RENAMED = {"default": "BN updating (as row a ran)", "BN frozen": "BN frozen (the new default)"}  # names of the first run


def main() -> None:
    from curlprune.data import data
    from curlprune.store import checkpoint
    from curlprune.store.rundir import atomic_write_text
    from curlprune.models import input_spec
    from curlprune.models.transfer import at_input_size
    from curlprune.recover.refine import RefineConfig, refine
    from transfer import ZIP, evaluate_all

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/bench-transfer/32px/500", help="the 500-per-class folder of benchmarks/transfer.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default=str(RESULTS / "refine_probe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    root, results = Path(args.root), Path(args.results)
    state = json.loads(results.read_text()) if results.is_file() else {"cells": {}}
    for key in list(state["cells"]):
        name, seed = key.split("|")
        if name in RENAMED:
            state["cells"][f"{RENAMED[name]}|{seed}"] = state["cells"].pop(key)
    state["command"] = "OMP_NUM_THREADS=1 python benchmarks/refine_probe.py " + " ".join(sys.argv[1:])
    splits = data.load_image_folder(ZIP)
    train = data.class_balanced_subset(splits["train"], 50, seed=0)
    test = splits["test"]
    spec = at_input_size(input_spec("cifar:resnet56"), 32)
    teacher = checkpoint.load(root / "t" / "model.safetensors").eval()
    for seed in args.seeds:
        distilled = root / f"a-s{seed}" / "distill" / "checkpoint.safetensors"
        key = f"distilled|{seed}"
        if key not in state["cells"]:
            state["cells"][key] = dict(zip(("top1", "per_class"), evaluate_all(checkpoint.load(distilled).eval(), test, spec)))
        for name, changes in VARIANTS.items():
            key = f"{name}|{seed}"
            if key in state["cells"]:
                continue
            student = checkpoint.load(distilled)
            cfg = RefineConfig(**{"epochs": 1, "seed": seed, "progress": False, **changes})
            with tempfile.TemporaryDirectory() as tmp:
                result = refine(student, teacher, {"train": train, "test": data.calibration_subset(test, 200, seed=0)}, spec, cfg, tmp)
            top1, per_class = evaluate_all(result.model.eval(), test, spec)
            state["cells"][key] = {"top1": top1, "per_class": per_class, "seconds": round(result.seconds, 1)}
            print(f"{key}: {top1:.2f}", flush=True)
            atomic_write_text(results, json.dumps(state, indent=1) + "\n")
    atomic_write_text(results, json.dumps(state, indent=1) + "\n")
    lines = ["# Refine-stage probe (issue 11): where row a loses to row e", "", f"Command: `{state['command']}`", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "", "```", __doc__.split("\n\n")[2], "```", "",
             "Top-1 % on the 713 clothing10 test images (ResNet-56 pruned to ResNet-20's MACs, 50 per class); mean ± std over seeds.", "",
             "| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std |", "|---|" + "---|" * (len(args.seeds) + 1)]
    for name in ["distilled", *VARIANTS]:
        values = [state["cells"].get(f"{name}|{s}", {}).get("top1") for s in args.seeds]
        done = [v for v in values if v is not None]
        summary = f"{statistics.mean(done):.2f} ± {statistics.stdev(done):.2f}" if len(done) > 1 else "-"
        label = "after distill (row e's model)" if name == "distilled" else f"refined: {name}"
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" if v is not None else "-" for v in values) + f" | {summary} |")
    atomic_write_text(results.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
