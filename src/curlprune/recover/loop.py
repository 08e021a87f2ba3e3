"""The training loop every recovery stage runs: resumable, deterministic, multi-process.

A stage (fine-tuning, distillation, label refinement) supplies only what differs, as a
:class:`Stage`: its training set, its loss and what happens after the backward pass. This loop
does the rest, identically for all of them:

* SGD (momentum 0.9, weight decay 4e-5 on every parameter, BN included, as in the paper) with
  the per-iteration warm-up + cosine schedule of :mod:`curlprune.recover.schedule`;
* mixed precision with ``amp: bf16|fp16`` (:mod:`curlprune.recover.amp`: autocast for the forward
  passes, float32 weights and losses, a loss scaler for fp16 saved with the state); off by default;
* channels_last, a progress bar (loss, lr, ETA; plain lines every 30 s off a terminal: curlprune.progress), and one JSON line per epoch in
  ``<run_dir>/<stage>/metrics.jsonl`` (epoch, mean training loss, lr of the epoch's last step,
  train_top1, test_top1, val_top1 when the data has a validation split, seconds; accuracies in %,
  test and validation top-1 with the eval transform);
* with ``early_stop`` (:mod:`curlprune.recover.early_stop`): stop once validation top-1 has not
  improved for ``patience`` epochs, and finish with the best epoch's weights;
* after every epoch, ``<run_dir>/<stage>/state.safetensors`` (written atomically): weights,
  optimizer, iteration, every RNG state and the stage's own tensors. A rerun resumes after the
  last completed epoch and then behaves exactly as the uninterrupted run would have;
* at the end, ``model.safetensors`` (final weights: plain weights, not a curlprune checkpoint)
  and ``done.json`` (summary). A stage whose ``done.json`` exists is skipped: its weights are
  loaded into the given model;
* a stage that diverged (NaN loss; or a last epoch at chance, far below the model it started
  from, :mod:`curlprune.recover.divergence`) stops with one line and writes no result; the
  weights of its best epoch so far are kept in ``best.safetensors``;
* under ``torchrun`` (``WORLD_SIZE > 1``): DistributedDataParallel, seeded sharding, files
  written by rank 0 only (see :mod:`curlprune.recover.dist`).

Determinism: the data order comes from a seeded ``torch.Generator``; augmentations draw from
the global torch RNG, seeded from ``(seed, rank)``; stage randomness (mixup) from its own
seeded generator. All of them are saved in the state, so a resumed run matches an
uninterrupted one bit for bit on the same machine and number of processes.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Dataset

from curlprune.data import build_transform, to_input
from curlprune.data.streaming import stream, streams, workers_of
from curlprune.models.spec import InputSpec
from curlprune.progress import progress as show_progress
from curlprune.recover import dist, divergence, guards
from curlprune.recover.amp import Precision
from curlprune.recover.dist import DistContext
from curlprune.recover.early_stop import VAL_KEY, EarlyStopper, check_early_stop_data
from curlprune.recover.evaluate import TransformedDataset, place_model, top1_accuracy
from curlprune.recover.resume_check import check_train_state
from curlprune.recover.schedule import set_lr, warmup_cosine_lr
from curlprune.recover.stage import (
    Result,
    Stage,
    check_config,
    check_data,
    check_same_settings,
    finished,
    load_stage_tensors,
    settings,
)
from curlprune.recover.state import (
    capture_rng,
    generator_state,
    load_optimizer_state,
    load_state,
    optimizer_state,
    prefixed,
    restore_rng,
    save_state,
    seed_everything,
    set_generator_state,
    unprefixed,
)
from curlprune.store import (
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    StageSummary,
    append_jsonl,
    atomic_write_text,
    check_finite_state,
    is_done,
    jsonl_text,
    save_safetensors,
    write_stage_summary,
)


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A 32-bit seed for one process and one random stream, derived from the run seed."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1)[0])


@dataclass
class TrainProgress:
    """Where training stands; saved in the state file."""

    epoch: int = 0  # completed epochs
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    start_top1: float | None = None  # test top-1 (%) of the model the stage started from (None: unknown)

    @property
    def best_top1(self) -> float:
        return max((r["test_top1"] for r in self.history), default=0.0)


def epoch_batches(ctx: DistContext, order_gen: torch.Generator, size: int, local_batch: int) -> list[list[int]]:
    """This rank's batches of dataset indices for one epoch (consumes one permutation of ``order_gen``)."""
    order = dist.shard(ctx, torch.randperm(size, generator=order_gen))
    indices = order.tolist()
    return [indices[i : i + local_batch] for i in range(0, len(indices), local_batch)]


