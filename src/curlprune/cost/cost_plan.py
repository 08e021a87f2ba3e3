"""Analytic cost of a Plan: MACs and parameters of the sliced model, without building it.

Convention (the paper's): MACs are the multiply-accumulates of convs and linears, per sample:
a conv costs ``Cout * Cin/groups * kH*kW * Hout*Wout`` (a depthwise conv ``C * k*k * H*W``), a
transposed conv ``Cin * Cout/groups * kH*kW * Hin*Win``, a linear
``in * out`` per position it is applied at (1 for a classifier). Params are every parameter the
traced model uses (conv, linear, norm weights and biases, ``get_attr`` parameters such as ConvNeXt's
layer scale); BN running statistics are buffers, not parameters.

Every cost is a sum of terms ``factor * prod(size_k - removed_k)``, where ``removed_k`` is how many
positions a plan removes from one member slice ``(module, role)``. The terms are built from what
``cost.count``'s own mode measured on every traced node (``graph.propagate``), refined into sliced
terms where a layer rule states them (``graph.layers``: each rule's ``cost``), so ``plan_cost`` equals
``count(apply(model, groups, plan), x)`` for every op count counts (transposed convs, functional
convs/linears and attention included), and is cheap enough for a target search
(``curlprune.cost.analysis.plan_cost`` evaluates it on the cached analysis).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from curlprune.channels import ChannelGroup, SliceKey
from curlprune.graph.layers import rule_for
from curlprune.graph.op_cost import CostTerm
from curlprune.graph.reparam import map_param_terms, stable
from curlprune.graph.shapes import Propagated
from curlprune.graph.tracing import fetch_attr


@dataclass
class CostTable:
    """All cost terms of one traced model at one input size, indexed by the slices they depend on."""

    terms: list[CostTerm]
    by_key: dict[SliceKey, list[int]] = field(default_factory=dict)
    mismatched: list[str] = field(default_factory=list)  # modules whose sliced terms disagreed with the measured MACs

    def __post_init__(self) -> None:
        for i, term in enumerate(self.terms):
            for key in {key for _, key in term.sizes} | ({term.gone_with} if term.gone_with is not None else set()):
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


def build_cost_table(gm: fx.GraphModule, found: Propagated, param_dims: Mapping[str, int]) -> CostTable:
    """Cost terms of every node, from what ``cost.count``'s mode measured on it during the trace.

    So the table at full width is ``count`` by construction, whatever ops count learns. A call of a
    module with a layer rule (``graph.layers``: convs, linears, norms, registered layers) and the
    ``get_attr`` parameters in ``param_dims`` get sliced terms, the rule's terms only where their MACs
    equal the measured ones; any other measured cost is a constant term (the channel pass leaves its
    channels unprunable). Each parameter is counted once, by identity, whichever modules
    or ops use it (tied weights).

    Args:
        gm: the traced model.
        found: ``graph.propagate``'s record: shapes, per-node MACs (whole batch) and parameters.
        param_dims: ``get_attr`` target -> the dim a channel group slices.

    Returns:
        The CostTable; ``mismatched`` names the modules whose sliced terms disagreed with the measured
        MACs (counted as measured, constant; the analysis makes their groups unprunable).

    Source: docs/method.md §8 (the MACs convention).
    """
    modules = dict(gm.named_modules())
    terms: list[CostTerm] = []
    mismatched: list[str] = []
    attr_terms: dict[int, CostTerm] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in param_dims:
            param = fetch_attr(gm, str(node.target))
            if isinstance(param, nn.Parameter) and param.dim() > 0:
                d, name = param_dims[str(node.target)], str(node.target)
                attr_terms[id(param)] = CostTerm(False, param.numel() // param.shape[d], ((param.shape[d], (name, "param")),))
    counted: set[int] = set()
    for node in gm.graph.nodes:
        macs = found.node_macs.get(node, 0) // found.batch
        structured: list[CostTerm] = []
        param_terms: dict[int, CostTerm] = {}
        rule = rule_for(modules[str(node.target)]) if node.op == "call_module" else None
        if rule is not None:  # MACs per sample: positions (leading dims included) // the example's batch
            shape = getattr(found.values.get(node), "shape", None)
            in_shape = getattr(found.values.get(node.args[0]), "shape", None) if node.args else None
            mod = modules[str(node.target)]
            with stable(mod):  # a reparametrised weight's terms go to the tensors that store it
                structured, param_terms = rule.cost(str(node.target), mod, in_shape, shape, found.batch)
                param_terms = map_param_terms(mod, param_terms)
        if structured and sum(t.value({}) for t in structured) == macs:
            terms.extend(structured)
        elif macs:
            terms.append(CostTerm(True, macs, ()))
            if structured:
                mismatched.append(str(node.target))
        for p in found.node_params.get(node, ()):
            if id(p) not in counted:
                counted.add(id(p))
                terms.append(attr_terms.get(id(p)) or param_terms.get(id(p)) or CostTerm(False, p.numel(), ()))
    return CostTable(terms, mismatched=mismatched)
