"""Channel-pass handlers of functions and tensor methods (``call_function`` / ``call_method``).

Per-channel ops pass the channels through; broadcasting binary ops tie operands carrying the whole
channel dim (residual adds mark the channels ``outside``, ``get_attr`` parameters become members),
``cat`` concatenates or ties channels, a zero pad of the channel dim adds fresh channels whose
owners are node members, and anything unknown makes the channels it touches unprunable.
"""
from __future__ import annotations

import builtins
import operator

import torch.fx as fx

from curlprune.graph.ops import (
    BINARY_OPS,
    REDUCE_OPS,
    RESIDUAL_OPS,
    SHAPE_QUERIES,
    SOFTMAX_OPS,
    SPATIAL_OPS,
    UNARY_OPS,
    DTYPE_ONLY_OPS,
    TENSOR_ARG_OPS,
    arg,
    norm_dim,
    op_name,
    where,
)
from curlprune.graph.pass_state import PassState
from curlprune.graph.shape_ops import (
    PARAM_VIEW_OPS,
    SPLIT_OPS,
    expand,
    flatten,
    getitem,
    move_dims,
    param_view,
    pixel_shuffle,
    reduce,
    reshape,
    split,
)
from curlprune.graph.slots import Layout
from curlprune.graph.taint import record_shape_value

_MOVES = {
    "flatten", "view", "reshape", "expand", "expand_as", "broadcast_to", "pixel_shuffle", "pixel_unshuffle",
    "permute", "transpose", "swapaxes", "unsqueeze", "squeeze", "pad",
}
_HANDLED = UNARY_OPS | SPATIAL_OPS | REDUCE_OPS | SOFTMAX_OPS | _MOVES
"""The ops ``call_op`` follows with one tensor input (others are unsupported whatever their arguments)."""


def call_op(st: PassState, node: fx.Node) -> None:
    """A function or tensor-method call: dispatch on the op name (``ops`` tables)."""
    name = op_name(node)
    if st.shape(node) is None:
        # a non-tensor result: shape queries are harmless (their uses are checked: graph.taint),
        # anything else reading channels is not
        record_shape_value(st, node, name)
        if name in SPLIT_OPS and st.layout(node.args[0] if node.args else None) is not None:
            return split(st, node, node.args[0], st.layout(node.args[0]))
        if name in SHAPE_QUERIES or node.target in (builtins.getattr, operator.getitem) or not any(
            st.layout(n) is not None for n in st.tensor_inputs(node)
        ):
            return None
        return st.unsupported(node)
    x = node.args[0] if node.args else None
    lay = st.layout(x)
    if name == "getitem" and x in st.part_layouts and isinstance(node.args[1], int):
        st.layouts[node] = st.part_layouts[x][node.args[1]]
        return None
    if name in BINARY_OPS:
        return binary(st, node, name)
    if name == "getitem" and lay is not None:
        return getitem(st, node, x, lay)
    if name in ("cat", "concat", "concatenate"):
        return cat(st, node)
    if name in ("matmul", "bmm") and len(node.args) == 2:
        return matmul(st, node, *node.args)
    if lay is None and name in PARAM_VIEW_OPS and isinstance(x, fx.Node) and param_view(st, node, x):
        return None
    if lay is None:
        return st.unsupported(node)
    extra = [n for n in st.tensor_inputs(node) if n is not x]
    if extra and name in UNARY_OPS and name not in DTYPE_ONLY_OPS:
        # tensor-valued arguments (clamp bounds, ...) are operands: tied or sliced with the channels
        return binary(st, node, name, [x, *extra])
    if extra and name in _HANDLED and name not in TENSOR_ARG_OPS:
        return st.unsupported(node, f"{name} with a tensor argument ({extra[0].name}) at {where(node)}")
    if name in UNARY_OPS:
        st.layouts[node] = lay
        return None
    if name in SPATIAL_OPS and lay.dim == 1:
        st.layouts[node] = lay
        return None
    if name in REDUCE_OPS:
        return reduce(st, node, x, lay)
    if name == "flatten":
        return flatten(st, node, x, arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1))
    if name in ("view", "reshape"):
        return reshape(st, node, x, lay)
    if name in ("expand", "expand_as", "broadcast_to"):
        return expand(st, node, x, lay)
    if name in ("pixel_shuffle", "pixel_unshuffle") and lay.dim == 1:
        r = st.value(arg(node, 1, "upscale_factor" if name == "pixel_shuffle" else "downscale_factor"))
        return pixel_shuffle(st, node, lay, r if name == "pixel_shuffle" else -r)
    if name in ("permute", "transpose", "swapaxes", "unsqueeze", "squeeze"):
        return move_dims(st, node, name, x, lay)
    if name == "pad":
        return pad(st, node, x, lay)
    if name in SOFTMAX_OPS:
        dim = arg(node, 1, "dim", 1 if name == "normalize" else None)
        if dim is not None and norm_dim(st.value(dim), len(st.shape(x))) != lay.dim:
            st.layouts[node] = lay
            return None
        return st.cross_channel(node, lay, f"{name} at {where(node)}")
    if name in ("layer_norm", "rms_norm"):  # the functional forms: eps is no module attribute a slice could rescale
        return st.layer_norm(node, lay, len(st.value(arg(node, 1, "normalized_shape"))), f"{name} at {where(node)}")
    if name in ("group_norm", "local_response_norm"):
        return st.cross_channel(node, lay, f"{name} at {where(node)}")
    return st.unsupported(node)


