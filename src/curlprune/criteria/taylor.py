"""First-order Taylor importance (Molchanov et al., ICLR 2017) on the same channel groups.

For every producing activation ``a`` of a group (the output of each member with role ``"out"``)
and every image n: ``t_n = |sum_{h,w} a * dL/da|`` at the channel, with L the cross-entropy of
that image's own label. The score is ``mean_n sum_producers t_n``: the first-order estimate of
the loss change when the producer's output channel is zeroed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.criteria.base import BLOCK_IMAGES, BlockShare, Scores, add_blocks, per_channel, prunable, submodule
from curlprune.graph.layers import rule_for


def taylor_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = BLOCK_IMAGES,
    blocks: BlockShare | None = None,
) -> Scores:
    """Mean over images of |sum a * dL/da| per channel, summed over each group's producers.

    Args:
        model: the unpruned model; groups: ``trace(model, x)``.
        images: calibration batch ``[N, C, H, W]``, float, transformed; labels: ``[N]`` int64.
        batch_size: images per block (one forward and backward pass each).
        blocks: which image blocks this process runs, and the sums of blocks run elsewhere
            (:class:`curlprune.criteria.base.BlockShare`; torchrun ranks); None = all.

    Returns:
        Scores: group name -> float64 ``(width,)``. With ``blocks``, complete only once every
        block was run or given.

    Source: Molchanov et al., ICLR 2017; docs/method.md §10 (blocks shared by processes).
    """
    producers = _producers(model, groups)
    totals = {name: np.zeros(module_width, dtype=np.float64) for name, (_, module_width, _) in producers.items()}
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(_capture(name, captured))
        for name, (module, _, _) in producers.items()
    ]
    try:
        for index, start in enumerate(range(0, len(images), batch_size)):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            add_blocks(totals, blocks, index, lambda: _block_sums(model, producers, captured, x, y))
    finally:
        for handle in handles:
            handle.remove()
    scores: Scores = {}
    for g in prunable(groups):
        total = np.zeros(g.width, dtype=np.float64)
        for member in g.members:
            if member.role == "out" and member.module in totals:
                total += per_channel(torch.from_numpy(totals[member.module]), g, member.index)
        scores[g.name] = total / len(images)
    return scores


def _block_sums(model: nn.Module, producers: dict[str, tuple[nn.Module, int, int]], captured: dict[str, torch.Tensor],
                images: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """One block's Σ_images |Σ_{h,w} a * dL/da| per producer channel (float64; zeros where no gradient)."""
    captured.clear()
    x = images.detach().requires_grad_(True)  # also when weights are frozen
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")  # per-image gradients stay separate
        names = list(captured)
        grads = torch.autograd.grad(loss, [captured[n] for n in names], allow_unused=True)
    sums = {name: np.zeros(width, dtype=np.float64) for name, (_, width, _) in producers.items()}
    for name, grad in zip(names, grads):
        if grad is None:
            continue
        act = captured[name]
        if act.dim() > 2 and producers[name][2] != 1:  # a linear on [N, H, W, C]: channels last
            act, grad = act.movedim(producers[name][2], 1), grad.movedim(producers[name][2], 1)
        contribution = (act * grad).flatten(2).sum(2) if act.dim() > 2 else act * grad
        sums[name] += contribution.detach().abs().sum(0).double().cpu().numpy()
    captured.clear()
    return sums


def _producers(model: nn.Module, groups: Sequence[ChannelGroup]) -> dict[str, tuple[nn.Module, int, int]]:
    """Modules producing channels of a prunable group -> (module, output channels, the dim of its
    output that holds them: 1, or -1 for a linear-like layer, ``graph.layers`` rule's ``dim``)."""
    found: dict[str, tuple[nn.Module, int, int]] = {}
    for g in prunable(groups):
        for member in g.members:
            module = submodule(model, member.module)
            if member.role == "out" and module is not None and getattr(module, "weight", None) is not None:
                found[member.module] = (module, module.weight.shape[member.dim], getattr(rule_for(module), "dim", 1))
    return found


def _capture(name: str, store: dict[str, torch.Tensor]):
    """A forward hook keeping the module's output (which requires grad) under ``name``."""

    def hook(module: nn.Module, args, output: torch.Tensor) -> None:
        if output.requires_grad:
            store[name] = output

    return hook