def iterations_per_epoch(ctx: DistContext, size: int, local_batch: int) -> int:
    """Steps per epoch on every rank (the shards have equal length)."""
    return math.ceil(math.ceil(size / ctx.world_size) / local_batch)


class Trainer:
    """Runs one :class:`Stage` on one model; see the module docstring for what it guarantees."""

    def __init__(
        self,
        stage: Stage,
        model: nn.Module,
        data: Mapping[str, Dataset],
        spec: InputSpec,
        run_dir: str | Path,
    ) -> None:
        check_data(data)
        self.stage = stage
        self.cfg = stage.cfg
        self.model = model
        self.data = data
        self.spec = spec
        self.stage_dir = Path(run_dir) / stage.name
        self.ctx = dist.init_distributed(self.cfg.device)
        check_config(self.cfg, self.ctx)
        self.precision = Precision(self.cfg.amp, self.ctx.device)  # autocast, fp16 loss scaler (off: neither)
        self.console = Console(stderr=True, markup=False)  # paths and names print as written: no [..] eaten as markup
        self.early: EarlyStopper | None = None  # set by run() when the stage has early_stop

    # ---- the whole stage -------------------------------------------------------------------
    def run(self) -> Result:
        if is_done(self.stage_dir):
            return finished(self.model, self.stage_dir, self.cfg, self.ctx.device)
        try:
            return self.train()
        finally:
            self.stage.release()

    def train(self) -> Result:
        """Train (fresh or resumed) to the end; :meth:`run` without the skip of a finished stage."""
        cfg, ctx = self.cfg, self.ctx
        check_early_stop_data(self.stage.name, cfg, self.data)
        self.early = EarlyStopper.of(getattr(cfg, "early_stop", None))
        place_model(self.model, ctx.device, cfg.channels_last)
        self.stage.prepare(ctx, self.model, self.data, self.spec)
        self.train_set = self.stage.train_set(self.data["train"])
        self.optimizer = torch.optim.SGD(self.stage.param_groups(self.model), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        seed_everything(rank_seed(cfg.seed, ctx.rank, 0))
        self.stage.seed(rank_seed(cfg.seed, ctx.rank, 1))
        if (self.stage_dir / STATE_FILE).is_file():
            progress = self.resume()
        else:
            self.stage.init_fresh(ctx, self.model, self.train_set, self.spec)
            progress = TrainProgress(start_top1=self.test_top1())  # what a divergence is measured against
            if ctx.is_main:
                atomic_write_text(self.stage_dir / METRICS_FILE, "")
        train_model = dist.wrap_ddp(ctx, self.model)
        local_batch = cfg.batch_size // ctx.world_size
        per_epoch = iterations_per_epoch(ctx, len(self.train_set), local_batch)
        total, warmup = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
        transform = build_transform(self.spec, train=True)
        for epoch in range(progress.epoch, cfg.epochs):
            if self.early is not None and self.early.stopped:  # a resume after the stopping epoch was saved
                break
            started = time.perf_counter()
            loss, train_top1, lr = self.train_epoch(train_model, epoch, progress, transform, local_batch, total, warmup)
            dist.broadcast_buffers(ctx, self.model)
            top1, val = self.test_top1(), self.val_top1()
            record = {"epoch": epoch + 1, "loss": loss, "lr": lr, "train_top1": train_top1, "test_top1": top1}
            if val is not None:
                record["val_top1"] = val
            record["seconds"] = time.perf_counter() - started
            progress.epoch, progress.history = epoch + 1, progress.history + [record]
            if self.early is not None:
                self.early.update(epoch + 1, val, self.model)
            self.save(progress)
            if ctx.is_main and cfg.progress:
                on_val = "" if val is None else f", val top-1 {val:.2f}%"
                self.console.print(
                    f"{self.stage.name} epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}, train top-1 {train_top1:.2f}%, "
                    f"test top-1 {top1:.2f}%{on_val}, {record['seconds']:.1f}s"
                    + (f"; early stop: best epoch {self.early.best_epoch}" if self.early is not None and self.early.stopped else "")
                )
            if self.early is not None and self.early.stopped:
                break
        return self.finish(progress)

    def test_top1(self) -> float:
        """Test top-1 (%) of the model now, over every process."""
        return top1_accuracy(self.model, self.data["test"], self.spec, ctx=self.ctx, batch_size=self.cfg.eval_batch_size,
                             channels_last=self.cfg.channels_last)

    def val_top1(self) -> float | None:
        """Validation top-1 (%) of the model now, over every process; None without a validation split."""
        if VAL_KEY not in self.data:
            return None
        return top1_accuracy(self.model, self.data[VAL_KEY], self.spec, ctx=self.ctx, batch_size=self.cfg.eval_batch_size,
                             channels_last=self.cfg.channels_last)

    # ---- one epoch ---------------------------------------------------------------------------
    def train_epoch(
        self,
        train_model: nn.Module,
        epoch: int,
        progress: TrainProgress,
        transform: Callable[[torch.Tensor], torch.Tensor],
        local_batch: int,
        total: int,
        warmup: int,
    ) -> tuple[float, float, float]:
        """One pass over this rank's shard; returns (mean loss, train top-1 %, last lr) over all ranks.

        Raises:
            CurlpruneError: the loss became NaN or infinite (epoch, step and lr named;
                :func:`curlprune.recover.guards.check_finite_loss`).
        """
        cfg, ctx = self.cfg, self.ctx
        batches = epoch_batches(ctx, self.order_gen, len(self.train_set), local_batch)
        if streams(self.train_set):  # decoded in the data's workers; the random transform here, as in memory
            loader = stream(self.train_set, self.spec, batches, train=True, workers=workers_of(self.train_set))
        else:
            loader = DataLoader(
                TransformedDataset(self.train_set, transform),
                batch_sampler=batches,
                num_workers=cfg.num_workers,
                pin_memory=ctx.device.type == "cuda",
            )
        self.stage.train_mode(train_model)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
        seen, lr = 0, 0.0
        with show_progress(f"{self.stage.name} {epoch + 1}/{cfg.epochs}", len(batches), unit="batches", enabled=cfg.progress and ctx.is_main,
                      fields_format="loss {loss:.4f}  lr {lr:.2e}", fields={"loss": float("nan"), "lr": 0.0},
                      final_line=False, transient=True) as bar:  # the epoch's own line follows
            for step, (x, y, index) in enumerate(loader):
                lr = warmup_cosine_lr(progress.iteration, total, warmup, cfg.lr)
                set_lr(self.optimizer, lr, epoch=progress.iteration * cfg.epochs / max(total, 1))
                x = to_input(x, ctx.device, cfg.channels_last)
                y = y.to(ctx.device, non_blocking=True)
                with self.precision.autocast():  # student and teacher forward, loss (in float32) under amp
                    loss, logits = self.stage.loss(train_model, x, y, index)
                guards.check_finite_loss(loss, epoch, step, lr)  # a diverged run stops here, nothing of the epoch saved
                self.optimizer.zero_grad(set_to_none=True)
                self.precision.backward(loss)
                self.stage.grad_scale = self.precision.grad_scale()
                self.stage.after_backward(ctx)
                self.precision.step(self.optimizer)
                progress.iteration += 1
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if step % 10 == 0 or step == len(batches) - 1:
                    bar.update(step + 1, loss=float(loss_sum) / seen, lr=lr)
        loss_total, correct_total, seen_total = dist.all_reduce_sum(ctx, [float(loss_sum), float(correct), float(seen)])
        return loss_total / max(seen_total, 1.0), 100.0 * correct_total / max(seen_total, 1.0), lr

    # ---- state -------------------------------------------------------------------------------
    def save(self, progress: TrainProgress) -> None:
        """Write the resumable state and the epoch's metrics line (rank 0), then wait for all ranks."""
        ctx = self.ctx
        rank_states = dist.all_gather_object(ctx, {"global": capture_rng(), "stage": self.stage.rng_state()})
        if ctx.is_main:
            optim_tensors, optim_meta = optimizer_state(self.optimizer)
            tensors = {
                **prefixed("model.", self.model.state_dict()),
                **prefixed("optim.", optim_tensors),
                **prefixed("stage.", self.stage.tensors()),
                **prefixed("early.", self.early.best_weights if self.early is not None else {}),
            }
            meta = {
                "stage": self.stage.name,
                "config": settings(self.cfg),
                "epoch": progress.epoch,
                "iteration": progress.iteration,
                "history": progress.history,
                "optimizer": optim_meta,
                "order_generator": generator_state(self.order_gen),
                "world_size": ctx.world_size,
                "rank_rng": rank_states,
                "start_top1": progress.start_top1,
            }
            if self.early is not None:
                meta["early_stop"] = self.early.meta()
            if self.precision.scaler is not None:
                meta["amp_scaler"] = self.precision.state()
            if divergence.is_new_best(progress.history, progress.start_top1):  # kept should the stage diverge later
                divergence.save_best(self.stage_dir, self.model, progress.history[-1])
            save_state(self.stage_dir / STATE_FILE, tensors, meta)
            append_jsonl(self.stage_dir / METRICS_FILE, progress.history[-1])
        dist.barrier(ctx)

    def resume(self) -> TrainProgress:
        """Restore everything from the state file (every rank reads it), once it is checked as a
        whole against this stage (:meth:`check_state`): an edited or stale file is one line."""
        path = self.stage_dir / STATE_FILE
        tensors, meta = load_state(path)
        self.check_state(path, tensors, meta)
        check_same_settings(self.cfg, meta.get("config", {}), path)
        load_stage_tensors(self.model, unprefixed("model.", tensors), path)
        load_optimizer_state(self.optimizer, unprefixed("optim.", tensors), meta["optimizer"])
        self.stage.load_tensors(unprefixed("stage.", tensors))
        self.precision.load_state(meta.get("amp_scaler"), str(path))
        set_generator_state(self.order_gen, meta["order_generator"])
        progress = TrainProgress(epoch=meta["epoch"], iteration=meta["iteration"], history=meta["history"],
                                 start_top1=meta.get("start_top1"))
        if self.early is not None:  # best-so-far and patience counter as they were
            self.early.load(meta.get("early_stop"), unprefixed("early.", tensors), progress.epoch, str(path))
        if meta["world_size"] == self.ctx.world_size:
            own = meta["rank_rng"][self.ctx.rank]
            restore_rng(own["global"])
            self.stage.load_rng_state(own["stage"])
        else:  # the shards change anyway; keep going, reproducibly, but say so
            seed_everything(rank_seed(self.cfg.seed, self.ctx.rank, 2 + progress.epoch))
            self.stage.seed(rank_seed(self.cfg.seed, self.ctx.rank, 10_000 + progress.epoch))
            if self.ctx.is_main:
                self.console.print(
                    f"{path} was written by {meta['world_size']} process(es), this run has {self.ctx.world_size}: "
                    "resuming with fresh augmentation seeds (not bit-identical to an uninterrupted run)", style="yellow"
                )
        if self.ctx.is_main:
            atomic_write_text(self.stage_dir / METRICS_FILE, jsonl_text(progress.history))
            if self.cfg.progress:
                self.console.print(f"{self.stage.name}: resuming after epoch {progress.epoch}/{self.cfg.epochs} from {path}")
        dist.barrier(self.ctx)
        return progress

    def check_state(self, path: Path, tensors: dict[str, torch.Tensor], meta: Any) -> None:
        """Every field of a state file against this stage before resuming (issue 18;
        :func:`curlprune.recover.resume_check.check_train_state`)."""
        classes = getattr(self.data["train"], "classes", None)
        check_train_state(path, meta, tensors, stage=self.stage.name, epochs=self.cfg.epochs, batch_size=self.cfg.batch_size,
                          train_size=len(self.train_set), optimizer=self.optimizer,
                          stage_shapes=self.stage.state_shapes(len(self.train_set), len(classes) if classes else None))

    def finish(self, progress: TrainProgress) -> Result:
        """Write the final weights and ``done.json`` (rank 0) and return the result.

        Weights holding NaN or inf are refused (:class:`CurlpruneError`) on every rank, so a diverged
        model is never written as a finished stage (issue 12); so is a stage whose last epoch fell to
        chance, far below where it started (:func:`curlprune.recover.divergence.check_not_diverged`,
        issue 18).
        """
        kept = progress.history  # the epochs up to the one whose weights are the output
        if self.early is not None:  # the best epoch's weights are the stage's output
            load_stage_tensors(self.model, self.early.best_weights, self.stage_dir / STATE_FILE)
            kept = progress.history[: self.early.best_epoch]
        last, seconds = kept[-1]["test_top1"], sum(r["seconds"] for r in progress.history)
        vals = [r["val_top1"] for r in progress.history if "val_top1" in r]
        summary = StageSummary(self.stage.name, last, progress.best_top1, progress.epoch, seconds, settings(self.cfg),
                               val_top1=kept[-1].get("val_top1"), best_val_top1=max(vals) if vals else None,
                               best_epoch=self.early.best_epoch if self.early is not None else None)
        divergence.check_not_diverged(self.stage.name, self.stage_dir, kept, progress.start_top1,
                                      divergence.chance_top1(self.data["test"]), self.cfg.lr)  # every rank: same history
        check_finite_state(self.model.state_dict(), str(self.stage_dir / MODEL_FILE))  # every rank: same weights
        if self.ctx.is_main:
            weights = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
            # bytes written by Python: a full disk is an OSError naming the file (one line), issue 18
            save_safetensors(self.stage_dir / MODEL_FILE, weights, {"summary": json.dumps(summary.to_json())})
            write_stage_summary(self.stage_dir, summary)
        dist.barrier(self.ctx)
        return Result(self.model, last, progress.best_top1, progress.epoch, seconds, self.stage_dir, self.stage.tensors(),
                      val_top1=summary.val_top1, best_epoch=summary.best_epoch)


def train_stage(
    stage: Stage,
    student: nn.Module,
    data: Mapping[str, Dataset],
    spec: InputSpec,
    run_dir: str | Path,
    *,
    folder: str | None = None,
) -> Result:
    """Run ``stage`` on ``student`` (trained in place) with the :class:`Trainer`: what every stage's
    entry function (:func:`~curlprune.recover.finetune.finetune`, ...) and
    :func:`curlprune.recover.registry.run_stage` do.

    Args:
        stage: the stage's hooks, with its settings.
        student, data, spec, run_dir: as in :func:`curlprune.recover.finetune.finetune`.
        folder: the stage folder's name under ``run_dir``, which also names the stage in its files
            and messages (default: ``stage.name``).
    Returns:
        The :class:`Result` (test top-1 in %, epochs, seconds).
    Raises:
        CurlpruneError: bad data or settings, a model that does not fit the data, or a stage
            folder written with other settings or another architecture.
    """
    if folder is not None:
        stage.name = folder
    return Trainer(stage, student, data, spec, run_dir).run()
