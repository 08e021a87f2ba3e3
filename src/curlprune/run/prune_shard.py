"""The prune stage's scoring, in blocks that are saved as they finish and shared by torchrun ranks.

:func:`compute` is what the prune stage runs for one scoring (docs/method.md §10):

* **per-group criteria** (``kl``, :attr:`curlprune.criteria.Criterion.per_group`): the pending groups
  are scored in blocks (:func:`score_blocks`); after each block the finished groups are saved
  (``scores.partial.npz``, by the caller's ``save``) so that a killed run resumes there. Under
  torchrun every block is split over the ranks by whole groups, balanced by their ablation cost
  (:func:`ablation_costs`: units x MACs from the group's first cut to the output, per image;
  :func:`assign_groups`: longest first, to the least loaded rank), and gathered. A group's scores
  do not depend on the other groups scored with it, so the gathered scores equal one process's,
  bit for bit.
* **per-block criteria** (``kl-approx``, ``taylor``, :attr:`curlprune.criteria.Criterion.per_block`):
  the calibration set's fixed image blocks go round robin to the ranks
  (:class:`curlprune.criteria.base.BlockShare`); every rank's raw block sums are gathered and rank
  0 adds all blocks in block order, from zeros, as one process does: equal bit for bit.
* any other criterion (``l1``, ``bn``, ``random``: data-free, seconds; a user's own criterion):
  rank 0 alone, the other ranks return nothing.

Bit-exact means the same float operations on the same inputs: the same device type and the same
number of threads per process (a torchrun process has ``OMP_NUM_THREADS=1`` unless set).

After the first scoring rank 0 leads the rest of the stage and the other ranks follow (:class:`Lead`):
every later scoring of iterative pruning is shared the same way, and every rank leaves the stage
together, with rank 0's result or with its error.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.criteria import compute_scores, get, work_items
from curlprune.criteria.base import BlockShare, Scores, prunable
from curlprune.criteria.partial import GraphRunner
from curlprune.errors import CurlpruneError
from curlprune.graph.op_cost import CostMode
from curlprune.progress import progress
from curlprune.recover.dist import DistContext, all_gather_object
from curlprune.report import console
from curlprune.run.prune_config import PruneConfig

SAVE_BLOCKS = 32
"""A per-group criterion's first block of groups holds about 1/SAVE_BLOCKS of the work (per rank);
later blocks grow to about :data:`SAVE_SECONDS` each (every block repeats the criterion's set-up and
reference pass, which dominates small blocks of a small model)."""
SAVE_SECONDS = 60.0

Save = Callable[[Scores], None]


def compute(config: PruneConfig, model: nn.Module, groups: Sequence[ChannelGroup], images: torch.Tensor | None,
            labels: torch.Tensor | None, show: bool, done: Scores, save: Save | None, *, ctx: DistContext | None = None,
            costs: dict[str, float] | None = None, record: dict[str, Any] | None = None) -> Scores:
    """The criterion's scores of ``groups`` with its declared options from ``config``, shared by the
    ranks of ``ctx`` (see the module docstring), with its progress (:func:`curlprune.progress.progress`)
    on rank 0 when it reports progress.

    Args:
        config: the prune stage's settings (criterion and its options).
        model: the model to score, on its device; groups: its channel groups.
        images, labels: the calibration batch ``[N, C, H, W]`` and ``[N]`` (None for data-free criteria).
        show: draw the progress bar (rank 0 only).
        done: scores of groups already finished (a killed run's partial file; per-group criteria
            only, ignored by the others, which score again from the start).
        save: called on rank 0 with every finished group after each block (per-group criteria); None = not saved.
        ctx: the torchrun ranks (None or one process: not shared). All ranks must call this with the same arguments.
        costs: group name -> ablation cost (:func:`ablation_costs`), for a per-group criterion on several ranks.
        record: filled with how the work was split (``ranks``, ``split``, ``shares``: per rank its
            groups and units or its image blocks, and seconds), for the log.

    Returns:
        Scores of every prunable group in the groups' order, on rank 0 (and in one process); on the
        other ranks the scores they computed (their share; empty for criteria rank 0 runs alone).

    Source: docs/method.md §10.
    """
    criterion = get(config.criterion)
    world = ctx.world_size if ctx is not None else 1
    record = record if record is not None else {}
    record.update(ranks=world)
    if criterion.per_group:
        return _per_group(config, model, groups, images, labels, show, done, save, ctx, costs, record)
    if world > 1 and criterion.per_block:
        return _per_block(config, model, groups, images, labels, show, ctx, record)
    record.update(split="rank 0 alone" if world > 1 else "one process")
    if world > 1 and not ctx.is_main:
        return {}
    total = work_items(config.criterion, groups)
    with progress(_description(config, images, 0), total, unit="units", enabled=show and bool(total)) as bar:
        scores = compute_scores(config.criterion, model, list(groups), images=images, labels=labels,
                                progress=bar.advance if show and total else None, **config.criterion_options())
        bar.update(total)
    return scores


def _description(config: PruneConfig, images: torch.Tensor | None, finished: float) -> str:
    on_text = "" if images is None else f", {len(images)} images, {images.device}"
    return f"scoring ({config.criterion}{on_text}{f', resumed at {finished:g}' if finished else ''})"


def _per_group(config: PruneConfig, model: nn.Module, groups: Sequence[ChannelGroup], images, labels, show: bool,
               done: Scores, save: Save | None, ctx: DistContext | None, costs: dict[str, float] | None,
               record: dict[str, Any]) -> Scores:
    """:func:`compute` for a per-group criterion: blocks of groups, each split over the ranks by cost."""
    name = config.criterion
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    scored = prunable(groups)
    done = {g: v for g, v in done.items() if g in {s.name for s in scored}}
    pending = [g for g in scored if g.name not in done]
    share = max(1, work_items(name, pending) // SAVE_BLOCKS) * world  # the same on every rank: blocks are cut alike
    total = work_items(name, groups)
    finished = work_items(name, [g for g in scored if g.name in done])
    shown = show and bool(total) and rank == 0
    mine: dict[str, Any] = {"rank": rank, "groups": [], "units": 0, "seconds": 0.0}
    shares = [mine]
    with progress(_description(config, images, finished), total, unit="units", enabled=shown) as bar:
        if finished:
            bar.update(finished)
        while pending:
            block = score_blocks(name, pending, share)[0]
            ours = assign_groups(block, costs or {}, world)[rank] if world > 1 else block
            started = time.perf_counter()
            scores = compute_scores(name, model, ours, images=images, labels=labels, progress=bar.advance if shown else None,
                                    **config.criterion_options()) if ours else {}
            seconds = time.perf_counter() - started
            mine["groups"] += [g.name for g in ours]
            mine["units"] += work_items(name, ours)
            mine["seconds"] = round(mine["seconds"] + seconds, 3)
            if world > 1:  # every rank's share of the block, in rank order; the slowest rank sets the pace
                parts = all_gather_object(ctx, {"scores": scores, "seconds": seconds, "share": mine})
                scores = {g: v for part in parts for g, v in part["scores"].items()}
                seconds = max(part["seconds"] for part in parts)
                shares = [part["share"] for part in parts]
            done.update(scores)
            if save is not None and rank == 0:
                save(done)
            pending = pending[len(block):]
            finished += work_items(name, block)
            bar.update(finished)
            share = max(share, int(work_items(name, block) * SAVE_SECONDS / max(seconds, 1e-3)))
        bar.update(total)
    record.update(split="groups" if world > 1 else "one process", shares=shares)
    if world > 1 and show and rank == 0:
        _say_split(record, "groups by ablation MACs")
    if rank != 0:
        return {g: done[g] for g in mine["groups"]}
    return {g.name: done[g.name] for g in scored}


def _per_block(config: PruneConfig, model: nn.Module, groups: Sequence[ChannelGroup], images, labels, show: bool,
               ctx: DistContext, record: dict[str, Any]) -> Scores:
    """:func:`compute` for a per-block criterion on several ranks: each runs its image blocks, rank 0
    adds every block's sums in block order."""
    name = config.criterion
    total = work_items(name, groups)
    shown = show and bool(total) and ctx.is_main
    share = BlockShare(ctx.rank, ctx.world_size)
    started = time.perf_counter()
    with progress(_description(config, images, 0), total, unit="units", enabled=shown) as bar:
        compute_scores(name, model, list(groups), images=images, labels=labels, blocks=share,
                       progress=bar.advance if shown and total else None, **config.criterion_options())
        mine = {"rank": ctx.rank, "blocks": sorted(share.sums), "seconds": round(time.perf_counter() - started, 3)}
        parts = all_gather_object(ctx, {"sums": share.sums, "share": mine})
        bar.update(total)
    record.update(split="image blocks", shares=[part["share"] for part in parts])
    if not ctx.is_main:
        return {}
    given = {block: sums for part in parts for block, sums in part["sums"].items()}
    # rank 0 of a world of one: every block given is added in order; one missing would be run here, never skipped
    scores = compute_scores(name, model, list(groups), images=images, labels=labels, blocks=BlockShare(0, 1, given),
                            **config.criterion_options())
    if show:
        _say_split(record, "calibration image blocks, round robin")
    return scores


