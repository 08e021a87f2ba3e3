"""Channel-group discovery: which channels of a CNN must be removed together.

A package of passes over a torch.fx trace, one job per file (like torch.fx's own passes):

    tracing.py       CurlTracer, trace_graph (int-size splits iterated), symbolic_trace, fetch_attr, eval_mode
    concrete.py      ConcreteTracer: a trace against an example input, with guards (specialised graphs)
    capture.py       capture: symbolic trace, else specialised, else with untraceable modules kept whole
    shapes.py        the shape recording pass (TensorInfo; each node's cost measured as count does)
    slots.py         union-find over channel slots, channel layouts
    ops.py           the op tables and node helpers
    layer_rules.py   how a layer rule is written: Roles, LayerRule, ChannelMixing, PerChannel
    layers.py        the table of layer types: one rule per parameter-bearing layer, register_layer
    pass_state.py    the channel pass's state and shared moves
    module_ops.py    handlers of module calls (convs, linears, norms, ...)
    tensor_ops.py    handlers of functions and methods (binary ops, cat, pad, ...)
    shape_ops.py     handlers of dim moves (indexing, flatten, reshape, permute, reductions, split/chunk)
    taint.py         channel counts read as values (size(1), shape, numel): followed or blocked
    shared_params.py tied parameters: one tensor cut by several members is one set of channels
    reparam.py       reparametrised weights (weight norm, spectral norm, parametrizations)
    channel_pass.py  the pass itself: dispatch over the graph
    groups.py        from slot classes to ChannelGroups (members, units)
    op_cost.py       the per-op MACs/params counter (CostTerm, CostMode) of the shape pass and count

It only finds groups; their costs and the cached analysis (``trace``, ``analyse``, ``plan_cost``)
are in :mod:`curlprune.cost.analysis`, which sits above this package and the cost table.
"""
from curlprune.channels import ChannelGroup, Member, Plan, SliceKey
from curlprune.graph.capture import Capture, capture, capture_graph
from curlprune.graph.channel_pass import channel_pass
from curlprune.graph.groups import build_groups, node_channels
from curlprune.graph.layer_rules import ChannelMixing, LayerRule, PerChannel, Roles
from curlprune.graph.layers import CHANNEL_NORMS, register_layer, rule_for
from curlprune.graph.shapes import Propagated, TensorInfo, propagate, propagate_shapes
from curlprune.graph.tracing import CurlTracer, eval_mode, fetch_attr, symbolic_trace

__all__ = [
    "CHANNEL_NORMS",
    "Capture",
    "ChannelGroup",
    "ChannelMixing",
    "CurlTracer",
    "LayerRule",
    "Member",
    "PerChannel",
    "Plan",
    "Propagated",
    "Roles",
    "SliceKey",
    "TensorInfo",
    "build_groups",
    "capture",
    "capture_graph",
    "node_channels",
    "channel_pass",
    "eval_mode",
    "fetch_attr",
    "propagate",
    "propagate_shapes",
    "register_layer",
    "rule_for",
    "symbolic_trace",
]
