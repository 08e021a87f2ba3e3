"""What every criterion shares: the scores type, the progress callback, the registry's entry
(:class:`Criterion` and its :class:`Option`), and the helpers the criterion modules use.

A leaf of ``criteria/``: it imports no criterion module, so the registry in ``criteria/__init__.py``
imports the criterion modules (which import this one) directly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup

DEFAULT_BUDGET_MB = 512
"""Memory (MiB) the data-driven criteria (``kl``, ``kl-approx``) may use for stacked ablations."""

BLOCK_IMAGES = 16
"""At most this many calibration images per image block of the criteria that sum over blocks
(``kl-approx``, ``taylor``; :attr:`Criterion.per_block`): the block partition depends only on the
calibration set (and ``budget_mb``), never on the number of processes, so torchrun ranks can share
the blocks and their sums still add up in the single-process order (docs/method.md §10). 16 runs
ResNet-56's ``kl-approx`` within about 7% of 33-image blocks on one CPU thread."""

Scores = dict[str, np.ndarray]
"""``{group name: float64 array [width]}``, one score per channel of every prunable group; lower = less important."""

Progress = Callable[[float], None]
"""Called with the number of work items just finished (``kl``: ablations; a fraction of an item
when an image block finishes part of one)."""


@dataclass
class BlockShare:
    """A share of a per-block criterion's image blocks (:attr:`Criterion.per_block`), for
    processes that score together (docs/method.md §10).

    rank, world: block ``b`` of the criterion's fixed partition is run by this process when
                 ``b % world == rank`` (round robin: the blocks hold equal numbers of images but
                 the last, so every process gets the same work to within one block).
    sums:        block index -> that block's raw sums (``{key: float64 array}``, the criterion's own
                 keys), filled with the blocks this process runs; a block already here is not run
                 but added as given. The scores the function returns are complete when every block
                 was run or given: blocks are always added in index order, from zeros, so the result
                 equals a single process's bit for bit.
    """

    rank: int = 0
    world: int = 1
    sums: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def runs(self, block: int) -> bool:
        """Whether this process computes ``block`` (it is not given and falls to this rank)."""
        return block not in self.sums and block % self.world == self.rank


def add_blocks(totals: dict[str, np.ndarray], share: BlockShare | None, block: int,
               compute: Callable[[], dict[str, np.ndarray]]) -> bool:
    """Add block ``block``'s raw sums to ``totals`` (in place): the given ones from ``share.sums``,
    else ``compute()`` when this process runs the block (recorded in ``share.sums``); a block of
    another process, not given, is skipped. ``share`` None: always computed.

    Returns:
        Whether the block was computed here (for progress).
    """
    ran = False
    if share is not None and block in share.sums:
        sums = share.sums[block]
    elif share is None or share.runs(block):
        sums, ran = compute(), True
        if share is not None:
            share.sums[block] = sums
    else:
        return False
    for key, value in sums.items():
        totals[key] += value
    return ran


