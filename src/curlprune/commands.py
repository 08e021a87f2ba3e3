"""Small sub-commands: ``groups`` (inspect), ``count`` (MACs/params) and ``export`` (ONNX)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from curlprune.errors import CurlpruneError


def example_input_for(model_name: str, input_size: int | None = None, batch: int = 1, weights: str | None = None) -> torch.Tensor:
    """A zero tensor shaped like one input batch of the named model (with these weights: torchvision
    weights may set the input size, e.g. vit_b_16's SWAG weights take 384x384)."""
    from curlprune.models import input_spec

    spec = input_spec(model_name, weights)
    size = input_size or spec.size
    return torch.zeros(batch, spec.channels, size, size)


def load_model_arg(model: str | None, weights: str | None, checkpoint: str | None = None):
    """Resolve --model/--weights or a curlprune checkpoint into (module, model name, input shape)."""
    from curlprune import checkpoint as ckpt
    from curlprune.models import build

    if checkpoint:
        meta = ckpt.read_metadata(checkpoint)
        return ckpt.load(checkpoint), meta["model_ref"]["name"], meta["input_shape"]
    if not model:
        raise CurlpruneError("no model given: pass --model NAME (e.g. cifar:resnet56) or a checkpoint file")
    return build(model, weights=weights).eval(), model, list(example_input_for(model, weights=weights).shape)


def cmd_groups(args: argparse.Namespace) -> int:
    from curlprune.analysis import trace
    from curlprune.report import console, groups_table

    model, name, _ = load_model_arg(args.model, args.weights)
    groups = trace(model, example_input_for(name, args.input_size, weights=args.weights))
    console.print(groups_table(groups, title=f"channel groups of {name}"))
    prunable = [g for g in groups if g.prunable]
    console.print(f"{len(groups)} groups, {len(prunable)} prunable, {sum(g.width for g in prunable)} prunable channels")
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    from curlprune.cost import count
    from curlprune.report import console, human

    model, name, shape = load_model_arg(args.model, args.weights, args.checkpoint)
    if args.input_size:
        shape = [1, shape[1], args.input_size, args.input_size]
    macs, params = count(model, torch.zeros(shape))
    console.print(f"{name} at {shape[2]}x{shape[3]}: {human(macs)} MACs, {human(params)} params ({macs:,} / {params:,})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from curlprune.checkpoint import export_onnx
    from curlprune.report import console

    model, _, shape = load_model_arg(None, None, args.checkpoint)
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise CurlpruneError(f"output {out} should end in .onnx")
    export_onnx(model, torch.zeros(shape), out)
    console.print(f"wrote {out} (input 'input' [batch, {shape[1]}, {shape[2]}, {shape[3]}], output 'logits')")
    return 0


DEMO_SHARED = Path(__file__).resolve().parents[3] / "shared"  # ../shared beside the repository


def demo_config(out: Path, cifar: bool) -> dict:
    """The embedded default run: real digits + a small residual CNN, or CIFAR-10 ResNet-56 -> 50% MACs."""
    if cifar:
        return {
            "model": "cifar:resnet56", "weights": str(DEMO_SHARED / "models" / "resnet56-cifar10jpeg.pt"),
            "data": str(DEMO_SHARED / "data" / "cifar10-jpeg.zip"), "train_per_class": 100, "run_dir": str(out), "seed": 0,
            "stages": ["prune", "distill", "refine"],
            "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 256},
            "distill": {"epochs": 3, "warmup_epochs": 0.5, "batch_size": 64},
            "refine": {"epochs": 1, "batch_size": 64},
        }
    return {
        "model": "small:resnet-digits", "weights": str(out / "teacher.pt"), "data": "digits", "run_dir": str(out), "seed": 0,
        "stages": ["prune", "distill", "refine"],
        "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 256},
        "distill": {"epochs": 10, "warmup_epochs": 1.0, "batch_size": 32},
        "refine": {"epochs": 1, "batch_size": 32, "lr": 1e-4},  # the paper's recipe: 6x expansion, lr 1e-4
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from curlprune.checkpoint import atomic_write
    from curlprune.data import evaluate, load_digits_dataset
    from curlprune.models import input_spec
    from curlprune.digits import train_digits_model
    from curlprune.pipeline import parse_config, run_and_print
    from curlprune.report import console

    out = Path(args.out)
    if not args.cifar and "OMP_NUM_THREADS" not in os.environ:
        # 8x8 images through at most 32 channels: one intra-op thread is fastest, and several
        # threads slow it down many times over when the cores are shared (a refine epoch 60 s -> 4 s).
        torch.set_num_threads(1)
    if args.cifar and not (DEMO_SHARED / "data" / "cifar10-jpeg.zip").is_file():
        raise CurlpruneError(f"--cifar needs the CIFAR-10 copy at {DEMO_SHARED}/data/cifar10-jpeg.zip; run without --cifar")
    if not args.cifar and not (out / "teacher.pt").is_file():
        console.print("[bold]1/4[/] training the small residual CNN on the 1,797 real 8x8 digits (sklearn) ...")
        model = train_digits_model(seed=0)
        top1 = 100 * evaluate(model, load_digits_dataset(0)["test"], input_spec("small:resnet-digits"))
        console.print(f"    unpruned model: {top1:.2f}% test top-1")
        atomic_write(out / "teacher.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    console.print("[bold]2/4[/] prune to 50% of the MACs with the KL criterion, then [bold]3/4[/] distill and [bold]4/4[/] refine")
    return run_and_print(parse_config(demo_config(out, args.cifar), "demo"))


def register(subparsers, formatter) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on an embedded example (no downloads)", formatter_class=formatter,
                              description="Train a small residual CNN on scikit-learn's real 8x8 digits, prune it to 50%% of its "
                                          "MACs with the KL criterion, recover accuracy by distillation and label refinement, "
                                          "and print the per-group table and accuracy before/after. Resumable.")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--cifar", action="store_true", help="use CIFAR-10 ResNet-56 from ../shared instead (slower)")
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("groups", help="list the channel groups of a model (what is pruned together)", formatter_class=formatter,
                              description="Trace a model and print its channel groups: channels that must be removed together "
                                          "(inside a block, or along a residual stream), with width and MACs per channel.")
    p.add_argument("--model", required=True, help="registry name: cifar:resnet20|32|44|56|110, torchvision:<name>, timm:<name>, small:resnet-digits")
    p.add_argument("--weights", default=None, help="weights file or torchvision weight name (not needed to see the groups)")
    p.add_argument("--input-size", type=int, default=None, help="input resolution used for tracing (default: the model's own)")
    p.set_defaults(func=cmd_groups)

    p = subparsers.add_parser("count", help="count MACs and parameters (paper convention)", formatter_class=formatter,
                              description="MACs: conv and linear multiply-accumulates for one image; params: conv, linear and norm layers.")
    p.add_argument("checkpoint", nargs="?", default=None, help="a curlprune checkpoint (.safetensors); or use --model")
    p.add_argument("--model", default=None, help="registry name, e.g. torchvision:resnet50")
    p.add_argument("--weights", default=None, help="weights for --model (optional: counting needs no weights)")
    p.add_argument("--input-size", type=int, default=None, help="input resolution (default: the model's own)")
    p.set_defaults(func=cmd_count)

    p = subparsers.add_parser("export", help="export a checkpoint to ONNX", formatter_class=formatter,
                              description="Export a curlprune checkpoint to ONNX (dynamic batch). Check it with onnxruntime.")
    p.add_argument("checkpoint", help="a curlprune checkpoint (.safetensors), e.g. runs/r56/model.safetensors")
    p.add_argument("output", help="the .onnx file to write (written atomically)")
    p.set_defaults(func=cmd_export)
