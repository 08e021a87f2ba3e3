"""Stage 2 of CURL on small data: knowledge distillation with mixup (docs/method.md §5).

Per batch: one lambda ~ Beta(a, a) (a = 1), a random pairing ``perm`` of the batch, and
``x_mix = lambda * x + (1 - lambda) * x[perm]``; the frozen teacher (eval mode, no gradient)
and the student both see ``x_mix``. The loss is

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T))   (batch mean, teacher first)
    + (1 - alpha) * (lambda * CE(s, y) + (1 - lambda) * CE(s, y[perm]))

with T = 2 and alpha = 0.7 (the paper's loss). With ``ce_weight`` w (issue 19) the loss is

    (1 - w) * (the loss above) + w * (lambda * CE(s, y) + (1 - lambda) * CE(s, y[perm]))

so w = 0 is the paper's loss exactly and w = 1 is plain (mixed) cross-entropy on the true labels.
The default w = 0.5 is our measurement, not the paper's: chosen on the validation split of the
small-data benchmark (benchmarks/results/small_data.md; docs/method.md §8), where it beat the
paper's recipe on test; ``recipe: paper`` sets w = 0.
With ``feature_weight`` f > 0 (issue 19 item 2) the loss adds ``f * feature loss``: the student's
features against the teacher's at the channels the plan kept (:mod:`curlprune.recover.features`);
f = 0 (the default) is the loss above exactly, with no hooks on either model.
The "train_top1" of the metrics compares the student's argmax on
the mixed images with the label of the unpermuted image, so it is only a rough signal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from curlprune.models.spec import InputSpec
from curlprune.recover.amp import full_precision
from curlprune.recover.dist import DistContext
from curlprune.recover.early_stop import canonical_early_stop
from curlprune.recover.features import AUTO, FeatureMap, FeatureTap, feature_loss, feature_maps
from curlprune.recover.loop import train_stage
from curlprune.recover.stage import Result, TeacherStage, TrainConfig, require
from curlprune.store.rundir import LATER, default_was


@dataclass
class DistillConfig(TrainConfig):
    """Distillation settings; defaults are the authors' CUB recipe (150 epochs for ResNet-50,
    200 for MobileNetV2) except ``ce_weight`` (0.5, measured: docs/method.md §8).

    temperature: T of the KD term (2).   alpha: weight of the KD term (0.7; CE gets 1 - alpha).
    mixup_alpha: lambda ~ Beta(mixup_alpha, mixup_alpha); 0 turns mixup off (lambda = 1).
    ce_weight:   w in [0, 1]: loss = (1 - w) * (the mixup-KD loss) + w * CE on the true labels (mixed
                 CE on both labels under mixup); 0 = the paper's loss; default 0.5 (chosen on val,
                 benchmarks/results/small_data.md). A stage folder written before this default (no
                 ``ce_weight``, or null, in its settings) was trained with 0 and resumes only with 0.
    features:    the features to match: module (or group) names, or "auto" (the output of every
                 residual stage; :mod:`curlprune.recover.features`). Unset with feature_weight > 0: "auto".
    feature_weight: f >= 0: loss += f * the mean normalised feature MSE; None or 0 = off (default;
                 0 is stored as None, and features too while it is off).
    early_stop:  {patience: P, min_delta: D}: stop on validation top-1 and keep the best epoch
                 (:mod:`curlprune.recover.early_stop`; needs a validation split). None = off.
    """

    epochs: int = 150
    batch_size: int = 32
    lr: float = 0.01
    warmup_epochs: float = 5.0
    temperature: float = 2.0
    alpha: float = 0.7
    mixup_alpha: float = 1.0
    ce_weight: float = field(default=0.5, metadata=default_was(0.0))  # absent/None in a saved folder = 0 (the paper's loss)
    early_stop: dict[str, float] | None = field(default=None, metadata=LATER)
    features: list[str] | str | None = field(default=None, metadata=LATER)
    feature_weight: float | None = field(default=None, metadata=LATER)

    def __post_init__(self) -> None:
        super().__post_init__()
        number = isinstance(self.ce_weight, (int, float)) and not isinstance(self.ce_weight, bool)
        require(number and 0.0 <= self.ce_weight <= 1.0,
                f"ce_weight must be a number in [0, 1] (got {self.ce_weight!r}); 0 = the paper's loss, default 0.5")
        self.ce_weight = float(self.ce_weight)  # stored as a number, 0 included (0 and 0.0 are one setting)
        self.early_stop = canonical_early_stop(self.early_stop)
        self.feature_weight, self.features = canonical_features(self.feature_weight, self.features)
        require(self.temperature > 0, f"temperature must be positive (got {self.temperature})")
        require(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1] (got {self.alpha})")
        require(self.mixup_alpha >= 0, f"mixup_alpha must be non-negative (got {self.mixup_alpha}); 0 turns mixup off")


def canonical_features(weight: float | None, features: Any) -> tuple[float | None, list[str] | str | None]:
    """``(feature_weight, features)`` as stored: both None while off (weight unset or 0), so a folder
    written before they existed resumes; "auto" when the weight is set and the features are not.

    Raises:
        CurlpruneError: a weight that is not a finite number >= 0, or features that are neither "auto"
            nor a non-empty list of module names.
    """
    ok = weight is None or (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < float("inf"))
    require(ok, f"feature_weight must be a finite number >= 0 (got {weight!r}); 0 turns feature distillation off")
    names_ok = features is None or features == AUTO or (
        isinstance(features, (list, tuple)) and features and all(isinstance(f, str) and f for f in features))
    require(names_ok, f"features must be 'auto' or a non-empty list of module names (got {features!r})")
    if not weight:
        return None, None
    return float(weight), AUTO if features is None else (AUTO if features == AUTO else list(features))


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    paired_labels: torch.Tensor,
    lam: float,
    temperature: float = 2.0,
    alpha: float = 0.7,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """The mixup-KD loss above (``paired_labels`` = ``labels[perm]``), a scalar tensor.

    Args:
        student_logits, teacher_logits: ``[B, classes]`` on the mixed images.
        labels, paired_labels: int64 ``[B]``, the true labels of the two images mixed.
        lam: the mixup weight of ``labels`` (1 without mixup).
        temperature, alpha: T and the KD weight of the paper's loss (docs/method.md §5).
        ce_weight: w of ``(1 - w) * paper loss + w * mixed CE`` (issue 19); 0 (this function's default)
            leaves the paper's loss untouched; the distill stage passes :class:`DistillConfig`'s (default 0.5).
    """
    t = temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True
    )
    ce = lam * F.cross_entropy(student_logits, labels) + (1.0 - lam) * F.cross_entropy(student_logits, paired_labels)
    paper = alpha * t * t * kd + (1.0 - alpha) * ce
    return paper if ce_weight == 0 else (1.0 - ce_weight) * paper + ce_weight * ce


class DistillStage(TeacherStage):
    """Mixup + KD from a frozen teacher on the original training set."""

    name = "distill"

    def __init__(self, cfg: DistillConfig, teacher: nn.Module) -> None:
        super().__init__(cfg, teacher)
        self.rng = np.random.default_rng(cfg.seed)
        self.plan: dict[str, list[int]] = {}
        self.maps: list[FeatureMap] = []
        self.taps: tuple[FeatureTap, FeatureTap] | None = None  # (teacher, student) while training with features

    def use_plan(self, plan: Mapping[str, list[int]] | None) -> None:
        self.plan = dict(plan or {})

    def prepare(self, ctx: DistContext, model: nn.Module, data: Mapping[str, Dataset], spec: InputSpec) -> None:
        super().prepare(ctx, model, data, spec)
        if not self.cfg.feature_weight:
            return
        example = torch.zeros(1, spec.channels, spec.size, spec.size, device=next(self.teacher.parameters()).device)
        self.maps = feature_maps(self.teacher, example, self.plan, self.cfg.features)
        modules = list(dict.fromkeys(m.hook for m in self.maps))
        self.release()
        self.taps = (FeatureTap(self.teacher, modules), FeatureTap(model, modules))

    def release(self) -> None:
        if self.taps is not None:
            for tap in self.taps:
                tap.remove()
            self.taps = None

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def rng_state(self) -> Any:
        return self.rng.bit_generator.state

    def load_rng_state(self, state: Any) -> None:
        self.rng.bit_generator.state = state

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(x_mix, perm, lambda)`` for one batch."""
        a = self.cfg.mixup_alpha
        lam = float(self.rng.beta(a, a)) if a > 0 else 1.0
        perm = torch.from_numpy(self.rng.permutation(x.shape[0])).to(x.device)
        mixed = lam * x + (1.0 - lam) * x[perm]
        if self.cfg.channels_last and mixed.dim() == 4:
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        return mixed, perm, lam

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, perm, lam = self.mix(x)
        if self.taps is not None:  # outputs of an evaluation in between are not this batch's
            self.taps[0].take(), self.taps[1].take()
        self.teacher.eval()
        with torch.inference_mode():  # under the loop's autocast, as the student
            teacher_logits = self.teacher(mixed)
        logits = model(mixed)
        cfg = self.cfg
        with full_precision(logits.device):  # softmax, KL and CE in float32
            loss = distill_loss(logits.float(), teacher_logits.float(), y, y[perm], lam, cfg.temperature, cfg.alpha, cfg.ce_weight)
            if self.taps is not None:
                loss = loss + cfg.feature_weight * feature_loss(self.taps[1].take(), self.taps[0].take(), self.maps)
        return loss, logits


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Mapping[str, Dataset],
    spec: InputSpec,
    cfg: DistillConfig | None = None,
    run_dir: str | Path = "runs/recover",
    *,
    stage: str = "distill",
    plan: Mapping[str, list[int]] | None = None,
) -> Result:
    """Train ``student`` in place by mixup-KD from ``teacher``; resumable, skipped when done.

    Args:
        teacher: the unpruned model, same classes as the data (checked); it is moved to the
            training device and put in eval mode, never updated.
        student, data, spec, cfg, run_dir, stage: as in :func:`curlprune.recover.finetune.finetune`
            (``cfg``: :class:`DistillConfig`).
        plan: the plan ``student`` was sliced from ``teacher`` by (group name -> kept channels), the
            channel map of feature distillation; None = the student is unpruned (identity maps).
    Returns:
        The :class:`~curlprune.recover.stage.Result` (test top-1 in %).
    Raises:
        CurlpruneError: as :func:`~curlprune.recover.finetune.finetune`, or teacher is student.

    Source: docs/method.md §5.
    """
    hooks = DistillStage(cfg or DistillConfig(), teacher)
    hooks.use_plan(plan)
    return train_stage(hooks, student, data, spec, run_dir, folder=stage)
