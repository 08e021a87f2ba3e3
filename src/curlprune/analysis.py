"""The analysis of one model: its channel groups with their costs, cached; and the cost of a Plan.

This layer sits above the group finder (:mod:`curlprune.graph`), the cost table
(:mod:`curlprune.cost_plan`) and plan checking (:mod:`curlprune.surgery`) and joins them, so none of
those imports another that imports it back.

* ``trace(model, example_input) -> list[ChannelGroup]`` traces ``model`` with torch.fx (module
  leaves: torch.nn modules and torchvision's StochasticDepth), propagates shapes with
  ``example_input`` and returns the channel groups in topological order of their first member,
  with the MACs and parameters each channel's removal saves.
* ``plan_cost(model, example_input, groups, plan)`` is the (MACs, params) of the sliced model,
  analytic and cheap enough for a target search.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.cost_plan import CostTable, build_cost_table
from curlprune.errors import CurlpruneError
from curlprune.graph import build_groups, channel_pass, propagate_shapes, symbolic_trace
from curlprune.surgery import removed_positions, validate_plan


@dataclass
class Analysis:
    """Everything one trace knows.

    gm:     the traced GraphModule; it shares the model's modules and its node names are the ones
            in ``ChannelGroup.nodes`` (for partial evaluation, e.g. by the KL criterion).
    groups: the channel groups (do not modify; ``trace`` returns copies).
    cost:   the cost table behind ``plan_cost`` and the per-channel savings.
    """

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    cost: CostTable


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Analysis]]" = weakref.WeakKeyDictionary()


def analyse(model: nn.Module, example_input: Any) -> Analysis:
    """Trace ``model`` and find its channel groups and cost table.

    Cached per model object, input shape and architecture fingerprint (module names, types and
    settings), so new weights reuse the analysis and a replaced/resized module triggers a new one.

    Args:
        model: the model to analyse (not changed; its train/eval modes are restored).
        example_input: one batch the model accepts, e.g. ``torch.zeros(1, 3, 224, 224)``, or a
            tuple of its positional inputs; costs are per sample at this input size.

    Returns:
        The cached :class:`Analysis` (shared: do not modify its groups).

    Raises:
        CurlpruneError: ``model`` is not an ``nn.Module``, cannot be traced by torch.fx, or fails
            on ``example_input``.

    Source: docs/method.md §1.
    """
    if not isinstance(model, nn.Module):
        raise CurlpruneError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    key = (tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs), _fingerprint(model))
    cached = _CACHE.get(model, {})
    if key in cached:
        return cached[key]
    gm = symbolic_trace(model)
    values = propagate_shapes(gm, model, example_input)
    an = channel_pass(gm, values)
    groups = build_groups(an)
    param_dims = {module: src.dim for (module, role), src in an.sources.items() if role == "param"}
    cost = build_cost_table(gm, values, param_dims)
    for g in groups:
        g.macs_per_channel, g.params_per_channel = cost.channel_savings(g)
    result = Analysis(gm, groups, cost)
    _CACHE.setdefault(model, {})[key] = result
    return result


def _fingerprint(model: nn.Module) -> tuple:
    """What the analysis depends on besides the code: every module's name, type and settings."""
    return tuple((name, type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules())


def trace(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Channel groups of ``model``, in topological order of their first member.

    The model is run once in eval mode under ``no_grad``; its train/eval modes are restored.

    Args:
        model: the model to trace.
        example_input: one batch the model accepts, e.g. ``torch.zeros(1, 3, 224, 224)`` (float,
            ``[N, C, H, W]``); per-channel MACs are per sample at this input size.

    Returns:
        Fresh ChannelGroup objects (the caller may modify them): name, width, kind
        (``inside``/``outside``), prunable and reason, unit, members, and per channel the MACs and
        parameters its removal alone saves.

    Raises:
        CurlpruneError: ``model`` cannot be traced or fails on ``example_input``.

    Source: docs/method.md §1.
    """
    return [g.copy() for g in analyse(model, example_input).groups]


def plan_cost(model: nn.Module, example_input: Any, groups: Sequence[ChannelGroup], plan: Plan) -> tuple[int, int]:
    """(MACs per sample, params) of ``apply(model, groups, plan)`` at ``example_input``'s size.

    Analytic: nothing is built. The trace behind it is cached per model and input shape, so calling
    this many times (a MACs-target search) is cheap; it equals ``count(apply(model, groups, plan), x)``.

    Args:
        model: the unpruned model the groups were traced from.
        example_input: the input the groups were traced with (``[1, C, H, W]``).
        groups: ``trace(model, example_input)``.
        plan: group name -> sorted kept channel indices.

    Returns:
        ``(macs, params)``: multiply-accumulates of convs and linears per sample, and parameters.

    Raises:
        CurlpruneError: the plan is not valid for ``groups``.
    """
    validate_plan(groups, plan)
    removed = {key: len(positions) for key, positions in removed_positions(groups, plan).items()}
    return analyse(model, example_input).cost.total(removed)
