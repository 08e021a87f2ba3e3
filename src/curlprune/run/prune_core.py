"""The prune stage on a model in memory: trace -> score -> select -> slice -> re-estimate BN -> evaluate.

:func:`prune_model` is the one implementation behind both ``curlprune prune`` (through
:func:`curlprune.run.prune.run_prune`, which adds the run folder: cached scores, checkpoint, report) and
the library call ``curlprune.prune`` (:mod:`curlprune.run.api`), so the two cannot drift.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.cost import check_pruned_cost, model_cost_fn, trace
from curlprune.criteria import get, gives_logits
from curlprune.recover.bn import bn_layers, recalibrate_bn
from curlprune.recover.dist import DistContext, resolve_device
from curlprune.report import console, print_prune_summary
from curlprune.run.prune_check import check_target_reachable, traced_groups
from curlprune.run.prune_config import PruneConfig
from curlprune.run.prune_data import PruneImages
from curlprune.run.prune_shard import Lead, ablation_costs, compute
from curlprune.select import Target, allocate, measured_cost_fn, named_allocation, ranking_scores, resolve_protect, select_latency
from curlprune.select.iterative import StepScoreFn, iterative_allocate
from curlprune.select.limits import resolve_limits
from curlprune.store import GroupWidth, PruneAccuracy, PruneReport
from curlprune.surgery import apply
from curlprune.surgery.keep_class import fallback_message, slice_model

Scores = dict[str, np.ndarray]
# compute(done, save, record) -> scores: ``done`` = the groups already scored (a killed run's partial file),
# ``save(scores so far)`` is called after each block of groups (None = nothing saved), ``record`` is
# filled with how the work was split over the torchrun ranks (:func:`curlprune.run.prune_shard.compute`)
Compute = Callable[[Scores, Callable[[Scores], None] | None, dict], Scores]
# (calibration images or None, compute, step, plan the scored model was sliced by, ranks) -> (scores, reused from a file, seconds spent);
# step 1 (plan {}) scores the unpruned model, steps 2..n the model pruned by the earlier steps (iterative pruning);
# every step is shared by the torchrun ranks (``ranks``; None = this process alone)
ScoreCache = Callable[[torch.Tensor | None, Compute, int, Plan, DistContext | None], tuple[Scores, bool, float]]

@dataclass
class Pruned:
    """What pruning a model produced.

    model:     the pruned model (physically smaller, eval mode; BN statistics re-estimated unless
               ``bn_recalibrate`` was 0 or there were no training images).
    plan:      group name -> kept channel indices (:class:`curlprune.Plan`).
    groups:    the unpruned model's channel groups (:func:`curlprune.trace`).
    scores:    group name -> one score per channel (float array ``[width]``; higher = more important).
    report:    :class:`curlprune.store.records.PruneReport`: criterion, allocation, selection (MACs and
               parameters before/after and their ratios, top_k, protected groups), accuracy (test
               top-1 % before, after slicing, after BN re-estimation; None without test images),
               per-group widths; the same object ``report.json`` is written from.
    selection: the selection (:class:`curlprune.select.search.Selection`, or the latency search's).
    """

    model: nn.Module
    plan: Plan
    groups: list[ChannelGroup] = field(repr=False)
    scores: Scores = field(repr=False)
    report: PruneReport
    selection: Any = field(default=None, repr=False)


def prune_model(model: nn.Module, example: torch.Tensor, config: PruneConfig,
                images: PruneImages | Callable[[], PruneImages], *, name: str, weights: str | None = None,
                default_protect: Callable[[nn.Module, list[ChannelGroup]], list[str]] | None = None,
                cache: ScoreCache | None = None, show: bool = False, keep_class: bool = True,
                ctx: DistContext | None = None, lead: Lead | None = None) -> Pruned | None:
    """Prune ``model`` to ``config``'s target: the prune stage without a run folder.

    Args:
        model: the unpruned model, on the CPU (eval mode; not changed). With ``config.device``
            another device (docs/method.md §10), a copy of it is scored and evaluated there, the
            pruned model is BN-re-estimated and evaluated there, and latency is timed there;
            the returned pruned model is on the CPU.
        example: an input ``[1, C, H, W]`` (shapes only: tracing and MACs).
        config: the settings (criterion, target, allocation, floor, protect, max_ratio, calib,
            bn_recalibrate, seed, ...), validated when it was made.
        images: the images (:func:`curlprune.run.prune_data.load_images`), or a function returning
            them, called once the target is known to be reachable (loading can be slow).
        name, weights: the model's name and weights, for the report.
        default_protect: the groups protected when ``config.protect`` is None (the model family's
            default); None = none.
        cache: how scores are reused and stored (the run folder's scores.npz); None = computed.
        show: print a progress bar while scoring, and the per-group table and accuracies at the end.
        keep_class: return the model's own class with smaller layers where its forward allows, else
            the sliced GraphModule (:func:`curlprune.surgery.keep_class.slice_model`; the reason in
            ``report.model_class``); False = always the GraphModule.
        ctx: the torchrun ranks (:func:`curlprune.recover.dist.init_distributed`); every rank calls
            this function, the ranks share every scoring (:mod:`curlprune.run.prune_shard`; the
            later steps of iterative pruning too), rank 0 alone selects, slices and evaluates; an
            error rank 0 finds is raised on every rank (:class:`curlprune.run.prune_shard.Lead`).
            None = one process.
        lead: under ``ctx``, the :class:`~curlprune.run.prune_shard.Lead` of a caller that continues
            rank 0's work after this returns and then calls its ``done()`` (the other ranks wait
            until then); None = ended here.
    Returns:
        :class:`Pruned`; None on the ranks other than 0, once rank 0 is done.
    Raises:
        CurlpruneError: a CUDA device asked for where there is none, no prunable group, an unreachable target, a pattern of ``protect`` or
            ``max_ratio`` matching no group, a data-driven criterion without training images,
            ``calib`` above the training images.

    Source: docs/method.md §2 (the KL score), §3 (selection, allocation, floor, limits), §8
    (defaults: 256 calibration images, BN re-estimation on 2,048 training images).
    """
    criterion = get(config.criterion)
    ranks = ctx if ctx is not None and ctx.enabled else None
    show = show and (ranks is None or ranks.is_main)
    device = resolve_device(config.device or "auto", ranks.local_rank if ranks else 0)  # one line when CUDA is asked for and absent
    groups = traced_groups(model, example)
    target = config.target()
    protect = resolve_protect(groups, config.protect) if config.protect is not None else (
        default_protect(model, groups) if default_protect else [])
    limits = resolve_limits(groups, config.max_ratio or {})
    cost_fn = model_cost_fn(model, example, groups)
    if target is not None:
        check_target_reachable(groups, cost_fn, target, config, protect, limits)  # before anything slow is done
    images = images() if callable(images) else images
    calib, labels = images.calibration(config.calib, config.seed, config.criterion) if criterion.needs_data else (None, None)
    scorer = on_device(model, device)  # the criteria, the evaluation; tracing, selection, slicing on the CPU
    on = [None if t is None else t.to(device) for t in (calib, labels)]

    shared = ranks is not None and criterion.per_group  # kl's groups are split by their ablation cost

    def score(scored: nn.Module, scored_groups, step: int, plan: Plan) -> tuple[Scores, bool, float]:
        scored_on = scorer if step == 1 else on_device(scored, device)
        costs = ablation_costs(scored, scored_groups, example) if shared else None

        def run(done: Scores, save: Callable[[Scores], None] | None, record: dict) -> Scores:
            with full_float32():
                return compute(config, scored_on, scored_groups, on[0], on[1], show, done, save, ctx=ranks,
                               costs=costs, record=record)
        found = cache(calib, run, step, plan, ranks) if cache is not None else _timed(run)
        if follow is not None:
            follow.joined()  # the other ranks are back waiting for rank 0's next message
        return found

    follow = (lead or Lead(ranks)) if ranks is not None else None
    scores, reused, seconds = score(model, groups, 1, {})
    if ranks is not None and not ranks.is_main:  # this rank's share is scored and gathered; it joins every later
        follow.follow(lambda step, plan: score(*_sliced(model, groups, plan, example), step, plan))  # scoring
        return None
    with follow.leading() if follow is not None else nullcontext():
        pruned = _finish(model, example, config, images, name, weights, groups, scores, reused, seconds, score, follow,
                         cost_fn, target, protect, limits, scorer, show, keep_class, device)
    if follow is not None and lead is None:  # else the caller ends what rank 0 leads
        follow.done()
    return pruned


def _sliced(model: nn.Module, groups: list[ChannelGroup], plan: Plan, example: torch.Tensor) -> tuple[nn.Module, list[ChannelGroup]]:
    """``model`` sliced by ``plan`` and its groups, as :func:`curlprune.select.iterative.iterative_allocate` makes them."""
    pruned = apply(model, groups, plan).eval()
    return pruned, trace(pruned, example)


def _finish(model: nn.Module, example: torch.Tensor, config: PruneConfig, images: PruneImages, name: str, weights: str | None,
            groups: list[ChannelGroup], scores: Scores, reused: bool, seconds: float, score, follow: Lead | None, cost_fn,
            target: Target | None, protect: list[str], limits: dict[str, float], scorer: nn.Module, show: bool,
            keep_class: bool, device: torch.device) -> Pruned:
    """:func:`prune_model` after the first scoring, on rank 0: select (iterative pruning's later
    scorings shared through ``follow``), slice, re-estimate BN, evaluate."""
    spent = [seconds]

    def rescore(scored: nn.Module, scored_groups, step: int, plan: Plan) -> Scores:
        if follow is not None:
            follow.step(step, plan)  # every rank slices the same model and joins this scoring
        step_scores, _, step_seconds = score(scored, scored_groups, step, plan)
        spent.append(step_seconds)
        return step_scores

    selection, chosen = _select(config, groups, scores, cost_fn, target, protect, limits, model, example, rescore, device)
    seconds = sum(spent)
    sliced = slice_model(model, groups, selection.plan, keep_class=keep_class, example_input=example)
    pruned = sliced.model.eval()  # the model's own class where its forward allows (docs/method.md §1)
    check_pruned_cost(pruned, example, (selection.macs, selection.params))  # the numbers reported are the model's
    accuracy = _accuracies(scorer, pruned, images, config, show, device, example)
    widths = {g.name: GroupWidth(g.kind, g.width, len(selection.plan.get(g.name, range(g.width)))) for g in groups if g.prunable}
    report = PruneReport(model=name, weights=weights, criterion=config.criterion, allocation=config.resolved_allocation(),
                         selection=chosen.as_dict(), accuracy=PruneAccuracy(**accuracy), groups=widths,
                         scores_seconds=round(seconds, 2), scores_reused=reused)
    report.model_class = sliced.as_dict()
    if show:
        print_prune_summary(groups, selection, accuracy, name, allocation=report.allocation)
        if not sliced.kept:
            console.print(f"note: {fallback_message(sliced)}")
    return Pruned(pruned, selection.plan, groups, scores, report, chosen)


def _timed(compute: Compute) -> tuple[Scores, bool, float]:
    started = time.time()
    scores = compute({}, None, {})
    return scores, False, time.time() - started


def _select(config: PruneConfig, groups, scores, cost_fn, target: Target | None, protect: list[str], limits: dict[str, float],
            model: nn.Module, example: torch.Tensor, rescore: StepScoreFn, device: torch.device) -> tuple[Any, Any]:
    """(select's Selection, what report.json shows: the Selection or the LatencySelection).

    Both targets rank the same scores: the config's allocation (:func:`curlprune.select.allocation.ranking_scores`;
    a latency target weighs by MACs), searched by :func:`curlprune.select.search.select`. With
    ``steps > 1`` :func:`curlprune.select.iterative.iterative_allocate` reaches the target in steps,
    scoring the pruned model with ``rescore`` between them; its step records go to ``selection.steps``.
    """
    allocation = named_allocation(config.resolved_allocation(), floor=config.floor, normalize=config.normalize)
    if target is not None and config.resolved_steps() > 1:
        selection, steps = iterative_allocate(model, example, groups, rescore, cost_fn, target, allocation, steps=config.resolved_steps(),
                                              first_scores=scores, protect=protect, round_to=config.round_to, limits=limits)
        selection.steps = steps
        return selection, selection
    if target is not None:
        selection = allocate(groups, scores, cost_fn, target, allocation, protect=protect, round_to=config.round_to, limits=limits)
        return selection, selection
    ranked, normalize = ranking_scores(groups, scores, allocation, "latency")
    measured = measured_cost_fn(model, groups, example, batch=config.latency_batch or 1, threads=config.latency_threads,
                                device=device)
    chosen = select_latency(groups, ranked, measured, cost_fn, config.latency_target(), floor=config.floor,
                            protect=protect, normalize=normalize, round_to=config.round_to, limits=limits)
    return chosen.selection, chosen


@contextmanager
def full_float32():
    """TF32 off for CUDA convolutions and matmuls (cuDNN's default is on): scores on a GPU in
    float32, as on the CPU (docs/method.md §10); the previous settings are restored."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` when all its parameters and buffers are on ``device``, else a copy moved there (``model`` unchanged)."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def _accuracies(model: nn.Module, pruned: nn.Module, images: PruneImages, config: PruneConfig, show: bool,
                device: torch.device, example: torch.Tensor) -> dict[str, Any]:
    """Re-estimate ``pruned``'s BN statistics (in place) and measure test top-1 (%) of the unpruned
    model, the sliced one before and after the re-estimation, when there are test images and the
    model gives one ``[N, classes]`` logits tensor on ``example`` (a model with several or dense
    outputs is not evaluated); on ``device`` (``model`` is there already; ``pruned`` is moved there
    and back to the CPU).

    The BN images are a seeded draw (seed + 1: not the calibration draw) of ``bn_recalibrate``
    training images, all when there are fewer.
    """
    pruned.to(device)
    try:
        evaluated = images.test is not None and config.eval_limit != 0
        return _measure(model, pruned, images, config, show, not evaluated or gives_logits(model, example.to(device)))
    finally:
        pruned.to("cpu")


def _measure(model: nn.Module, pruned: nn.Module, images: PruneImages, config: PruneConfig, show: bool,
             classifier: bool = True) -> dict[str, Any]:
    """:func:`_accuracies` with both models on the device; ``classifier`` False: test images were given,
    but the model gives no single logits tensor to evaluate."""
    test = images.test
    if not classifier:
        if show:
            console.print("the model does not return one [N, classes] logits tensor (several or dense outputs): "
                          "top-1 is not evaluated")
        test = None
    evaluate = test is not None and config.eval_limit != 0
    if images.test is None and images.train is not None and config.eval_limit != 0 and show:
        console.print(f"{images.source} has no test split: top-1 is not evaluated (add test/<class>/<image> to evaluate)")
    if evaluate and config.eval_limit is not None and config.eval_limit < len(test):
        test = test.subset(config.eval_limit, config.seed)
    before = round(test.top1(model), 3) if evaluate else None
    raw = round(test.top1(pruned), 3) if evaluate else None
    n = config.resolved_bn_recalibrate()
    bn_images = 0
    if n and images.train is not None and bn_layers(pruned):
        bn, _ = images.train.draw(n, config.seed + 1)
        recalibrate_bn(pruned, bn, len(bn))
        bn_images = len(bn)
    after_bn = round(test.top1(pruned), 3) if evaluate and bn_images else None
    return {"test_images": len(test) if evaluate else 0, "top1_before": before, "top1_after": raw,
            "bn_images": bn_images, "top1_after_bn": after_bn}