def _say_split(record: dict[str, Any], how: str) -> None:
    """One line on rank 0: the scoring was split over the ranks, and each rank's share."""
    parts = []
    for s in record["shares"]:
        size = f"{len(s['groups'])} groups, {s['units']} units" if "groups" in s else f"{len(s['blocks'])} image blocks"
        parts.append(f"rank {s['rank']} {size} in {s['seconds']:.1f} s")
    console.print(f"scoring split over {record['ranks']} ranks ({how}): " + "; ".join(parts))


def score_blocks(name: str, groups: list[ChannelGroup], share: int) -> list[list[ChannelGroup]]:
    """``groups`` (prunable, in order) cut into consecutive blocks of at least ``share`` work items
    (:func:`curlprune.criteria.work_items`) each, the last one possibly less; at least one group per block."""
    blocks: list[list[ChannelGroup]] = []
    size = share
    for g in groups:
        if size >= share:
            blocks.append([])
            size = 0
        blocks[-1].append(g)
        size += work_items(name, [g])
    return blocks


def assign_groups(groups: Sequence[ChannelGroup], costs: dict[str, float], world: int) -> list[list[ChannelGroup]]:
    """Split ``groups`` over ``world`` ranks, balanced by cost: longest first, each to the least
    loaded rank (the lowest rank on ties); every rank's groups in their given order.

    Args:
        groups: the groups of one block; costs: group name -> cost (:func:`ablation_costs`; a group
            without a cost counts its units); world: the number of ranks.
    Returns:
        ``world`` lists, together ``groups`` once each; the same on every rank (deterministic).
    """
    loads = [0.0] * world
    owner: dict[str, int] = {}
    order = sorted(range(len(groups)), key=lambda i: (-_cost(groups[i], costs), i))
    for i in order:
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[groups[i].name] = rank
        loads[rank] += _cost(groups[i], costs)
    return [[g for g in groups if owner[g.name] == rank] for rank in range(world)]