@dataclass(frozen=True)
class Option:
    """One setting of a criterion: a keyword of its function, a field of ``PruneConfig`` (the prune
    stage sets it from there) and an option of the ``prune`` command (``--budget-mb`` for ``budget_mb``).

    name:           the setting's name (``PruneConfig`` field, ``compute_scores`` keyword).
    default:        its value when unset: the function's own default (a test checks they agree);
                    its type is the command-line option's type.
    help:           one line for ``--help``.
    keyword:        the function's keyword when it differs from ``name`` (``approx_classes`` ->
                    ``classes``); None = ``name``.
    changes_scores: whether the scores depend on it. True: the scores fingerprint records it, so
                    stored scores are reused only with the same value. False for a resource limit
                    (``budget_mb``: memory only, docs/method.md §2 and §8), so that resuming with another
                    limit reuses the stored scores.
    shared:         also a setting of the whole prune stage (``seed``: the calibration draw and the
                    eval subset too), so the prune command's own option sets it (no second option).
    """

    name: str
    default: Any
    help: str
    keyword: str | None = None
    changes_scores: bool = True
    shared: bool = False

    @property
    def argument(self) -> str:
        """The function's keyword for this setting."""
        return self.keyword or self.name


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its scoring function and everything its callers need to know about it.

    name:        what ``--criterion`` / ``PruneConfig.criterion`` take.
    function:    ``function(model, groups, [images], [labels], **options, [progress]) -> Scores``:
                 ``images`` (``[N, C, H, W]`` float, transformed) when ``needs_data``, ``labels``
                 (``[N]`` int64) when ``needs_labels``, ``progress`` when ``work`` is set.
    summary:     one line for ``--help``.
    needs_data:  scores from a calibration batch (the prune stage loads ``--data``).
    needs_labels: and from its labels.
    options:     its settings (:class:`Option`), with defaults.
    work:        ``work(groups) -> int``: how many progress steps the function reports for ``groups``;
                 None = it reports no progress.
    one_scale:   its scores share one scale across groups (a damage to the output distribution, in
                 nats, for every layer), so dividing a score by what the channel's removal saves is
                 meaningful: its default allocation is "cost-weighted", otherwise "paper". Magnitude
                 and Taylor scores are on per-layer scales (a residual stream's l1 sums all its
                 producers), and dividing them by the cost made ResNet-56 worse (50% of the MACs, top-1
                 after BN re-estimation: l1 84.74% paper vs 52.78% cost-weighted, taylor 70.51% vs
                 67.36%; benchmarks/results/cifar_resnet56.md). Source: docs/method.md §3 (allocation).
    needs_logits: it reads the model's class distribution (a softmax over the last dim of one
                 ``[N, classes]`` output): refused for models with dense or several outputs
                 (segmentation, detector backbones), where it would be a distribution over pixels.
    per_group:   a group's scores do not depend on which other groups are given (bit for bit): the
                 prune stage then scores the groups in blocks and saves the finished ones after each
                 block (``scores.partial.npz``), so a killed run resumes where it stopped
                 (docs/method.md §10). ``kl``: every unit's ablation is independent given the model and
                 the calibration batch. False: the criterion is run once over all groups, and a killed
                 run scores again from the start (``kl-approx`` and ``taylor`` accumulate over
                 calibration batches for all groups at once; the data-free ones take seconds).
                 Under torchrun the groups are shared by the ranks (docs/method.md §10).
    per_block:   its scores are sums over a fixed partition of the calibration images into blocks
                 (at most :data:`BLOCK_IMAGES` each), divided at the end: its function takes
                 ``blocks`` (a :class:`BlockShare`, default None = all blocks), so torchrun ranks
                 run a share of the blocks each and the sums are added in block order
                 (``kl-approx``, ``taylor``; docs/method.md §10).
    """

    name: str
    function: Callable[..., Scores]
    summary: str
    needs_data: bool = False
    needs_labels: bool = False
    options: tuple[Option, ...] = ()
    work: Callable[[Sequence[ChannelGroup]], int] | None = None
    one_scale: bool = False
    needs_logits: bool = False
    per_group: bool = False
    per_block: bool = False

    @property
    def reports_progress(self) -> bool:
        """Whether the function takes a ``progress`` callback."""
        return self.work is not None

    def defaults(self) -> dict[str, Any]:
        """``{option name: default}`` of every declared option."""
        return {option.name: option.default for option in self.options}


# ------------------------------------------------------------------------------------- helpers


def prunable(groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
    """The groups that get scores."""
    return [g for g in groups if g.prunable]


def unit_count(groups: Sequence[ChannelGroup]) -> int:
    """Units (of ``group.unit`` channels) of the prunable groups: the work of a criterion that
    scores every unit once (``kl``, ``kl-approx``)."""
    return sum(g.width // g.unit for g in prunable(groups))


def per_channel(values: torch.Tensor, group: ChannelGroup, member_index: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Sum per-position ``values`` (along a member's sliced dimension) into the group's channels."""
    flat = values.detach().double().cpu()
    out = np.zeros(group.width, dtype=np.float64)
    for channel, positions in enumerate(member_index):
        out[channel] = float(flat[list(positions)].sum())
    return out


def unit_broadcast(per_unit: np.ndarray, unit: int) -> np.ndarray:
    """Give every channel of a unit the unit's value."""
    return np.repeat(np.asarray(per_unit, dtype=np.float64), unit)


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module called ``name``, or None when ``name`` is a parameter (``get_attr`` member)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
