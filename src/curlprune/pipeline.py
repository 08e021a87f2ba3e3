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

Run directory::

    config.json          the resolved config (every setting of every stage)
    log.jsonl            one line per stage that did work (stage, seconds)
    prune/               the prune stage's outputs (scores, plan, checkpoint, report)
    <train stage>/       metrics.jsonl (one line per epoch), state.safetensors (resumable state),
                         model.safetensors + done.json (when finished), checkpoint.safetensors
                         (architecture + plan + weights), student.json (what it started from)
    model.safetensors    the final model (a curlprune checkpoint: ``curlprune.load`` / ``export``)
    summary.json         accuracies (test top-1 in %), MACs and params, per stage and final

Each stage is skipped when its outputs are complete; a killed run resumes from the last completed
epoch. Under ``torchrun`` the training stages run on every process (DistributedDataParallel) and
rank 0 alone prunes and writes the shared files while the other ranks wait.
"""
from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from curlprune.checkpoint import file_digest
from curlprune.errors import CurlpruneError

TRAIN_STAGES = ("finetune", "distill", "refine")
ALL_STAGES = ("prune",) + TRAIN_STAGES
CHECKPOINT = "checkpoint.safetensors"
STUDENT_RECORD = "student.json"
IDENTITY_KEYS = ("model", "weights", "num_classes", "data", "train_per_class", "seed", "input_size")
# Rank 0 may prune for a long time while the other ranks wait in a collective.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)

T = TypeVar("T")


@dataclass
class RunConfig:
    """The top level of a run config (stage sections are parsed into their own dataclasses).

    model:           registry name of the unpruned model (also the teacher), e.g. cifar:resnet56.
    weights:         its weights (state-dict file or torchvision weight name).
    num_classes:     classifier outputs when they differ from the model's default; in a run that
                     starts with ``finetune`` on weights of other classes, the classes of the new
                     classifier (default: the data's; see :meth:`Run.new_head`).
    data:            "digits", or an ImageFolder directory / zip with train/ and test/.
    train_per_class: train on a seeded class-balanced subset of this many images per class.
    input_size:      square input side when not the model's default (transforms resize to it).
    """

    model: str
    weights: str | None = None
    num_classes: int | None = None
    data: str = "digits"
    run_dir: str = "runs/run"
    seed: int = 0
    train_per_class: int | None = None
    input_size: int | None = None
    stages: list[str] = field(default_factory=lambda: ["prune", "distill", "refine"])
    sections: dict[str, Any] = field(default_factory=dict)


# ----- config ---------------------------------------------------------------------------------
def _stage_config_class(stage: str) -> type:
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


def _build_section(stage: str, values: Any, where: str, defaults: dict[str, Any]) -> Any:
    """The stage's config dataclass from its section; unknown keys are errors that list the valid ones."""
    cls = _stage_config_class(stage)
    if values is not None and not isinstance(values, dict):
        raise CurlpruneError(f"{where}: section '{stage}' must be a mapping of settings, e.g. {stage}: {{epochs: 10}}")
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing or malformed file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CurlpruneError(f"config {path} does not exist: write one (see `curlprune run --help` for an example)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CurlpruneError(f"config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise CurlpruneError(f"config {path} must be a mapping of keys to values (model: ..., data: ..., stages: [...])")
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Parse and check a YAML run config; ``overrides`` replace top-level keys (e.g. from the CLI)."""
    raw = read_config_file(path)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(raw, str(path))


def _check_stages(stages: Any, where: str) -> list[str]:
    if isinstance(stages, str) or not isinstance(stages, list) or not stages:
        raise CurlpruneError(f"{where}: 'stages' must be a non-empty list, e.g. stages: [prune, distill, refine]")
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad:
        raise CurlpruneError(f"{where}: unknown stage '{bad[0]}'; stages are {', '.join(ALL_STAGES)}")
    if len(set(stages)) != len(stages):
        raise CurlpruneError(f"{where}: a stage is listed twice in {stages}: list each stage once")
    if "prune" in stages[1:] and stages[:stages.index("prune")] != ["finetune"]:
        raise CurlpruneError(f"{where}: 'prune' must be the first stage, or follow only 'finetune' (got {stages})")
    return [str(s) for s in stages]


def _optional_int(raw: dict[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CurlpruneError(f"{where}: '{key}' must be a positive whole number (got {value!r})")
    return value


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Check a config mapping and turn it into a :class:`RunConfig` with typed stage sections."""
    top = {f.name for f in dataclasses.fields(RunConfig)} - {"sections"}
    unknown = sorted(set(raw) - top - set(ALL_STAGES))
    if unknown:
        raise CurlpruneError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(top | set(ALL_STAGES)))}")
    if not raw.get("model"):
        raise CurlpruneError(f"{where}: 'model' is missing (e.g. model: cifar:resnet56)")
    stages = _check_stages(raw.get("stages", ["prune", "distill", "refine"]), where)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CurlpruneError(f"{where}: 'seed' must be a whole number (got {seed!r})")
    sections = {s: _build_section(s, raw.get(s), where, {"seed": seed}) for s in ALL_STAGES if s in stages or s in raw}
    return RunConfig(
        model=str(raw["model"]),
        weights=None if raw.get("weights") is None else str(raw["weights"]),
        num_classes=_optional_int(raw, "num_classes", where),
        data=str(raw.get("data", "digits")),
        run_dir=str(raw.get("run_dir", "runs/run")),
        seed=seed,
        train_per_class=_optional_int(raw, "train_per_class", where),
        input_size=_optional_int(raw, "input_size", where),
        stages=stages,
        sections=sections,
    )


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON-able values (what ``config.json`` holds)."""
    top = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "sections"}
    top.update({name: dataclasses.asdict(section) for name, section in cfg.sections.items()})
    return top


def check_same_run(previous: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """A run directory belongs to one model, data and seed; its stage list may only grow or shrink at the end."""
    from curlprune.recover.loop import changed_settings

    differ = changed_settings(previous, {k: current.get(k) for k in IDENTITY_KEYS})
    if differ:
        raise CurlpruneError(
            f"{run_dir} holds a run with different settings: {', '.join(differ)}; use another run_dir (--out) or delete {run_dir}"
        )
    old, new = list(previous.get("stages", [])), list(current["stages"])
    shared = min(len(old), len(new))
    if old[:shared] != new[:shared]:
        raise CurlpruneError(
            f"{run_dir} holds a run with stages {old}, not a prefix or extension of {new}: use another run_dir (--out) or delete {run_dir}"
        )


def check_finished_prune(prune_dir: Path, cfg: Any) -> None:
    """A finished prune stage is never redone with other settings: the stages after it started from its model."""
    try:
        previous = json.loads((prune_dir / "done.json").read_text())["settings"]["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not finished (or not readable): the prune stage itself decides
    from curlprune.recover.loop import changed_settings

    differ = changed_settings(previous, dataclasses.asdict(cfg))
    if differ:
        raise CurlpruneError(
            f"{prune_dir} holds a finished prune stage with other settings: {', '.join(differ)}; "
            f"use another run_dir (--out), or delete {prune_dir} and the stages after it"
        )


# ----- data -----------------------------------------------------------------------------------
def load_data(source: str, train_per_class: int | None, seed: int) -> dict[str, Any]:
    """``{"train", "test"}`` uint8 datasets from "digits", an ImageFolder directory or a zip."""
    from curlprune import data

    if source == "digits":
        splits = data.load_digits_dataset(seed=seed)
    else:  # only the two splits a run uses are decoded
        splits = data.load_image_folder(source, splits=("train", "test"))
    if train_per_class:
        splits = dict(splits)
        splits["train"] = data.class_balanced_subset(splits["train"], int(train_per_class), seed)
    return splits


# ----- several processes ----------------------------------------------------------------------
def on_main(ctx: Any, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only while the other ranks wait; every rank gets its (JSON-like)
    result, or raises its error, so a failure on rank 0 never leaves the others waiting."""
    if not ctx.enabled:
        return work()
    from curlprune.recover import dist

    outcome: dict[str, Any] = {}
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            outcome = {"value": work()}
        except CurlpruneError as exc:
            outcome, failure = {"error": str(exc)}, exc
        except BaseException as exc:  # tell the others, then fail loudly here
            outcome, failure = {"error": f"rank 0 failed ({type(exc).__name__}: {exc}); see its traceback"}, exc
    shared = dist.all_gather_object(ctx, outcome)[0]
    if failure is not None:
        raise failure
    if "error" in shared:
        raise CurlpruneError(shared["error"])
    return shared["value"]


