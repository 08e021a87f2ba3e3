"""Accuracy recovery after pruning, as resumable training stages (docs/method.md §4-§7).

    finetune(student, data, spec, FinetuneConfig(), run_dir)          # CE on hard labels
    distill(student, teacher, data, spec, DistillConfig(), run_dir)   # mixup + KD (stage 2)
    refine(student, teacher, data, spec, RefineConfig(), run_dir)     # 6x data + label refinement (stage 3)

Each returns a :class:`Result` and writes ``<run_dir>/<stage>/`` (metrics.jsonl,
state.safetensors, model.safetensors, done.json); rerunning resumes or skips. They run
unchanged under ``torchrun --nproc_per_node=N`` (see :mod:`curlprune.recover.dist`).
"""
from curlprune.recover.distill import DistillConfig, distill, distill_loss
from curlprune.recover.expand import VERSIONS, ExpandedDataset
from curlprune.recover.finetune import FinetuneConfig, finetune
from curlprune.recover.evaluate import top1_accuracy
from curlprune.recover.stage import Result, TrainConfig, load_stage_model
from curlprune.recover.refine import RefineConfig, load_label_store, refine, refine_loss

__all__ = [
    "DistillConfig",
    "ExpandedDataset",
    "FinetuneConfig",
    "RefineConfig",
    "Result",
    "TrainConfig",
    "VERSIONS",
    "distill",
    "distill_loss",
    "finetune",
    "load_label_store",
    "load_stage_model",
    "refine",
    "refine_loss",
    "top1_accuracy",
]
