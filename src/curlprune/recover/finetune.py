"""Recovery by plain fine-tuning: cross-entropy on hard labels (the paper's ImageNet recipe)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.recover.amp import full_precision
from curlprune.recover.early_stop import canonical_early_stop
from curlprune.recover.loop import train_stage
from curlprune.recover.stage import Result, Stage, TrainConfig
from curlprune.store import LATER

# The transfer recipe's defaults, measured on real clothing photos (CIFAR-10 ResNet-20, 50 images per
# class, 15 epochs, 32 px; benchmarks/results/transfer_recipe.md): body at the head's lr 59.05% top-1,
# head-only warm-up of 2 epochs 57.36%, body at 0.1 x lr 45.16%. The CIFAR features must adapt to the
# new domain, so the body trains at the full rate from the start.
TRANSFER_BODY_LR_MULT = 1.0
TRANSFER_HEAD_EPOCHS = 0.0


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
    # Transfer to a new dataset (a classifier re-initialised for its classes, see
    # curlprune.models.transfer): the recipe for the body (every parameter but the new head).
    # None = the measured default (TRANSFER_BODY_LR_MULT / TRANSFER_HEAD_EPOCHS); no effect without a new head.
    new_head: bool | None = field(default=None, metadata=LATER)  # pipeline: re-initialise the classifier (None: when the widths differ)
    body_lr_mult: float | None = field(default=None, metadata=LATER)  # the body's lr = lr x this
    head_epochs: float | None = field(default=None, metadata=LATER)  # the body's lr stays 0 for this many epochs (head-only warm-up)
    # {patience: P, min_delta: D}: stop after P epochs without a validation top-1 gain > D points and
    # keep the best epoch's weights (curlprune.recover.early_stop); needs a validation split. None = off.
    early_stop: dict[str, float] | None = field(default=None, metadata=LATER)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.early_stop = canonical_early_stop(self.early_stop)
        for name in ("body_lr_mult", "head_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise CurlpruneError(f"{name} must be a non-negative number or null for the default (got {value!r})")

    def transfer_recipe(self) -> tuple[float, float]:
        """The body's recipe in a transfer, with the measured defaults filled in.

        Returns:
            ``(body_lr_mult, head_epochs)``.

        Source: docs/method.md §4 (the defaults are our measurement, benchmarks/results/transfer_recipe.md).
        """
        mult = TRANSFER_BODY_LR_MULT if self.body_lr_mult is None else float(self.body_lr_mult)
        head = TRANSFER_HEAD_EPOCHS if self.head_epochs is None else float(self.head_epochs)
        return mult, head

    @classmethod
    def imagenet(cls, **overrides: Any) -> "FinetuneConfig":
        """The authors' ImageNet settings (docs/method.md §4), with optional overrides."""
        return cls(**{"epochs": 100, "batch_size": 512, "lr": 0.1, "warmup_epochs": 5.0, **overrides})


class FinetuneStage(Stage):
    """Cross-entropy with hard labels on the training set, train transform.

    ``head``: the qualified name of a newly initialised classifier; when given, the other
    parameters (the body) train with the config's transfer recipe.
    """

    name = "finetune"

    def __init__(self, cfg: FinetuneConfig, head: str | None = None) -> None:
        super().__init__(cfg)
        self.head = head

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        if self.head is None:
            return super().param_groups(model)
        prefix = self.head + "."
        named = list(model.named_parameters())
        head = [p for n, p in named if n.startswith(prefix)]
        body = [p for n, p in named if not n.startswith(prefix)]
        if not head:
            raise CurlpruneError(f"the model has no parameters under {self.head!r}: it is not the model whose classifier was replaced")
        mult, head_epochs = self.cfg.transfer_recipe()
        return [{"params": head}, {"params": body, "lr_mult": mult, "start_epoch": head_epochs}]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        with full_precision(logits.device):
            return F.cross_entropy(logits.float(), y), logits


def finetune(
    student: nn.Module,
    data: Mapping[str, Dataset],
    spec: InputSpec,
    cfg: FinetuneConfig | None = None,
    run_dir: str | Path = "runs/recover",
    *,
    stage: str = "finetune",
    head: str | None = None,
) -> Result:
    """Fine-tune ``student`` in place with cross-entropy; resumable, skipped when already done.

    Args:
        student: the (pruned) model; its weights are updated in place and returned in the Result.
        data: ``{"train": ImageDataset, "test": ImageDataset}`` of uint8 images ``[C, H, W]``.
        spec: the model's input recipe (:func:`curlprune.models.input_spec`), for its transforms.
        cfg: :class:`FinetuneConfig` (defaults for small data); None = the defaults.
        run_dir: outputs go to ``<run_dir>/<stage>/`` (metrics.jsonl, state.safetensors,
            model.safetensors: plain weights, done.json; see :mod:`curlprune.store.rundir`).
        stage: the stage folder's name.
        head: name of a classifier just re-initialised for new classes (a transfer,
            :func:`curlprune.models.transfer.replace_classifier`): the body then trains with
            ``cfg.body_lr_mult`` and ``cfg.head_epochs``.
    Returns:
        The :class:`~curlprune.recover.stage.Result` (test top-1 in %, epochs, seconds).
    Raises:
        CurlpruneError: bad data or settings, a model that does not fit the data, or a stage
            folder written with other settings or another architecture.

    Source: docs/method.md §4.
    """
    return train_stage(FinetuneStage(cfg or FinetuneConfig(), head=head), student, data, spec, run_dir, folder=stage)
