"""Limited-data benchmark: CURL vs its ablations vs a small pretrained model, on small CIFAR-10 subsets.

Data: ../shared/data/cifar10-jpeg.zip. The small training sets are seeded class-balanced subsets
of the training split (500 and 100 images per class); every row is tested on all 10,000 test
images. Teacher: ../shared/models/resnet56-cifar10jpeg.pt; target: the MACs of a CIFAR ResNet-20.

Rows (same epoch budget for every row that trains, see BUDGETS and the results file):
  a  CURL: kl prune + distill (mixup KD) + refine (6x expansion, label refinement)
  b  kl prune + CE fine-tuning
  c  l1 prune + distill + refine
  d0 the small pretrained ResNet-20 (resnet20-cifar10jpeg.pt) as it is
  d1 that ResNet-20 fine-tuned with CE on the small set
  e  CURL without refine (row a after its distill stage)
  t  the unpruned ResNet-56 teacher, for reference

Rows b and d1 train E + 6 R epochs, so they see as many images as the distill (E epochs) +
refine (R epochs of the 6x set) rows. Per-epoch monitoring uses a fixed 1,000-image slice of the
test split; the reported top-1 is the last-epoch model on all 10,000 test images (as the paper
reports last-epoch numbers).

    python benchmarks/limited_data.py --per-class 500 100 --out runs/bench-limited
writes benchmarks/results/limited_data.json and limited_data.md. Resumable: re-run to continue.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench_paths import CIFAR10_JPEG, RESNET20_JPEG, RESNET56_JPEG, RESULTS

# (distill/finetune epochs E, refine epochs R on the 6x set) per images-per-class.
BUDGETS = {500: (8, 1), 100: (20, 2)}


def main() -> None:
    from curlprune.data import data
    from curlprune.store import checkpoint
    from curlprune.store.rundir import atomic_write_text
    from curlprune.cost.cost import count
    from curlprune.models import build, input_spec
    from curlprune.run.pipeline import Run
    from curlprune.run.run_config import parse_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--out", default="runs/bench-limited")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override E (smoke runs)")
    parser.add_argument("--refine-epochs", type=int, default=None, help="override R (smoke runs)")
    parser.add_argument("--rows", default="t,a,b,c,d0,d1,e")
    parser.add_argument("--results", default=str(RESULTS), help="folder for limited_data.json/.md")
    args = parser.parse_args()
    rows_wanted = args.rows.split(",")

    zip_path = CIFAR10_JPEG
    teacher_w = RESNET56_JPEG
    small_w = RESNET20_JPEG
    if not zip_path.is_file():
        raise SystemExit(f"needs {zip_path}")
    torch.manual_seed(args.seed)
    splits = data.load_image_folder(zip_path)
    test = splits["test"]
    monitor = data.calibration_subset(test, 1000, seed=args.seed)
    spec = input_spec("cifar:resnet56")
    x = torch.zeros(1, 3, 32, 32)
    target_macs, _ = count(build("cifar:resnet20"), x)
    teacher_macs, teacher_params = count(build("cifar:resnet56"), x)

    out_root = Path(args.out)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    results_path = results_dir / "limited_data.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    results.update(
        target_macs=target_macs, teacher_macs=teacher_macs, teacher_params=teacher_params,
        torch=torch.__version__, threads=torch.get_num_threads(),
    )

    command = " ".join(["python", "benchmarks/limited_data.py", *sys.argv[1:]])
    earlier = results.pop("command", None)  # results written before commands were kept as a list
    commands = results.get("commands", [earlier] if earlier else [])
    results["commands"] = [c for c in commands if c != command] + [command]

    def final_eval(model) -> float:
        return 100 * data.evaluate(model.eval(), test, spec)

    def record(per_class: int, row: str, model, seconds: float, extra: dict | None = None) -> None:
        macs, params = count(model, x)
        entry = {"top1": round(final_eval(model), 2), "macs": macs, "params": params, "seconds": round(seconds, 1), **(extra or {})}
        results["rows"].setdefault(str(per_class), {})[row] = entry
        atomic_write_text(results_path, json.dumps(results, indent=2))
        write_markdown(results, results_dir)
        print(per_class, row, entry, flush=True)

    for per_class in args.per_class:
        epochs, refine_epochs = BUDGETS[per_class]
        epochs = args.epochs or epochs
        refine_epochs = args.refine_epochs or refine_epochs
        small_train = data.class_balanced_subset(splits["train"], per_class, seed=args.seed)
        run_data = {"train": small_train, "test": monitor}
        results.setdefault("budgets", {})[str(per_class)] = {"E": epochs, "R": refine_epochs, "ce_epochs": epochs + 6 * refine_epochs}
        common = {"model": "cifar:resnet56", "weights": str(teacher_w), "data": str(zip_path), "seed": args.seed}
        stage_cfgs = {
            # ce_weight 0: the paper's loss, as every committed row used, whatever the default (0.5 since issue 19)
            "distill": {"epochs": epochs, "warmup_epochs": 1.0, "batch_size": 64, "lr": 0.02, "ce_weight": 0.0},
            "refine": {"epochs": refine_epochs, "batch_size": 64},
            "finetune": {"epochs": epochs + 6 * refine_epochs, "warmup_epochs": 1.0, "batch_size": 64, "lr": 0.02},
        }
        run_root = out_root / f"{per_class}pc"

        def run(name: str, raw: dict, student: Path | None = None) -> tuple[dict, float]:
            cfg = parse_config({**raw, "run_dir": str(run_root / name)}, name)
            runner = Run(cfg, student=student)
            runner._data = run_data  # the small set, and the monitoring slice of the test split
            started = time.time()
            return runner.run(), time.time() - started

        pruned: dict[str, tuple[Path, float]] = {}

        def pruned_by(criterion: str) -> tuple[Path, float]:
            """One prune per criterion, shared by the rows that start from it (the scores are the same)."""
            if criterion not in pruned:
                summary, seconds = run(f"prune-{criterion}", {**common, "stages": ["prune"],
                                       "prune": {"target_macs": float(target_macs), "calib": 256, "criterion": criterion}})
                pruned[criterion] = (Path(summary["stages"]["prune"]["checkpoint"]), seconds)
            return pruned[criterion]

        if "t" in rows_wanted:
            record(per_class, "t", build("cifar:resnet56", weights=str(teacher_w)), 0.0, {"note": "the unpruned teacher, no training"})
        if "d0" in rows_wanted:
            record(per_class, "d0", build("cifar:resnet20", weights=str(small_w)), 0.0, {"note": "no training"})
        plan_rows = {"a": ("kl", ["distill", "refine"]), "b": ("kl", ["finetune"]), "c": ("l1", ["distill", "refine"])}
        for row, (criterion, stages) in plan_rows.items():
            if row not in rows_wanted and not (row == "a" and "e" in rows_wanted):
                continue
            student, prune_seconds = pruned_by(criterion)
            summary, seconds = run(row, {**common, "stages": stages, **{s: stage_cfgs[s] for s in stages}}, student)
            stage_seconds = {"prune": round(prune_seconds, 1), **{s: r["seconds"] for s, r in summary["stages"].items()}}
            if row in rows_wanted:
                record(per_class, row, checkpoint.load(summary["checkpoint"]), prune_seconds + seconds, {"stage_seconds": stage_seconds})
            if row == "a" and "e" in rows_wanted:
                distilled = checkpoint.load(Path(summary["stages"]["distill"]["checkpoint"]))
                record(per_class, "e", distilled, prune_seconds + summary["stages"]["distill"]["seconds"], {"note": "row a after distill"})
        if "d1" in rows_wanted:
            raw = {"model": "cifar:resnet20", "weights": str(small_w), "data": str(zip_path), "seed": args.seed,
                   "stages": ["finetune"], "finetune": stage_cfgs["finetune"]}
            summary, seconds = run("d1", raw)
            record(per_class, "d1", checkpoint.load(summary["checkpoint"]), seconds)


def write_markdown(results: dict, results_dir: Path) -> None:
    from curlprune.store.rundir import atomic_write_text

    names = {"t": "ResNet-56 teacher (unpruned)", "a": "CURL: kl prune + distill + refine", "b": "kl prune + CE fine-tune", "c": "l1 prune + distill + refine",
             "d0": "ResNet-20 pretrained, as is", "d1": "ResNet-20 pretrained + CE fine-tune", "e": "CURL without refine"}
    lines = ["# Limited-data benchmark (CIFAR-10 JPEG, ResNet-56 teacher -> ResNet-20 MACs)", "",
             "Commands (in order; each adds or replaces rows):", "", *[f"    {c}" for c in results["commands"]], "",
             f"Target MACs {results['target_macs'] / 1e6:.2f} M (ResNet-20); teacher {results['teacher_macs'] / 1e6:.2f} M MACs, "
             f"{results['teacher_params'] / 1e6:.3f} M params. torch {results['torch']}, {results['threads']} intra-op thread(s) "
             "on 2 CPU cores shared with other jobs: wall times are indicative only.", ""]
    for per_class, rows in results["rows"].items():
        budget = results.get("budgets", {}).get(per_class, {})
        lines += [f"## {per_class} images per class ({int(per_class) * 10} images)", "",
                  f"Budget: distill E = {budget.get('E')} epochs, refine R = {budget.get('R')} epochs of the 6x set; "
                  f"CE rows {budget.get('ce_epochs')} epochs.", "",
                  "| row | method | top-1 (10k test) | MACs | params | wall s |", "|---|---|---|---|---|---|"]
        for row in ("t", "a", "b", "c", "d0", "d1", "e"):
            if row in rows:
                r = rows[row]
                lines.append(f"| {row} | {names[row]} | {r['top1']:.2f}% | {r['macs'] / 1e6:.2f} M | {r['params'] / 1e6:.3f} M | {r['seconds']:.0f} |")
        lines.append("")
    atomic_write_text(results_dir / "limited_data.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
