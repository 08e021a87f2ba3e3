"""The pruned model as the user's own class: their module object with smaller layers in place.

``surgery.apply`` returns a ``torch.fx.GraphModule``, the reference: it runs the traced graph, so it
can change anything the plan touches, also a channel zero-pad written in the forward. Most users
want their own object back (``isinstance``, their methods and attributes, their forward, the same
``state_dict`` keys), as Torch-Pruning gives it. :func:`slice_model` makes it: a deep copy of the
model whose members are sliced in place by the same per-member function as the GraphModule
(:func:`curlprune.surgery.surgery.slice_member`: every layer with a rule in ``graph/layers.py`` gets its
tensors sliced and its width attributes set, ``in_channels``, ``num_features``, ``in_features``,
``groups``, ...), then proven equal to the GraphModule on the example input and on a seeded random
input of its shape (the masked == sliced check's tolerance, relative error below 1e-4).

A channel zero-pad (``F.pad`` along the channels, such as the CIFAR ResNets' option-A shortcuts)
is no layer: the GraphModule changes the pad's amounts in its graph; the copy asks the module whose
forward pads to do it, through its method ``shrink_channel_pad(front, back)`` (the numbers of zero
channels fewer to add before and after; ``models.cifar.ZeroPadShortcut`` has it). Where the user's
forward cannot run with smaller layers (a channel count written as a constant, a functional op with
a fixed-size tensor, a channel pad whose module has no such method), or its outputs differ, the
GraphModule is returned instead with the reason in one line (:class:`Sliced.reason`, a
:class:`KeepClassWarning`).

Source: docs/method.md §1 (members, slicing).
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from curlprune.cost.analysis import traced_inputs
from curlprune.channels import ChannelGroup, Plan
from curlprune.errors import exception_summary
from curlprune.graph.capture import inherit_trace
from curlprune.surgery.surgery import apply as apply_graph
from curlprune.surgery.surgery import members_by_module, removed_positions, retie, slice_member, split_sizes, tied_parameters

__all__ = ["KeepClassWarning", "Sliced", "TOLERANCE", "apply", "slice_model"]

TOLERANCE = 1e-4
"""Largest relative error ``max|kept - graph| / max|graph|`` accepted (the masked == sliced check's)."""


class KeepClassWarning(UserWarning):
    """The pruned model could not keep the user's class; the message says why (one line)."""


@dataclass
class Sliced:
    """A sliced model and what it is.

    model:      the model to use: the user's class (a deep copy with smaller layers) when ``kept``,
                else ``graph``.
    graph:      the sliced ``torch.fx.GraphModule`` (the reference).
    kept:       whether ``model`` is of the user's class.
    reason:     why it is not (one line); "" when kept.
    class_name: the user's model class (``type(model).__qualname__`` of the unpruned model).
    """

    model: nn.Module
    graph: fx.GraphModule
    kept: bool
    reason: str
    class_name: str

    def as_dict(self) -> dict[str, Any]:
        """``{"class": ..., "kept": ..., "reason": ...}``: what ``report.json`` records as ``model_class``."""
        return {"class": self.class_name, "kept": self.kept, "reason": self.reason}


def slice_model(model: nn.Module, groups: Sequence[ChannelGroup], plan: Plan, *, keep_class: bool = True,
                example_input: Any = None) -> Sliced:
    """Slice ``model`` by ``plan``, keeping its class where its forward allows it.

    Args:
        model: the unpruned model the groups were traced from (not changed).
        groups: its channel groups (``curlprune.trace``).
        plan: group name -> kept channel indices.
        keep_class: False: the GraphModule, as ``curlprune.surgery.surgery.apply`` gives it.
        example_input: the input to prove the kept model equal to the GraphModule on (a tensor
            ``[N, C, H, W]`` or a tuple of positional inputs); None: the input shape of the
            ``trace`` that gave ``groups`` (a seeded random input of it).

    Returns:
        A :class:`Sliced`; ``model`` is the user's class when ``kept``, else the GraphModule and
        ``reason`` says why.

    Raises:
        CurlpruneError: the plan is invalid or the groups come from another model (as ``apply``).

    Source: docs/method.md §1.
    """
    graph = apply_graph(model, groups, plan)
    name = type(model).__qualname__
    if not keep_class:
        return Sliced(graph, graph, False, "keep_class=False", name)
    small, reason = _slice_copy(model, groups, plan, graph)
    if not reason:
        inputs = _inputs(model, groups, example_input)
        reason = _differs(small, graph, inputs, name) if inputs else (
            "no example input to prove the kept class equal to the sliced graph: pass example_input")
    if reason:
        return Sliced(graph, graph, False, reason, name)
    inherit_trace(small, model)  # a model fx cannot trace: traced again against the same example input
    return Sliced(small, graph, True, "", name)


def apply(model: nn.Module, groups: Sequence[ChannelGroup], plan: Plan, *, keep_class: bool = True,
          example_input: Any = None) -> nn.Module:
    """A new, physically smaller model with the channels ``plan`` removes sliced away.

    By default the user's own class (a deep copy of ``model`` with smaller layers: ``isinstance``,
    methods, attributes and ``state_dict`` keys are kept), proven equal to the sliced
    ``torch.fx.GraphModule``; where it cannot be (see :func:`slice_model`), that GraphModule, with a
    :class:`KeepClassWarning` saying why. ``model`` itself is not changed.

    Args:
        model: the model the groups were traced from.
        groups: its channel groups (``trace``).
        plan: group name -> kept channel indices.
        keep_class: False: always the GraphModule (``curlprune.surgery.surgery.apply``).
        example_input: the input the kept class is checked on (default: the traced input's shape).

    Returns:
        The sliced model, in the same train/eval modes as ``model``.

    Raises:
        CurlpruneError: the plan is invalid or the groups were traced from another model.

    Source: docs/method.md §1.
    """
    sliced = slice_model(model, groups, plan, keep_class=keep_class, example_input=example_input)
    if keep_class and not sliced.kept:
        warnings.warn(fallback_message(sliced), KeepClassWarning, stacklevel=2)
    return sliced.model


def fallback_message(sliced: Sliced) -> str:
    """One line: the pruned model is a GraphModule, not the user's class, and why."""
    return f"the pruned model is a torch.fx.GraphModule, not {sliced.class_name}: {sliced.reason}"


def _slice_copy(model: nn.Module, groups: Sequence[ChannelGroup], plan: Plan, graph: fx.GraphModule) -> tuple[nn.Module, str]:
    """A deep copy of ``model`` with every module and get_attr member sliced, and every channel
    zero-pad shrunk by the module that pads (``shrink_channel_pad``); the reason when one cannot be
    (also a channel split whose parts the plan shrinks to unequal sizes, or a constant channel range
    the plan moves: the user's forward would cut at the old places)."""
    small = copy.deepcopy(model)
    shared = tied_parameters(small)
    by_module = members_by_module(removed_positions(groups, plan))
    try:
        pads = {name: roles for name, roles in by_module.items() if not slice_member(small, name, roles, groups)}
    except (AttributeError, KeyError, IndexError, RuntimeError) as exc:
        return small, f"its members cannot be sliced in place ({exception_summary(exc)})"
    owners = {n.name: [path for path, _ in (n.meta.get("nn_module_stack") or {}).values()] for n in graph.graph.nodes}
    for name, roles in pads.items():
        if any(role.startswith("part") for role in roles):
            full, kept, _ = split_sizes(name, roles, groups)
            if len(set(kept)) > 1:  # equal parts: a chunk of the new width still cuts there (checked after)
                return small, (f"its forward cuts the channels into parts of {list(full)} (graph node {name}, a split/chunk) and the "
                               f"plan keeps {list(kept)} of them; only the traced graph can cut at the new sizes")
            continue
        if any(role.startswith("select") for role in roles):
            return small, (f"its forward takes a constant channel range (graph node {name}, x[:, a:b]) that the plan moves; "
                           "only the traced graph can move its bounds")
        owner = owners.get(name, [])[-1:]
        padder = small.get_submodule(owner[0]) if owner else None
        if not callable(getattr(padder, "shrink_channel_pad", None)):
            return small, (f"its forward zero-pads channels by a fixed amount (graph node {name}, e.g. an option-A shortcut), "
                           "which only the traced graph can change (or give the padding module a shrink_channel_pad(front, back) method)")
        padder.shrink_channel_pad(len(roles.get("pad_front", ())), len(roles.get("pad_back", ())))
    retie(shared)
    return small, ""


def _inputs(model: nn.Module, groups: Sequence[ChannelGroup], example_input: Any) -> list[tuple]:
    """The inputs to compare on: the example itself and a seeded random input of each shape, of the
    example's floating dtype (else the model's: a float64 model is checked in float64)."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    if example_input is not None:
        given = example_input if isinstance(example_input, tuple) else (example_input,)
        tensors = all(isinstance(t, torch.Tensor) for t in given)
        specs = [(tuple(t.shape), t.dtype if t.is_floating_point() else dtype) for t in given] if tensors else None
        out = [given]
    else:
        shapes, out = traced_inputs(model, groups), []
        specs = [(s, dtype) for s in shapes] if shapes is not None else None
    if specs is not None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        out.append(tuple(torch.randn(s, generator=g).to(device=device, dtype=dt) for s, dt in specs))
    return out


def _differs(small: nn.Module, graph: nn.Module, inputs: list[tuple], name: str) -> str:
    """Why ``small`` is not ``graph`` (its forward fails, other outputs, other state_dict), or ""."""
    want = {k: tuple(v.shape) for k, v in graph.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    if want != have:
        key = sorted(set(want) ^ set(have)) or [k for k in sorted(want) if want[k] != have[k]]
        return f"its state_dict differs from the sliced graph's (at {key[0]})"
    modes = [(m, m.training) for m in list(small.modules()) + list(graph.modules())]
    try:
        small.eval(), graph.eval()
        with torch.no_grad():
            for x in inputs:
                error = _relative_error(small(*x), graph(*x))
                if error is None:
                    return "its outputs are not those of the sliced graph (other structure)"
                if not error < TOLERANCE:
                    return f"its outputs differ from the sliced graph's (relative error {error:.2g}; a fixed channel count in its forward?)"
    except Exception as exc:  # the user's forward with smaller layers: anything may go wrong
        return f"{name}'s forward fails with the smaller layers ({exception_summary(exc)}; a channel count written as a constant?)"
    finally:
        for m, training in modes:
            m.training = training
    return ""


def _relative_error(a: Any, b: Any) -> float | None:
    """``max|a - b| / max|b|`` over every tensor of two outputs of one structure; None when they differ in structure."""
    left, spec_a = tree_flatten(a)
    right, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return None
    worst = 0.0
    for x, y in zip(left, right):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return None
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape:
            return None
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        scale = float(y.abs().max()) if y.numel() else 0.0
        diff = float((x - y).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
