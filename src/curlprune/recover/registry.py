"""The recovery stages, one row each: the one table that the run config, the pipeline, the
commands and the report read.

    finetune   FinetuneConfig   cross-entropy on hard labels; may run first, to transfer the unpruned model
    distill    DistillConfig    mixup + knowledge distillation from the teacher (docs/method.md §5)
    refine     RefineConfig     label refinement on the 6x expanded data (docs/method.md §6, §7)

A stage is a settings class (a :class:`~curlprune.recover.stage.TrainConfig`), its hooks into the
one training loop (a :class:`~curlprune.recover.stage.Stage`) and one row here. Adding one is one
file, ``recover/<name>.py`` with the two classes, and one :func:`register_stage` call::

    register_stage(RecoveryStage("smooth", SmoothConfig, lambda cfg, teacher, head: SmoothStage(cfg),
                                 help="recover accuracy with label-smoothed cross-entropy"))

Then ``stages: [prune, smooth]`` and a ``smooth:`` section are valid in a run config (its keys are
the fields of ``SmoothConfig``), the pipeline trains it into ``<run_dir>/smooth/``, a parser built
afterwards (:func:`curlprune.cli.build_parser`) has ``curlprune smooth``, and the report draws its
training curves. A stage's name is also its folder's name and its label in summaries and figures.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from torch import nn
from torch.utils.data import Dataset

from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.recover.distill import DistillConfig, DistillStage
from curlprune.recover.finetune import FinetuneConfig, FinetuneStage
from curlprune.recover.loop import train_stage
from curlprune.recover.refine import RefineConfig, RefineStage
from curlprune.recover.stage import Result, Stage, TrainConfig
from curlprune.store import PRUNE_STAGE

StageBuilder = Callable[[TrainConfig, "nn.Module | None", "str | None"], Stage]
"""``(cfg, teacher, head) -> Stage``: the stage's hooks for one run. ``teacher`` is the frozen model to
learn from (None unless the stage ``needs_teacher``); ``head`` is the qualified name of a classifier
just re-initialised for the data's classes (a transfer; None otherwise)."""

TRANSFER_FIELDS = ("new_head", "body_lr_mult", "head_epochs")  # what a transfer stage's settings hold


@dataclass(frozen=True)
class RecoveryStage:
    """One registered recovery stage.

    name:          its name in a run config (``stages`` and its section), its command
                   (``curlprune <name>``), its folder ``<run_dir>/<name>/`` and its label in reports.
    config:        its settings class (a :class:`TrainConfig` subclass); a config section's keys are its fields.
    build:         :data:`StageBuilder`: the settings (and teacher, head) -> its :class:`Stage` hooks.
    help:          one line for ``curlprune --help``, also the start of the command's description.
    needs_teacher: it learns from the unpruned model (the fine-tuned one in a transfer run).
    transfer:      it may run first, on the unpruned model, with a new classifier for the data's
                   classes; its result is then the teacher of the later stages and the model the prune
                   stage prunes (docs/method.md §4). Its settings hold ``new_head``, ``body_lr_mult`` and
                   ``head_epochs`` (as :class:`~curlprune.recover.finetune.FinetuneConfig`).
    """

    name: str
    config: type[TrainConfig]
    build: StageBuilder
    help: str
    needs_teacher: bool = False
    transfer: bool = False


_STAGES: dict[str, RecoveryStage] = {}


def register_stage(entry: RecoveryStage) -> RecoveryStage:
    """Add a recovery stage to the table (after those registered before it).

    Args:
        entry: the stage's row.
    Returns:
        ``entry``.
    Raises:
        ValueError: the name is taken (also by the prune stage) or not a plain lowercase word,
            ``config`` is not a TrainConfig subclass, or a transfer stage's settings lack
            :data:`TRANSFER_FIELDS`.
    """
    if entry.name in _STAGES or entry.name == PRUNE_STAGE:
        raise ValueError(f"recovery stage {entry.name!r} is registered twice")
    if not entry.name or not entry.name.replace("_", "").replace("-", "").isalnum() or entry.name != entry.name.lower():
        raise ValueError(f"recovery stage name {entry.name!r} must be a lowercase word (it names a folder and a command)")
    if not (isinstance(entry.config, type) and issubclass(entry.config, TrainConfig)):
        raise ValueError(f"recovery stage {entry.name!r}: its config must be a TrainConfig subclass (got {entry.config!r})")
    missing = set(TRANSFER_FIELDS) - {f.name for f in dataclasses.fields(entry.config)}
    if entry.transfer and missing:
        raise ValueError(f"recovery stage {entry.name!r} is a transfer stage but its config lacks {', '.join(sorted(missing))}")
    _STAGES[entry.name] = entry
    return entry


