"""Which transfer recipe should `finetune` use by default for a new classifier? Measured on real data.

A CIFAR-10 pretrained CIFAR ResNet (../shared/models/resnet20-12fca82f.th by default) is
fine-tuned on the clothing photos (../shared/data/clothing10-96.zip, 10 classes; 50 training
images per class, all 713 test images) with a re-initialised classifier, by `curlprune`'s own
pipeline (stages: [finetune], finetune.new_head: true), with three recipes for the body:

  plain   body at the same lr as the new head          (body_lr_mult 1, head_epochs 0)
  mult    body at 0.1 x the lr of the head             (body_lr_mult 0.1, head_epochs 0)
  warmup  head alone for the first 2 epochs, then all  (body_lr_mult 1, head_epochs 2)

Everything else is FinetuneConfig's default (lr 0.01, batch 32, warm-up 1 epoch, cosine), at
--epochs epochs. Reports the last-epoch test top-1 and the per-class mean accuracy.

    python benchmarks/transfer_recipe.py --sizes 32 --seeds 0 1 --out runs/bench-recipe
writes benchmarks/results/transfer_recipe.{json,md}; resumable (a finished row is never recomputed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_paths import CLOTHING10, RESNET20, RESULTS
RECIPES = {"plain": {"body_lr_mult": 1.0, "head_epochs": 0.0}, "mult": {"body_lr_mult": 0.1, "head_epochs": 0.0},
           "warmup": {"body_lr_mult": 1.0, "head_epochs": 2.0}}


def per_class_mean(model, test, spec) -> float:
    """Mean over classes of the per-class top-1 (%), on every test image."""
    from curlprune.data.data import batches

    model.eval()
    predictions = []
    with torch.inference_mode():
        for images, _ in batches(test, spec, 256):
            predictions.append(model(images).argmax(1))
    predicted = torch.cat(predictions)
    rates = [float((predicted[test.labels == c] == c).float().mean()) for c in range(len(test.classes))]
    return 100 * sum(rates) / len(rates)


def main() -> None:
    from curlprune.data import data
    from curlprune.store import checkpoint
    from curlprune.store.rundir import atomic_write_text
    from curlprune.run.pipeline import Run
    from curlprune.run.run_config import parse_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar:resnet20")
    parser.add_argument("--weights", default=str(RESNET20))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", default="plain,mult,warmup")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="runs/bench-recipe")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()

    zip_path = CLOTHING10
    splits = data.load_image_folder(zip_path)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "transfer_recipe.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}, "commands": []}
    command = " ".join(["python", "benchmarks/transfer_recipe.py", *sys.argv[1:]])
    results["commands"] = [c for c in results["commands"] if c != command] + [command]
    results.update(epochs=args.epochs, per_class=args.per_class, torch=torch.__version__, threads=torch.get_num_threads())
    for size in args.sizes:
        for seed in args.seeds:
            train = data.class_balanced_subset(splits["train"], args.per_class, seed)
            for recipe in args.recipes.split(","):
                key = f"{args.model}|{size}|{recipe}|{seed}"
                if key in results["rows"]:
                    continue
                raw = {"model": args.model, "weights": args.weights, "data": str(zip_path), "seed": seed, "input_size": size,
                       "run_dir": f"{args.out}/{args.model.replace(':', '-')}-{size}-{recipe}-{seed}", "stages": ["finetune"],
                       "finetune": {"epochs": args.epochs, "new_head": True, "progress": False, **RECIPES[recipe]}}
                runner = Run(parse_config(raw, key))
                runner._data = {"train": train, "test": splits["test"]}
                started = time.time()
                summary = runner.run()
                model = checkpoint.load(summary["checkpoint"])
                results["rows"][key] = {"model": args.model, "size": size, "recipe": recipe, "seed": seed,
                                        "top1": round(summary["last_top1"], 2),
                                        "per_class": round(per_class_mean(model, splits["test"], runner.spec), 2),
                                        "seconds": round(time.time() - started, 1)}
                atomic_write_text(path, json.dumps(results, indent=2) + "\n")
                write_markdown(results, results_dir)
                print(key, results["rows"][key], flush=True)


def write_markdown(results: dict, results_dir: Path) -> None:
    from curlprune.store.rundir import atomic_write_text

    groups: dict[tuple, list[dict]] = {}
    for row in results["rows"].values():
        groups.setdefault((row["model"], row["size"], row["recipe"]), []).append(row)

    def stat(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    lines = ["# Transfer recipe for a new classifier (clothing10, CIFAR-10 pretrained)", "", "Commands:", "",
             *[f"    {c}" for c in results["commands"]], "",
             f"{results['per_class']} training images per class, all 713 test images; {results['epochs']} epochs of "
             "FinetuneConfig's defaults otherwise (lr 0.01, batch 32, 1 warm-up epoch, cosine). Last-epoch numbers, "
             "mean ± std over seeds (seed = training subset, head init, order).", "",
             "| model | input | recipe | seeds | top-1 % | per-class mean % | wall s (each) |", "|---|---|---|---|---|---|---|"]
    for (model, size, recipe), rows in sorted(groups.items()):
        lines.append(f"| {model} | {size} | {recipe} {RECIPES[recipe]} | {len(rows)} | {stat([r['top1'] for r in rows])} | "
                     f"{stat([r['per_class'] for r in rows])} | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    atomic_write_text(results_dir / "transfer_recipe.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
