"""Channel-pass handlers of module calls (``call_module``).

Convs, transposed convs and linears create fresh output channels and consume their input channels
(depthwise and tied grouped convs pass them through in units of whole conv groups; a depthwise conv
with a channel multiplier k gives each input channel its k outputs); PixelShuffle/Unshuffle move
whole blocks of r*r channels; per-channel norms and PReLU
are ``channel`` members; activations, dropout and pooling pass channels through; cross-channel
norms and softmax over channels make them unprunable; any other module is unsupported.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from curlprune.graph.ops import (
    CHANNEL_NORMS,
    CROSS_CHANNEL_MODULES,
    SOFTMAX_MODULES,
    SPATIAL_MODULES,
    is_elementwise,
    norm_dim,
)
from curlprune.graph.pass_state import PassState
from curlprune.graph.shape_ops import flatten, pixel_shuffle
from curlprune.graph.slots import Layout


def call_module(st: PassState, node: fx.Node) -> None:
    """A module call: dispatch on the module type (unknown modules are unsupported)."""
    name = str(node.target)
    mod = st.modules[name]
    x = node.args[0] if node.args else None
    lay = st.layout(x)
    if st.shape(node) is None or lay is None:
        return st.unsupported(node)
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
        return conv(st, node, name, mod, lay)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd) and lay.dim == 1 and mod.groups == 1:
        out = st.fresh_layout(node, 1)  # weight [Cin, Cout, k...]: out on dim 1, in on dim 0
        st.add_source(st.sources, (name, "out"), 1, out.slots)
        st.add_source(st.sources, (name, "in"), 0, lay.slots)
        st.layouts[node] = out
        return None
    if isinstance(mod, nn.Linear):
        return linear(st, node, name, lay)
    if isinstance(mod, CHANNEL_NORMS) and lay.dim == 1:
        if mod.weight is not None or mod.running_mean is not None:
            st.add_source(st.sources, (name, "channel"), 0, lay.slots)
        st.layouts[node] = lay
        return None
    if isinstance(mod, nn.PReLU) and (mod.num_parameters == 1 or lay.dim == 1):
        if mod.num_parameters > 1:
            st.add_source(st.sources, (name, "channel"), 0, lay.slots)
        st.layouts[node] = lay
        return None
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
    if isinstance(mod, nn.LayerNorm):
        return st.layer_norm(node, lay, len(mod.normalized_shape), f"LayerNorm at {name}")
    if isinstance(mod, CROSS_CHANNEL_MODULES):
        return st.cross_channel(node, lay, f"{type(mod).__name__} at {name}")
    if isinstance(mod, nn.modules.padding._ConstantPadNd) and len(mod.padding) // 2 < len(st.shape(x)) - lay.dim:
        st.layouts[node] = lay
        return None
    return st.unsupported(node, f"unsupported module {type(mod).__name__} at {name}")


def conv(st: PassState, node: fx.Node, name: str, mod: nn.Module, lay: Layout) -> None:
    """A conv: fresh output channels (depthwise/tied grouped: the input's, in units), input consumed."""
    if lay.dim != 1:
        return st.unsupported(node, f"conv {name} reads a tensor whose channels are not on dim 1")
    cin, cout, groups = mod.in_channels, mod.out_channels, mod.groups
    if groups == 1:
        out = st.fresh_layout(node, 1)
        st.add_source(st.sources, (name, "out"), 0, out.slots)
        st.add_source(st.sources, (name, "in"), 1, lay.slots)
    elif cin == cout:
        # depthwise (or grouped with as many in as out channels per conv group): out i is in i
        out = lay
        st.add_source(st.sources, (name, "out"), 0, out.slots)
        if cin // groups > 1:
            st.units.append((name, cin // groups, out.slots))
    elif groups == cin and cout % cin == 0:
        # depthwise with a channel multiplier k: input channel i owns outputs i*k .. i*k+k-1
        k = cout // cin
        out = Layout(1, [s for s in lay.slots for _ in range(k)])
        st.add_source(st.sources, (name, "out"), 0, out.slots)
    else:
        out = st.fresh_layout(node, 1)
        reason = f"grouped conv {name} (groups={groups}, {cin}->{cout} channels) cannot be sliced per channel"
        st.uf.mark(out.slots, reason)
        st.uf.mark(lay.slots, reason)
    st.layouts[node] = out
    return None


def linear(st: PassState, node: fx.Node, name: str, lay: Layout) -> None:
    """A linear over the last dim: fresh output channels, input channels consumed."""
    ndim = len(st.shape(node))
    if lay.dim != len(st.shape(node.args[0])) - 1:
        return st.unsupported(node, f"linear {name} reads a tensor whose channels are not its last dim")
    out = st.fresh_layout(node, ndim - 1)
    st.add_source(st.sources, (name, "out"), 0, out.slots)
    st.add_source(st.sources, (name, "in"), 1, lay.slots)
    st.layouts[node] = out
    return None
