"""Recovery by plain fine-tuning: cross-entropy on hard labels (the paper's ImageNet recipe)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from curlprune.models.spec import InputSpec
from curlprune.recover.loop import Trainer
from curlprune.recover.stage import Result, Stage, TrainConfig


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning settings (see :class:`TrainConfig` for every field).

    The defaults suit small datasets (the distillation recipe without the teacher, docs/method.md §4 and §8): 30
    epochs, global batch 32, lr 0.01, 1 warm-up epoch, weight decay 4e-5, cosine to 0. The
    paper's ImageNet recipe (100 epochs, batch 512, lr 0.1, 5 warm-up epochs) is
    :meth:`imagenet`.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.01
    warmup_epochs: float = 1.0

    @classmethod
    def imagenet(cls, **overrides: Any) -> "FinetuneConfig":
        """The authors' ImageNet settings (docs/method.md §4), with optional overrides."""
        return cls(**{"epochs": 100, "batch_size": 512, "lr": 0.1, "warmup_epochs": 5.0, **overrides})


class FinetuneStage(Stage):
    """Cross-entropy with hard labels on the training set, train transform."""

    name = "finetune"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits


def finetune(
    student: nn.Module,
    data: Mapping[str, Dataset],
    spec: InputSpec,
    cfg: FinetuneConfig | None = None,
    run_dir: str | Path = "runs/recover",
    *,
    stage: str = "finetune",
) -> Result:
    """Fine-tune ``student`` in place with cross-entropy; resumable, skipped when already done.

    Args:
        student: the (pruned) model; its weights are updated in place and returned in the Result.
        data: ``{"train": ImageDataset, "test": ImageDataset}`` of uint8 images ``[C, H, W]``.
        spec: the model's input recipe (:func:`curlprune.models.input_spec`), for its transforms.
        cfg: :class:`FinetuneConfig` (defaults for small data); None = the defaults.
        run_dir: outputs go to ``<run_dir>/<stage>/`` (metrics.jsonl, state.safetensors,
            model.safetensors: plain weights, done.json; see :mod:`curlprune.rundir`).
        stage: the stage folder's name.
    Returns:
        The :class:`~curlprune.recover.stage.Result` (test top-1 in %, epochs, seconds).
    Raises:
        CurlpruneError: bad data or settings, a model that does not fit the data, or a stage
            folder written with other settings or another architecture.

    Source: docs/method.md §4.
    """
    stage_impl = FinetuneStage(cfg or FinetuneConfig())
    stage_impl.name = stage
    return Trainer(stage_impl, student, data, spec, run_dir).run()
