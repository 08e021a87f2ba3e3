"""Stage 3 of CURL on small data: label refinement on the 6x expanded set (docs/method.md §7).

A label store ``Z`` (N x C float32, one row per expanded image, kept on the CPU and saved
with the resumable state) starts as the teacher's raw logits on the expanded images under the
EVAL transform. Per batch, with ``z = Z[idx]`` made a leaf that requires grad:

    L = alpha * T^2 * mean_i KL(softmax(s_i / T) || softmax(z_i / T)) + (1 - alpha) * CE(s, y)

(T = 1, alpha = 0.7, student first as in PENCIL). After ``L.backward()`` the rows move by
gradient descent, ``Z[idx] = z - step * z.grad``, with ``dL/dz_i = (alpha / B)(q_i - p_i)``
(q = softmax(z), p = softmax(s)). The step is scaled with the batch size (docs/method.md §7):

    step = label_lr * B / label_reference_batch   (B = this process's batch, reference 32)

so each row moves by ``label_lr * alpha / 32 * (p_i - q_i)`` at ANY batch size and number of
processes; ``label_lr = 1`` is the authors' setting at their batch of 32. Under torchrun the
updated rows of all ranks are all-gathered and written in rank order, so every rank holds
the same store (a row duplicated by the sampler's padding gets the highest rank's update).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from curlprune.data import build_transform
from curlprune.errors import CurlpruneError
from curlprune.models.spec import InputSpec
from curlprune.recover import dist
from curlprune.recover.amp import autocast, full_precision
from curlprune.recover.dist import DistContext
from curlprune.recover.evaluate import predict
from curlprune.recover.expand import ExpandedDataset
from curlprune.recover.loop import train_stage
from curlprune.recover.stage import Result, TeacherStage, TrainConfig, require, stage_tensors
from curlprune.store import LATER, STATE_FILE


BN_MODES = ("frozen", "update")
DEFAULT_BN = "frozen"


@dataclass
class RefineConfig(TrainConfig):
    """Label-refinement settings; defaults are the authors' (16 epochs, batch 32, lr 1e-4,
    no warm-up, cosine).

    temperature, alpha: of the loss above (1 and 0.7).
    label_lr:  label step at the reference batch (1.0 = the paper); the step is rescaled by
               B / label_reference_batch so the per-row step stays label_lr * alpha / 32.
    expand:    train on the 6x expanded set (True, the paper) or on the original images.
    bn:        batch-norm statistics while refining: "frozen" (BN layers in eval mode: the
               running mean and variance of the distilled model are used and kept) or "update"
               (train mode, as the authors). None = the default, :data:`DEFAULT_BN` (unset, so
               that run folders written before the option existed keep their settings).
               The expanded images (rotated, cut out) have other statistics than the test
               images; docs/method.md §7 has the measurement behind the default.
    """

    epochs: int = 16
    batch_size: int = 32
    lr: float = 1e-4
    warmup_epochs: float = 0.0
    temperature: float = 1.0
    alpha: float = 0.7
    label_lr: float = 1.0
    label_reference_batch: int = 32
    expand: bool = True
    bn: str | None = field(default=None, metadata=LATER)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.bn is None or self.bn in BN_MODES, f"bn must be one of {', '.join(BN_MODES)} (got {self.bn!r})")
        require(self.temperature > 0, f"temperature must be positive (got {self.temperature})")
        require(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1] (got {self.alpha})")
        require(self.label_lr >= 0, f"label_lr must be non-negative (got {self.label_lr}); 0 keeps the teacher's logits")
        require(self.label_reference_batch >= 1, f"label_reference_batch must be at least 1 (got {self.label_reference_batch})")


def refine_loss(
    student_logits: torch.Tensor,
    label_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    """The label-refinement loss above; differentiable in both the student and the label logits."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(label_logits / t, dim=1), F.log_softmax(student_logits / t, dim=1), reduction="batchmean", log_target=True
    )
    return alpha * t * t * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def label_step(cfg: RefineConfig, batch: int) -> float:
    """Step size applied to the gradient of the batch-mean loss (docs/method.md §7: scaled with the batch size)."""
    return cfg.label_lr * batch / cfg.label_reference_batch


