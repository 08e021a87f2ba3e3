"""The resumable run of a :class:`~curlprune.run.run_config.RunConfig`: prune -> distill (the default
stages), -> refine when listed (or finetune; or finetune -> prune -> distill, a transfer to a new dataset).

Run directory::

    config.json          the resolved config (every setting of every stage)
    log.jsonl            one line per stage that did work (stage, seconds); one lost to a kill
                         after the stage's done.json is restored on resume (``"rebuilt": true``)
    prune/               the prune stage's outputs (scores, plan, checkpoint, report)
    <train stage>/       metrics.jsonl (one line per epoch), state.safetensors (resumable state),
                         model.safetensors (plain weights) + done.json (when finished),
                         checkpoint.safetensors (architecture + plan + weights), student.json
                         (what it started from), best.safetensors (plain weights of the best epoch
                         so far; kept when the stage diverges, :mod:`curlprune.recover.divergence`)
    model.safetensors    the final model (a curlprune checkpoint: ``curlprune.load`` / ``export``)
    summary.json         accuracies (test top-1 in %), MACs and params, per stage and final

Each stage is skipped when its outputs are complete; a killed run resumes from the last completed
epoch. Under ``torchrun`` the training stages run on every process (DistributedDataParallel); the
prune stage's scoring is shared by the processes (every step's; docs/method.md §10) and rank 0 alone
selects and writes the shared files.

The file names and the stage-folder protocol are :mod:`curlprune.store.rundir`'s (``model.safetensors``
is a curlprune checkpoint here and in ``prune/``, plain weights in a training stage's folder).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curlprune.cost import count
from curlprune.errors import CurlpruneError
from curlprune.models import ModelRef, build_reproducible, input_spec
from curlprune.models.spec import InputSpec
from curlprune.models.transfer import at_input_size, build_with_new_head, weights_classes
from curlprune.run.prune_check import preflight_prune
from curlprune.recover.dist import init_distributed, on_main
from curlprune.recover.evaluate import check_classes
from curlprune.recover.early_stop import check_early_stop_data
from curlprune.recover.registry import get_stage, is_recovery_stage, run_stage
from curlprune.recover.stage import check_config
from curlprune.run.prune import run_prune
from curlprune.run.run_config import RunConfig, check_finished_prune, check_same_run, config_to_dict, data_settings
from curlprune.run.student_check import check_student_fits
from curlprune.store import (
    CONFIG_FILE,
    MODEL_FILE,
    PRUNE_STAGE,
    STAGE_CHECKPOINT_FILE,
    STUDENT_FILE,
    PruneStep,
    RunLock,
    RunSummary,
    TrainStep,
    content_digest,
    copy_if_changed,
    file_digest,
    is_done,
    log_stage,
    read_json,
    write_json,
    write_run_summary,
)
from curlprune.store import checkpoint
from curlprune.data.valsplit import SPLIT_FILE, check_split_record
from curlprune.run.run_data import load_splits

# Rank 0 may select, evaluate (or score with a criterion it runs alone) for a long time while the other ranks wait in a collective.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)


# ----- the run --------------------------------------------------------------------------------
@dataclass
class Student:
    """The model a stage starts from, with what is needed to save it as a curlprune checkpoint."""

    model: nn.Module
    model_ref: ModelRef
    plan: dict[str, list[int]]
    input_shape: list[int]
    extra: dict[str, Any]
    source: str  # "unpruned" or the checkpoint it was loaded from
    digest: str | None  # content digest of that checkpoint (canonical.content_digest)

    @classmethod
    def from_checkpoint(cls, path: Path) -> "Student":
        """The student saved in a curlprune checkpoint, with the checkpoint's path and content digest
        (:func:`curlprune.store.canonical.content_digest`: tensors + metadata, not the file's bytes)."""
        meta = checkpoint.read_metadata(path)
        return cls(checkpoint.load(path), ModelRef.of(meta["model_ref"]), meta["plan"], meta["input_shape"], meta["extra"], str(path), content_digest(path))


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
        self._val_record: dict[str, Any] | None = None  # what val_split.json holds (curlprune.data.valsplit)
        self._teacher = None
        self._new_head: bool | None = None
        self.head_name: str | None = None  # the re-initialised classifier of a transfer run
        self.ctx = None
        self.lock = RunLock(self.run_dir)
        self.summary: RunSummary | None = None  # set when a run completes

    # ----- shared inputs -------------------------------------------------------------------
    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data, self._val_record = load_splits(self.cfg.data, self.cfg.train_per_class, self.cfg.seed,
                                                       val_per_class=self.cfg.val_per_class, val_fraction=self.cfg.val_fraction,
                                                       settings=data_settings(self.cfg))
        return self._data

    @property
    def spec(self) -> InputSpec:
        """The model's input recipe at the run's ``input_size``, with the task's classes in a transfer."""
        classes = self.task_classes if self.new_head else self.cfg.num_classes  # a transfer: not the weights' (an
        # import-path model would be built with them to read its classes, and refuse weights of other classes)
        spec = at_input_size(input_spec(self.cfg.model, self.cfg.weights, classes, input_shape=self.cfg.input_shape,
                                        model_kwargs=self.cfg.model_kwargs), self.cfg.input_size)
        return dataclasses.replace(spec, num_classes=self.task_classes) if self.new_head else spec

    @property
    def transfer_first(self) -> bool:
        """The run starts with a transfer stage (``finetune``; :attr:`RecoveryStage.transfer
        <curlprune.recover.registry.RecoveryStage.transfer>`) on the unpruned model; the trained model
        is then the teacher of the later stages and the model the prune stage prunes."""
        first = self.cfg.stages[0]
        return is_recovery_stage(first) and get_stage(first).transfer and self.student_path is None

    @property
    def task_classes(self) -> int:
        """Classes of the run's task: ``num_classes``, else the training data's."""
        return self.cfg.num_classes or len(self.data["train"].classes)

    @property
    def new_head(self) -> bool:
        """Whether the first stage fine-tunes with a new classifier (a transfer to a new dataset):
        the transfer stage section's ``new_head`` when set, else whether the weights' classes differ from
        :attr:`task_classes` (docs/method.md §4)."""
        if self._new_head is None:
            flag = self.cfg.sections[self.cfg.stages[0]].new_head if self.transfer_first else False
            if flag is None:
                flag = weights_classes(self.cfg.model, self.cfg.weights, self.cfg.num_classes, input_shape=self.cfg.input_shape,
                                       model_kwargs=self.cfg.model_kwargs) != self.task_classes
            self._new_head = bool(flag)
        return self._new_head

    @property
    def model_ref(self) -> ModelRef:
        """The unpruned architecture the checkpoints name: the model with the task's classes in a transfer."""
        classes = self.task_classes if self.new_head else self.cfg.num_classes
        return ModelRef(self.cfg.model, {**(self.cfg.model_kwargs or {}), **({"num_classes": classes} if classes else {})})

    def build_unpruned(self) -> nn.Module:
        """The unpruned model in eval mode; in a transfer, with a new classifier for the task's classes."""
        if self.new_head:
            model, self.head_name = build_with_new_head(self.cfg.model, self.cfg.weights, self.task_classes,
                                                        self.example_input, seed=self.cfg.seed, input_shape=self.cfg.input_shape,
                                                        model_kwargs=self.cfg.model_kwargs)
            return model
        return build_reproducible(self.cfg.model, weights=self.cfg.weights, num_classes=self.cfg.num_classes,
                                  **(self.cfg.model_kwargs or {})).eval()  # no weights: the prune stage's random init

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self.build_unpruned()
        return self._teacher

    @property
    def example_input(self) -> torch.Tensor:
        spec = self.spec
        return torch.zeros(1, spec.channels, spec.size, spec.size)

    def checkpoint_of(self, stage: str) -> Path:
        return self.run_dir / stage / STAGE_CHECKPOINT_FILE

    def _process_device(self) -> str:
        """The device setting of the first training stage decides the process group's backend."""
        for stage in self.cfg.stages:
            if is_recovery_stage(stage):
                return self.cfg.sections[stage].device
        return "auto"

    # ----- stages --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or skip, or resume) every stage; return the summary (``summary.json``'s object;
        typed: :attr:`summary`).

        Rank 0 checks the run directory and locks it (:class:`curlprune.store.runlock.RunLock`) before
        any data or model is loaded, and holds the lock until the run ends in any way; then every
        check runs (:meth:`preflight`) before the run writes its first byte (``config.json``).

        Returns:
            The summary: per-stage records, final MACs/params and their ratios to the unpruned
            model, test top-1 in % (unpruned, pruned, last and best after training).
        Raises:
            CurlpruneError: bad combination of student and stages, a run directory that is not a
                writable folder, is in use by another process (also: lies inside a run directory
                in use, or a stage folder of it is in use) or holds another run, a teacher that does not fit the data,
                a student checkpoint that is damaged or does not fit the run, a prune target that cannot be
                reached or a calibration set larger than the data (all of these before anything is written,
                :meth:`preflight`), or any stage's own errors.
        """
        if self.student_path is not None and PRUNE_STAGE in self.cfg.stages:
            raise CurlpruneError("a starting student cannot be combined with a prune stage: drop --student or the prune stage")
        if self.student_path is not None and not self.student_path.is_file():
            raise CurlpruneError(f"student checkpoint {self.student_path} does not exist: pass a curlprune checkpoint (e.g. <run_dir>/model.safetensors)")
        self.ctx = init_distributed(self._process_device(), timeout=PROCESS_GROUP_TIMEOUT)
        on_main(self.ctx, lambda: bool(self.lock.acquire()))  # --out checked and locked before any slow work (issue 12)
        try:
            return self._run_stages()
        finally:
            self.lock.release()

    def _run_stages(self) -> dict[str, Any]:
        """The stages of :meth:`run`, with the run directory locked."""
        student = self.preflight()
        on_main(self.ctx, self._claim_run_dir)  # the first byte the run writes
        results: dict[str, PruneStep | TrainStep] = {}
        for stage in self.cfg.stages:
            if stage == PRUNE_STAGE:
                student, results[stage] = self.prune()
            else:
                student, results[stage] = self.train(stage, student)
                if stage == self.cfg.stages[0] and self.transfer_first:  # the teacher of the stages after it
                    self._teacher = copy.deepcopy(student.model).eval()
        return self.summarize(results, student).to_json()

    def preflight(self) -> Student | None:
        """Every check that can be made before the run writes anything (issue 18, item 6): a run that
        would fail on its inputs fails here, and the run directory is left as it was (a folder the
        lock created is removed again, :class:`~curlprune.store.runlock.RunLock`).

        Checked, in order: the run directory holds this run or none (``config.json``), a finished
        ``prune/`` has this run's prune settings; every training stage's batch splits evenly over the
        processes (:func:`curlprune.recover.stage.check_config`); the data loads and the teacher's weights (finite)
        give the data's classes; a ``--student`` checkpoint (header, finite weights) takes the run's
        input and gives the teacher's classes; the prune stage's target is reachable on the model it
        will prune (floor, protected groups, ``round_to``) and its calibration set fits in the
        training split (:func:`curlprune.run.prune_check.preflight_prune`).

        Returns:
            What the first training stage starts from (:meth:`initial_student`).
        Raises:
            CurlpruneError: the first check that fails, in one line.
        """
        on_main(self.ctx, self._check_run_dir)
        for stage in filter(is_recovery_stage, self.cfg.stages):
            check_config(self.cfg.sections[stage], self.ctx)  # e.g. a global batch that does not split over the processes
        check_classes("teacher", self.teacher, self.data, self.spec, torch.device("cpu"), channels_last=False)
        for stage in filter(is_recovery_stage, self.cfg.stages):
            check_early_stop_data(stage, self.cfg.sections[stage], self.data)  # early stopping needs a validation split
        on_main(self.ctx, lambda: self._check_val_split(write=False))  # a rerun draws the split it started with
        self.base_cost = count(self.teacher, self.example_input)
        student = self.initial_student()
        if PRUNE_STAGE in self.cfg.stages:
            on_main(self.ctx, self._preflight_prune)
        return student

    def _preflight_prune(self) -> None:
        """The prune stage's checks on the model it will prune: the teacher's architecture (with the
        task's classifier in a transfer). Returns None: under torchrun rank 0's result is sent to the others."""
        preflight_prune(self.cfg.sections[PRUNE_STAGE], self.cfg.model, self.teacher, self.example_input, self.data)

    def _check_run_dir(self) -> None:
        """The run directory holds this run or none, and a finished prune stage in it has this run's settings."""
        config_file = self.run_dir / CONFIG_FILE
        if config_file.is_file():
            try:
                previous = json.loads(config_file.read_text())
            except json.JSONDecodeError:
                raise CurlpruneError(f"{config_file} is damaged: delete it (the stages check their own settings)") from None
            check_same_run(previous, config_to_dict(self.cfg), self.run_dir, self.cfg.stages_listed)
        if PRUNE_STAGE in self.cfg.stages:
            check_finished_prune(self.run_dir / PRUNE_STAGE, self.cfg.sections[PRUNE_STAGE])

    def _claim_run_dir(self) -> None:
        """After :meth:`preflight`: a new run directory gets ``config.json`` (and ``val_split.json``)
        now, an existing one when the run completes, so a rerun that fails changes nothing."""
        config_file = self.run_dir / CONFIG_FILE
        if config_file.is_file():
            self._check_val_split()  # a run folder from before the split record gets it now
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._check_val_split()
        write_json(config_file, config_to_dict(self.cfg), only_if_changed=True)

    def _check_val_split(self, write: bool = True) -> None:
        """The run keeps the validation split it started with: ``val_split.json`` is written with the
        first split drawn (unless ``write`` is False), and a rerun must draw the same one
        (:func:`curlprune.data.valsplit.check_split_record`)."""
        path = self.run_dir / SPLIT_FILE
        current = self._val_record or {"train_images": None, "indices": None, "sha256": None}
        if path.is_file():
            try:
                previous = read_json(path)
            except CurlpruneError:
                raise CurlpruneError(f"{path} is damaged: delete {self.run_dir} to run again") from None
            check_split_record(previous, current, str(path))
        elif write and self._val_record is not None:
            write_json(path, self._val_record, only_if_changed=True)

    def initial_student(self) -> Student | None:
        """What the first training stage starts from when there is no prune stage before it; a
        ``--student`` must take the run's input and give the teacher's classes
        (:func:`curlprune.run.student_check.check_student_fits`)."""
        if PRUNE_STAGE in self.cfg.stages and not self.transfer_first:
            return None
        if self.student_path is not None:
            student = Student.from_checkpoint(self.student_path)
            check_student_fits(student.model, self.student_path, student.model_ref, student.input_shape, self.teacher,
                               self.example_input, self.cfg.model)  # another architecture: one line
            return student
        return Student(self.build_unpruned(), self.model_ref, {}, list(self.example_input.shape), {}, "unpruned", None)

    def prune(self) -> tuple[Student, PruneStep]:
        """Every rank prunes (sharing the scoring; rank 0 selects and writes) or finds it done, then loads its checkpoint."""
        record = self._run_prune()
        return Student.from_checkpoint(Path(record.checkpoint)), record

    def _run_prune(self) -> PruneStep:
        """``run_prune`` on every rank: it returns (or raises rank 0's error) on all, then rank 0's record goes to all."""
        prune_dir = self.run_dir / PRUNE_STAGE
        on_main(self.ctx, lambda: check_finished_prune(prune_dir, self.cfg.sections[PRUNE_STAGE]))
        weights, classes = self.cfg.weights, self.cfg.num_classes
        if self.transfer_first:  # prune the fine-tuned model (its plain weights file)
            weights, classes = str(self.run_dir / self.cfg.stages[0] / MODEL_FILE), self.model_ref.kwargs.get("num_classes")
        started = time.time()
        with self.lock.stages():  # the run's own stage may lock prune/ inside the locked run directory
            result = run_prune(self.cfg.sections[PRUNE_STAGE], prune_dir, resume=True, model_name=self.cfg.model,
                               weights=weights, data=self.data, num_classes=classes, input_size=self.cfg.input_size,
                               model_kwargs=self.cfg.model_kwargs, input_shape=self.cfg.input_shape, ctx=self.ctx)

        def record() -> PruneStep:  # rank 0 (the others got None); a line lost to a kill after done.json is restored
            log_stage(self.run_dir, PRUNE_STAGE, None if result.already_done else round(time.time() - started, 2),
                      did_work=not result.already_done)
            report = result.report
            return PruneStep(report.criterion, report.macs_ratio, report.params_ratio, report.accuracy.top1_before,
                             report.accuracy.top1_after, str(result.checkpoint), report.accuracy.top1_after_bn)

        return on_main(self.ctx, record)

    def train(self, stage: str, student: Student) -> tuple[Student, TrainStep]:
        """Run one recovery stage (:func:`curlprune.recover.registry.run_stage`) on every rank; rank 0 saves its checkpoint."""
        stage_dir = self.run_dir / stage
        on_main(self.ctx, lambda: self._check_student_record(stage_dir, student))
        was_done = is_done(stage_dir)
        entry = get_stage(stage)
        head = self.head_name if entry.transfer and self.transfer_first and self.new_head else None
        result = run_stage(stage, student.model, self.data, self.spec, self.cfg.sections[stage], self.run_dir,
                           teacher=self.teacher if entry.needs_teacher else None, head=head, plan=student.plan)
        extra = {**student.extra, f"{stage}_last_top1": result.last_top1, f"{stage}_best_top1": result.best_top1}
        out = self.checkpoint_of(stage)

        def save() -> str:
            if not out.is_file():
                checkpoint.save(out, student.model_ref, student.plan, result.model.state_dict(),
                                input_shape=student.input_shape, extra=extra)
            log_stage(self.run_dir, stage, round(result.seconds, 2), did_work=not was_done)  # or restored, issue 18
            return content_digest(out)

        digest = on_main(self.ctx, save)
        trained = Student(result.model, student.model_ref, student.plan, student.input_shape, extra, str(out), digest)
        return trained, TrainStep(result.epochs, result.last_top1, result.best_top1, round(result.seconds, 1), str(out),
                                    result.val_top1, result.best_epoch)

    def _check_student_record(self, stage_dir: Path, student: Student) -> None:
        """A stage resumes or is skipped only if it started from the same student as now (same
        content digest; records written by earlier versions hold the file's SHA-256, also accepted)."""
        record = {"source": student.source, "sha256": student.digest}
        path = stage_dir / STUDENT_FILE
        if path.is_file():
            previous = read_json(path)
            same = previous.get("sha256") == record["sha256"]  # tensors + metadata, not file bytes (issue 12)
            if not same and Path(student.source).is_file():  # a record written before: the file's own SHA-256
                same = previous.get("sha256") == file_digest(student.source)
            if not same:
                raise CurlpruneError(
                    f"{stage_dir} was started from another student ({previous.get('source')}, now {student.source}): "
                    f"delete {stage_dir} to run the stage again from the new one"
                )
            return
        write_json(path, record, only_if_changed=True)

    def summarize(self, results: dict[str, PruneStep | TrainStep], final_student: Student) -> RunSummary:
        """Final accuracies, MACs and params; rank 0 writes ``model.safetensors`` and ``summary.json``.

        The cost is counted on the last stage's model in memory (it is what its checkpoint holds).
        Returns:
            The :class:`~curlprune.store.records.RunSummary`, also kept as :attr:`summary`.
        """
        final = Path(results[self.cfg.stages[-1]].checkpoint)
        model = final_student.model
        cost = count(model, self.example_input.to(next(model.parameters()).device))
        summary = RunSummary.build(self.cfg.model, results, cost, self.base_cost, str(self.run_dir / MODEL_FILE))

        def write() -> None:
            write_json(self.run_dir / CONFIG_FILE, config_to_dict(self.cfg), only_if_changed=True)
            copy_if_changed(final, self.run_dir / MODEL_FILE)
            write_run_summary(self.run_dir, summary)

        on_main(self.ctx, write)
        self.summary = summary
        return summary
