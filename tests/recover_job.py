"""A tiny real recovery run (digits, small ResNet) that tests start as a separate process.

    python tests/recover_job.py RUN_DIR [--stages finetune,distill,refine] [--trip STAGE] [--trip-epoch N]
    python tests/recover_job.py RUN_DIR --early-stop [--trip finetune --trip-epoch N]
    torchrun --standalone --nproc_per_node=2 tests/recover_job.py RUN_DIR --dump-ranks
    python tests/recover_job.py RUN_DIR --amp bf16 [--trip STAGE]

--early-stop: finetune only, on a validation split held out of the training images, with
early_stop {patience: 2}, from a pretrained digits model with a new classifier and a learning rate
warmed up far too high, so that validation top-1 peaks early (a real computation).
--trip STAGE: in STAGE's second epoch (or epoch --trip-epoch) (its first epoch's state exists, the stage is not done),
after a few training samples have been read, write RUN_DIR/tripped and sleep, so the test can
SIGKILL the process in the middle of an epoch.
--dump-ranks: every rank writes its final weights and label store to RUN_DIR/rank<r>.safetensors.
--amp MODE: the stages' amp setting (off, bf16, fp16; unset when not given).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from curlprune.data.data import ImageDataset, class_balanced_subset, load_digits_dataset
from curlprune.data.digits import train_digits_model
from curlprune.models import build, input_spec
from curlprune.recover import DistillConfig, FinetuneConfig, RefineConfig, distill, finetune, refine
from curlprune.recover.dist import shutdown
from curlprune.store.rundir import DONE_FILE, STATE_FILE
from curlprune.data.valsplit import hold_out

MODEL = "small:resnet-digits"
TRIP_AFTER_SAMPLES = 8


class Tripwire(ImageDataset):
    """The same images; reading them mid-way through a stage's second epoch stops the process."""

    run_dir: Path
    stage: str
    epoch = 2
    count = 0

    def __getitem__(self, index: int):
        stage_dir = self.run_dir / self.stage
        if (stage_dir / STATE_FILE).exists() and not (stage_dir / DONE_FILE).exists() and self.done_epochs() >= self.epoch - 1:
            self.count += 1
            if self.count == TRIP_AFTER_SAMPLES:
                (self.run_dir / "tripped").write_text(str(os.getpid()))
                while True:  # the test kills us here, in the middle of the epoch
                    time.sleep(1)
        return super().__getitem__(index)

    def done_epochs(self) -> int:
        metrics = self.run_dir / self.stage / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def tiny_data(trip: str | None, run_dir: Path, trip_epoch: int = 2, val: bool = False) -> dict:
    """20 training images per class (10 with ``val``, and 20 per class held out first as the
    validation split), 100 test images, real digits."""
    data = load_digits_dataset(0)
    split = {}
    if val:
        held = hold_out(data["train"], 0, per_class=20)
        data["train"], split = held.train, {"val": held.val}
    train = class_balanced_subset(data["train"], 10 if val else 20, seed=0)
    test = class_balanced_subset(data["test"], 10, seed=0)
    if trip:
        train = Tripwire(train.images, train.labels, train.classes)
        train.run_dir, train.stage, train.epoch = run_dir, trip, trip_epoch
    return {"train": train, "test": test, **split}


def early_stop_job(data: dict, run_dir: Path) -> None:
    """Fine-tune a pretrained digits model with a new classifier at a learning rate warmed up far
    too high: validation top-1 peaks in the second epoch and collapses after."""
    student = train_digits_model(0, epochs=4)
    head = [m for m in student.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.manual_seed(5)
    head.reset_parameters()
    cfg = FinetuneConfig(epochs=10, batch_size=16, lr=0.3, warmup_epochs=8.0, seed=3, progress=False, device="cpu",
                         early_stop={"patience": 2})
    finetune(student, data, input_spec(MODEL), cfg, run_dir)


def seeded_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(MODEL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stages", default="finetune,distill,refine")
    parser.add_argument("--trip", default=None)
    parser.add_argument("--trip-epoch", type=int, default=2)
    parser.add_argument("--early-stop", action="store_true")
    parser.add_argument("--dump-ranks", action="store_true")
    parser.add_argument("--amp", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = input_spec(MODEL)
    data = tiny_data(args.trip, args.run_dir, args.trip_epoch, val=args.early_stop)
    if args.early_stop:
        early_stop_job(data, args.run_dir)
        return
    teacher = seeded_model(1)
    student = seeded_model(2)
    common = dict(epochs=2, batch_size=32, seed=3, progress=False, device="cpu")
    if args.amp is not None:
        common["amp"] = args.amp
    stages = args.stages.split(",")
    if "finetune" in stages:
        finetune(student, data, spec, FinetuneConfig(lr=0.05, warmup_epochs=0.5, **common), args.run_dir)
    if "distill" in stages:
        distill(student, teacher, data, spec, DistillConfig(lr=0.05, warmup_epochs=0.5, **common), args.run_dir)
    result = None
    if "refine" in stages:
        result = refine(student, teacher, data, spec, RefineConfig(lr=0.01, **common), args.run_dir)
    if args.dump_ranks:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in student.state_dict().items()}
        if result is not None:
            tensors["labels"] = result.tensors["labels"]
        save_file(tensors, str(args.run_dir / f"rank{os.environ.get('RANK', '0')}.safetensors"))
    shutdown()  # leave the process group cleanly before exiting


if __name__ == "__main__":
    main()
