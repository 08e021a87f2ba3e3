"""Transfer benchmark in the paper's limited-data protocol: a model pretrained on a large dataset,
fine-tuned and pruned on a small dataset of another domain, against a small pretrained model
fine-tuned there at the same MACs.

Source (large): CIFAR-10. Big model: ../shared/models/resnet56-4bfd9763.th (ResNet-56); small
pretrained model: resnet20-12fca82f.th (ResNet-20, about a third of the MACs).
Target (small): ../shared/data/clothing10-96.zip, real photos of clothes (10 classes, 3,068
imbalanced training images, 713 test images), short side 96 px, resized to --size (default 32).
Training sets: a class-balanced 50 per class (500 images, seed 0) and the full training split.

Rows, all at the MACs of ResNet-20 at the input size (rows that prune aim at exactly that):
  t   ResNet-56 fine-tuned on the target, new classifier (the teacher; the unpruned reference)
  a   CURL: prune t (kl, the default criterion) + distill (mixup KD from t) + refine (6x, labels)
  b   prune t (kl) + CE fine-tuning
  c   prune t (l1) + distill + refine
  d1  ResNet-20 pretrained, new classifier, CE fine-tuning (the paper's baseline)
  d2  ResNet-20 pretrained, new classifier, distill + refine from t (the same KD as a)
  e   CURL without refine (row a after its distill stage)
  f   CURL without the 6x expansion (row a's distilled model refined on the original images,
      6 R epochs so it sees as many images)
  z   ResNet-20 from scratch, CE (lower bound)

Budget per training set (BUDGETS): distill E epochs, refine R epochs of the 6x set; rows that
train with CE (t, b, d1, z) get E + 6 R epochs, so every row sees the same number of images.
Rows a, b, d1, d2 run with seeds 0, 1, 2 (training randomness: order, augmentation, mixup, new
head; the training subset and the prunes are the same), the others with seed 0. Every stage
uses the product's defaults (``curlprune.run.pipeline.Run``) except epochs and a 1-epoch warm-up.
Per-epoch monitoring uses a fixed 200-image slice of the test split; the reported numbers are
the last-epoch model on all 713 test images: top-1 and the mean of the per-class accuracies.

    OMP_NUM_THREADS=1 python benchmarks/transfer.py --sets 500 full --out runs/bench-transfer
writes benchmarks/results/transfer.{json,md,png}. Resumable: a finished row (and seed) is never
recomputed; each is written atomically as it finishes (and committed with --git-commit).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench_paths import CLOTHING10 as ZIP, RESNET20 as SMALL, RESNET56 as BIG, RESULTS, ROOT

# (distill epochs E, refine epochs R on the 6x set) per training set; CE rows get E + 6 R epochs.
BUDGETS = {"500": (12, 1), "full": (4, 1)}
ROW_ORDER = ("t", "a", "b", "c", "d1", "d2", "e", "f", "z")
SEEDED = ("a", "b", "d1", "d2")
NAMES = {"t": "ResNet-56 fine-tuned (teacher, unpruned)", "a": "CURL: kl prune t + distill + refine",
         "b": "kl prune t + CE fine-tune", "c": "l1 prune t + distill + refine",
         "d1": "ResNet-20 pretrained + CE fine-tune", "d2": "ResNet-20 pretrained + distill + refine from t",
         "e": "CURL without refine", "f": "CURL, refine without 6x expansion", "z": "ResNet-20 from scratch (CE)"}


def evaluate_all(model, test, spec) -> tuple[float, float]:
    """(top-1 %, mean of the per-class top-1 %) on every image of ``test``."""
    from curlprune.data.data import batches

    model.eval()
    predicted = []
    with torch.inference_mode():
        for images, _ in batches(test, spec, 256):
            predicted.append(model(images.to(next(model.parameters()).device)).argmax(1).cpu())
    predicted = torch.cat(predicted)
    top1 = 100 * float((predicted == test.labels).float().mean())
    rates = [float((predicted[test.labels == c] == c).float().mean()) for c in range(len(test.classes))]
    return top1, 100 * sum(rates) / len(rates)


def main() -> None:
    from curlprune.data import data
    from curlprune.store import checkpoint
    from curlprune.store.rundir import atomic_write_text
    from curlprune.cost.cost import count
    from curlprune.models import build, input_spec
    from curlprune.models.transfer import at_input_size, build_with_new_head
    from curlprune.run.pipeline import Run
    from curlprune.run.run_config import parse_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["500", "full"], choices=list(BUDGETS))
    parser.add_argument("--size", type=int, default=32, help="input side in pixels")
    parser.add_argument("--rows", default=",".join(ROW_ORDER))
    parser.add_argument("--seeds", type=int, default=3, help="seeds for rows a, b, d1, d2")
    parser.add_argument("--out", default="runs/bench-transfer")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--epochs", type=int, default=None, help="override E (smoke runs)")
    parser.add_argument("--per-class", type=int, default=50, help="images per class of the small set (smoke runs: fewer)")
    parser.add_argument("--git-commit", action="store_true", help="git commit the results files after every row")
    parser.add_argument("--markdown", action="store_true",
                        help="only fill in the training seconds of finished rows from their run folders and rewrite the md and png")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    for path in (ZIP, BIG, SMALL):
        if not path.is_file():
            raise SystemExit(f"needs {path}")

    splits = data.load_image_folder(ZIP)
    test = splits["test"]
    monitor = data.calibration_subset(test, 200, seed=0)
    size = args.size
    spec = at_input_size(input_spec("cifar:resnet56"), size)
    x = torch.zeros(1, 3, size, size)
    target_macs, _ = count(build("cifar:resnet20"), x)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    results_path = results_dir / "transfer.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}, "commands": []}
    if results.get("size", size) != size:
        raise SystemExit(f"{results_path} holds results at {results['size']} px: use --size {results['size']} or another --results")
    command = " ".join(["OMP_NUM_THREADS=1", "python", "benchmarks/transfer.py", *sys.argv[1:]])
    results["commands"] = [c for c in results["commands"] if c != command] + [command]
    results.update(size=size, target_macs=target_macs, teacher_macs=count(build("cifar:resnet56"), x)[0],
                   torch=torch.__version__, threads=torch.get_num_threads())
    out_root = Path(args.out) / f"{size}px"
    if args.markdown:
        for tset, rows in results["rows"].items():
            for row, seeds in rows.items():
                for seed, entry in seeds.items():
                    trained = train_seconds(out_root / tset, row, int(seed))
                    if trained is not None:
                        entry["train_seconds"] = trained
        atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
        write_markdown(results, results_dir)
        plot(results, results_dir)
        return

    def done(tset: str, row: str, seed: int) -> bool:
        return str(seed) in results["rows"].get(tset, {}).get(row, {})

    def record(tset: str, row: str, seed: int, model, seconds: float, extra: dict | None = None) -> None:
        macs, params = count(model.cpu(), x)
        top1, per_class = evaluate_all(model, test, spec)
        entry = {"top1": round(top1, 2), "per_class": round(per_class, 2), "macs": macs, "params": params,
                 "seconds": round(seconds, 1), **(extra or {})}
        trained = train_seconds(out_root / tset, row, seed)
        if trained is not None:
            entry["train_seconds"] = trained
        # take in the rows another process of this script wrote meanwhile (e.g. --sets 500 and --sets full at once)
        disk = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
        for disk_set, disk_rows in disk.get("rows", {}).items():
            for disk_row, seeds in disk_rows.items():
                for disk_seed, disk_entry in seeds.items():
                    results["rows"].setdefault(disk_set, {}).setdefault(disk_row, {}).setdefault(disk_seed, disk_entry)
        results["rows"].setdefault(tset, {}).setdefault(row, {})[str(seed)] = entry
        atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
        write_markdown(results, results_dir)
        plot(results, results_dir)
        print(tset, row, seed, entry, flush=True)
        if args.git_commit:
            git_commit(results_dir, f"transfer benchmark: {tset} row {row} seed {seed}: top-1 {entry['top1']:.2f}%")

    for tset in args.sets:
        E, R = BUDGETS[tset]
        E = args.epochs or E
        ce_epochs = E + 6 * R
        results.setdefault("budgets", {})[tset] = {"E": E, "R": R, "ce_epochs": ce_epochs}
        train = splits["train"] if tset == "full" else data.class_balanced_subset(splits["train"], args.per_class, seed=0)
        run_data = {"train": train, "test": monitor}
        root = out_root / tset
        stage_cfgs = {
            "finetune": {"epochs": ce_epochs, "warmup_epochs": 1.0, "progress": False},
            # ce_weight 0: the paper's loss, as every committed row used, whatever the default (0.5 since issue 19)
            "distill": {"epochs": E, "warmup_epochs": 1.0, "progress": False, "ce_weight": 0.0},
            "refine": {"epochs": R, "progress": False},
        }

        def run(name: str, raw: dict, student: Path | None = None) -> tuple[dict, float]:
            raw = {"data": str(ZIP), "input_size": size, "seed": 0, **raw, "run_dir": str(root / name)}
            runner = Run(parse_config(raw, name), student=student)
            runner._data = run_data  # the training set and the monitoring slice
            torch.manual_seed(raw["seed"])  # untrained models (row z) are built from the global RNG
            started = time.time()
            return runner.run(), time.time() - started

        teacher_file = root / "t" / "finetune" / "model.safetensors"

        def teacher() -> Path:
            if not (root / "t" / "finetune" / "done.json").is_file() or not done(tset, "t", 0):
                summary, seconds = run("t", {"model": "cifar:resnet56", "weights": str(BIG), "stages": ["finetune"],
                                             "finetune": {**stage_cfgs["finetune"], "new_head": True}})
                if not done(tset, "t", 0):
                    record(tset, "t", 0, checkpoint.load(summary["checkpoint"]), seconds, {"epochs": ce_epochs})
            return teacher_file

        pruned: dict[str, tuple[Path, float]] = {}

        def pruned_by(criterion: str) -> tuple[Path, float]:
            if criterion not in pruned:
                summary, seconds = run(f"prune-{criterion}", {"model": "cifar:resnet56", "weights": str(teacher()), "stages": ["prune"],
                                       "prune": {"target_macs": float(target_macs), "calib": min(256, len(train)), "criterion": criterion}})
                pruned[criterion] = (Path(summary["stages"]["prune"]["checkpoint"]), seconds)
            return pruned[criterion]

        kd = {"model": "cifar:resnet56", "stages": ["distill", "refine"], "distill": stage_cfgs["distill"], "refine": stage_cfgs["refine"]}
        seeds = {row: (list(range(args.seeds)) if row in SEEDED else [0]) for row in ROW_ORDER}
        if "t" in wanted:
            teacher()
        for seed in range(max(args.seeds, 1)):
            for row in ("a", "b", "c", "d1", "d2", "e", "f", "z"):
                need = row in wanted and seed in seeds[row] and not done(tset, row, seed)
                if row == "a" and seed == 0 and any(r in wanted and not done(tset, r, 0) for r in ("e", "f")):
                    need = True  # e and f start from row a's seed-0 run
                if not need:
                    continue
                if row in ("a", "c"):
                    student, prune_seconds = pruned_by("kl" if row == "a" else "l1")
                    summary, seconds = run(f"{row}-s{seed}", {**kd, "weights": str(teacher()), "seed": seed}, student)
                    if row in wanted and not done(tset, row, seed):
                        stages = {s: r["seconds"] for s, r in summary["stages"].items()}
                        record(tset, row, seed, checkpoint.load(summary["checkpoint"]), prune_seconds + seconds, {"stage_seconds": stages})
                    if row == "a" and seed == 0 and "e" in wanted and not done(tset, "e", 0):
                        distilled = Path(summary["stages"]["distill"]["checkpoint"])
                        record(tset, "e", 0, checkpoint.load(distilled), summary["stages"]["distill"]["seconds"], {"note": "row a (seed 0) after distill"})
                    if row == "a" and seed == 0 and "f" in wanted and not done(tset, "f", 0):
                        distilled = Path(summary["stages"]["distill"]["checkpoint"])
                        f_summary, f_seconds = run("f", {"model": "cifar:resnet56", "weights": str(teacher()), "stages": ["refine"],
                                                         "refine": {**stage_cfgs["refine"], "expand": False, "epochs": 6 * R}}, distilled)
                        record(tset, "f", 0, checkpoint.load(f_summary["checkpoint"]), summary["stages"]["distill"]["seconds"] + f_seconds,
                               {"note": f"row a (seed 0) distilled, refined {6 * R} epochs on the original images"})
                elif row == "b":
                    student, prune_seconds = pruned_by("kl")
                    summary, seconds = run(f"b-s{seed}", {"model": "cifar:resnet56", "weights": str(teacher()), "seed": seed,
                                                          "stages": ["finetune"], "finetune": stage_cfgs["finetune"]}, student)
                    record(tset, "b", seed, checkpoint.load(summary["checkpoint"]), prune_seconds + seconds)
                elif row == "d1":
                    summary, seconds = run(f"d1-s{seed}", {"model": "cifar:resnet20", "weights": str(SMALL), "seed": seed, "stages": ["finetune"],
                                                           "finetune": {**stage_cfgs["finetune"], "new_head": True}})
                    record(tset, "d1", seed, checkpoint.load(summary["checkpoint"]), seconds)
                elif row == "d2":
                    start = root / f"d2-s{seed}-start.safetensors"
                    if not start.is_file():  # ResNet-20 pretrained with a new classifier, as a curlprune checkpoint
                        model, _ = build_with_new_head("cifar:resnet20", str(SMALL), 10, x, seed=seed)
                        start.parent.mkdir(parents=True, exist_ok=True)
                        checkpoint.save(start, {"name": "cifar:resnet20", "kwargs": {}}, {}, model.state_dict(), input_shape=list(x.shape))
                    summary, seconds = run(f"d2-s{seed}", {**kd, "weights": str(teacher()), "seed": seed}, start)
                    record(tset, "d2", seed, checkpoint.load(summary["checkpoint"]), seconds)
                elif row == "z":
                    summary, seconds = run("z", {"model": "cifar:resnet20", "stages": ["finetune"], "finetune": stage_cfgs["finetune"]})
                    record(tset, "z", 0, checkpoint.load(summary["checkpoint"]), seconds)
    plot(results, results_dir)


def git_commit(results_dir: Path, message: str) -> None:
    """Commit the results files (retrying while another git command holds the index lock)."""
    files = [str(p) for p in sorted(results_dir.glob("transfer.*"))]
    for _ in range(20):
        add = subprocess.run(["git", "-C", str(ROOT), "add", *files], capture_output=True, text=True)
        commit = subprocess.run(["git", "-C", str(ROOT), "commit", "-q", "-m", message, "--", *files], capture_output=True, text=True)
        if add.returncode == 0 and commit.returncode == 0:
            return
        if "index.lock" not in add.stderr + commit.stderr:
            print(f"git commit skipped: {(add.stderr + commit.stderr).strip()[:200]}", flush=True)
            return
        time.sleep(3)


def summary_of(entries: dict) -> dict:
    """Mean and std (over seeds) of top-1 and per-class mean; std is None for one seed."""
    out = {"n": len(entries)}
    for key in ("top1", "per_class"):
        values = [e[key] for e in entries.values()]
        out[key] = statistics.mean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else None
    first = next(iter(entries.values()))
    out.update(macs=first["macs"], params=first["params"], seconds=statistics.mean(e["seconds"] for e in entries.values()),
               train_seconds=statistics.mean(e.get("train_seconds", e["seconds"]) for e in entries.values()))
    return out


TRAINING_STAGES = ("finetune", "distill", "refine")


def stage_seconds(*folders: tuple[Path, tuple[str, ...]]) -> float | None:
    """Sum of the seconds of the named stages in the summaries of finished run folders, given as
    ``(run folder, stage names)`` pairs; None when no such stage is recorded."""
    found = []
    for folder, names in folders:
        path = folder / "summary.json"
        stages = json.loads(path.read_text())["stages"] if path.is_file() else {}
        found += [v["seconds"] for k, v in stages.items() if k in names]
    return round(sum(found), 1) if found else None


def train_seconds(root: Path, row: str, seed: int) -> float | None:
    """Seconds of the training stages (finetune, distill, refine) of one finished row, from the
    summaries of its run folders under ``root`` (the training set's folder); None when absent.
    Pruning (the criterion's scoring, shared by the rows that prune with it) is not counted."""
    if row == "e":
        return stage_seconds((root / "a-s0", ("distill",)))
    if row == "f":
        return stage_seconds((root / "a-s0", ("distill",)), (root / "f", TRAINING_STAGES))
    return stage_seconds((root / (row if row in ("t", "z") else f"{row}-s{seed}"), TRAINING_STAGES))


def write_markdown(results: dict, results_dir: Path) -> None:
    from curlprune.store.rundir import atomic_write_text

    def fmt(mean: float, std: float | None) -> str:
        return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    size = results["size"]
    lines = [f"# Transfer benchmark: CIFAR-10 pretrained -> clothing10 at {size}x{size} (ResNet-56 -> ResNet-20 MACs)", "",
             "Commands (in order; each adds rows, finished rows are kept):", "", *[f"    {c}" for c in results["commands"]], "",
             f"Target MACs {results['target_macs'] / 1e6:.2f} M (ResNet-20 at {size} px); ResNet-56 {results['teacher_macs'] / 1e6:.2f} M. "
             f"Top-1 and per-class mean accuracy (%) of the last-epoch model on all 713 test images; mean ± std over seeds "
             f"(rows a, b, d1, d2), else one seed. torch {results['torch']}, {results['threads']} thread on 2 CPU cores shared "
             "with other jobs: times are indicative only. Training s: seconds of the row's training stages (finetune, "
             "distill, refine; e: row a's distill, f: that plus its refine), not the pruning, whose kl scoring of t is "
             "shared by rows a, b, e and f. Rows: see the docstring of benchmarks/transfer.py.", "",
             "Input size: MACs grow with the square of the side (ResNet-20: 40.6 M at 32 px, 91.2 M at 48, 162.2 M at 64; "
             "ResNet-56: 125.5 / 282.3 / 501.9 M) and so does CPU time (training on this machine, one thread: ResNet-56 "
             "17.0 / 7.7 / 4.1 images/s, ResNet-20 41.6 / 23.2 / 13.2). At 64 px the table would take about four times "
             "the 2-3 CPU-hours it is budgeted for, and the CIFAR-10 filters were learned at 32 px, the scale they "
             "see here. The accuracy cost of 32 px against 64 px for the small model is measured in "
             "benchmarks/results/transfer_recipe.md.", "",
             "Follow-ups at 50 per class: benchmarks/results/teacher_probe.md (rows a, b and d1 again with a teacher "
             "and a ResNet-20 trained 36 epochs) and benchmarks/results/refine_probe.md (the refine stage's batch norm, "
             "label step, epochs and learning rate).", "",
             "Successor: benchmarks/results/small_data.md (benchmarks/small_data.py, issue 19). The same task with a "
             "validation split held out of the training images, the teacher early-stopped on it, the recovery recipe "
             "chosen on it, then rows a (that recipe, now curlprune's default), a-paper, b, d1 and every ingredient "
             "switched off and on, 3 seeds on test with paired standard errors. Its teacher is trained longer than "
             "this table's, so its numbers are higher; compare rows within one file.", ""]
    for tset, rows in results["rows"].items():
        budget = results["budgets"][tset]
        images = "500 images (50 per class)" if tset == "500" else "the full training split (3,068 images, imbalanced)"
        lines += [f"## Trained on {images}", "",
                  f"Budget: distill E = {budget['E']} epochs + refine R = {budget['R']} epoch(s) of the 6x set; "
                  f"CE rows (t, b, d1, z) {budget['ce_epochs']} epochs; f refines {6 * budget['R']} epochs on the original images.", "",
                  "| row | method | seeds | top-1 % | per-class mean % | MACs | params | training s |", "|---|---|---|---|---|---|---|---|"]
        for row in ROW_ORDER:
            if row in rows:
                s = summary_of(rows[row])
                lines.append(f"| {row} | {NAMES[row]} | {s['n']} | {fmt(s['top1'], s['top1_std'])} | {fmt(s['per_class'], s['per_class_std'])} | "
                             f"{s['macs'] / 1e6:.2f} M | {s['params'] / 1e6:.3f} M | {s['train_seconds']:.0f} |")
        lines.append("")
    atomic_write_text(results_dir / "transfer.md", "\n".join(lines) + "\n")


def plot(results: dict, results_dir: Path) -> None:
    """Bar chart of top-1 per row and training set, with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curlprune.store.rundir import atomic_write

    sets = list(results["rows"])
    if not sets:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(sets)
    for i, tset in enumerate(sets):
        rows = [r for r in ROW_ORDER if r in results["rows"][tset]]
        stats = [summary_of(results["rows"][tset][r]) for r in rows]
        positions = [ROW_ORDER.index(r) + (i - (len(sets) - 1) / 2) * width for r in rows]
        ax.bar(positions, [s["top1"] for s in stats], width, yerr=[s["top1_std"] or 0 for s in stats], capsize=3,
               label="50 per class" if tset == "500" else "full split")
    ax.set_xticks(range(len(ROW_ORDER)), ROW_ORDER)
    ax.set_ylabel("top-1 on 713 test images (%)")
    ax.set_title(f"clothing10 at {results['size']} px, all rows at ResNet-20 MACs (t: ResNet-56)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(results_dir / "transfer.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
