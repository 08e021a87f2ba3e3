"""A fast approximation of CURL's KL score: its second-order (Fisher) expansion.

Removing unit u changes the logits z by δ. Around the intact network (δ = 0),

    KL(q || p) = ½ δᵀ F δ + O(|δ|³),   F = diag(p) − p pᵀ = Σ_y p_y (e_y − p)(e_y − p)ᵀ,

the Fisher information of the softmax in logit space. To first order, δ is the sum, over every
cut (each input of a channel-mixing consumer where the unit's channels are zeroed, the same points
as the exact criterion), of ``−J · a_u``: the Jacobian of the logits with respect to that input,
applied to the unit's activations there. With ``(e_y − p)ᵀ J = ∂ log p_y / ∂a`` this gives

    score_u ≈ mean_n ½ Σ_y p_{n,y} ( Σ_cuts Σ_{positions of u} a · ∂ log p_{n,y} / ∂a )².

One forward pass and one backward pass per class y compute it for every unit of every group at
once (the backward pass of ``Σ_n log p_{n, y_n}`` gives each image its own gradient because the
model is in eval mode). Only the ``classes`` most probable classes of each image are summed (all
of them when there are at most that many); the remaining terms carry little probability mass.
Weights get no gradients, so each backward pass costs about one forward pass.

Its rank agreement with the exact ``kl`` is measured in benchmarks/score_speed.py and reported in
docs/criteria.md; large removals (whole residual-stream channels) are where the expansion is least
accurate.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.criteria.base import BLOCK_IMAGES, DEFAULT_BUDGET_MB, BlockShare, Progress, Scores, add_blocks, prunable, unit_broadcast
from curlprune.criteria.partial import Cut, Env, GraphRunner, logits_of

DEFAULT_CLASSES = 5


def kl_approx_scores(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    images: torch.Tensor,
    *,
    classes: int = DEFAULT_CLASSES,
    budget_mb: float = DEFAULT_BUDGET_MB,
    progress: Progress | None = None,
    blocks: BlockShare | None = None,
) -> Scores:
    """Fisher approximation of the KL score of every unit (see the module docstring).

    Args:
        model: the unpruned model; groups: ``trace(model, x)``.
        images: calibration batch ``[N, C, H, W]``, float, transformed; it is run in blocks of at
            most :data:`curlprune.criteria.base.BLOCK_IMAGES` images (fewer when ``budget_mb`` says so).
        classes: the most probable classes summed per image; budget_mb: memory (MiB) of one block's backward pass.
        progress: called with finished units (fractions per image block).
        blocks: which image blocks this process runs, and the sums of blocks run elsewhere
            (:class:`curlprune.criteria.base.BlockShare`; torchrun ranks); None = all.

    Returns:
        Scores: group name -> float64 ``(width,)``, the approximate batch-mean KL (nats) per unit.
        With ``blocks``, complete only once every block was run or given.

    Source: docs/method.md §2 (the score), §10 (blocks shared by processes).
    """
    runner = GraphRunner(model, channels_last=True, example_input=images[:1])
    for p in runner.model.parameters():
        p.requires_grad_(False)
    work = [(g, runner.cuts(g)) for g in prunable(groups)]
    unit_maps = {(g.name, k): tuple(t.to(images.device) for t in _unit_index(g, cut)) for g, cuts in work for k, cut in enumerate(cuts)}
    cut_nodes = {c.node: c.dim for _, cuts in work for c in cuts}
    sums = {g.name: np.zeros(g.width // g.unit) for g, _ in work}
    n = len(images)
    block = max(1, min(n, BLOCK_IMAGES, int(budget_mb * 2**20 // (3 * _activation_bytes(runner, images[:1])))))
    for index, start in enumerate(range(0, n, block)):
        x = runner.prepare(images[start : start + block]).requires_grad_(True)
        ran = add_blocks(sums, blocks, index, lambda: _block_sums(runner, work, unit_maps, cut_nodes, x, classes))
        if progress and ran:
            progress(sum(g.width // g.unit for g, _ in work) * x.shape[0] / n)
    return {g.name: unit_broadcast(sums[g.name] / n, g.unit) for g, _ in work}


def _block_sums(runner: GraphRunner, work, unit_maps, cut_nodes: dict[str, int], x: torch.Tensor,
                classes: int) -> dict[str, np.ndarray]:
    """One image block's raw sums per group: Σ_images Σ_top classes ½ p_{n,y} δ_u², float64 ``[units]``
    (added over the classes from zeros, in the same order wherever the block is run)."""
    taps: dict[str, torch.Tensor] = {}

    def tap(name: str):
        def make(arg: torch.Tensor) -> torch.Tensor:
            taps[name] = arg.view_as(arg)
            return taps[name]
        return make

    sums = {g.name: np.zeros(g.width // g.unit) for g, _ in work}
    with torch.enable_grad():
        env: Env = {runner.placeholders[0]: x}
        logits = logits_of(runner.run(env, 0, cut_arg={name: tap(name) for name in cut_nodes}))
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.detach().double().exp()
        top = probs.topk(min(classes, probs.shape[1]), dim=1).indices
        names = list(taps)
        for m in range(top.shape[1]):
            chosen = logp.gather(1, top[:, m : m + 1]).sum()
            grads = torch.autograd.grad(chosen, [taps[k] for k in names], retain_graph=m < top.shape[1] - 1, allow_unused=True)
            weight = probs.gather(1, top[:, m : m + 1]).flatten()  # p_{n,y}
            per_position = {k: _contribution(taps[k].detach(), g, cut_nodes[k]) for k, g in zip(names, grads) if g is not None}
            for g, cuts in work:
                delta = torch.zeros(x.shape[0], g.width // g.unit, dtype=torch.float64, device=x.device)
                for k, cut in enumerate(cuts):
                    if cut.node in per_position:
                        positions, units = unit_maps[(g.name, k)]
                        delta.index_add_(1, units, per_position[cut.node].index_select(1, positions))
                sums[g.name] += (0.5 * weight[:, None] * delta**2).sum(0).cpu().numpy()
    return sums


def _contribution(activation: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ a · ∂/∂a over every dim but the batch and ``dim``: [batch, positions] in float64."""
    d = dim % activation.dim()
    product = (activation * grad).double()
    reduce = [k for k in range(1, product.dim()) if k != d]
    return product.sum(dim=reduce) if reduce else product


def _unit_index(group: ChannelGroup, cut: Cut) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, unit of each position) of ``cut`` for the group's channels."""
    positions, units = [], []
    for c, ps in enumerate(cut.positions):
        positions.extend(ps)
        units.extend([c // group.unit] * len(ps))
    return torch.tensor(positions, dtype=torch.long), torch.tensor(units, dtype=torch.long)


def _activation_bytes(runner: GraphRunner, image: torch.Tensor) -> float:
    """Bytes of all batched values of one image (what a backward pass keeps alive)."""
    total = 0

    def add(i: int, node, value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and node.name in runner.batched:
            total += value.numel() * value.element_size()

    with torch.inference_mode():
        runner.run({runner.placeholders[0]: runner.prepare(image)}, 0, on_value=add)
    return max(total, 1)
