"""Accuracy recovery after pruning, as resumable training stages (docs/method.md §4-§7).

    finetune(student, data, spec, FinetuneConfig(), run_dir)          # CE on hard labels
    distill(student, teacher, data, spec, DistillConfig(), run_dir)   # mixup KD + CE (ce_weight 0.5; 0 = the paper's loss; stage 2)
    refine(student, teacher, data, spec, RefineConfig(), run_dir)     # 6x data + label refinement (stage 3)

Each returns a :class:`Result` and writes ``<run_dir>/<stage>/`` (metrics.jsonl,
state.safetensors, model.safetensors, done.json); rerunning resumes or skips. They run
unchanged under ``torchrun --nproc_per_node=N`` (see :mod:`curlprune.recover.dist`).

The stages are registered in one table, :mod:`curlprune.recover.registry` (name, settings class,
how to build the stage, whether it needs a teacher, help): ``run_stage(name, ...)`` runs any of
them, and :func:`register_stage` adds one that the run config, the pipeline, the commands and
the report then know.
"""
from curlprune.recover.distill import DistillConfig, distill, distill_loss
from curlprune.recover.expand import VERSIONS, ExpandedDataset
from curlprune.recover.finetune import FinetuneConfig, finetune
from curlprune.recover.evaluate import top1_accuracy
from curlprune.recover.stage import Result, TrainConfig, load_stage_model
from curlprune.recover.refine import RefineConfig, load_label_store, refine, refine_loss
from curlprune.recover.registry import RecoveryStage, get_stage, recovery_stages, register_stage, run_stage

__all__ = [
    "DistillConfig",
    "ExpandedDataset",
    "FinetuneConfig",
    "RecoveryStage",
    "RefineConfig",
    "Result",
    "TrainConfig",
    "VERSIONS",
    "distill",
    "distill_loss",
    "finetune",
    "get_stage",
    "load_label_store",
    "load_stage_model",
    "recovery_stages",
    "refine",
    "refine_loss",
    "register_stage",
    "run_stage",
    "top1_accuracy",
]
