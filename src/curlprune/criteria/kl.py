"""CURL's criterion, exact: the batch-mean KL(q || p) when one unit of one group is removed.

p = softmax(logits of the intact model), q = softmax(logits with the unit's channels zeroed at
every channel-mixing consumer, exactly as :func:`curlprune.surgery.surgery.mask` zeroes them, which equals
slicing them away); natural log, temperature 1, model in eval mode. Every unit is scored alone,
once, before any pruning (docs/method.md §2).

Two implementations that compute the same numbers:

``kl_scores_naive``  the authors' loop: one full forward of the calibration batch per unit, with
                     ``mask`` hooks. The reference.
``kl_scores``        the fast one. For each block of images: one reference pass gives p and, at
                     every cut, which (image, channel) inputs are exactly zero; a second reference
                     pass stops at each group's first cut and, from the values alive there (the
                     frontier), runs only the rest of the network for stacked (unit, image) rows
                     (``partial.py``). Exact shortcuts on top:

  * rank-1 first consumer: when the first cut is a conv/linear reading only the group's tensor,
    its output for an ablated unit is ``reference - W[:, unit] * x[unit]``, a conv over the unit's
    few input channels instead of all of them;
  * inactive rows: if the unit's channels are exactly zero at every cut for an image, removing
    them changes nothing for that image (KL = 0), so the row is not run at all (dead ReLU
    channels are common);
  * inference mode, BN folded into the conv before it, channels_last tensors; stacked rows come in cache-sized chunks (``chunk_mb``
    of live activations, at least 8 rows: on a CPU, 64 CIFAR images per call run ~1.3x faster per
    image than 256 and ~1.8x faster than 1024, while ResNet-50 at 224 runs ~1.3x faster with 8
    rows than with 1), image blocks are bounded by ``budget_mb``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.criteria.base import DEFAULT_BUDGET_MB, Progress, Scores, prunable
from curlprune.criteria.partial import Cut, Env, GraphRunner, gather, is_gatherable, kl_to_reference, unit_positions
from curlprune.graph import eval_mode
from curlprune.graph.layer_rules import InputPart
from curlprune.graph.layers import rule_for
from curlprune.surgery import mask

DEFAULT_CHUNK_MB = 16
MIN_CHUNK_ROWS = 8  # big inputs: batch at least this many rows so each conv's weights are read once per 8 rows


@dataclass
class KLStats:
    """What the fast path did (for logs and the benchmark)."""

    rows_total: int = 0  # (unit, image) pairs
    rows_run: int = 0  # pairs actually evaluated (the rest were inactive: KL exactly 0)
    rank1_groups: int = 0
    fallback_groups: list[str] = field(default_factory=list)  # scored with the naive loop
    blocks: int = 0
    chunk_rows: int = 0
    group_seconds: dict[str, float] = field(default_factory=dict)  # ablation time per group


def kl_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    images: torch.Tensor,
    *,
    budget_mb: float = DEFAULT_BUDGET_MB,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    progress: Progress | None = None,
    rank1: bool = True,
    skip_inactive: bool = True,
    channels_last: bool = True,
    fold_bn: bool = True,
    stats: KLStats | None = None,
    only: dict[str, Sequence[int]] | None = None,
) -> Scores:
    """Exact CURL scores, computed with partial evaluation (see the module docstring).

    Args:
        model: the unpruned model (eval mode is used).
        groups: ``trace(model, x)``.
        images: calibration batch ``[N, C, H, W]``, float, already transformed.
        budget_mb: memory (MiB) for an image block's stacked ablations.
        chunk_mb: live activations (MiB) of one stacked chunk of (unit, image) rows.
        progress: called with finished ablations (fractions of a unit per image block).
        rank1, skip_inactive, channels_last, fold_bn: exact shortcuts (off: for checks).
        stats: filled with what the fast path did.
        only: restricts scoring to some units per group (others stay 0), for spot checks.

    Returns:
        Scores: group name -> float64 ``(width,)``: the batch-mean KL(q || p) (nats) when the
        channel's unit is removed, the same for every channel of a unit.

    Source: docs/method.md §2.
    """
    stats = stats if stats is not None else KLStats()
    runner = GraphRunner(model, channels_last=channels_last, fold_bn=fold_bn, example_input=images[:1])
    works = [_Work(g, runner.cuts(g), runner, images.device) for g in prunable(groups)]
    if only is not None:
        works = [w for w in works if w.group.name in only]
        for w in works:
            w.units = sorted(set(int(u) for u in only[w.group.name]))
    stats.rank1_groups = sum(w.rank1_part is not None for w in works) if rank1 else 0
    scores = {g.name: np.zeros(g.width, dtype=np.float64) for g in prunable(groups)}
    n = len(images)
    if n == 0:
        return scores
    with torch.inference_mode():
        peak = _peak_live_bytes(runner, images[:1])
        budget = budget_mb * 2**20
        block = max(1, min(n, int(budget // (2 * peak))))
        chunk = max(1, min(int(budget // peak), max(MIN_CHUNK_ROWS, int(chunk_mb * 2**20 // peak))))
        stats.blocks, stats.chunk_rows = math.ceil(n / block), chunk
        for start in range(0, n, block):
            x = runner.prepare(images[start : start + block])
            _score_block(runner, works, x, n, chunk, scores, stats, rank1, skip_inactive,
                         (lambda done: progress(done / stats.blocks)) if progress else None)
    return scores


def kl_scores_naive(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    progress: Progress | None = None,
    only: dict[str, Sequence[int]] | None = None,
) -> Scores:
    """The reference: one full forward per unit with :func:`curlprune.surgery.surgery.mask` (as the authors)."""

    def forward() -> torch.Tensor:
        return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])

    scores = {g.name: np.zeros(g.width, dtype=np.float64) for g in prunable(groups)}
    with torch.no_grad(), eval_mode(model):
        reference = torch.log_softmax(forward().double(), dim=-1)
        for g in prunable(groups):
            if only is not None and g.name not in only:
                continue
            units = range(g.width // g.unit) if only is None else sorted(set(only[g.name]))
            for u in units:
                with mask(model, groups, _without_unit(g, u)):
                    value = float(kl_to_reference(forward(), reference).mean())
                scores[g.name][u * g.unit : (u + 1) * g.unit] = value
                if progress:
                    progress(1)
    return scores


def _without_unit(group: ChannelGroup, u: int) -> Plan:
    """The plan that removes unit ``u`` of ``group`` and nothing else."""
    return {group.name: [c for c in range(group.width) if c // group.unit != u]}


# ----------------------------------------------------------------------------------------------


class _Work:
    """One group's ablations: its cuts, where its suffix starts, whether rank-1 applies."""

    def __init__(self, group: ChannelGroup, cuts: list[Cut], runner: GraphRunner, device: torch.device) -> None:
        self.group = group
        self.device = device  # of the images and the model: index tensors are made there
        self.cuts = cuts
        self.units = list(range(group.width // group.unit))
        self.start = runner.index[cuts[0].node] if cuts else None
        self.rank1_part: InputPart | None = None  # the first consumer's output from some input channels
        if cuts and sum(c.node == cuts[0].node for c in cuts) == 1:
            node = runner.nodes[self.start]
            module = runner.modules[str(node.target)]
            rule = rule_for(module)
            if len(node.args) == 1 and not node.kwargs and rule is not None:  # a single input
                self.rank1_part = rule.input_part(module)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def positions(self, cut_index: int, u: int) -> torch.Tensor:
        key = (cut_index, u)
        if key not in self._positions:
            self._positions[key] = torch.tensor(unit_positions(self.cuts[cut_index], u, self.group.unit), dtype=torch.long,
                                                  device=self.device)
        return self._positions[key]


def _peak_live_bytes(runner: GraphRunner, image: torch.Tensor) -> float:
    """Largest total size of the batched values alive at once, for one image (memory planning)."""
    peak = 0

    def track(i: int, node, value) -> None:
        nonlocal peak
        live = sum(v.numel() * v.element_size() for k, v in env.items() if k in runner.batched and isinstance(v, torch.Tensor))
        peak = max(peak, live)

    env: Env = {runner.placeholders[0]: runner.prepare(image)}
    runner.run(env, 0, on_value=track)
    return max(peak, 1)


def _score_block(runner: GraphRunner, works: list[_Work], x: torch.Tensor, n_total: int, chunk: int,
                 scores: Scores, stats: KLStats, rank1: bool, skip_inactive: bool, progress) -> None:
    """Add this block's share of every unit's mean KL to ``scores``."""
    cut_nodes = {c.node: c.dim for w in works for c in w.cuts}
    nonzero: dict[str, torch.Tensor] = {}

    def record(name: str, dim: int):
        def observe(arg: torch.Tensor) -> torch.Tensor:
            d = dim % arg.dim()
            reduce = [k for k in range(1, arg.dim()) if k != d]
            nonzero[name] = arg.ne(0).any(dim=reduce) if reduce else arg.ne(0)
            return arg
        return observe

    logits = runner.forward(x, cut_arg={name: record(name, dim) for name, dim in cut_nodes.items()})
    reference = torch.log_softmax(logits.double(), dim=-1)
    by_start: dict[int, list[_Work]] = {}
    for w in works:
        if w.start is None:
            if progress:
                progress(len(w.units))
            continue
        by_start.setdefault(w.start, []).append(w)

    def at_node(i: int, node, value) -> None:
        for w in by_start.get(i, ()):
            _ablate(runner, w, env, i, x, nonzero, reference, n_total, chunk, scores, stats, rank1, skip_inactive, progress)

    env: Env = {runner.placeholders[0]: x}
    runner.run(env, 0, on_value=at_node)


def _active_rows(w: _Work, nonzero: dict[str, torch.Tensor], batch: int, skip_inactive: bool) -> list[tuple[int, torch.Tensor]]:
    """For each unit, the image rows where zeroing it can change anything."""
    rows = []
    for u in w.units:
        if not skip_inactive:
            rows.append((u, torch.arange(batch, device=w.device)))
            continue
        active = torch.zeros(batch, dtype=torch.bool, device=w.device)
        for k, cut in enumerate(w.cuts):
            active |= nonzero[cut.node].index_select(1, w.positions(k, u)).any(1)
        rows.append((u, torch.nonzero(active).flatten()))
    return rows


def _ablate(runner: GraphRunner, w: _Work, env: Env, i: int, x: torch.Tensor, nonzero: dict[str, torch.Tensor],
            reference: torch.Tensor, n_total: int, chunk: int, scores: Scores, stats: KLStats,
            rank1: bool, skip_inactive: bool, progress) -> None:
    """Score ``w``'s units on this block, from the frontier ``env`` right after node ``i`` ran."""
    started = time.perf_counter()
    try:
        _ablate_units(runner, w, env, i, x, nonzero, reference, n_total, chunk, scores, stats, rank1, skip_inactive, progress)
    finally:
        name = w.group.name
        stats.group_seconds[name] = stats.group_seconds.get(name, 0.0) + time.perf_counter() - started


def _ablate_units(runner: GraphRunner, w: _Work, env: Env, i: int, x: torch.Tensor, nonzero: dict[str, torch.Tensor],
                  reference: torch.Tensor, n_total: int, chunk: int, scores: Scores, stats: KLStats,
                  rank1: bool, skip_inactive: bool, progress) -> None:
    node = runner.nodes[i]
    batch = x.shape[0]
    use_rank1 = rank1 and w.rank1_part is not None
    needed = [k for k in env if runner.last_use.get(k, -1) > i or (not use_rank1 and runner.last_use.get(k, -1) == i)]
    if use_rank1 or node.name in needed:
        needed = [k for k in needed if k != node.name]
    if any(k in runner.batched and not is_gatherable(env[k]) for k in needed):
        return _ablate_with_mask(runner, w, x, reference, n_total, scores, stats, progress)
    unit_rows = _active_rows(w, nonzero, batch, skip_inactive)
    stats.rows_total += len(w.units) * batch
    stats.rows_run += sum(len(r) for _, r in unit_rows)
    per_unit = np.zeros(len(w.units))
    finished = sum(1 for _, r in unit_rows if len(r) == 0)
    if progress and finished:
        progress(finished)
    items = [(slot, u, r) for slot, (u, r) in enumerate(unit_rows) if len(r)]
    pending: list[tuple[int, int, torch.Tensor]] = []
    size = completing = 0  # rows queued; units whose last rows are queued

    def flush() -> None:
        _run_chunk(runner, w, env, i, needed, pending, use_rank1, reference, per_unit)
        if progress and completing:
            progress(completing)

    for slot, u, r in items:
        while len(r):
            take = r[: chunk - size]
            pending.append((slot, u, take))
            size += len(take)
            r = r[len(take):]
            completing += not len(r)
            if size >= chunk:
                flush()
                pending, size, completing = [], 0, 0
    if pending:
        flush()
    _add_unit_scores(w, per_unit / n_total, scores)


def _run_chunk(runner: GraphRunner, w: _Work, env: Env, i: int, needed: list[str],
               pending: list[tuple[int, int, torch.Tensor]], use_rank1: bool,
               reference: torch.Tensor, per_unit: np.ndarray) -> None:
    """Evaluate stacked (unit, image) rows from the frontier and add their KL to ``per_unit``."""
    rows = torch.cat([r for _, _, r in pending])
    sub: Env = {k: gather(env[k], rows, runner.channels_last) if k in runner.batched else env[k] for k in needed}
    spans = []
    offset = 0
    for slot, u, r in pending:
        spans.append((slot, u, offset, offset + len(r)))
        offset += len(r)
    node = runner.nodes[i]
    if use_rank1:
        out = gather(env[node.name], rows, runner.channels_last)
        x_ref = env[node.args[0].name]
        first = w.cuts[0]
        for slot, u, a, b in spans:
            positions = w.positions(0, u)
            x_unit = x_ref.index_select(0, rows[a:b]).index_select(first.dim % x_ref.dim(), positions)
            out[a:b] -= w.rank1_part(x_unit, positions)
        sub[node.name] = out
        start = i + 1
    else:
        start = i
    cut_arg = {}
    for k, cut in enumerate(w.cuts):
        if use_rank1 and k == 0:
            continue
        cut_arg[cut.node] = _zeroing(w, k, spans, len(rows))
    logits = runner.run(sub, start, cut_arg=cut_arg)
    kl = kl_to_reference(logits.reshape(len(rows), -1), reference.index_select(0, rows)).cpu().numpy()
    for slot, _, a, b in spans:
        per_unit[slot] += kl[a:b].sum()


def _zeroing(w: _Work, k: int, spans, n_rows: int):
    """A first-argument rewrite that zeroes, row by row, the positions of each row's unit."""
    cut = w.cuts[k]

    def apply(arg: torch.Tensor) -> torch.Tensor:
        d = cut.dim % arg.dim()
        keep = torch.ones(n_rows, arg.shape[d], dtype=arg.dtype, device=arg.device)
        for _, u, a, b in spans:
            keep[a:b, w.positions(k, u)] = 0
        shape = [n_rows] + [1] * (arg.dim() - 1)
        shape[d] = arg.shape[d]
        return arg * keep.view(shape)

    return apply


def _add_unit_scores(w: _Work, per_unit: np.ndarray, scores: Scores) -> None:
    unit = w.group.unit
    for slot, u in enumerate(w.units):
        scores[w.group.name][u * unit : (u + 1) * unit] += per_unit[slot]


def _ablate_with_mask(runner: GraphRunner, w: _Work, x: torch.Tensor, reference: torch.Tensor,
                      n_total: int, scores: Scores, stats: KLStats, progress) -> None:
    """Fallback when the frontier holds batch-sized non-tensors (e.g. a saved ``x.size(0)``) that
    cannot be split into rows: full forwards of the block with ``mask``, one per unit."""

    if w.group.name not in stats.fallback_groups:
        stats.fallback_groups.append(w.group.name)
    g = w.group
    per_unit = np.zeros(len(w.units))
    for slot, u in enumerate(w.units):
        with mask(runner.gm, [g], _without_unit(g, u)):
            per_unit[slot] = float(kl_to_reference(runner.forward(x), reference).sum())
        if progress:
            progress(1)
    _add_unit_scores(w, per_unit / n_total, scores)
