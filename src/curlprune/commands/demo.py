"""The ``demo`` command: the whole pipeline on an embedded example (no downloads)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from curlprune.commands.run import run_and_print
from curlprune.data import evaluate, load_digits_dataset, train_digits_model
from curlprune.errors import CurlpruneError
from curlprune.models import input_spec
from curlprune.report import console
from curlprune.run import parse_config
from curlprune.store import atomic_write

DEMO_SHARED = Path(__file__).resolve().parents[4] / "shared"  # ../shared beside the repository


def demo_config(out: Path, cifar: bool) -> dict:
    """The embedded default run config: real digits + a small residual CNN, or CIFAR-10 ResNet-56 -> 50% MACs.

    It lists no stages and sets no loss, so it shows the product's defaults: prune, then distill
    (ce_weight 0.5), the recipe chosen on val (:data:`curlprune.run.run_config.DEFAULT_STAGES`,
    docs/method.md §8); only the epochs and batch sizes are the demo's.

    Args:
        out: the run directory (the digits teacher's weights go to ``out/teacher.pt``).
        cifar: use CIFAR-10 ResNet-56 from ../shared instead of the digits.
    Returns:
        A raw config mapping for :func:`curlprune.run.run_config.parse_config`.
    """
    if cifar:
        return {
            "model": "cifar:resnet56", "weights": str(DEMO_SHARED / "models" / "resnet56-cifar10jpeg.pt"),
            "data": str(DEMO_SHARED / "data" / "cifar10-jpeg.zip"), "train_per_class": 100, "run_dir": str(out), "seed": 0,
            "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 256},
            "distill": {"epochs": 3, "warmup_epochs": 0.5, "batch_size": 64},
        }
    return {
        "model": "small:resnet-digits", "weights": str(out / "teacher.pt"), "data": "digits", "run_dir": str(out), "seed": 0,
        "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 256},
        "distill": {"epochs": 10, "warmup_epochs": 1.0, "batch_size": 32},
    }


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.cifar and "OMP_NUM_THREADS" not in os.environ:
        # 8x8 images through at most 32 channels: one intra-op thread is fastest, and several
        # threads slow it down many times over when the cores are shared (a refine epoch 60 s -> 4 s).
        torch.set_num_threads(1)
    if args.cifar and not (DEMO_SHARED / "data" / "cifar10-jpeg.zip").is_file():
        raise CurlpruneError(f"--cifar needs the CIFAR-10 copy at {DEMO_SHARED}/data/cifar10-jpeg.zip; run without --cifar")
    if not args.cifar and not (out / "teacher.pt").is_file():
        console.print("[bold]1/3[/] training the small residual CNN on the 1,797 real 8x8 digits (sklearn) ...", markup=True)
        model = train_digits_model(seed=0)
        top1 = 100 * evaluate(model, load_digits_dataset(0)["test"], input_spec("small:resnet-digits"))
        console.print(f"    unpruned model: {top1:.2f}% test top-1")
        atomic_write(out / "teacher.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    console.print("[bold]2/3[/] prune to 50% of the MACs with the KL criterion, then [bold]3/3[/] distill from the unpruned model", markup=True)
    return run_and_print(parse_config(demo_config(out, args.cifar), "demo"))


def register(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``demo`` to the parser."""
    p = subparsers.add_parser("demo", help="run the whole pipeline on an embedded example (no downloads)", formatter_class=formatter,
                              description="Train a small residual CNN on scikit-learn's real 8x8 digits, prune it to 50% of its "
                                          "MACs with the KL criterion, recover accuracy by distillation (the default stages: prune, distill), "
                                          "and print the per-group table and accuracy before/after; ends with the report (figures + index.md in <out>/report/). Resumable.")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--cifar", action="store_true", help="use CIFAR-10 ResNet-56 from ../shared instead (slower)")
    p.set_defaults(func=cmd_demo)
