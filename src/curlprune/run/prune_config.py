"""The prune stage's settings (:class:`PruneConfig`, also the ``prune:`` section of a run config),
their defaults, and the fingerprint of what its scores depend on."""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from curlprune.cost import LatencyTarget
from curlprune.criteria import DEFAULT_APPROX_CLASSES, DEFAULT_BUDGET_MB, get
from curlprune.errors import CurlpruneError
from curlprune.select import ALLOCATIONS, DEFAULT_FLOOR, NORMALIZATIONS, Target, default_allocation
from curlprune.store import LATER
from curlprune.recover.bn import DEFAULT_BN_IMAGES
from curlprune.select.limits import parse_max_ratio
from curlprune.validate import check_ranges

DEFAULT_CALIB = 256  # calibration images (docs/method.md §8)
DEFAULT_BUDGET = float(DEFAULT_BUDGET_MB)  # MB for the stacked ablations of the kl criteria


@dataclass
class PruneConfig:
    """Settings of the prune stage (also the ``prune:`` section of a run config).

    criterion:      kl | kl-approx | l1 | bn | taylor | random, or a registered one
                    (:data:`curlprune.criteria.CRITERIA`).
    target_macs:    MACs to keep: a fraction of the unpruned model (<= 1, e.g. 0.5) or a count
                    ("62.5M", 1.11e9; a value in (1, 1000) is refused as ambiguous). Exactly one of
                    target_macs / target_params / target_latency. Stored in one canonical form
                    (:func:`canonical_target`: the number, 0.5 or 62500000.0), so "0.5" from the
                    command line and 0.5 from a YAML config are the same setting.
    target_params:  parameters to keep, same forms.
    target_latency: measured latency to reach: a fraction of the unpruned model's (0.5) or a time per
                    batch ("12ms"); found by timing the sliced model on this machine
                    (:func:`curlprune.select.latency_select.select_latency`). Canonical form: the
                    fraction, or the time in ms as "12ms".
    latency_batch:  images per timed forward pass (latency target only); None = 1 (unset, so that
                    run folders written before latency targets existed keep their settings).
    latency_threads: intra-op threads while timing; None = the current setting.
    calib:          calibration images (seeded draw from the training split, eval transform).
    seed:           seed of the calibration draw, the random criterion and the eval subset.
    floor:          a group is not pruned further once its kept fraction is below this (CURL: 0.3,
                    docs/method.md §3).
    protect:        group names or globs never pruned; None = the model's default (the classifier's
                    input stream for torchvision ResNets), [] = none.
    normalize:      per-group score normalisation before the global ranking (none = CURL).
    allocation:     how scores become the global ranking (docs/method.md §3): "cost-weighted" =
                    score / what the channel's removal saves (MACs; parameters for a params
                    target), "paper" = raw scores (CURL as published). None = the criterion's
                    default: cost-weighted for kl and kl-approx (scores on one scale), paper for
                    the others (unset, so that run folders written before the option existed keep
                    their settings); :meth:`resolved_allocation` gives the name used.
    round_to:       round kept widths up to a multiple of this (hardware-friendly); None = off.
    eval_limit:     test images for top-1 before/after (seeded subset); None = all, 0 = skip.
    bn_recalibrate: training images for re-estimating the pruned model's batch-norm statistics
                    (:func:`curlprune.recover.bn.recalibrate_bn`; a seeded draw, all when fewer);
                    None = the default, :data:`DEFAULT_BN_IMAGES` (unset, so that run folders
                    written before the option existed keep their settings); 0 = off.
    max_ratio:      ``{pattern: R}``: no group whose name matches the glob loses more than R (in
                    [0, 1)) of its channels (:mod:`curlprune.select.limits`); None = no limits.
    steps:          reach the target in this many steps, scoring the pruned model again between
                    them (:func:`curlprune.select.iterative.iterative_allocate`; geometric schedule,
                    docs/method.md §3); None = 1, one shot (unset, so that run folders written before
                    the option existed keep their settings). MACs/params targets only.
    device:         where the prune stage computes: the criteria, the BN re-estimation, the
                    evaluation and the latency measurement: "auto" (a CUDA GPU when there is one,
                    else the CPU), "cpu", "cuda" or "cuda:<i>"; None = auto (unset, so that run
                    folders written before the option existed keep their settings). Tracing,
                    selection and slicing stay on the CPU. Not part of the stage's identity nor
                    of the scores fingerprint (docs/method.md §10).
    budget_mb:      memory for the stacked ablations of the kl criteria.
    approx_classes: most probable classes summed by kl-approx's Fisher form.

    The last two (and ``seed``) are the criteria's declared options (:class:`curlprune.criteria.Option`):
    :meth:`criterion_options` gives the chosen criterion's.

    Every number is checked against its range (:data:`curlprune.validate.RANGES`: seed in
    0 .. 2**32 - 1, budget_mb > 0, ...) when the config is made; ``protect: none`` (or ``[none]``)
    is stored as ``[]``, as the command line's ``--protect none``.
    """

    criterion: str = "kl"
    target_macs: float | str | None = None
    target_params: float | str | None = None
    target_latency: float | str | None = field(default=None, metadata=LATER)
    latency_batch: int | None = field(default=None, metadata=LATER)
    latency_threads: int | None = field(default=None, metadata=LATER)
    calib: int = DEFAULT_CALIB
    seed: int = 0
    floor: float = DEFAULT_FLOOR
    protect: list[str] | None = None
    normalize: str = "none"
    allocation: str | None = field(default=None, metadata=LATER)
    round_to: int | None = None
    eval_limit: int | None = None
    bn_recalibrate: int | None = field(default=None, metadata=LATER)
    max_ratio: dict[str, float] | None = field(default=None, metadata=LATER)
    steps: int | None = field(default=None, metadata=LATER)
    device: str | None = field(default=None, metadata=LATER)
    budget_mb: float = DEFAULT_BUDGET
    approx_classes: int = DEFAULT_APPROX_CLASSES

    def __post_init__(self) -> None:
        get(self.criterion)
        if sum(t is not None for t in (self.target_macs, self.target_params, self.target_latency)) != 1:
            raise CurlpruneError("give exactly one target: target_macs (e.g. 0.5 or 62.5M), target_params or target_latency (0.5 or 12ms)")
        self.target()  # parses, raises on a bad value
        self.latency_target()
        if self.latency_batch is not None and (isinstance(self.latency_batch, bool) or not isinstance(self.latency_batch, int) or self.latency_batch < 1):
            raise CurlpruneError(f"latency_batch must be a positive number of images, got {self.latency_batch!r}")
        if self.latency_threads is not None and (isinstance(self.latency_threads, bool) or not isinstance(self.latency_threads, int) or self.latency_threads < 1):
            raise CurlpruneError(f"latency_threads must be a positive number of threads, got {self.latency_threads!r}")
        if isinstance(self.calib, bool) or not isinstance(self.calib, int) or self.calib < 1:
            raise CurlpruneError(f"calib must be a positive number of images, got {self.calib!r}")
        if not 0.0 <= float(self.floor) < 1.0:
            raise CurlpruneError(f"floor must be in [0, 1) (the smallest kept fraction of a group), got {self.floor}")
        if self.normalize not in NORMALIZATIONS:
            raise CurlpruneError(f"unknown normalize {self.normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
        if self.allocation is not None and (not isinstance(self.allocation, str) or self.allocation not in ALLOCATIONS):
            raise CurlpruneError(f"unknown allocation {self.allocation!r}: use one of {', '.join(ALLOCATIONS)} "
                                 f"(default for {self.criterion}: {default_allocation(self.criterion)})")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise CurlpruneError(f"round_to must be a positive channel count, got {self.round_to!r}")
        if self.eval_limit is not None and (not isinstance(self.eval_limit, int) or self.eval_limit < 0):
            raise CurlpruneError(f"eval_limit must be a number of test images >= 0, got {self.eval_limit!r}")
        if self.bn_recalibrate is not None and (isinstance(self.bn_recalibrate, bool) or not isinstance(self.bn_recalibrate, int)
                                                or self.bn_recalibrate < 0):
            raise CurlpruneError(f"bn_recalibrate must be a number of training images >= 0 (0 = off), got {self.bn_recalibrate!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise CurlpruneError(f"steps must be a positive number of pruning steps (1 = one shot), got {self.steps!r}")
        if self.resolved_steps() > 1 and self.target_latency is not None:
            raise CurlpruneError("steps > 1 needs target_macs or target_params: a latency target is reached in one shot (use steps: 1)")
        if self.max_ratio is not None and not isinstance(self.max_ratio, dict):
            raise CurlpruneError(f"max_ratio must be a mapping of group name or glob to a fraction, e.g. {{'layer1.*': 0.5}}, got {self.max_ratio!r}")
        self.max_ratio = parse_max_ratio(self.max_ratio)
        if self.device is not None:
            self.device = check_device_name(self.device)
        if isinstance(self.approx_classes, bool) or not isinstance(self.approx_classes, int) or self.approx_classes < 1:
            raise CurlpruneError(f"approx_classes must be a positive number of classes, got {self.approx_classes!r}")
        if isinstance(self.protect, str):
            self.protect = [self.protect]
        if self.protect is not None:
            self.protect = [p for p in self.protect if not (isinstance(p, str) and p.lower() == "none")]
        check_ranges(self)  # seed -1 or 2**32, budget_mb 0, ... (issue 18)
        for name in TARGET_FIELDS:  # one form however it was written: "0.5" and 0.5 are one setting
            setattr(self, name, canonical_target(name, getattr(self, name)))

    def resolved_allocation(self) -> str:
        """The allocation's name: ``allocation``, or when it is unset the criterion's default
        (:func:`curlprune.select.allocation.default_allocation`: cost-weighted for criteria whose scores
        share one scale, kl and kl-approx; paper otherwise)."""
        return self.allocation or default_allocation(self.criterion)

    def resolved_bn_recalibrate(self) -> int:
        """Training images for the BN re-estimation: ``bn_recalibrate``, or :data:`DEFAULT_BN_IMAGES` when unset (0 = off)."""
        return DEFAULT_BN_IMAGES if self.bn_recalibrate is None else self.bn_recalibrate

    def resolved_steps(self) -> int:
        """Pruning steps: ``steps``, or 1 (one shot) when unset."""
        return 1 if self.steps is None else self.steps

    def criterion_options(self) -> dict[str, Any]:
        """The chosen criterion's declared options with this config's values: ``{name: value}``,
        the field of the same name, or the option's default when there is no such field (a
        registered criterion's own option)."""
        return {option.name: getattr(self, option.name, option.default) for option in get(self.criterion).options}

    def target(self) -> Target | None:
        """The parsed MACs/params target (a fraction or a count); None for a latency target."""
        if self.target_macs is not None:
            return Target.parse("macs", self.target_macs)
        return None if self.target_params is None else Target.parse("params", self.target_params)

    def latency_target(self) -> LatencyTarget | None:
        """The parsed latency target (a fraction or a duration), or None."""
        return None if self.target_latency is None else LatencyTarget.parse(self.target_latency)


def stage_identity(config: PruneConfig) -> dict[str, Any]:
    """The settings that define the prune stage's outputs (``done.json``'s ``config``): every field
    but ``device``, which says where they are computed, not what they are (docs/method.md §10)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "device"}


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(device: object) -> str:
    """``device`` as the prune stage takes it: "auto", "cpu", "cuda" or "cuda:<i>" (a ``torch.device`` as its string).

    Raises:
        CurlpruneError: anything else (whether CUDA is there is checked when the stage runs:
            :func:`curlprune.recover.dist.resolve_device`).
    """
    text = str(device) if isinstance(device, (str, torch.device)) else None
    if text is None or not DEVICE_PATTERN.fullmatch(text):
        raise CurlpruneError(f"device must be auto, cpu, cuda or cuda:<index>, got {device!r}")
    return text


TARGET_FIELDS = ("target_macs", "target_params", "target_latency")


def canonical_target(name: str, value: Any) -> float | str | None:
    """The one stored form of a target setting (``name``: one of :data:`TARGET_FIELDS`).

    MACs/params: the parsed number (``"0.5"`` -> 0.5, ``"62.5M"`` -> 62500000.0). Latency: the
    fraction as a number, a duration as ``"<ms>ms"`` (``"0.012s"`` -> ``"12ms"``). None stays None.

    Raises:
        CurlpruneError: the value does not parse (see :meth:`Target.parse`, :meth:`LatencyTarget.parse`).
    """
    if value is None:
        return None
    if name == "target_latency":
        latency = LatencyTarget.parse(value)
        return latency.fraction if latency.fraction is not None else f"{latency.ms:.12g}ms"
    return Target.parse(name.removeprefix("target_"), value).value


def canonical_settings(saved: Any) -> Any:
    """A stored prune config (``done.json``, ``config.json``; possibly written by an earlier version)
    with its targets in the canonical form, for comparing with a config now; values that do not
    parse, and anything that is not a mapping, are returned as they are."""
    if not isinstance(saved, dict):
        return saved
    out = dict(saved)
    for name in TARGET_FIELDS:
        try:
            out[name] = canonical_target(name, out.get(name))
        except CurlpruneError:
            pass
    protect = [out["protect"]] if isinstance(out.get("protect"), str) else out.get("protect")
    if isinstance(protect, list):
        out["protect"] = [p for p in protect if not (isinstance(p, str) and p.lower() == "none")]
    return {k: v for k, v in out.items() if k in saved or v is not None}


def scores_fingerprint(config: PruneConfig, settings: dict[str, Any], images: torch.Tensor | None) -> dict[str, Any]:
    """What the scores depend on; a stored scores.npz is reused only when this matches.

    Every declared option of the criterion that changes its scores (:attr:`curlprune.criteria.Option.changes_scores`:
    ``seed`` of random, ``approx_classes`` of kl-approx; not the memory limit ``budget_mb``) is
    recorded under its name. For the built-in criteria this is the form earlier versions wrote, so
    their scores files keep matching.

    Args:
        config: the prune stage's settings (criterion and its options, seed).
        settings: the stage's identity (model, weights, weights_sha256, num_classes; model_kwargs and
            input_shape of a model named by import path, when set).
        images: the calibration batch ``[N, C, H, W]`` (float, eval transform), or None for
            data-free criteria.
    Returns:
        A JSON-able mapping.
    """
    fingerprint = {
        "model": settings["model"],
        "weights": settings["weights_sha256"] or settings["weights"],
        "num_classes": settings["num_classes"],
        "criterion": config.criterion,
        "seed": None,  # set below by a seed option or the calibration draw; None otherwise, as before
    }
    fingerprint.update({k: settings[k] for k in ("model_kwargs", "input_shape") if k in settings})  # only when set: as before
    values = config.criterion_options()
    fingerprint.update({o.name: values[o.name] for o in get(config.criterion).options if o.changes_scores})
    if images is not None:
        fingerprint.update(calib=len(images), seed=config.seed,
                           calib_sha256=hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest())
    return fingerprint
