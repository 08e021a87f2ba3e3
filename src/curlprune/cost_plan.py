"""Analytic cost of a Plan: MACs and parameters of the sliced model, without building it.

Convention (the paper's): MACs are the multiply-accumulates of convs and linears, per sample:
a conv costs ``Cout * Cin/groups * kH*kW * Hout*Wout`` (a depthwise conv ``C * k*k * H*W``), a linear
``in * out`` per position it is applied at (1 for a classifier). Params are every parameter the
traced model uses (conv, linear, norm weights and biases, ``get_attr`` parameters such as ConvNeXt's
layer scale); BN running statistics are buffers, not parameters.

Every cost is a sum of terms ``factor * prod(size_k - removed_k)``, where ``removed_k`` is how many
positions a plan removes from one member slice ``(module, role)``. ``plan_cost`` therefore equals
``count(apply(model, groups, plan), x)`` exactly, and is cheap enough for a target search
(``curlprune.analysis.plan_cost`` evaluates it on the cached analysis).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from curlprune.channels import ChannelGroup, SliceKey
from curlprune.graph.ops import CHANNEL_NORMS
from curlprune.graph.tracing import fetch_attr


@dataclass(frozen=True)
class CostTerm:
    """``factor * prod(size - removed[key] for size, key in sizes)``; ``key`` None = never sliced."""

    macs: bool
    factor: int
    sizes: tuple[tuple[int, SliceKey], ...]

    def value(self, removed: Mapping[SliceKey, int]) -> int:
        total = self.factor
        for size, key in self.sizes:
            total *= size - removed.get(key, 0)
        return total


@dataclass
class CostTable:
    """All cost terms of one traced model at one input size, indexed by the slices they depend on."""

    terms: list[CostTerm]
    by_key: dict[SliceKey, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, term in enumerate(self.terms):
            for _, key in term.sizes:
                self.by_key.setdefault(key, []).append(i)

    def total(self, removed: Mapping[SliceKey, int]) -> tuple[int, int]:
        """(MACs, params) with ``removed[key]`` positions gone from each member slice."""
        macs = params = 0
        for term in self.terms:
            v = term.value(removed)
            if term.macs:
                macs += v
            else:
                params += v
        return macs, params

    def saving(self, removed: Mapping[SliceKey, int]) -> tuple[int, int]:
        """(MACs, params) saved by ``removed``, summing only the terms it touches."""
        touched = sorted({i for key in removed for i in self.by_key.get(key, ())})
        macs = params = 0
        for i in touched:
            term = self.terms[i]
            v = term.value({}) - term.value(removed)
            if term.macs:
                macs += v
            else:
                params += v
        return macs, params

    def channel_savings(self, group: ChannelGroup) -> tuple[list[float], list[float]]:
        """Per channel of ``group``: (MACs, params) saved by removing that channel alone."""
        macs: list[float] = []
        params: list[float] = []
        cache: dict[tuple[int, ...], tuple[int, int]] = {}
        for i in range(group.width):
            counts = tuple(len(m.index[i]) for m in group.members)
            if counts not in cache:
                removed: dict[SliceKey, int] = {}
                for m, c in zip(group.members, counts):
                    removed[(m.module, m.role)] = removed.get((m.module, m.role), 0) + c
                cache[counts] = self.saving(removed)
            m_, p_ = cache[counts]
            macs.append(float(m_))
            params.append(float(p_))
        return macs, params


def build_cost_table(gm: fx.GraphModule, values: Mapping[fx.Node, Any], param_dims: Mapping[str, int]) -> CostTable:
    """Cost terms of every conv/linear call and every parameter the graph uses.

    ``values`` are the shapes from shape propagation (``graph.TensorInfo``); ``param_dims`` gives
    the sliced dim of ``get_attr`` parameters that follow a channel group.
    """
    modules = dict(gm.named_modules())
    terms: list[CostTerm] = []
    counted: set[int] = set()  # ids of parameters already counted (shared modules/parameters)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[str(node.target)]
            shape = getattr(values.get(node), "shape", None)
            terms.extend(_module_terms(str(node.target), mod, shape, counted))
        elif node.op == "get_attr":
            param = fetch_attr(gm, str(node.target))
            if isinstance(param, nn.Parameter) and id(param) not in counted:
                counted.add(id(param))
                name = str(node.target)
                if name in param_dims and param.dim() > 0:
                    d = param_dims[name]
                    terms.append(CostTerm(False, param.numel() // param.shape[d], ((param.shape[d], (name, "param")),)))
                else:
                    terms.append(CostTerm(False, param.numel(), ()))
    return CostTable(terms)


def _module_terms(name: str, mod: nn.Module, out_shape: Sequence[int] | None, counted: set[int]) -> list[CostTerm]:
    """MACs of this call, plus the module's parameters the first time the module is seen."""
    macs, params = _structured_terms(name, mod, out_shape)
    own = list(mod.parameters())
    if any(id(p) in counted for p in own):  # called before (or shares its parameters): count once
        return macs
    counted.update(id(p) for p in own)
    if params is None:
        params = [CostTerm(False, p.numel(), ()) for p in own]
    return macs + params


def _structured_terms(name: str, mod: nn.Module, out_shape: Sequence[int] | None) -> tuple[list[CostTerm], list[CostTerm] | None]:
    """(MACs terms, params terms) of the module kinds whose tensors a plan slices; params None otherwise."""
    out_key, in_key, ch_key = (name, "out"), (name, "in"), (name, "channel")
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed and out_shape is not None:
        k = math.prod(mod.kernel_size)
        cout, cin, groups = mod.out_channels, mod.in_channels, mod.groups
        if groups == 1:
            sizes, per_out = ((cout, out_key), (cin, in_key)), k
        elif cin == cout:  # depthwise / grouped with tied in and out channels
            sizes, per_out = ((cout, out_key),), k * (cin // groups)
        else:  # other grouped convs are never sliced
            sizes, per_out = (), k * cout * (cin // groups)
        params = [CostTerm(False, per_out, sizes)]
        if mod.bias is not None:
            params.append(CostTerm(False, 1, ((cout, out_key),)) if sizes else CostTerm(False, cout, ()))
        return [CostTerm(True, per_out * math.prod(out_shape[2:]), sizes)], params
    if isinstance(mod, nn.Linear) and out_shape is not None:
        sizes = ((mod.out_features, out_key), (mod.in_features, in_key))
        params = [CostTerm(False, 1, sizes)]
        if mod.bias is not None:
            params.append(CostTerm(False, 1, ((mod.out_features, out_key),)))
        return [CostTerm(True, math.prod(out_shape[1:-1]), sizes)], params
    per_channel = isinstance(mod, CHANNEL_NORMS) or (
        isinstance(mod, nn.PReLU) and mod.num_parameters > 1
    )
    if per_channel:
        return [], [CostTerm(False, 1, ((p.shape[0], ch_key),)) for p in mod.parameters(recurse=False)]
    return [], None