def unregister_stage(name: str) -> None:
    """Remove a stage registered with :func:`register_stage` (tests, plug-ins); an unknown name is ignored."""
    _STAGES.pop(name, None)


def recovery_stages() -> tuple[RecoveryStage, ...]:
    """Every registered stage, in registration order (the built-in ones first: finetune, distill, refine)."""
    return tuple(_STAGES.values())


def stage_names() -> tuple[str, ...]:
    """The registered stages' names, in registration order."""
    return tuple(_STAGES)


def is_recovery_stage(name: str) -> bool:
    """Whether ``name`` is a registered recovery stage."""
    return name in _STAGES


def get_stage(name: str) -> RecoveryStage:
    """The row of the recovery stage ``name``.

    Raises:
        CurlpruneError: no stage of that name (the message lists the registered ones).
    """
    if name not in _STAGES:
        raise CurlpruneError(f"unknown recovery stage {name!r}: use one of {', '.join(_STAGES)}")
    return _STAGES[name]


def run_stage(
    name: str,
    student: nn.Module,
    data: Mapping[str, Dataset],
    spec: InputSpec,
    cfg: TrainConfig | None = None,
    run_dir: str | Path = "runs/recover",
    *,
    teacher: nn.Module | None = None,
    head: str | None = None,
    folder: str | None = None,
    plan: Mapping[str, list[int]] | None = None,
) -> Result:
    """Train ``student`` in place with the recovery stage ``name``; resumable, skipped when done.

    Args:
        name: a registered stage.
        student, data, spec, run_dir: as in :func:`curlprune.recover.finetune.finetune`.
        cfg: the stage's settings (an instance of its ``config``); None = that class's defaults.
        teacher: the model it learns from; required when the stage ``needs_teacher``, else ignored.
        head: a classifier just re-initialised for the data's classes (transfer stages; else ignored).
        folder: the stage folder's name under ``run_dir`` (default: ``name``).
        plan: the plan the student was sliced from the teacher by (group name -> kept channels of the
            original model; :meth:`Stage.use_plan <curlprune.recover.stage.Stage.use_plan>`); None = unpruned.
    Returns:
        The :class:`~curlprune.recover.stage.Result` (test top-1 in %, epochs, seconds).
    Raises:
        CurlpruneError: an unknown stage, a missing teacher, or the stage's own errors (bad data or
            settings, a model that does not fit the data, a folder written with other settings).
    """
    entry = get_stage(name)
    if entry.needs_teacher and teacher is None:
        raise CurlpruneError(f"the {name} stage needs a teacher (the unpruned model): pass teacher=")
    stage = entry.build(cfg or entry.config(), teacher if entry.needs_teacher else None, head if entry.transfer else None)
    stage.use_plan(plan)
    return train_stage(stage, student, data, spec, run_dir, folder=folder or name)


register_stage(RecoveryStage(
    "finetune", FinetuneConfig, lambda cfg, teacher, head: FinetuneStage(cfg, head=head), transfer=True,
    help="recover accuracy with plain cross-entropy fine-tuning, or transfer a pretrained model to "
         "a new dataset (a new classifier for its classes: finetune.new_head)"))
register_stage(RecoveryStage(
    "distill", DistillConfig, lambda cfg, teacher, head: DistillStage(cfg, teacher), needs_teacher=True,
    help="recover accuracy by mixup knowledge distillation from the unpruned model (+ CE on the true labels: ce_weight, default 0.5; 0 = the paper's loss)"))
register_stage(RecoveryStage(
    "refine", RefineConfig, lambda cfg, teacher, head: RefineStage(cfg, teacher), needs_teacher=True,
    help="label refinement on the 6x expanded data (CURL stage 3)"))
