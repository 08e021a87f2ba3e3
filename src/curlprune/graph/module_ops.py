"""Channel-pass handlers of module calls (``call_module``).

A layer with a rule in the layer table (``layers``: convs, linears, norms, PReLU, registered
layers) does what its rule's ``Roles`` say: fresh output channels with the input's consumed, or the
input's channels passed through, with the member slices the groups own. Of the other modules,
PixelShuffle/Unshuffle move whole blocks of r*r channels; activations, dropout and pooling pass
channels through; cross-channel ops and softmax over channels make them unprunable; any other
module is unsupported, and so is a module the trace kept whole (``graph.capture``'s opaque leaves).
"""
from __future__ import annotations

import dataclasses

import torch.fx as fx
from torch import nn

from curlprune.graph.capture import TRACE_META
from curlprune.graph.layer_rules import Roles, unsupported_module
from curlprune.graph.layers import rule_for
from curlprune.graph.ops import (
    CROSS_CHANNEL_MODULES,
    SOFTMAX_MODULES,
    SPATIAL_MODULES,
    is_elementwise,
    norm_dim,
)
from curlprune.graph.pass_state import PassState
from curlprune.graph.reparam import reparam_problem
from curlprune.graph.shape_ops import flatten, pixel_shuffle
from curlprune.graph.slots import Layout


def call_module(st: PassState, node: fx.Node) -> None:
    """A module call: dispatch on the module type (unknown modules are unsupported)."""
    name = str(node.target)
    mod = st.modules[name]
    opaque = getattr(st.gm.meta.get(TRACE_META), "opaque", {})
    if name in opaque:  # a submodule the trace could not enter (graph.capture): kept whole
        return st.unsupported(node, opaque[name])
    x = node.args[0] if node.args else None
    lay = st.layout(x)
    if st.shape(node) is None or lay is None:
        return st.unsupported(node)
    rule = rule_for(mod)
    if rule is not None:
        roles = rule.roles(mod, name, lay.dim, st.shape(x), st.shape(node))
        problem = reparam_problem(mod, name)  # spectral norm, orthogonal, ...: kept whole (graph.reparam)
        if problem and isinstance(roles, Roles) and not roles.unprunable:
            roles = dataclasses.replace(roles, unprunable=problem)
        return st.unsupported(node, roles) if isinstance(roles, str) else layer_call(st, node, name, lay, roles)
    if is_elementwise(mod):
        st.layouts[node] = lay
        return None
    if isinstance(mod, SPATIAL_MODULES) and lay.dim == 1 and not getattr(mod, "return_indices", False):
        st.layouts[node] = lay
        return None
    if isinstance(mod, (nn.PixelShuffle, nn.PixelUnshuffle)) and lay.dim == 1:
        return pixel_shuffle(st, node, lay, mod.upscale_factor if isinstance(mod, nn.PixelShuffle) else -mod.downscale_factor)
    if isinstance(mod, nn.Flatten):
        return flatten(st, node, x, mod.start_dim, mod.end_dim)
    if isinstance(mod, SOFTMAX_MODULES):
        if mod.dim is not None and norm_dim(mod.dim, len(st.shape(x))) != lay.dim:
            st.layouts[node] = lay
            return None
        return st.cross_channel(node, lay, f"{type(mod).__name__} at {name}")
    if isinstance(mod, CROSS_CHANNEL_MODULES):
        return st.cross_channel(node, lay, f"{type(mod).__name__} at {name}")
    if isinstance(mod, nn.modules.padding._ConstantPadNd) and len(mod.padding) // 2 < len(st.shape(x)) - lay.dim:
        st.layouts[node] = lay
        return None
    return st.unsupported(node, unsupported_module(mod, name))


def layer_call(st: PassState, node: fx.Node, name: str, lay: Layout, roles: Roles) -> None:
    """Carry out a layer rule's ``Roles`` for one call: the output's channels and the member slices."""
    if roles.fresh:
        out = st.fresh_layout(node, norm_dim(roles.dim, len(st.shape(node))))
    elif roles.repeat > 1:
        out = Layout(lay.dim, [s for s in lay.slots for _ in range(roles.repeat)])
    else:
        out = lay
    for role, dim in roles.members:
        st.add_source(st.sources, (name, role), dim, lay.slots if role == "in" else out.slots)
    if roles.unit > 1:
        st.units.append((name, roles.unit, out.slots))
    if roles.unprunable:
        st.uf.mark(out.slots, roles.unprunable)
        st.uf.mark(lay.slots, roles.unprunable)
    if roles.unprunable_in:
        st.uf.mark(lay.slots, roles.unprunable_in)
    st.layouts[node] = out
    return None