def write_rows(ctx: DistContext, store: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``store[index] = rows`` with every rank's (index, rows), applied in rank order on every rank."""
    for part_index, part_rows in zip(dist.all_gather(ctx, index), dist.all_gather(ctx, rows)):
        store[part_index.cpu()] = part_rows.cpu()


def teacher_logits(ctx: DistContext, teacher: nn.Module, dataset: Dataset, spec: InputSpec, cfg: TrainConfig) -> torch.Tensor:
    """Raw teacher logits (N x C, float32, CPU) on ``dataset`` with the eval transform.

    Each rank computes a contiguous share; the shares are all-gathered. Under ``amp`` the teacher
    runs under the same autocast as in training; the logits are stored as float32.
    """
    share = Subset(dataset, dist.chunk_range(ctx, len(dataset)))
    with autocast(cfg.amp, ctx.device):
        local, _ = predict(
            teacher,
            share,
            build_transform(spec, train=False),
            batch_size=cfg.eval_batch_size,
            device=ctx.device,
            channels_last=cfg.channels_last,
            num_workers=cfg.num_workers,
        )
    return dist.gather_rows(ctx, local, len(dataset)).contiguous()


class RefineStage(TeacherStage):
    """Training with a learnable label store initialised from the teacher."""

    name = "refine"

    def __init__(self, cfg: RefineConfig, teacher: nn.Module) -> None:
        super().__init__(cfg, teacher)
        self.labels: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    def train_set(self, train: Dataset) -> Dataset:
        return ExpandedDataset(train, seed=self.cfg.seed) if self.cfg.expand else train

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if (self.cfg.bn or DEFAULT_BN) == "frozen":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def init_fresh(self, ctx: DistContext, model: nn.Module, train_set: Dataset, spec: InputSpec) -> None:
        self.labels = teacher_logits(ctx, self.teacher, train_set, spec, self.cfg)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.labels is not None, "init_fresh or load_tensors sets the label store"
        self._index = index
        self._rows = self.labels[index].to(x.device).requires_grad_(True)
        logits = model(x)
        with full_precision(logits.device):  # the store and the loss stay float32 under amp
            return refine_loss(logits.float(), self._rows, y, self.cfg.temperature, self.cfg.alpha), logits

    def after_backward(self, ctx: DistContext) -> None:
        rows, index = self._rows, self._index
        assert rows is not None and rows.grad is not None and index is not None
        grad = rows.grad if self.grad_scale == 1.0 else rows.grad / self.grad_scale  # fp16: the loss was scaled
        updated = (rows - label_step(self.cfg, len(index)) * grad).detach()
        write_rows(ctx, self.labels, index.to(ctx.comm_device), updated.to(ctx.comm_device))
        self._rows = self._index = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"labels": self.labels}

    def state_shapes(self, train_size: int, classes: int | None) -> dict[str, tuple[int | None, ...]]:
        return {"labels": (train_size, classes)}  # one row of logits per (expanded) training image

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        labels = tensors.get("labels")
        if labels is None or labels.dim() != 2:
            raise CurlpruneError("the refine state has no label store: delete the refine folder to restart the stage")
        self.labels = labels.float().contiguous()


def load_label_store(run_dir: str | Path, stage: str = "refine") -> torch.Tensor:
    """The label store of a refine stage's last completed epoch.

    Args:
        run_dir: the run directory.
        stage: the refine stage's folder name.
    Returns:
        float32 logits ``[N, classes]``, rows in :class:`ExpandedDataset` order.
    Raises:
        CurlpruneError: no state file, or it holds no label store.
    """
    path = Path(run_dir) / stage / STATE_FILE
    if not path.is_file():
        raise CurlpruneError(f"no label store in {path.parent} ({path.name} is missing): run the refine stage first")
    labels = stage_tensors(path).get("labels")
    if labels is None:
        raise CurlpruneError(f"{path} holds no label store: it is not a refine stage")
    return labels


def refine(
    student: nn.Module,
    teacher: nn.Module,
    data: Mapping[str, Dataset],
    spec: InputSpec,
    cfg: RefineConfig | None = None,
    run_dir: str | Path = "runs/recover",
    *,
    stage: str = "refine",
) -> Result:
    """Train ``student`` in place with label refinement on the 6x expanded data; resumable, skipped when done.

    Args:
        teacher: the unpruned model whose logits initialise the label store (eval mode, no grad).
        student, data, spec, cfg, run_dir, stage: as in :func:`curlprune.recover.finetune.finetune`
            (``cfg``: :class:`RefineConfig`).
    Returns:
        The :class:`~curlprune.recover.stage.Result`; the refined store is
        ``result.tensors["labels"]`` (``[6 N, classes]`` logits; also in
        ``<run_dir>/<stage>/state.safetensors``, :func:`load_label_store`).
    Raises:
        CurlpruneError: as :func:`~curlprune.recover.finetune.finetune`, or teacher is student.

    Source: docs/method.md §6 (expansion) and §7 (refinement, the step's batch-size scaling).
    """
    return train_stage(RefineStage(cfg or RefineConfig(), teacher), student, data, spec, run_dir, folder=stage)