def write_if_changed(path: Path, text: str) -> None:
    """Write a text file atomically unless it already holds exactly ``text`` (reruns rewrite nothing)."""
    from curlprune.checkpoint import atomic_write_text

    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def copy_if_changed(source: Path, target: Path) -> None:
    """Copy a file atomically unless ``target`` already has the same bytes."""
    from curlprune.checkpoint import atomic_write

    if not target.is_file() or not filecmp.cmp(source, target, shallow=False):
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def log_event(run_dir: Path, event: dict[str, Any]) -> None:
    """Append one JSON line to ``<run_dir>/log.jsonl``."""
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")


# ----- the run --------------------------------------------------------------------------------
@dataclass
class Student:
    """The model a stage starts from, with what is needed to save it as a curlprune checkpoint."""

    model: Any
    model_ref: dict[str, Any]
    plan: dict[str, list[int]]
    input_shape: list[int]
    extra: dict[str, Any]
    source: str  # "unpruned" or the checkpoint it was loaded from
    digest: str | None  # SHA-256 of that checkpoint

    @classmethod
    def from_checkpoint(cls, path: Path) -> "Student":
        from curlprune import checkpoint

        meta = checkpoint.read_metadata(path)
        return cls(checkpoint.load(path), meta["model_ref"], meta["plan"], meta["input_shape"], meta["extra"], str(path), file_digest(path))


