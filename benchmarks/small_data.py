"""Small data that wins? (issue 19 item 4): choose the recovery recipe on a validation split, then
report on test, at 50 images per class and on the full training split of clothing10.

Source: CIFAR-10. Teacher and pruned model: ResNet-56 (../shared/models/resnet56-4bfd9763.th);
small pretrained model: ResNet-20 (resnet20-12fca82f.th). Target data: ../shared/data/clothing10-96.zip
(10 classes, 3,068 imbalanced training images, 713 test images) at 32 px; every student at the MACs
of ResNet-20 (the prune target).

* Validation split (curlprune.run.pipeline.load_splits, seed 0, the product's own): at 50 per class,
  20 per class held out of the training images, then 50 per class drawn from the rest; on the full
  split, val_fraction 0.15 of every class. No row trains on val (the calibration images of the
  prune stage included); every choice is made on val top-1; the test split only reports.
* t: ResNet-56 with a new classifier, the finetune stage with early_stop {patience} on val (the
  product's), epochs capped, the best epoch kept; its curve (val and test top-1 per epoch) is in the
  report. The test curve is monitoring only: it decides nothing.
* Every other row monitors its epochs on val (the stage's "test" slot holds val) and reports its
  last epoch: val top-1 (all rows) and test top-1 (report rows only; choice rows never see test).
* Rows, budgets and the choice: benchmarks/small_data_plan.py.
* Resumable: one JSON line per finished row in --rows-file, keyed by the row id (bench_stats.RowsFile);
  a finished row is never recomputed. The pruned model and shared distill stages are cached under
  --out with a lock. Processes sharing the rows file split the plan dynamically: each claims the
  next free row that can run (bench_stats.RowsFile.claim); --shard i/n pins every n-th row instead.

    python benchmarks/small_data.py --list        # planned rows, estimated CPU time
    python benchmarks/small_data.py               # one of two background processes (start it twice)
    python benchmarks/small_data.py --report      # rewrite the markdown and png from the rows file
    python benchmarks/small_data.py --smoke       # a few minutes, end to end, runs/bench-small-smoke
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import small_data_plan as sp  # noqa: E402
from bench_stats import RowsFile, run_pending, shard  # noqa: E402
from small_data_report import write_report  # noqa: E402
from transfer import evaluate_all  # noqa: E402

from bench_paths import CLOTHING10 as ZIP, RESNET20 as SMALL, RESNET56 as BIG, RESULTS  # noqa: E402
SPLIT_SEED = 0  # the validation split and the training subset: the same images for every row
SIZE = 32
WARMUP = 1.0  # warm-up epochs of every stage but a-paper's (the paper's 5)


class Bench:
    def __init__(self, out: Path, settings: dict, smoke: bool) -> None:
        from curlprune.cost.cost import count
        from curlprune.data import data
        from curlprune.models import build, input_spec
        from curlprune.models.transfer import at_input_size
        from curlprune.run.pipeline import load_splits

        self.out, self.settings, self.smoke = out, settings, smoke
        self.loss_grid = sp.SMOKE_LOSS_GRID if smoke else sp.LOSS_GRID
        self.refine_grid = sp.SMOKE_REFINE_GRID if smoke else sp.REFINE_GRID
        self.spec = at_input_size(input_spec("cifar:resnet56"), SIZE)
        self.example = torch.zeros(1, 3, SIZE, SIZE)
        self.target_macs = count(build("cifar:resnet20"), self.example)[0]
        self.splits = {}
        for tset, s in settings.items():
            splits, _ = load_splits(str(ZIP), s["per_class"], SPLIT_SEED, val_per_class=s["val_per_class"], val_fraction=s["val_fraction"])
            if smoke:  # 200 test and at most 60 val images are enough to prove the script
                splits["test"] = data.calibration_subset(splits["test"], 200, SPLIT_SEED)
                splits["val"] = data.calibration_subset(splits["val"], min(60, len(splits["val"])), SPLIT_SEED)
            self.splits[tset] = splits

    # ------------------------------------------------------------------ runs of the product's pipeline

    @contextlib.contextmanager
    def locked(self, folder: Path):
        """One process at a time works in ``folder`` (a pruned model or distill stage two rows share)."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def run(self, tset: str, folder: Path, raw: dict, student: Path | None = None, teacher_run: bool = False) -> tuple[dict, float]:
        """One curlprune run (``curlprune.run.pipeline.Run``) on this set's data; (summary, CPU seconds).
        Stages see train, and val in the "test" slot (the teacher: val for early stopping, test as its monitor)."""
        from curlprune.run.pipeline import Run
        from curlprune.run.run_config import parse_config

        splits = self.splits[tset]
        raw = {"data": str(ZIP), "input_size": SIZE, "model": "cifar:resnet56", **raw, "run_dir": str(folder)}
        runner = Run(parse_config(raw, folder.name), student=student)
        runner._data = ({"train": splits["train"], "val": splits["val"], "test": splits["test"]} if teacher_run
                        else {"train": splits["train"], "test": splits["val"]})
        torch.manual_seed(raw.get("seed", 0))
        cpu = time.process_time()
        summary = runner.run()
        return summary, time.process_time() - cpu

    def teacher_weights(self, tset: str) -> Path:
        return self.out / tset / "t" / "finetune" / "model.safetensors"

    def pruned(self, tset: str) -> tuple[Path, float]:
        """kl prune of t to ResNet-20's MACs (cached; shared by a, its ablations, a-paper and b); (checkpoint, CPU s)."""
        folder = self.out / tset / "prune"
        with self.locked(folder):
            summary, cpu = self.run(tset, folder, {"weights": str(self.teacher_weights(tset)), "stages": ["prune"],
                                                   "prune": {"target_macs": float(self.target_macs), "criterion": "kl",
                                                             "calib": min(self.settings[tset]["calib"], len(self.splits[tset]["train"]))}})
        return Path(summary["stages"]["prune"]["checkpoint"]), cpu

    def distilled(self, tset: str, recipe: sp.Recipe, seed: int) -> tuple[dict, float]:
        """The distill stage of ``recipe`` from the pruned t (cached per loss, epochs and seed: a refine variant
        shares it); (summary, CPU s spent now)."""
        budget = self.settings[tset]["budget"]
        student, prune_cpu = self.pruned(tset)
        folder = self.out / tset / "distill" / f"{recipe.distill_key(budget)}-s{seed}"
        distill = {"epochs": recipe.distill_epochs(budget), "warmup_epochs": WARMUP, "progress": False,
                   "ce_weight": recipe.ce_weight, "feature_weight": recipe.feature_weight}
        with self.locked(folder):
            summary, cpu = self.run(tset, folder, {"weights": str(self.teacher_weights(tset)), "seed": seed, "stages": ["distill"],
                                                   "distill": distill}, student)
        return summary, prune_cpu + cpu

    def student_row(self, tset: str, recipe: sp.Recipe, seed: int) -> tuple[Path, dict]:
        """Train ``recipe`` (distill, then refine when R > 0; both cached per recipe and seed, so recipe a's
        seed-0 row reuses the choice row of the same recipe); (final checkpoint, record fields)."""
        budget = self.settings[tset]["budget"]
        summary, cpu = self.distilled(tset, recipe, seed)
        seconds = {"distill": summary["stages"]["distill"]["seconds"]}
        final = Path(summary["checkpoint"])
        if recipe.refine:
            folder = self.out / tset / "refine" / f"{recipe.distill_key(budget)}-r{recipe.refine}-l{recipe.label_lr:g}-x{int(recipe.expand)}-s{seed}"
            refine = {"epochs": recipe.refine_epochs(), "label_lr": recipe.label_lr, "expand": recipe.expand, "progress": False}
            with self.locked(folder):
                refined, refine_cpu = self.run(tset, folder, {"weights": str(self.teacher_weights(tset)), "seed": seed,
                                                              "stages": ["refine"], "refine": refine}, final)
            seconds["refine"], cpu, final = refined["stages"]["refine"]["seconds"], cpu + refine_cpu, Path(refined["checkpoint"])
        epochs = {"distill": recipe.distill_epochs(budget), "refine": recipe.refine, "refine_expanded": bool(recipe.expand),
                  "budget": budget}
        return final, {"recipe": recipe.as_dict(), "epochs": epochs, "train_seconds": round(sum(seconds.values()), 1),
                       "stage_seconds": seconds, "cpu_seconds": round(cpu, 1)}

    # ------------------------------------------------------------------ rows

    def measure(self, tset: str, checkpoint_path: Path, test: bool = True) -> dict:
        from curlprune.cost.cost import count
        from curlprune.store import checkpoint

        model = checkpoint.load(checkpoint_path).cpu()
        macs, params = count(model, self.example)
        cpu = time.process_time()
        val_top1, val_per_class = evaluate_all(model, self.splits[tset]["val"], self.spec)
        out = {"macs": macs, "params": params, "val_top1": round(val_top1, 2), "val_per_class": round(val_per_class, 2)}
        if test:
            top1, per_class = evaluate_all(model, self.splits[tset]["test"], self.spec)
            out.update(test_top1=round(top1, 2), test_per_class=round(per_class, 2))
        out["eval_cpu_seconds"] = round(time.process_time() - cpu, 1)
        return out

    def compute(self, row_id: str, done: dict) -> dict | None:
        """The finished row ``row_id``, or None while a row it needs (t, the choice) is unfinished."""
        row = sp.parse_id(row_id)
        s = self.settings[row.set]
        base = {"id": row.id, "set": row.set, "name": row.name, "seed": row.seed, "kind": row.kind,
                "images": {k: len(v) for k, v in self.splits[row.set].items()}}
        if row.kind == "t":
            return {**base, **self.teacher_row(row.set)}
        if sp.Row(row.set, "t").id not in done:
            return None
        if row.kind == "d1":
            epochs = done[sp.Row(row.set, "t").id]["epochs_run"]
            folder = self.out / row.set / "rows" / f"d1-s{row.seed}"
            summary, cpu = self.run(row.set, folder, {"model": "cifar:resnet20", "weights": str(SMALL), "seed": row.seed,
                                                      "stages": ["finetune"], "finetune": {"epochs": epochs, "warmup_epochs": WARMUP,
                                                                                           "new_head": True, "progress": False}})
            return {**base, **self.measure(row.set, Path(summary["checkpoint"])), "epochs": {"finetune": epochs},
                    "train_seconds": summary["stages"]["finetune"]["seconds"], "cpu_seconds": round(cpu, 1)}
        if row.kind == "b":
            student, prune_cpu = self.pruned(row.set)
            folder = self.out / row.set / "rows" / f"b-s{row.seed}"
            summary, cpu = self.run(row.set, folder, {"weights": str(self.teacher_weights(row.set)), "seed": row.seed, "stages": ["finetune"],
                                                      "finetune": {"epochs": s["budget"], "warmup_epochs": WARMUP, "progress": False}}, student)
            return {**base, **self.measure(row.set, Path(summary["checkpoint"])), "epochs": {"finetune": s["budget"], "budget": s["budget"]},
                    "train_seconds": summary["stages"]["finetune"]["seconds"], "cpu_seconds": round(prune_cpu + cpu, 1)}
        if row.kind == "a-paper":
            student, prune_cpu = self.pruned(row.set)
            folder = self.out / row.set / "rows" / f"a-paper-s{row.seed}"
            distill_epochs = s["budget"] - sp.EXPANSION
            summary, cpu = self.run(row.set, folder, {"weights": str(self.teacher_weights(row.set)), "seed": row.seed, "recipe": "paper",
                                                      "stages": ["distill", "refine"], "distill": {"epochs": distill_epochs, "progress": False},
                                                      "refine": {"epochs": 1, "progress": False}}, student)
            seconds = {k: v["seconds"] for k, v in summary["stages"].items()}
            return {**base, **self.measure(row.set, Path(summary["checkpoint"])), "recipe": "paper",
                    "epochs": {"distill": distill_epochs, "refine": 1, "refine_expanded": True, "budget": s["budget"]},
                    "train_seconds": round(sum(seconds.values()), 1), "stage_seconds": seconds, "cpu_seconds": round(prune_cpu + cpu, 1)}
        if row.kind == "choose-loss":
            config = row.name[len("choose:"):]
            recipe = sp.loss_recipe(config, self.loss_grid)
        elif row.kind == "choose-refine":
            winner = sp.loss_winner(done, self.loss_grid)
            if winner is None:
                return None
            config = f"{winner}+{row.name[len('choose:+'):]}"
            recipe = sp.with_refine(sp.loss_recipe(winner, self.loss_grid), row.name[len("choose:+"):], self.refine_grid)
        else:  # a and its ablations
            choice = sp.chosen(done, self.loss_grid, self.refine_grid)
            if choice is None:
                return None
            a = sp.Recipe.of(choice["recipe"])
            recipe = (sp.switch_on(a, row.name, done, self.loss_grid, self.refine_grid) if row.name in sp.SWITCH_ON
                      else sp.ablation(a, row.name))
            base["chosen"] = choice
            if row.name != "a" and recipe == a:  # a has this ingredient off (or on) already: the row is a
                return {**base, "same_as": sp.Row(row.set, "a", row.seed).id, "recipe": recipe.as_dict()}
            config = row.name
        final, fields = self.student_row(row.set, recipe, row.seed)
        record = {**base, "config": config, **fields, **self.measure(row.set, final, test=not row.kind.startswith("choose"))}
        return record

    def teacher_row(self, tset: str) -> dict:
        s = self.settings[tset]
        folder = self.out / tset / "t"
        finetune = {"epochs": s["teacher_cap"], "warmup_epochs": WARMUP, "new_head": True, "progress": False,
                    "early_stop": {"patience": s["patience"]}}
        summary, cpu = self.run(tset, folder, {"weights": str(BIG), "stages": ["finetune"], "finetune": finetune}, teacher_run=True)
        curve = [json.loads(line) for line in (folder / "finetune" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        stage = summary["stages"]["finetune"]
        return {**self.measure(tset, Path(summary["checkpoint"])), "epochs_run": len(curve), "best_epoch": stage.get("best_epoch"),
                "epoch_cap": s["teacher_cap"], "patience": s["patience"], "train_seconds": stage["seconds"], "cpu_seconds": round(cpu, 1),
                "curve": [{"epoch": r["epoch"], "val_top1": round(r["val_top1"], 2), "test_top1": round(r["test_top1"], 2)} for r in curve]}


def select(rows: list[sp.Row], pattern: str | None, shard_spec: str | None) -> list[sp.Row]:
    if pattern:
        rows = [r for r in rows if any(fnmatch.fnmatchcase(r.id, p) for p in pattern.split(","))]
    return shard(rows, shard_spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the planned rows (done or not) with their estimated CPU time")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown and png from the rows file")
    parser.add_argument("--rows", default=None, help="only rows whose id matches one of these comma-separated globs")
    parser.add_argument("--shard", default=None, help="i/n: this process runs every n-th planned row from the i-th")
    parser.add_argument("--sets", nargs="+", default=list(sp.SETS), choices=list(sp.SETS))
    parser.add_argument("--no-wait", action="store_true", help="exit instead of waiting for rows another shard computes")
    parser.add_argument("--smoke", action="store_true", help="tiny subsets and budgets, a few rows: proves the script end to end")
    parser.add_argument("--out", default=None, help="run folders (default runs/bench-small[-smoke])")
    parser.add_argument("--rows-file", default=None, help="JSON lines of finished rows (default benchmarks/results/small_data.jsonl)")
    args = parser.parse_args()
    settings = sp.SMOKE_SETTINGS if args.smoke else sp.SETTINGS
    out = Path(args.out or ("runs/bench-small-smoke" if args.smoke else "runs/bench-small"))
    store = RowsFile(args.rows_file or (out / "rows.jsonl" if args.smoke else RESULTS / "small_data.jsonl"))
    md = store.path.with_suffix(".md")
    plan = sp.smoke_plan() if args.smoke else sp.plan(tuple(args.sets))
    rows = select(plan, args.rows, args.shard)
    report = lambda: write_report(store.read(), md, settings=settings, smoke=args.smoke)  # noqa: E731
    if args.list:
        done = store.read()
        teacher_epochs = {r["set"]: r["epochs_run"] for r in done.values() if r.get("kind") == "t"}
        total, phases = 0.0, {}
        for position, row in enumerate(rows):
            cost = sp.estimate(row, settings, teacher_epochs)
            total += 0 if row.id in done else cost
            phases[sp.phase(row)] = phases.get(sp.phase(row), 0.0) + (0 if row.id in done else cost)
            print(f"{position:3d}  {row.id:28s}  {'done' if row.id in done else f'~{cost / 3600:.2f} h'}")
        print("left per phase: " + ", ".join(f"{name} ~{seconds / 3600:.1f} h" for name, seconds in phases.items()))
        print(f"{len(rows)} rows, {sum(r.id in done for r in rows)} done; ~{total / 3600:.1f} h of one-thread CPU left "
              "(the teacher at its epoch cap; wall time on shared cores is longer)")
        return
    if args.report:
        report()
        print(f"wrote {md}")
        return
    torch.set_num_threads(1)
    for path in (ZIP, BIG, SMALL):
        if not path.is_file():
            raise SystemExit(f"needs {path}")
    bench = Bench(out, settings, args.smoke)
    print("splits: " + "; ".join(f"{k}: " + ", ".join(f"{n} {len(v)}" for n, v in d.items()) for k, d in bench.splits.items())
          + f"; {len(rows)} rows selected", flush=True)
    run_pending([r.id for r in rows], store, bench.compute, report, wait=not args.no_wait, log=lambda m: print(m, flush=True))
    report()


if __name__ == "__main__":
    main()