def _cost(group: ChannelGroup, costs: dict[str, float]) -> float:
    return costs.get(group.name, float(group.width // group.unit))


def ablation_costs(model: nn.Module, groups: Sequence[ChannelGroup], example: torch.Tensor) -> dict[str, float]:
    """What scoring each prunable group with ``kl`` costs, up to a constant: its units x the MACs
    (per image) from its first cut (the first consumer that sees its channels zeroed) to the
    output, which each ablation runs again (:mod:`curlprune.criteria.partial`); at least its units.

    Args:
        model: the model (CPU; traced again, not changed); groups: its channel groups;
        example: one input ``[1, C, H, W]``.
    Returns:
        group name -> cost (MACs).

    Source: docs/method.md §10 (the split over ranks); MACs as in §8.
    """
    runner = GraphRunner(model, channels_last=False, fold_bn=False)
    before: dict[int, int] = {}  # node index -> MACs of the nodes before it
    mode = CostMode()

    def track(i: int, node, value) -> None:
        before[i + 1] = mode.macs

    with torch.no_grad(), mode:
        runner.run({runner.placeholders[0]: runner.prepare(example.to(next(model.parameters()).device))}, 0, on_value=track)
    total = mode.macs
    known = sorted(before)

    def macs_from(index: int) -> int:
        earlier = [k for k in known if k <= index]
        return total - (before[earlier[-1]] if earlier else 0)

    costs: dict[str, float] = {}
    for g in prunable(groups):
        cuts = runner.cuts(g)
        units = g.width // g.unit
        costs[g.name] = float(max(units, units * macs_from(runner.index[cuts[0].node]) if cuts else units))
    return costs


class Lead:
    """Rank 0 leads the prune stage after its first shared scoring; the other ranks follow.

    Rank 0 alone selects, slices, evaluates and writes. Before every later scoring of iterative
    pruning (``steps`` > 1) it sends the step and the plan the scored model is sliced by; every
    rank slices the same model and joins that scoring (:func:`compute`). At the end rank 0 sends
    "done" (:meth:`done`) or its error (:meth:`leading`), which the other ranks raise in one line: so
    every rank leaves the stage the same way and none is left waiting in a collective.

    Rank 0 sends only while the others wait for its next message (:attr:`waiting`, set by
    :meth:`joined` after each shared scoring): an error inside a shared scoring is raised there on
    every rank (an error rank 0 finds before it: :func:`curlprune.recover.dist.on_main`), or ends
    rank 0's process and with it the torchrun job, and is not sent again.

    Source: docs/method.md §10.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.waiting = False  # rank 0: the other ranks wait in :meth:`follow` for its next message

    def joined(self) -> None:
        """Rank 0, after a shared scoring (or its reuse) returned: the others are back in :meth:`follow`."""
        self.waiting = True

    def step(self, step: int, plan: Plan) -> None:
        """Rank 0: tell the others to score iterative pruning's ``step`` (the model sliced by ``plan``) with it."""
        self._send({"step": step, "plan": plan})

    def done(self) -> None:
        """Rank 0: the stage is finished (its files written); the others return from :meth:`follow`."""
        if self.waiting:
            self._send({"done": True})

    @contextmanager
    def leading(self) -> Iterator[None]:
        """Rank 0's own work: an error leaving it is sent to the waiting ranks (once), then raised here."""
        try:
            yield
        except CurlpruneError as exc:
            if self.waiting:
                self._send({"error": str(exc)})
            raise
        except BaseException as exc:
            if self.waiting:
                self._send({"error": f"rank 0 failed ({type(exc).__name__}: {exc}); see its traceback"})
            raise

    def follow(self, rescore: Callable[[int, Plan], object]) -> None:
        """The other ranks: join every later scoring rank 0 asks for (``rescore(step, plan)``) until it is done.

        Raises:
            CurlpruneError: rank 0's error, in its words.
        """
        while True:
            message = all_gather_object(self.ctx, None)[0]
            if "step" in message:
                rescore(message["step"], message["plan"])
            elif "error" in message:
                raise CurlpruneError(message["error"])
            else:
                return

    def _send(self, message: dict[str, Any]) -> None:
        self.waiting = False
        all_gather_object(self.ctx, message)
