"""The analysis of one model: its channel groups with their costs, cached; and the cost of a Plan.

This layer sits above the group finder (:mod:`curlprune.graph`), the cost table
(:mod:`curlprune.cost.cost_plan`) and plan checking (:mod:`curlprune.surgery.surgery`) and joins them, so none of
those imports another that imports it back.

* ``trace(model, example_input) -> list[ChannelGroup]`` traces ``model`` with torch.fx (module
  leaves: torch.nn modules and torchvision's StochasticDepth), propagates shapes with
  ``example_input`` and returns the channel groups in topological order of their first member,
  with the MACs and parameters each channel's removal saves.
* ``plan_cost(model, example_input, groups, plan)`` is the (MACs, params) of the sliced model,
  analytic and cheap enough for a target search.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from curlprune.channels import ChannelGroup, Plan
from curlprune.cost.cost import count
from curlprune.cost.cost_plan import CostTable, build_cost_table
from curlprune.errors import CurlpruneError
from curlprune.graph import build_groups, capture, channel_pass, node_channels, propagate
from curlprune.graph.capture import TRACE_META, Capture, SpecialisedTraceWarning
from curlprune.graph.layers import table_version
from curlprune.surgery.surgery import removed_positions, validate_plan


@dataclass
class Analysis:
    """Everything one trace knows.

    gm:     the traced GraphModule; it shares the model's modules and its node names are the ones
            in ``ChannelGroup.nodes`` (for partial evaluation, e.g. by the KL criterion).
    groups: the channel groups (do not modify; ``trace`` returns copies).
    cost:   the cost table behind ``plan_cost`` and the per-channel savings.
    channels: fx node name -> (channel dim, (group index in ``groups``, group channel) per position)
            of the node's output (:func:`curlprune.graph.groups.node_channels`; the channel map of a feature).
    capture: how the graph was captured (:class:`curlprune.graph.capture.Capture`, without its graph):
            ``capture.specialised`` when torch.fx could not trace the model symbolically and it was
            traced against the example input (groups and costs hold at that input size).
    """

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    cost: CostTable
    channels: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    capture: Capture = field(default_factory=lambda: Capture(None))


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
        CurlpruneError: ``model`` is not an ``nn.Module``, cannot be traced (neither by torch.fx nor
            against ``example_input``), or fails on ``example_input``.

    Warns:
        SpecialisedTraceWarning: torch.fx cannot trace ``model`` symbolically, so it was traced against
            ``example_input``: the groups and costs hold at that input size (one line, how).

    Source: docs/method.md §1.
    """
    if not isinstance(model, nn.Module):
        raise CurlpruneError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs)
    key = (shapes, _fingerprint(model), table_version())  # a layer registered since: analysed again
    cached = _CACHE.get(model, {})
    if key in cached:
        return cached[key]
    gm = capture(model, inputs)  # symbolic, else specialised to example_input (graph.capture)
    how: Capture = gm.meta[TRACE_META]
    if how.specialised:
        warnings.warn(f"{type(model).__name__} was {how.summary()}", SpecialisedTraceWarning, stacklevel=3)
    found = propagate(gm, model, example_input)
    an = channel_pass(gm, found)
    groups = build_groups(an)
    param_dims = {module: src.dim for (module, role), src in an.sources.items() if role == "param"}
    cost = build_cost_table(gm, found, param_dims)
    for g in groups:  # a slice whose cost the table cannot follow exactly is not offered
        bad = sorted({m.module for m in g.members} & set(cost.mismatched))
        if g.prunable and bad:
            g.prunable, g.reason = False, f"the sliced cost of {bad[0]} differs from its measured cost"
    for g in groups:
        g.macs_per_channel, g.params_per_channel = cost.channel_savings(g)
    result = Analysis(gm, groups, cost, node_channels(an), how)
    _CACHE.setdefault(model, {})[key] = result
    return result


