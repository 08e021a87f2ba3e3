"""One resumable run from a YAML config: prune -> distill -> refine (or finetune).

A config names the model, its weights, the data and one section per stage; every key of a
section is a field of that stage's config dataclass, so every hyperparameter is configurable and
a misspelt key is an error, not a silent default::

    run_dir: runs/r56-small
    seed: 0
    model: cifar:resnet56
    weights: ../shared/models/resnet56-cifar10jpeg.pt
    data: ../shared/data/cifar10-jpeg.zip   # or "digits"
    train_per_class: 500                     # optional class-balanced subset of the train split
    stages: [prune, distill, refine]
    prune:   {criterion: kl, target_macs: 0.33}
    distill: {epochs: 30}
    refine:  {epochs: 16}

Each stage writes into ``<run_dir>/<stage>/`` and is skipped when its outputs are complete; a
killed run resumes from the last completed epoch. The final model is ``<run_dir>/model.safetensors``
and ``<run_dir>/summary.json`` states last and best test top-1, MACs and params.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curlprune.errors import CurlpruneError

TRAIN_STAGES = ("finetune", "distill", "refine")
ALL_STAGES = ("prune",) + TRAIN_STAGES
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class RunConfig:
    """The top level of a run config (stage sections are parsed into their own dataclasses)."""

    model: str
    weights: str | None = None
    data: str = "digits"
    run_dir: str = "runs/run"
    seed: int = 0
    train_per_class: int | None = None
    stages: list[str] = field(default_factory=lambda: ["prune", "distill", "refine"])
    sections: dict[str, Any] = field(default_factory=dict)


def _stage_config_class(stage: str):
    if stage == "prune":
        from curlprune.prune import PruneConfig

        return PruneConfig
    if stage == "finetune":
        from curlprune.recover.finetune import FinetuneConfig

        return FinetuneConfig
    if stage == "distill":
        from curlprune.recover.distill import DistillConfig

        return DistillConfig
    from curlprune.recover.refine import RefineConfig

    return RefineConfig


def _build_section(stage: str, values: dict[str, Any] | None, where: str, defaults: dict[str, Any]):
    cls = _stage_config_class(stage)
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CurlpruneError(f"{where}: unknown key '{unknown[0]}' in section '{stage}'; valid keys: {', '.join(sorted(names))}")
    for key, value in defaults.items():
        if key in names:
            values.setdefault(key, value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CurlpruneError(f"{where}: bad value in section '{stage}': {exc}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Parse and check a YAML run config; ``overrides`` replace top-level keys (e.g. from the CLI)."""
    path = Path(path)
    if not path.is_file():
        raise CurlpruneError(f"config {path} does not exist: write one (see `curlprune run --help` for an example)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CurlpruneError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CurlpruneError(f"config {path} must be a mapping of keys to values")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(raw, str(path))


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Check a config mapping and turn it into a :class:`RunConfig` with typed stage sections."""
    top = {f.name for f in dataclasses.fields(RunConfig)} - {"sections"}
    unknown = sorted(set(raw) - top - set(ALL_STAGES))
    if unknown:
        raise CurlpruneError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(top | set(ALL_STAGES)))}")
    if "model" not in raw:
        raise CurlpruneError(f"{where}: 'model' is missing (e.g. model: cifar:resnet56)")
    stages = list(raw.get("stages", ["prune", "distill", "refine"]))
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad:
        raise CurlpruneError(f"{where}: unknown stage '{bad[0]}'; stages are {', '.join(ALL_STAGES)}")
    seed = int(raw.get("seed", 0))
    sections = {s: _build_section(s, raw.get(s), where, {"seed": seed}) for s in ALL_STAGES if s in stages or s in raw}
    return RunConfig(
        model=str(raw["model"]),
        weights=raw.get("weights"),
        data=str(raw.get("data", "digits")),
        run_dir=str(raw.get("run_dir", "runs/run")),
        seed=seed,
        train_per_class=raw.get("train_per_class"),
        stages=stages,
        sections=sections,
    )


def load_data(source: str, train_per_class: int | None, seed: int) -> dict[str, Any]:
    """``{"train", "test"}`` uint8 datasets from "digits", an ImageFolder directory or a zip."""
    from curlprune import data

    if source == "digits":
        splits = data.load_digits_dataset(seed=seed)
    else:
        splits = data.load_image_folder(source)
    if "train" not in splits:
        raise CurlpruneError(f"data {source} has no 'train' split: lay it out as train/<class>/<image> (and test/<class>/<image>)")
    if train_per_class:
        splits = dict(splits)
        splits["train"] = data.class_balanced_subset(splits["train"], int(train_per_class), seed)
    return splits


class Run:
    """Executes the stages of a :class:`RunConfig` in order, skipping finished ones."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self._data: dict[str, Any] | None = None
        self._teacher = None

    # ----- shared inputs -------------------------------------------------------------------
    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = load_data(self.cfg.data, self.cfg.train_per_class, self.cfg.seed)
        return self._data

    @property
    def spec(self):
        from curlprune.models import input_spec

        return input_spec(self.cfg.model)

    @property
    def teacher(self):
        if self._teacher is None:
            from curlprune.models import build

            self._teacher = build(self.cfg.model, weights=self.cfg.weights).eval()
        return self._teacher

    def checkpoint_of(self, stage: str) -> Path:
        return self.run_dir / stage / CHECKPOINT

    # ----- stages --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from curlprune.checkpoint import atomic_write_text

        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.json", json.dumps(config_to_dict(self.cfg), indent=2))
        student_ckpt: Path | None = None
        results: dict[str, Any] = {}
        for stage in self.cfg.stages:
            started = time.time()
            if stage == "prune":
                student_ckpt = self.prune()
            else:
                student_ckpt, results[stage] = self.train(stage, student_ckpt)
            log_event(self.run_dir, {"stage": stage, "seconds": round(time.time() - started, 2)})
        return self.summarize(student_ckpt, results)

    def prune(self) -> Path:
        from curlprune.prune import run_prune

        out = self.run_dir / "prune"
        result = run_prune(self.cfg.sections["prune"], out, resume=True, model_name=self.cfg.model,
                           weights=self.cfg.weights, data=self.data)
        return Path(result.checkpoint)

    def train(self, stage: str, student_ckpt: Path | None) -> tuple[Path, dict[str, Any]]:
        from curlprune import checkpoint
        from curlprune.recover.distill import distill
        from curlprune.recover.finetune import finetune
        from curlprune.recover.refine import refine

        if student_ckpt is None:  # no prune stage in this run: start from the unpruned weights
            checkpoint.save(self.run_dir / "start" / CHECKPOINT, {"name": self.cfg.model, "kwargs": {}}, {},
                            self.teacher.state_dict())
            student_ckpt = self.run_dir / "start" / CHECKPOINT
        meta = checkpoint.read_metadata(student_ckpt)
        student = checkpoint.load(student_ckpt)
        cfg = self.cfg.sections[stage]
        if stage == "finetune":
            result = finetune(student, self.data, self.spec, cfg, self.run_dir, stage=stage)
        elif stage == "distill":
            result = distill(student, self.teacher, self.data, self.spec, cfg, self.run_dir, stage=stage)
        else:
            result = refine(student, self.teacher, self.data, self.spec, cfg, self.run_dir, stage=stage)
        out = self.checkpoint_of(stage)
        extra = {**meta["extra"], f"{stage}_last_top1": result.last_top1, f"{stage}_best_top1": result.best_top1}
        checkpoint.save(out, meta["model_ref"], meta["plan"], result.model.state_dict(), input_shape=meta["input_shape"], extra=extra)
        return out, {"last_top1": result.last_top1, "best_top1": result.best_top1, "epochs": result.epochs,
                     "seconds": round(result.seconds, 1)}

    def summarize(self, final_ckpt: Path | None, results: dict[str, Any]) -> dict[str, Any]:
        import shutil

        import torch

        from curlprune import checkpoint
        from curlprune.checkpoint import atomic_write, atomic_write_text
        from curlprune.cost import count

        summary: dict[str, Any] = {"model": self.cfg.model, "stages": results}
        if final_ckpt is not None:
            meta = checkpoint.read_metadata(final_ckpt)
            x = torch.zeros(meta["input_shape"])
            macs, params = count(checkpoint.load(final_ckpt), x)
            base_macs, base_params = count(self.teacher, x)
            summary.update(macs=macs, params=params, macs_ratio=macs / base_macs, params_ratio=params / base_params)
            atomic_write(self.run_dir / "model.safetensors", lambda tmp: shutil.copyfile(final_ckpt, tmp))
            summary["checkpoint"] = str(self.run_dir / "model.safetensors")
            if results:
                last = results[list(results)[-1]]
                summary.update(last_top1=last["last_top1"], best_top1=max(r["best_top1"] for r in results.values()))
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    top = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sections"}
    top.update({name: dataclasses.asdict(section) for name, section in cfg.sections.items()})
    return top


def log_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one JSON line to ``<run_dir>/log.jsonl``."""
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from curlprune.report import console, human

    table = Table(title=f"run summary: {summary['model']}")
    for col in ("stage", "epochs", "last top-1", "best top-1", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, r in summary["stages"].items():
        table.add_row(stage, str(r["epochs"]), f"{r['last_top1']:.2f}%", f"{r['best_top1']:.2f}%", f"{r['seconds']:.0f}")
    console.print(table)
    if "macs" in summary:
        console.print(f"final model: {human(summary['macs'])} MACs ({100 * summary['macs_ratio']:.1f}%), "
                      f"{human(summary['params'])} params ({100 * summary['params_ratio']:.1f}%) -> {summary['checkpoint']}")


# ----- CLI ------------------------------------------------------------------------------------
EXAMPLE = """\
example config (every key of a stage section is a field of that stage's settings):

  model: cifar:resnet56
  weights: ../shared/models/resnet56-cifar10jpeg.pt
  data: ../shared/data/cifar10-jpeg.zip      # ImageFolder dir or zip with train/ and test/, or "digits"
  train_per_class: 500                        # optional: a seeded class-balanced subset
  run_dir: runs/r56-small
  seed: 0
  stages: [prune, distill, refine]
  prune:   {criterion: kl, target_macs: 0.33, calib: 256}
  distill: {epochs: 30, lr: 0.01, batch_size: 32}
  refine:  {epochs: 16, lr: 0.0001}

A killed run resumes from its last completed epoch: run the same command again.
Several processes: torchrun --nproc_per_node=2 -m curlprune.cli run config.yaml
"""


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, {"run_dir": args.out})
    summary = Run(cfg).run()
    print_summary(summary)
    return 0


def _single_stage(stage: str):
    def command(args: argparse.Namespace) -> int:
        raw: dict[str, Any] = {"model": args.model, "weights": args.weights, "data": args.data, "run_dir": args.out,
                               "seed": args.seed, "train_per_class": args.train_per_class, "stages": [stage]}
        if args.config:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
            raw = {**loaded, **{k: v for k, v in raw.items() if v is not None}}
            raw["stages"] = [stage]
        section = dict(raw.get(stage) or {})
        for key in ("epochs", "lr", "batch_size"):
            if getattr(args, key) is not None:
                section[key] = getattr(args, key)
        raw[stage] = section
        cfg = parse_config({k: v for k, v in raw.items() if v is not None}, args.config or "command line")
        runner = Run(cfg)
        if args.student:
            summary = runner.summarize(*_train_from(runner, stage, Path(args.student)))
        else:
            summary = runner.run()
        print_summary(summary)
        return 0

    return command


def _train_from(runner: Run, stage: str, student: Path):
    runner.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, result = runner.train(stage, student)
    return ckpt, {stage: result}


def register(subparsers, formatter) -> None:
    p = subparsers.add_parser("run", help="run a whole pipeline from a YAML config (prune -> distill -> refine)",
                              formatter_class=formatter, epilog=EXAMPLE,
                              description="Run the stages named in the config in order. Each stage writes into "
                                          "<run_dir>/<stage>/ and is skipped when complete; an interrupted run resumes.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--out", default=None, help="run directory (overrides run_dir in the config)")
    p.set_defaults(func=cmd_run)
    helps = {"finetune": "recover accuracy with plain cross-entropy fine-tuning",
             "distill": "recover accuracy by mixup knowledge distillation from the unpruned model",
             "refine": "label refinement on the 6x expanded data (CURL stage 3)"}
    for stage, text in helps.items():
        p = subparsers.add_parser(stage, help=text, formatter_class=formatter,
                                  description=f"{text[0].upper()}{text[1:]}. Settings come from --config (section '{stage}') "
                                              "and the options below (options win).")
        p.add_argument("--config", default=None, help="YAML run config to take model, data and the stage section from")
        p.add_argument("--student", default=None, help="curlprune checkpoint to train (e.g. runs/r56/model.safetensors); default: the unpruned model")
        p.add_argument("--model", default=None, help="registry name of the unpruned model (the teacher), e.g. cifar:resnet56")
        p.add_argument("--weights", default=None, help="weights of the unpruned model")
        p.add_argument("--data", default=None, help="ImageFolder directory or zip with train/ and test/, or 'digits'")
        p.add_argument("--train-per-class", type=int, default=None, help="use a seeded class-balanced subset of the train split")
        p.add_argument("--epochs", type=int, default=None, help="epochs (default: the stage's own)")
        p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the stage's own)")
        p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the stage's own)")
        p.add_argument("--seed", type=int, default=None, help="seed for data order, augmentation and mixup (default 0)")
        p.add_argument("--out", default=None, help="run directory")
        p.set_defaults(func=_single_stage(stage))
