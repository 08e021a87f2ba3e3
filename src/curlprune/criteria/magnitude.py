"""Data-free baselines on the same channel groups: filter L1 norm, BN |gamma|, and random scores."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from curlprune.channels import ChannelGroup
from curlprune.criteria.base import Scores, per_channel, prunable, submodule, unit_broadcast
from curlprune.graph.layers import StdConvRule, rule_for, standardised_weight


def l1_scores(model: nn.Module, groups: Sequence[ChannelGroup]) -> Scores:
    """L1 norm of the filters producing each channel, summed over the group's producers.

    A producer is a member with role ``"out"`` (a conv or linear whose weight's ``dim`` indexes the
    channel); the filter is the weight slice at that index (bias excluded). Summing over producers
    gives a residual-stream channel the total magnitude of every conv that writes into it. A
    weight-standardised conv (timm ``StdConv2d`` / ``ScaledStdConv2d``, ``graph.layers.StdConvRule``)
    convolves with its standardised weight (times ``gain * scale`` when scaled), not its stored one,
    whose per-filter scale has no effect on the output: its filters are read standardised.
    """
    scores: Scores = {}
    for g in prunable(groups):
        total = np.zeros(g.width, dtype=np.float64)
        for member in g.members:
            module = submodule(model, member.module)
            if member.role != "out" or module is None or getattr(module, "weight", None) is None:
                continue
            weight = filters(module)
            dims = [d for d in range(weight.dim()) if d != member.dim]
            total += per_channel(weight.abs().sum(dim=dims) if dims else weight.abs(), g, member.index)
        scores[g.name] = total
    return scores


def filters(module: nn.Module) -> torch.Tensor:
    """The weight ``module``'s forward computes with (detached): the standardised one for a
    weight-standardised conv (:func:`curlprune.graph.layers.standardised_weight`), else ``weight``."""
    if isinstance(rule_for(module), StdConvRule):
        with torch.no_grad():
            return standardised_weight(module)
    return module.weight.detach()


def bn_scores(model: nn.Module, groups: Sequence[ChannelGroup]) -> Scores:
    """|gamma| of each channel, summed over the group's affine batch norms (network slimming).

    A group without an affine batch norm gets +inf (this criterion cannot rank it, so it is never
    chosen for removal by it).
    """
    scores: Scores = {}
    for g in prunable(groups):
        total = np.zeros(g.width, dtype=np.float64)
        found = False
        for member in g.members:
            module = submodule(model, member.module)
            if member.role != "channel" or not isinstance(module, _NormBase) or module.weight is None:
                continue
            total += per_channel(module.weight.detach().abs(), g, member.index)
            found = True
        scores[g.name] = total if found else np.full(g.width, np.inf)
    return scores


def random_scores(model: nn.Module, groups: Sequence[ChannelGroup], seed: int = 0) -> Scores:
    """Uniform random scores, one per unit, from ``seed`` (a control for the other criteria)."""
    rng = np.random.default_rng(seed)
    return {g.name: unit_broadcast(rng.random(g.width // g.unit), g.unit) for g in prunable(groups)}