class Run:
    """Executes the stages of a :class:`RunConfig` in order, skipping finished ones.

    ``student``: a curlprune checkpoint the first training stage starts from (for runs without a
    prune stage); by default such runs start from the unpruned model.
    """

    def __init__(self, cfg: RunConfig, student: str | Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.student_path = Path(student) if student else None
        self._data: dict[str, Any] | None = None
        self._teacher = None
        self._new_head: bool | None = None
        self.head_name: str | None = None  # the re-initialised classifier of a transfer run
        self.ctx = None

    # ----- shared inputs -------------------------------------------------------------------
    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = load_data(self.cfg.data, self.cfg.train_per_class, self.cfg.seed)
        return self._data

    @property
    def spec(self):
        from curlprune.models import input_spec
        from curlprune.models.transfer import at_input_size

        spec = at_input_size(input_spec(self.cfg.model, self.cfg.weights, self.cfg.num_classes), self.cfg.input_size)
        return dataclasses.replace(spec, num_classes=self.task_classes) if self.new_head else spec

    @property
    def finetune_first(self) -> bool:
        """The run starts by fine-tuning the unpruned model; the fine-tuned model is then the
        teacher of the later stages and the model the prune stage prunes."""
        return self.cfg.stages[0] == "finetune" and self.student_path is None

    @property
    def task_classes(self) -> int:
        """Classes of the run's task: ``num_classes``, else the training data's."""
        return self.cfg.num_classes or len(self.data["train"].classes)

    @property
    def new_head(self) -> bool:
        """Whether the first stage fine-tunes with a new classifier (a transfer to a new dataset):
        the finetune section's ``new_head`` when set, else whether the weights' classes differ from
        :attr:`task_classes`."""
        if self._new_head is None:
            flag = self.cfg.sections["finetune"].new_head if self.finetune_first else False
            if flag is None:
                from curlprune.models.transfer import weights_classes

                flag = weights_classes(self.cfg.model, self.cfg.weights, self.cfg.num_classes) != self.task_classes
            self._new_head = bool(flag)
        return self._new_head

    @property
    def model_ref(self) -> dict[str, Any]:
        classes = self.task_classes if self.new_head else self.cfg.num_classes
        kwargs = {"num_classes": classes} if classes else {}
        return {"name": self.cfg.model, "kwargs": kwargs}

    def build_unpruned(self):
        from curlprune.models import build

        if self.new_head:
            from curlprune.models.transfer import build_with_new_head

            model, self.head_name = build_with_new_head(self.cfg.model, self.cfg.weights, self.task_classes,
                                                        self.example_input, seed=self.cfg.seed)
            return model
        return build(self.cfg.model, weights=self.cfg.weights, num_classes=self.cfg.num_classes).eval()

    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = self.build_unpruned()
        return self._teacher

    @property
    def example_input(self):
        import torch

        spec = self.spec
        return torch.zeros(1, spec.channels, spec.size, spec.size)

    def checkpoint_of(self, stage: str) -> Path:
        return self.run_dir / stage / CHECKPOINT

    def _process_device(self) -> str:
        """The device setting of the first training stage decides the process group's backend."""
        for stage in self.cfg.stages:
            if stage in TRAIN_STAGES:
                return self.cfg.sections[stage].device
        return "auto"

    # ----- stages --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or skip, or resume) every stage; return the summary (also in ``summary.json``)."""
        from curlprune.cost import count
        from curlprune.recover.dist import init_distributed
        from curlprune.recover.loop import check_classes

        import torch

        if self.student_path is not None and "prune" in self.cfg.stages:
            raise CurlpruneError("a starting student cannot be combined with a prune stage: drop --student or the prune stage")
        if self.student_path is not None and not self.student_path.is_file():
            raise CurlpruneError(f"student checkpoint {self.student_path} does not exist: pass a curlprune checkpoint (e.g. <run_dir>/model.safetensors)")
        self.ctx = init_distributed(self._process_device(), timeout=PROCESS_GROUP_TIMEOUT)
        check_classes("teacher", self.teacher, self.data, self.spec, torch.device("cpu"), channels_last=False)
        self.base_cost = count(self.teacher, self.example_input)
        on_main(self.ctx, self._claim_run_dir)
        student = self.initial_student()
        results: dict[str, Any] = {}
        for stage in self.cfg.stages:
            if stage == "prune":
                student, results[stage] = self.prune()
            else:
                student, results[stage] = self.train(stage, student)
                if stage == "finetune" and self.finetune_first:  # the teacher of the stages after it
                    import copy

                    self._teacher = copy.deepcopy(student.model).eval()
        return self.summarize(results, student)

    def _claim_run_dir(self) -> None:
        """Check that the run directory holds this run (or none); a new one gets ``config.json`` now,
        an existing one when the run completes, so a rerun that fails changes nothing."""
        current = config_to_dict(self.cfg)
        config_file = self.run_dir / "config.json"
        if config_file.is_file():
            try:
                previous = json.loads(config_file.read_text())
            except json.JSONDecodeError:
                raise CurlpruneError(f"{config_file} is damaged: delete it (the stages check their own settings)") from None
            check_same_run(previous, current, self.run_dir)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_if_changed(config_file, json.dumps(current, indent=2) + "\n")

    def initial_student(self) -> Student | None:
        """What the first training stage starts from when there is no prune stage before it."""
        if "prune" in self.cfg.stages and not self.finetune_first:
            return None
        if self.student_path is not None:
            return Student.from_checkpoint(self.student_path)
        return Student(self.build_unpruned(), self.model_ref, {}, list(self.example_input.shape), {}, "unpruned", None)

    def prune(self) -> tuple[Student, dict[str, Any]]:
        """Rank 0 prunes (or finds the finished prune stage); every rank then loads its checkpoint."""
        record = on_main(self.ctx, self._run_prune)
        return Student.from_checkpoint(Path(record["checkpoint"])), record

    def _run_prune(self) -> dict[str, Any]:
        from curlprune.prune import run_prune

        from curlprune.recover.loop import MODEL_FILE

        check_finished_prune(self.run_dir / "prune", self.cfg.sections["prune"])
        weights, classes = self.cfg.weights, self.cfg.num_classes
        if self.finetune_first:  # prune the fine-tuned model (its plain weights file)
            weights, classes = str(self.run_dir / "finetune" / MODEL_FILE), self.model_ref["kwargs"].get("num_classes")
        started = time.time()
        result = run_prune(self.cfg.sections["prune"], self.run_dir / "prune", resume=True, model_name=self.cfg.model,
                           weights=weights, data=self.data, num_classes=classes, input_size=self.cfg.input_size)
        if not result.already_done:
            log_event(self.run_dir, {"stage": "prune", "seconds": round(time.time() - started, 2)})
        accuracy, selection = result.report["accuracy"], result.report["selection"]
        return {"criterion": result.report["criterion"], "macs_ratio": selection["macs_ratio"],
                "params_ratio": selection["params_ratio"], "top1_before": accuracy["top1_before"],
                "top1_after": accuracy["top1_after"], "checkpoint": str(result.checkpoint)}

    def train(self, stage: str, student: Student) -> tuple[Student, dict[str, Any]]:
        """Run one training stage on every rank; rank 0 saves its checkpoint."""
        from curlprune import checkpoint
        from curlprune.recover.distill import distill
        from curlprune.recover.finetune import finetune
        from curlprune.recover.refine import refine

        stage_dir = self.run_dir / stage
        on_main(self.ctx, lambda: self._check_student_record(stage_dir, student))
        was_done = (stage_dir / "done.json").is_file()
        cfg = self.cfg.sections[stage]
        if stage == "finetune":
            head = self.head_name if self.finetune_first and self.new_head else None
            result = finetune(student.model, self.data, self.spec, cfg, self.run_dir, stage=stage, head=head)
        elif stage == "distill":
            result = distill(student.model, self.teacher, self.data, self.spec, cfg, self.run_dir, stage=stage)
        else:
            result = refine(student.model, self.teacher, self.data, self.spec, cfg, self.run_dir, stage=stage)
        extra = {**student.extra, f"{stage}_last_top1": result.last_top1, f"{stage}_best_top1": result.best_top1}
        out = self.checkpoint_of(stage)

        def save() -> str:
            if not out.is_file():
                checkpoint.save(out, student.model_ref, student.plan, result.model.state_dict(),
                                input_shape=student.input_shape, extra=extra)
            if not was_done:
                log_event(self.run_dir, {"stage": stage, "seconds": round(result.seconds, 2)})
            return file_digest(out)

        digest = on_main(self.ctx, save)
        trained = Student(result.model, student.model_ref, student.plan, student.input_shape, extra, str(out), digest)
        record = {"epochs": result.epochs, "last_top1": result.last_top1, "best_top1": result.best_top1,
                  "seconds": round(result.seconds, 1), "checkpoint": str(out)}
        return trained, record

    def _check_student_record(self, stage_dir: Path, student: Student) -> None:
        """A stage resumes or is skipped only if it started from the same student as now."""
        from curlprune.recover.loop import read_json

        record = {"source": student.source, "sha256": student.digest}
        path = stage_dir / STUDENT_RECORD
        if path.is_file():
            previous = read_json(path)
            if previous.get("sha256") != record["sha256"]:
                raise CurlpruneError(
                    f"{stage_dir} was started from another student ({previous.get('source')}, now {student.source}): "
                    f"delete {stage_dir} to run the stage again from the new one"
                )
            return
        write_if_changed(path, json.dumps(record, indent=2) + "\n")

    def summarize(self, results: dict[str, Any], final_student: Student) -> dict[str, Any]:
        """Final accuracies, MACs and params; rank 0 writes ``model.safetensors`` and ``summary.json``.

        The cost is counted on the last stage's model in memory (it is what its checkpoint holds).
        """
        from curlprune.cost import count

        final = Path(results[self.cfg.stages[-1]]["checkpoint"])
        model = final_student.model
        macs, params = count(model, self.example_input.to(next(model.parameters()).device))
        base_macs, base_params = self.base_cost
        summary: dict[str, Any] = {
            "model": self.cfg.model,
            "stages": results,
            "macs": macs,
            "params": params,
            "base_macs": base_macs,
            "base_params": base_params,
            "macs_ratio": macs / base_macs,
            "params_ratio": params / base_params,
            "checkpoint": str(self.run_dir / "model.safetensors"),
        }
        if "prune" in results:  # test top-1 (%) before any recovery
            summary.update(unpruned_top1=results["prune"]["top1_before"], pruned_top1=results["prune"]["top1_after"])
        trained = [r for r in results.values() if "last_top1" in r]
        if trained:
            summary.update(last_top1=trained[-1]["last_top1"], best_top1=max(r["best_top1"] for r in trained))

        def write() -> None:
            write_if_changed(self.run_dir / "config.json", json.dumps(config_to_dict(self.cfg), indent=2) + "\n")
            copy_if_changed(final, self.run_dir / "model.safetensors")
            write_if_changed(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")

        on_main(self.ctx, write)
        return summary


def print_summary(summary: dict[str, Any]) -> None:
    """Test top-1 after every stage (unpruned and pruned without recovery too) and the final cost."""
    from rich.table import Table

    from curlprune.report import console, human

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}%"

    table = Table(title=f"run summary: {summary['model']}, test top-1")
    for col in ("stage", "epochs", "last top-1", "best top-1", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, r in summary["stages"].items():
        if stage == "prune":
            table.add_row("unpruned", "", percent(r["top1_before"]), "", "")
            table.add_row(f"pruned ({r['criterion']}, {100 * r['macs_ratio']:.1f}% MACs)", "", percent(r["top1_after"]), "", "")
        else:
            table.add_row(stage, str(r["epochs"]), percent(r["last_top1"]), percent(r["best_top1"]), f"{r['seconds']:.1f}")
    console.print(table)
    console.print(f"final model: {human(summary['macs'])} MACs ({100 * summary['macs_ratio']:.1f}%), "
                  f"{human(summary['params'])} params ({100 * summary['params_ratio']:.1f}%) -> {summary['checkpoint']}")


def run_and_print(cfg: RunConfig, student: str | Path | None = None) -> int:
    """Run a config and print its summary on the process that prints (rank 0 under torchrun)."""
    from curlprune.recover.dist import shutdown

    runner = Run(cfg, student=student)
    try:
        summary = runner.run()
    except BaseException:
        shutdown(wait=False)
        raise
    if runner.ctx.is_main:
        print_summary(summary)
    shutdown()
    return 0


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
    return run_and_print(load_config(args.config, {"run_dir": args.out}))


def _single_stage(stage: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        given = {"model": args.model, "weights": args.weights, "num_classes": args.num_classes, "data": args.data,
                 "run_dir": args.out, "seed": args.seed, "train_per_class": args.train_per_class, "input_size": args.input_size}
        raw = read_config_file(args.config) if args.config else {}
        raw.update({k: v for k, v in given.items() if v is not None})
        raw["stages"] = [stage]
        section = dict(raw.get(stage) or {})
        section.update({key: getattr(args, key) for key in ("epochs", "lr", "batch_size") if getattr(args, key) is not None})
        if getattr(args, "new_head", False):
            section["new_head"] = True
        raw[stage] = section
        return run_and_print(parse_config(raw, args.config or "command line"), student=args.student)

    return command


def register(subparsers, formatter) -> None:
    from curlprune.prune import NO_DEFAULT

    p = subparsers.add_parser("run", help="run a whole pipeline from a YAML config (prune -> distill -> refine)",
                              formatter_class=formatter, epilog=EXAMPLE,
                              description="Run the stages named in the config in order. Each stage writes into "
                                          "<run_dir>/<stage>/ and is skipped when complete; an interrupted run resumes.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--out", default=None, help="run directory (overrides run_dir in the config)" + NO_DEFAULT)
    p.set_defaults(func=cmd_run)
    helps = {"finetune": "recover accuracy with plain cross-entropy fine-tuning, or transfer a pretrained model to "
                         "a new dataset (a new classifier for its classes: finetune.new_head)",
             "distill": "recover accuracy by mixup knowledge distillation from the unpruned model",
             "refine": "label refinement on the 6x expanded data (CURL stage 3)"}
    for stage, text in helps.items():
        p = subparsers.add_parser(stage, help=text, formatter_class=formatter,
                                  description=f"{text[0].upper()}{text[1:]}. Settings come from --config (section '{stage}') "
                                              "and the options below (options win). Resumable like `curlprune run`.")
        p.add_argument("--config", default=None, help="YAML run config to take model, data and the stage section from" + NO_DEFAULT)
        p.add_argument("--student", default=None, help="curlprune checkpoint to train, e.g. runs/r56/prune/model.safetensors "
                                                        "(default: the unpruned model)" + NO_DEFAULT)
        p.add_argument("--model", default=None, help="registry name of the unpruned model (the teacher), e.g. cifar:resnet56" + NO_DEFAULT)
        p.add_argument("--weights", default=None, help="weights of the unpruned model" + NO_DEFAULT)
        p.add_argument("--num-classes", type=int, default=None, help="classifier outputs, when not the model's default; "
                                                                  "finetune on weights of other classes: the new classifier's (default: the data's)" + NO_DEFAULT)
        p.add_argument("--data", default=None, help="ImageFolder directory or zip with train/ and test/, or 'digits' (default: digits)" + NO_DEFAULT)
        p.add_argument("--train-per-class", type=int, default=None, help="use a seeded class-balanced subset of the train split" + NO_DEFAULT)
        p.add_argument("--input-size", type=int, default=None, help="square input side when not the model's default, e.g. 64 "
                                                                 "(images are resized to it)" + NO_DEFAULT)
        p.add_argument("--epochs", type=int, default=None, help="epochs (default: the stage's own)" + NO_DEFAULT)
        p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the stage's own)" + NO_DEFAULT)
        p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the stage's own)" + NO_DEFAULT)
        p.add_argument("--seed", type=int, default=None, help="seed for data order, augmentation and mixup (default: 0)" + NO_DEFAULT)
        p.add_argument("--out", default=None, help="run directory (default: runs/run)" + NO_DEFAULT)
        if stage == "finetune":
            p.add_argument("--new-head", action="store_true", help="replace the classifier by a new one for the data's classes "
                                                                   "even when their number equals the weights' (a new dataset)")
        p.set_defaults(func=_single_stage(stage))