def traced_inputs(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[tuple[int, ...]] | None:
    """The input shapes ``model`` was traced with when it gave ``groups`` (same names and widths), from
    the analysis cache (a trace of another model of the same architecture counts too); None when no
    cached trace gave them or an input was no tensor.

    Args:
        model: the traced model.
        groups: the groups a ``trace(model, x)`` returned.
    Returns:
        One shape per positional input of that trace (``[(1, 3, 32, 32)]``), or None.
    """
    want = [(g.name, g.width) for g in groups]
    fingerprint = _fingerprint(model)
    entries = list(_CACHE.get(model, {}).items()) + [item for traced in list(_CACHE.values()) for item in traced.items()]
    for key, found in entries:
        if key[1] == fingerprint and [(g.name, g.width) for g in found.groups] == want and all(isinstance(s, tuple) for s in key[0]):
            return [tuple(s) for s in key[0]]
    return None


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


def model_cost_fn(model: nn.Module, example_input: torch.Tensor, groups: Sequence[ChannelGroup]) -> Callable[[Plan], tuple[float, float]]:
    """``plan -> (macs, params)`` of ``model`` sliced by the plan (analytic, no slicing).

    Args:
        model: the unpruned model.
        example_input: the input the groups were traced with (``[1, C, H, W]``).
        groups: ``trace(model, example_input)``.

    Returns:
        A cost function (memoised per plan) returning floats: MACs per sample and parameters.

    Raises:
        CurlpruneError: the analytic cost of the unpruned model differs from ``cost.count`` of it
            (a target search on numbers the engine cannot stand behind would report one
            compression and deliver another).
    """
    groups = list(groups)
    check_cost_exact(model, example_input)
    cache: dict[tuple, tuple[float, float]] = {}

    def cost(plan: Plan) -> tuple[float, float]:
        key = tuple(sorted((k, tuple(v)) for k, v in plan.items()))
        if key not in cache:
            macs, params = plan_cost(model, example_input, groups, plan)
            cache[key] = (float(macs), float(params))
        return cache[key]

    return cost


def check_cost_exact(model: nn.Module, example_input: Any) -> None:
    """Refuse (one line) a model whose analytic cost the engine cannot stand behind.

    The cost table is built from what ``count`` measures on each node, so its full-width total is
    ``count(model)``; a difference, or a conv/linear whose sliced terms disagree with its measured
    MACs, means an op or a shared parameter is not modelled, and a target search on those numbers
    would report one compression and deliver another.

    Args:
        model: the unpruned model.
        example_input: the input it is traced with (``[1, C, H, W]``).

    Raises:
        CurlpruneError: the analytic and measured costs differ.

    Source: docs/method.md §8 (the MACs convention).
    """
    analytic, measured = analyse(model, example_input).cost.total({}), count(model, example_input)
    mismatched = analyse(model, example_input).cost.mismatched
    if analytic != measured or mismatched:
        where = f" (at {', '.join(mismatched[:3])})" if mismatched else ""
        raise CurlpruneError(
            f"cannot select channels of {type(model).__name__} by cost: its analytic cost ({analytic[0]:,} MACs, "
            f"{analytic[1]:,} params) differs from its measured cost ({measured[0]:,} MACs, {measured[1]:,} params){where}, "
            "so an op or shared parameter is not modelled; please report the model"
        )


def check_pruned_cost(pruned: nn.Module, example_input: Any, expected: tuple[float, float]) -> None:
    """Refuse a pruned model whose measured cost is not the cost the selection computed.

    ``plan_cost`` equals ``count(apply(plan))`` by construction; this check after ``apply`` catches a
    plan-dependent fault that :func:`check_cost_exact` on the unpruned model cannot see.

    Args:
        pruned: ``apply(model, groups, plan)``.
        example_input: the input the groups were traced with (``[1, C, H, W]``).
        expected: ``(MACs, params)`` the selection reported for the plan (``plan_cost``).

    Raises:
        CurlpruneError: ``count(pruned)`` differs from ``expected`` (one line).

    Source: docs/method.md §8.
    """
    macs, params = count(pruned, example_input)
    want = (round(expected[0]), round(expected[1]))
    if (macs, params) != want:
        raise CurlpruneError(
            f"the pruned {type(pruned).__name__} costs {macs:,} MACs and {params:,} params, but the selection "
            f"computed {want[0]:,} MACs and {want[1]:,} params; the pruned model was not saved; please report the model"
        )