def binary(st: PassState, node: fx.Node, name: str, operands: list | None = None) -> None:
    """Broadcasting elementwise op: operands carrying the full channel dim are tied; a parameter
    read directly (``get_attr``) is sliced with them; any other operand that varies along the channel
    dim makes them unprunable.

    ``operands``: the tensors combined (default: the two operands of a binary op)."""
    out_shape = st.shape(node)
    ndim = len(out_shape)
    if operands is None:
        operands = list(node.args[:2])
        if len(operands) < 2:
            operands.append(node.kwargs.get("other", node.kwargs.get("exponent")))
    laid = [(a, st.layout(a)) for a in operands if st.layout(a) is not None]
    dims = {lay.dim + ndim - len(st.shape(a)) for a, lay in laid}
    if len(dims) != 1:
        return st.unsupported(node)
    dim = dims.pop()
    width = out_shape[dim]
    full = [lay for a, lay in laid if len(lay.slots) == width]
    if not full:
        return st.unsupported(node)
    out = Layout(dim, full[0].slots)
    for a, lay in laid:
        if len(lay.slots) == width:
            st.uf.union_all(out.slots, lay.slots)
        else:
            st.uf.mark(lay.slots, f"broadcast across channels at {where(node)}")
    for a in operands:
        shape = st.shape(a)
        if shape is None or st.layout(a) is not None:
            continue
        op_dim = dim - (ndim - len(shape))
        if op_dim < 0 or shape[op_dim] == 1:
            continue
        if a.op == "get_attr":  # a parameter/buffer used directly, e.g. ConvNeXt's layer_scale
            st.add_source(st.sources, (str(a.target), "param"), op_dim, out.slots)
        elif a in st.param_views and st.param_views[a][2] == op_dim:  # reshaped first (LayerScale2d)
            target, param_dim, _ = st.param_views[a]
            st.add_source(st.sources, (target, "param"), param_dim, out.slots)
        else:
            st.uf.mark(out.slots, f"combined with an untracked tensor at {where(node)}")
    if name in RESIDUAL_OPS and len(full) >= 2:
        st.uf.mark_residual(out.slots)
    st.layouts[node] = out
    return None


def cat(st: PassState, node: fx.Node) -> None:
    """``torch.cat``: along the channel dim the channels concatenate, along another they are tied."""
    parts = arg(node, 0, "tensors")
    lays = st.part_layouts.get(parts) if isinstance(parts, fx.Node) else [st.layout(p) for p in parts]
    if lays is None:
        return st.unsupported(node)
    if any(lay is None for lay in lays) or len({lay.dim for lay in lays}) != 1:
        return st.unsupported(node)
    cdim = lays[0].dim
    dim = norm_dim(st.value(arg(node, 1, "dim", 0)), len(st.shape(node)))
    if dim == cdim:
        st.layouts[node] = Layout(cdim, [s for lay in lays for s in lay.slots])
        return None
    if len({len(lay.slots) for lay in lays}) != 1:
        return st.unsupported(node)
    for lay in lays[1:]:
        st.uf.union_all(lays[0].slots, lay.slots)
    st.layouts[node] = lays[0]
    return None


def pad(st: PassState, node: fx.Node, x: fx.Node, lay: Layout) -> None:
    """F.pad; zero-padding the channel dim (option-A shortcut) adds fresh zero channels."""
    amounts = list(st.value(arg(node, 1, "pad")))
    mode = st.value(arg(node, 2, "mode", "constant"))
    k = len(st.shape(x)) - 1 - lay.dim  # pair index of the channel dim
    if len(amounts) <= 2 * k:
        st.layouts[node] = lay
        return None
    front, back = amounts[2 * k], amounts[2 * k + 1]
    if front == back == 0:
        st.layouts[node] = lay
        return None
    if mode != "constant" or front < 0 or back < 0:
        return st.unsupported(node, f"{mode} pad of the channel dim at {where(node)}")
    front_slots, back_slots = st.uf.fresh(front), st.uf.fresh(back)
    from_end = lay.dim - len(st.shape(x))
    st.add_source(st.node_sources, (node.name, "pad_front"), from_end, front_slots)
    st.add_source(st.node_sources, (node.name, "pad_back"), from_end, back_slots)
    st.layouts[node] = Layout(lay.dim, front_slots + lay.slots + back_slots)
    return None


def matmul(st: PassState, node: fx.Node, a: object, b: object) -> None:
    """``a @ b`` that contracts only non-channel dims: GCNet's context ``x.reshape(B, 1, C, H*W) @
    attn`` (attn ``[B, 1, H*W, 1]``) sums over positions, so row ``c`` of the result is channel ``c``
    alone. Followed when the channels are the rows of ``a`` (its dim -2) and ``b`` carries no channels
    of more than one position (an attention map from a 1-channel conv, or a constant); anything
    else (channels contracted, or on both sides) mixes them."""
    la, lb = st.layout(a), st.layout(b)
    sa, sb, out = st.shape(a), st.shape(b), st.shape(node)
    if la is None or sa is None or sb is None or out is None or len(sa) < 2 or len(sb) < 2:
        return st.unsupported(node)
    if la.dim != len(sa) - 2:
        return st.unsupported(node, f"matmul over the channel dim at {where(node)}")
    if lb is not None and len(lb.slots) > 1:
        return st.unsupported(node, f"matmul of two tensors with channels at {where(node)}")
    st.layouts[node] = Layout(len(out) - 2, la.slots)
    return None
