"""The ``prune`` command: score, select to a MACs/params target, slice, save (:mod:`curlprune.run.prune`)."""
from __future__ import annotations

import argparse
import dataclasses
import os

from curlprune.commands.common import (
    INPUT_SHAPE_HELP,
    MODEL_HELP,
    MODEL_KWARGS_HELP,
    NO_DEFAULT,
    add_data_arguments,
    add_val_arguments,
    data_settings_arg,
    input_shape_arg,
    model_kwargs_arg,
)
from curlprune.commands.report import write_report_and_say
from curlprune.criteria import CRITERIA, options_by_name
from curlprune.errors import CurlpruneError
from curlprune.report import console
from curlprune.recover.dist import DistContext, init_distributed, shutdown
from curlprune.run.pipeline import PROCESS_GROUP_TIMEOUT
from curlprune.run.run_data import load_data
from curlprune.run import DEFAULT_CALIB, PruneConfig, run_prune
from curlprune.select import ALLOCATIONS, DEFAULT_FLOOR
from curlprune.store import LOG_FILE, PLAN_FILE, REPORT_FILE, SCORES_FILE
from curlprune.recover.bn import DEFAULT_BN_IMAGES
from curlprune.select.limits import parse_max_ratio


def cmd_prune(args: argparse.Namespace) -> int:
    """Under torchrun every rank runs this: the ranks share the scoring, rank 0 alone locks --out,
    selects and writes (docs/method.md §10)."""
    config = _config(args)  # bad settings: one line on every rank, before the ranks join
    ctx = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ctx = init_distributed(config.device or "auto", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        done = _prune(args, config, ctx)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    return done


def _config(args: argparse.Namespace) -> PruneConfig:
    protect = None if args.protect is None else [p for p in args.protect if p.lower() != "none"]
    config = PruneConfig(
        criterion=args.criterion, target_macs=args.target_macs, target_params=args.target_params, target_latency=args.target_latency,
        latency_batch=args.latency_batch, latency_threads=args.latency_threads, calib=args.calib,
        seed=args.seed, floor=args.floor, protect=protect, normalize=args.normalize, allocation=args.allocation, round_to=args.round_to,
        eval_limit=args.eval_limit, bn_recalibrate=args.bn_recalibrate, max_ratio=parse_max_ratio(args.max_ratio),
        steps=args.steps, device=args.device,
        **{name: getattr(args, name) for name in _criterion_options()},
    )
    return config


def _prune(args: argparse.Namespace, config: PruneConfig, ctx: DistContext | None) -> int:
    data, settings = args.data, data_settings_arg(args)
    if args.val_per_class is not None or args.val_fraction is not None:  # calibrate on what remains for training
        if data is None:
            raise CurlpruneError("--val-per-class / --val-fraction hold images out of the training data: give --data too")
        data = load_data(data, None, args.seed, val_per_class=args.val_per_class, val_fraction=args.val_fraction, settings=settings)
    result = run_prune(config, args.out, resume=args.resume, model_name=args.model, weights=args.weights,
                       data=data, num_classes=args.num_classes, input_size=args.input_size,
                       model_kwargs=model_kwargs_arg(args.model_kwargs), input_shape=input_shape_arg(args.input_shape), ctx=ctx,
                       data_settings=settings)
    if result is None:  # a rank other than 0: its share is scored and gathered
        return 0
    if result.already_done:
        console.print(f"{args.out} already holds this finished run; nothing to do")
    console.print(f"wrote {result.checkpoint} (load with curlprune.load), {SCORES_FILE}, {PLAN_FILE}, {REPORT_FILE}, {LOG_FILE} in {args.out}")
    if not args.no_report:
        write_report_and_say(args.out)
    return 0


def register(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``prune`` to the parser; the criteria, their options and their default allocations come
    from the registry (:data:`curlprune.criteria.CRITERIA`)."""
    one_scale = [c.name for c in CRITERIA.values() if c.one_scale]
    per_layer = [c.name for c in CRITERIA.values() if not c.one_scale]
    p = subparsers.add_parser(
        "prune", help="score channels, select globally to a MACs/params/latency target, slice, save", formatter_class=formatter,
        description="CURL's one-shot pruning: score every channel of every group (kl: KL divergence of the output "
                    "when the channel is removed), rank all channels globally (by default by score per MAC saved, "
                    "--allocation), remove the lowest until the target is met (the number of removals is found "
                    "automatically), slice the weights and save the pruned model. "
                    "Re-estimates the batch-norm statistics of the pruned model on training images (--bn-recalibrate). "
                    "Prints a table per group and test top-1 before, after slicing and after the re-estimation (no fine-tuning).")
    p.add_argument("--model", required=True, help=MODEL_HELP + " (required)" + NO_DEFAULT)
    p.add_argument("--model-kwargs", default=None, metavar="JSON", help=MODEL_KWARGS_HELP + NO_DEFAULT)
    p.add_argument("--input-shape", default=None, metavar="C,S,S", help=INPUT_SHAPE_HELP + NO_DEFAULT)
    p.add_argument("--weights", default=None, help="weights file (.th/.pt/.pth/.safetensors) or torchvision weight name (default: random init)" + NO_DEFAULT)
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs, when not the model's default (default: the model's)" + NO_DEFAULT)
    p.add_argument("--input-size", type=int, default=None, help="square input side when not the model's default, e.g. 64 "
                                                             "(images are resized to it)" + NO_DEFAULT)
    p.add_argument("--data", default=None, help="ImageFolder folder or .zip with train/ (and test/) splits, or 'digits' "
                                                "(sklearn digits); not needed by " + ", ".join(c.name for c in CRITERIA.values() if not c.needs_data)
                                                + " (default: none)" + NO_DEFAULT)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", default=None, help="MACs to keep: a fraction (at most 1, e.g. 0.5) or a count with a unit "
                                                            "(62.5M, 1.11G; a value between 1 and 1000 is ambiguous and refused); "
                                                            "this, --target-params or --target-latency is required" + NO_DEFAULT)
    target.add_argument("--target-params", default=None, help="parameters to keep: a fraction (0.5) or a count (1.2M)" + NO_DEFAULT)
    target.add_argument("--target-latency", default=None, metavar="FRACTION|TIME",
                        help="measured speed to reach on THIS machine: a fraction of the unpruned model's latency "
                             "(0.5 = twice as fast) or a time per batch (12ms, 0.8s, 500us). The ranking is the same; "
                             "the stopping point is found by timing the sliced model against the unpruned one, "
                             "interleaved and repeated (5%% tolerance); report.json gets the achieved latency" + NO_DEFAULT)
    p.add_argument("--latency-batch", type=int, default=None, metavar="N",
                   help="images per timed forward pass for --target-latency; use your deployment batch, e.g. 64 for throughput "
                        "(default: 1)" + NO_DEFAULT)
    p.add_argument("--latency-threads", type=int, default=None, metavar="N",
                   help="CPU threads while timing for --target-latency, e.g. 1 for a single-core device (default: torch's current setting)" + NO_DEFAULT)
    p.add_argument("--criterion", default="kl", metavar="{" + ",".join(CRITERIA) + "}",
                   help="; ".join(f"{c.name}: {c.summary}" for c in CRITERIA.values()))
    p.add_argument("--calib", type=int, default=DEFAULT_CALIB, help="calibration images drawn from the training split (eval transform)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw, random scores, the eval subset and the validation split")
    add_val_arguments(p)
    add_data_arguments(p)
    p.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help="stop pruning a group once its kept fraction is below this (CURL: 0.3)")
    p.add_argument("--protect", action="append", default=None, metavar="PATTERN",
                   help="group name or glob never pruned (repeatable); 'none' = protect nothing. Default: the model's "
                        "default (torchvision ResNets: the stream feeding the classifier)" + NO_DEFAULT)
    p.add_argument("--max-ratio", action="append", default=None, metavar="PATTERN=R",
                   help="no group whose name matches PATTERN (a name or glob) loses more than R of its channels, R in [0, 1), "
                        "e.g. 'layer1.*=0.5' (repeatable); the other groups make up the target (default: no limit)" + NO_DEFAULT)
    p.add_argument("--normalize", default="none", metavar="{none,mean,max,l2}",
                   help="per-group score normalisation before the global ranking (CURL ranks raw scores)")
    p.add_argument("--allocation", default=None, metavar="{" + ",".join(ALLOCATIONS) + "}",
                   help="how scores become the global ranking. cost-weighted: each channel's score is divided by what "
                        "removing it saves (MACs; parameters for --target-params), i.e. damage per MAC saved: a channel "
                        "that saves 4x the MACs of another goes first unless its score is over 4x higher. paper: raw "
                        f"scores, CURL exactly as published. Default: cost-weighted for {_spoken(one_scale)}, whose scores share "
                        "one scale (ResNet-56 on CIFAR-10, top-1 after BN re-estimation, no training: 85.01%% vs 79.13%% "
                        f"at 50%% of the MACs, 59.60%% vs 53.84%% at 30%%); paper for {_spoken(per_layer)}, whose "
                        "per-layer scales make the division hurt (l1 at 50%%: 52.78%% vs 84.74%%); see "
                        "benchmarks/results/cifar_resnet56.md" + NO_DEFAULT)
    p.add_argument("--round-to", type=int, default=None, help="round kept widths up to a multiple of this, e.g. 8; the target is still met "
                                                           "within 1%% (whole units are added back or exchanged between groups), or "
                                                           "report.json and the terminal say by how much it was missed (default: off)" + NO_DEFAULT)
    p.add_argument("--eval-limit", type=int, default=None, help="test images for top-1 before/after: a seeded subset; 0 skips the evaluation (default: all)" + NO_DEFAULT)
    p.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="re-estimate the pruned model's batch-norm statistics on N training images (seeded draw, all when fewer; "
                        "no training) before saving; report.json gives top-1 before and after; 0 = off "
                        f"(default: {DEFAULT_BN_IMAGES})" + NO_DEFAULT)
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="reach the target in N steps, scoring the pruned model again before each step after the first "
                        "(iterative pruning; step k keeps target**(k/N) of the cost; floor, --protect, --max-ratio and --round-to "
                        "stay relative to the original widths). MACs/params targets only (default: 1, one shot)" + NO_DEFAULT)
    p.add_argument("--device", default=None, metavar="{auto,cpu,cuda,cuda:i}",
                   help="where the criterion, the BN re-estimation, the evaluation and the latency measurement run: auto = a CUDA "
                        "GPU when there is one, else the CPU; tracing, selection and slicing stay on the CPU. Scores on a GPU agree "
                        "with the CPU's to float32 round-off (docs/method.md §10); resuming on another device reuses them "
                        "(default: auto)" + NO_DEFAULT)
    for name, (option, users) in _criterion_options().items():
        p.add_argument("--" + name.replace("_", "-"), type=type(option.default), default=option.default,
                       help=f"{', '.join(users)}: {option.help}")
    p.add_argument("--out", required=True, help="output folder: scores.npz, plan.json, model.safetensors, report.json, log.jsonl (required)" + NO_DEFAULT)
    p.add_argument("--resume", action="store_true", help="reuse scores.npz in --out when it was computed with the same settings (an error when not)" + NO_DEFAULT)
    p.add_argument("--no-report", action="store_true", help="do not write the figures and index.md to <out>/report/ at the end" + NO_DEFAULT)
    p.set_defaults(func=cmd_prune)


def _criterion_options() -> dict:
    """The criteria's own options that the prune stage has a setting for (``budget_mb``,
    ``approx_classes``): name -> (declaration, the criteria declaring it). Options shared with the
    stage (``seed``) have the stage's own option; a registered criterion's option without a
    ``PruneConfig`` field keeps its default in the stage."""
    settings = {f.name for f in dataclasses.fields(PruneConfig)}
    return {name: found for name, found in options_by_name().items() if not found[0].shared and name in settings}


def _spoken(names: list[str]) -> str:
    """``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
