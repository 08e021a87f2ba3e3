"""The channel pass: one walk over the traced graph that ties channel slots together.

Every channel position of every traced tensor is a slot in a union-find. Convs and linears create
fresh output slots; per-channel ops (BN, activations, pooling, ...) pass the slots through; residual
adds, squeeze-excitation scales, depthwise convs, concatenation, channel zero-padding and flatten
tie slots together. Any op that mixes channels other than a conv or linear, or that the op tables
do not know, makes the channels it touches unprunable with a reason, so a plan can never silently
build a wrong model. This module only dispatches: the per-op semantics are in ``module_ops``
(module calls), ``tensor_ops`` (functions and methods) and ``shape_ops`` (dim moves).

Source: docs/method.md §1.
"""
from __future__ import annotations

import torch.fx as fx

from curlprune.graph.concrete import check_specialised
from curlprune.graph.module_ops import call_module
from curlprune.graph.ops import op_name
from curlprune.graph.pass_state import PassState
from curlprune.graph.shapes import Propagated
from curlprune.graph.shared_params import tie_shared_parameters
from curlprune.graph.taint import check_followed, check_taint, tainted_args
from curlprune.graph.tensor_ops import call_op


def channel_pass(gm: fx.GraphModule, found: Propagated) -> PassState:
    """Run the channel pass over ``gm``.

    After the walk, members that cut one shared tensor are united (``shared_params``) and channel
    counts used as shapes are checked against the channels they shape (``taint``).

    Args:
        gm: the traced model (``symbolic_trace``).
        found: every node's recorded shape/value and the parameters its calls used (``propagate``).

    Returns:
        The final ``PassState``: the union-find of slots, each tensor node's channel layout and the
        member slices (``sources``, ``node_sources``, grouped-conv ``units``) that ``build_groups``
        turns into ChannelGroups.
    """
    st = PassState(gm, found.values)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = st.shape(node)
            if shape is not None and len(shape) >= 2:
                lay = st.fresh_layout(node, 1)
                st.uf.mark(lay.slots, "model input")
                st.layouts[node] = lay
        elif node.op == "call_module":
            call_module(st, node)
            check_taint(st, node, None)
        elif node.op == "call_function" and node.target is check_specialised:
            specialised_on(st, node)
        elif node.op in ("call_function", "call_method"):
            call_op(st, node)
            check_taint(st, node, op_name(node))
        elif node.op == "output":
            check_taint(st, node, None)
            for n in st.tensor_inputs(node):
                if (lay := st.layout(n)) is not None:
                    st.uf.mark(lay.slots, "feeds the model output")
    tie_shared_parameters(st, found.node_params)
    check_followed(st)
    return st


def specialised_on(st: PassState, node: fx.Node) -> None:
    """A guard of a trace specialised to its example input (``graph.concrete``): the traced forward
    branched on (or read as a Python number) this value. A channel count there would branch another
    way, or keep its old value, once channels are removed, so its channels become unprunable."""
    for slots, read in tainted_args(st, node):
        st.uf.mark(slots, f"channel count read at {read} is fixed by the trace at {node.args[2]}")
