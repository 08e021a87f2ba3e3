"""The pipeline commands: ``run`` (a YAML config) and one command per registered recovery stage
(:mod:`curlprune.recover.registry`: ``finetune``, ``distill``, ``refine``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from curlprune.commands.common import (
    INPUT_SHAPE_HELP,
    MODEL_HELP,
    MODEL_KWARGS_HELP,
    NO_DEFAULT,
    add_data_arguments,
    add_val_arguments,
    input_shape_arg,
    model_kwargs_arg,
)
from curlprune.commands.report import write_report_and_say
from curlprune.recover.amp import AMP_MODES
from curlprune.recover.dist import shutdown
from curlprune.recover.registry import recovery_stages
from curlprune.report import print_summary
from curlprune.run import Run, RunConfig, load_config, parse_config, read_config_file


def run_and_print(cfg: RunConfig, student: str | Path | None = None, report: bool = True) -> int:
    """Run a config and print its summary on the process that prints (rank 0 under torchrun).

    Args:
        cfg: the parsed config.
        student: a curlprune checkpoint the first training stage starts from (runs without prune).
        report: write ``<run_dir>/report/`` (figures + index.md) at the end and print its path.
    Returns:
        0 (the exit status).
    Raises:
        CurlpruneError: see :meth:`curlprune.run.pipeline.Run.run`.
    """
    runner = Run(cfg, student=student)
    try:
        runner.run()
    except BaseException:
        shutdown(wait=False)
        raise
    if runner.ctx.is_main:
        print_summary(runner.summary)
        if report:
            write_report_and_say(cfg.run_dir)
    shutdown()
    return 0


EXAMPLE = """\
example config (every key of a stage section is a field of that stage's settings):

  model: cifar:resnet56
  weights: ../shared/models/resnet56-cifar10jpeg.pt
  data: ../shared/data/cifar10-jpeg.zip      # ImageFolder dir or zip with train/ and test/, or "digits"
  train_per_class: 500                        # optional: a seeded class-balanced subset
  val_per_class: 100                          # optional: a validation split held out of train (or val_fraction: 0.1)
  streaming: auto                             # optional: decode on the fly above memory_budget_gb (true/false: always/never)
  run_dir: runs/r56-small
  seed: 0
  stages: [prune, distill]                    # the default; [prune, distill, refine] adds label refinement
  prune:   {criterion: kl, target_macs: 0.33, calib: 256}
  distill: {epochs: 30, lr: 0.01, batch_size: 32}   # loss: ce_weight 0.5 (default); ce_weight: 0 = the paper's
  # recipe: paper                             # the authors' constants; without stages: [prune, distill, refine]

Your own model by import path (no registration): model: mypkg.nets:MyNet (on PYTHONPATH) or
model: path/to/file.py:build_fn, with model_kwargs: {width: 32} and input_shape: [3, 32, 32].

A killed run resumes from its last completed epoch: run the same command again.
Several processes: torchrun --nproc_per_node=2 -m curlprune.cli run config.yaml
"""


def cmd_run(args: argparse.Namespace) -> int:
    return run_and_print(load_config(args.config, {"run_dir": args.out}), report=not args.no_report)


def _single_stage(stage: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        given = {"model": args.model, "weights": args.weights, "num_classes": args.num_classes, "data": args.data,
                 "run_dir": args.out, "seed": args.seed, "train_per_class": args.train_per_class,
                 "input_size": args.input_size, "val_per_class": args.val_per_class, "val_fraction": args.val_fraction,
                 "model_kwargs": model_kwargs_arg(args.model_kwargs), "input_shape": input_shape_arg(args.input_shape),
                 "streaming": args.streaming, "memory_budget_gb": args.memory_budget_gb, "data_workers": args.data_workers}
        raw = read_config_file(args.config) if args.config else {}
        raw.update({k: v for k, v in given.items() if v is not None})
        raw["stages"] = [stage]
        section = dict(raw.get(stage) or {})
        section.update({key: getattr(args, key) for key in ("epochs", "lr", "batch_size", "amp") if getattr(args, key) is not None})
        if getattr(args, "new_head", False):
            section["new_head"] = True
        raw[stage] = section
        return run_and_print(parse_config(raw, args.config or "command line"), student=args.student, report=not args.no_report)

    return command


def register(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``run`` and one command per registered recovery stage (``finetune``, ``distill``, ``refine``) to the parser."""
    p = subparsers.add_parser("run", help="run a whole pipeline from a YAML config (default stages: prune -> distill)",
                              formatter_class=formatter, epilog=EXAMPLE,
                              description="Run the stages named in the config in order. Each stage writes into "
                                          "<run_dir>/<stage>/ and is skipped when complete; an interrupted run resumes.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--out", default=None, help="run directory (overrides run_dir in the config)" + NO_DEFAULT)
    p.add_argument("--no-report", action="store_true", help="do not write the figures and index.md to <run_dir>/report/ at the end" + NO_DEFAULT)
    p.set_defaults(func=cmd_run)
    for entry in recovery_stages():
        stage, text = entry.name, entry.help
        p = subparsers.add_parser(stage, help=text, formatter_class=formatter,
                                  description=f"{text[0].upper()}{text[1:]}. Settings come from --config (section '{stage}') "
                                              "and the options below (options win). Resumable like `curlprune run`.")
        p.add_argument("--config", default=None, help="YAML run config to take model, data and the stage section from" + NO_DEFAULT)
        p.add_argument("--student", default=None, help="curlprune checkpoint to train, e.g. runs/r56/prune/model.safetensors "
                                                        "(default: the unpruned model)" + NO_DEFAULT)
        p.add_argument("--model", default=None, help=MODEL_HELP + "; the unpruned model (the teacher)" + NO_DEFAULT)
        p.add_argument("--model-kwargs", default=None, metavar="JSON", help=MODEL_KWARGS_HELP + NO_DEFAULT)
        p.add_argument("--input-shape", default=None, metavar="C,S,S", help=INPUT_SHAPE_HELP + NO_DEFAULT)
        p.add_argument("--weights", default=None, help="weights of the unpruned model" + NO_DEFAULT)
        p.add_argument("--num-classes", type=int, default=None, help="classifier outputs, when not the model's default; "
                                                                  "finetune on weights of other classes: the new classifier's (default: the data's)" + NO_DEFAULT)
        p.add_argument("--data", default=None, help="ImageFolder directory or zip with train/ and test/, or 'digits' (default: digits)" + NO_DEFAULT)
        p.add_argument("--train-per-class", type=int, default=None, help="use a seeded class-balanced subset of the train split" + NO_DEFAULT)
        p.add_argument("--input-size", type=int, default=None, help="square input side when not the model's default, e.g. 64 "
                                                                 "(images are resized to it)" + NO_DEFAULT)
        add_val_arguments(p)
        add_data_arguments(p)
        p.add_argument("--epochs", type=int, default=None, help="epochs (default: the stage's own)" + NO_DEFAULT)
        p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the stage's own)" + NO_DEFAULT)
        p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the stage's own)" + NO_DEFAULT)
        p.add_argument("--amp", default=None, choices=AMP_MODES,
                       help="mixed precision of the forward passes: off (float32, default), bf16, or fp16 (with loss scaling); "
                            "weights and losses stay float32" + NO_DEFAULT)
        p.add_argument("--seed", type=int, default=None, help="seed for data order, augmentation and mixup (default: 0)" + NO_DEFAULT)
        p.add_argument("--out", default=None, help="run directory (default: runs/run)" + NO_DEFAULT)
        p.add_argument("--no-report", action="store_true", help="do not write <run_dir>/report/ at the end" + NO_DEFAULT)
        if entry.transfer:
            p.add_argument("--new-head", action="store_true", help="replace the classifier by a new one for the data's classes "
                                                                   "even when their number equals the weights' (a new dataset)")
        p.set_defaults(func=_single_stage(stage))
