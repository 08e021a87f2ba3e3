"""Channel-pass handlers of ops that move, merge or select dims: where the channels go.

Indexing, flatten, view/reshape (size-1 dims added or removed included), expand, pixel
(un)shuffle, permute/transpose/(un)squeeze and reductions keep every channel
as long as they do not cut, reduce or reshape the channel dim into a constant; otherwise the
channels they touch become unprunable with a reason.
"""
from __future__ import annotations

import math

import torch.fx as fx

from curlprune.graph.ops import arg, fmt_index, norm_dim, op_name, where
from curlprune.graph.pass_state import PassState
from curlprune.graph.slots import Layout


def getitem(st: PassState, node: fx.Node, x: fx.Node, lay: Layout) -> None:
    """Basic indexing that keeps every channel (e.g. ``x[:, :, ::2, ::2]``), or a contiguous range
    of channels given by constants (``out[:, :oup]`` after GhostNet's cat): a node member
    ``(node, "select<i>")`` over the input's channels, whose removed positions ``apply`` takes
    from the bounds of index entry ``i``."""
    index = st.value(node.args[1])
    index = index if isinstance(index, tuple) else (index,)
    literal = _literal_slices(node.args[1])
    in_shape = st.shape(x)
    slots = lay.slots
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:at] + (slice(None),) * (len(in_shape) - consumed) + index[at + 1:]
    in_dim = out_dim = 0
    new_dim = None
    for pos, item in enumerate(index):
        if item is None:
            out_dim += 1
            continue
        if in_dim == lay.dim:
            if not isinstance(item, slice) or range(*item.indices(in_shape[in_dim])) != range(in_shape[in_dim]):
                if not (literal and _plain_range(item)):
                    return st.unsupported(node, f"channel selection {fmt_index(item)} at {where(node)}")
                st.add_source(st.node_sources, (node.name, f"select{pos}"), lay.dim - len(in_shape), lay.slots)
                slots = lay.slots[item]
            new_dim = out_dim
        if isinstance(item, slice):
            out_dim += 1
        elif not isinstance(item, int):
            return st.unsupported(node)
        in_dim += 1
    if new_dim is None:
        new_dim = lay.dim - in_dim + out_dim
    st.layouts[node] = Layout(new_dim, slots)
    return None


def _literal_slices(index: object) -> bool:
    """Whether an index is written with constants only (no traced value: a bound computed from a
    size would change by itself in the pruned model) and without Ellipsis (entry positions fixed)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(
        item is None or isinstance(item, int)
        or (isinstance(item, slice) and all(b is None or type(b) is int for b in (item.start, item.stop, item.step)))
        for item in items
    )


def _plain_range(item: object) -> bool:
    """A slice ``[a:b]`` with step 1 and non-negative (or omitted) bounds."""
    return (
        isinstance(item, slice) and item.step in (None, 1)
        and all(b is None or b >= 0 for b in (item.start, item.stop))
    )


def reduce(st: PassState, node: fx.Node, x: fx.Node, lay: Layout) -> None:
    """mean/sum/amax/amin/norm/var/std over other dims keep the channels; over the channel dim they mix them."""
    ndim = len(st.shape(x))
    at = 2 if op_name(node) == "norm" else 1  # norm(input, p, dim, keepdim)
    keep_at = 3 if op_name(node) in ("var", "std") else at + 1  # var(input, dim, unbiased, keepdim)
    dims = st.value(arg(node, at, "dim"))
    if dims is None or isinstance(dims, bool):  # var(input, unbiased): over every dim
        return st.unsupported(node)
    dims = {norm_dim(d, ndim) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
    if lay.dim in dims:
        return st.unsupported(node, f"{op_name(node)} over the channel dim at {where(node)}")
    keepdim = st.value(arg(node, keep_at, "keepdim", node.kwargs.get("keepdims", False)))  # numpy's spelling too
    new_dim = lay.dim if keepdim else lay.dim - sum(1 for d in dims if d < lay.dim)
    st.layouts[node] = Layout(new_dim, lay.slots)
    return None


def flatten(st: PassState, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
    """Merging dims start..end: channel c owns the positions of its block (flatten -> linear)."""
    in_shape = st.shape(x)
    lay = st.layout(x)
    ndim = len(in_shape)
    start, end = norm_dim(st.value(start), ndim), norm_dim(st.value(end), ndim)
    if lay.dim < start or end <= start:
        st.layouts[node] = lay
        return None
    if lay.dim > end:
        st.layouts[node] = Layout(lay.dim - (end - start), lay.slots)
        return None
    if start == 0:
        return st.unsupported(node, f"flatten of the batch dim with channels at {where(node)}")
    outer = math.prod(in_shape[start:lay.dim])
    inner = math.prod(in_shape[lay.dim + 1:end + 1])
    slots = [s for _ in range(outer) for s in lay.slots for _ in range(inner)]
    st.layouts[node] = Layout(start, slots)
    return None


def shape_entries(node: fx.Node) -> list:
    """The requested shape of a view/reshape/expand/broadcast_to/repeat call, one entry per dim
    (ints, -1, or the nodes computing them)."""
    raw = list(node.args[1:]) if len(node.args) > 1 else [
        node.kwargs.get("shape", node.kwargs.get("size", node.kwargs.get("repeats")))
    ]
    if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
        raw = list(raw[0])
    return raw


def fixed_channel_entry(st: PassState, node: fx.Node, raw: list, pos: int) -> str:
    """Why entry ``pos`` of a requested shape, the one that holds the channels, would not follow a
    pruning (a constant, or a value not read from the channels), or "" (-1, or a followed count:
    ``graph.taint`` checks it is these channels' count)."""
    if len(raw) != len(st.shape(node)) or pos >= len(raw):
        return ""
    entry = raw[pos]
    what = "reshape" if op_name(node) in ("view", "reshape") else op_name(node)
    if isinstance(entry, fx.Node):
        if entry in st.taint:
            return ""
        value = st.value(entry)
        return f"{what} to a size {value!r} not read from the channels at {where(node)}"
    if isinstance(entry, int) and entry != -1:
        return f"{what} to a constant size {entry} over channels at {where(node)}"
    return ""


def reshape(st: PassState, node: fx.Node, x: fx.Node, lay: Layout) -> None:
    """view/reshape: identity, a flatten of adjacent dims or size-1 dims added/removed; the entry of
    the requested shape that holds the channels must be -1 or their count read at run time."""
    in_shape, out_shape = st.shape(x), st.shape(node)
    raw = shape_entries(node)
    if in_shape == out_shape:
        if problem := fixed_channel_entry(st, node, raw, lay.dim):
            return st.unsupported(node, problem)
        st.layouts[node] = lay
        return None
    for start in range(len(in_shape)):
        for end in range(start + 1, len(in_shape)):
            merged = in_shape[:start] + (math.prod(in_shape[start:end + 1]),) + in_shape[end + 1:]
            if merged != out_shape:
                continue
            pos = start if start <= lay.dim <= end else lay.dim if lay.dim < start else lay.dim - (end - start)
            if problem := fixed_channel_entry(st, node, raw, pos):
                return st.unsupported(node, problem)
            return flatten(st, node, x, start, end)
    real_in = [i for i, d in enumerate(in_shape) if d != 1]
    real_out = [i for i, d in enumerate(out_shape) if d != 1]
    if in_shape[lay.dim] != 1 and [in_shape[i] for i in real_in] == [out_shape[i] for i in real_out]:
        new_dim = real_out[real_in.index(lay.dim)]  # only size-1 dims added or removed
        if problem := fixed_channel_entry(st, node, raw, new_dim):
            return st.unsupported(node, problem)
        st.layouts[node] = Layout(new_dim, lay.slots)
        return None
    return st.unsupported(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} at {where(node)}")


def expand(st: PassState, node: fx.Node, x: fx.Node, lay: Layout) -> None:
    """expand/expand_as/broadcast_to: size-1 dims grow; the channel dim must keep its size."""
    in_shape, out_shape = st.shape(x), st.shape(node)
    new_dim = lay.dim + len(out_shape) - len(in_shape)
    if out_shape[new_dim] != in_shape[lay.dim]:
        return st.unsupported(node, f"broadcast across channels at {where(node)}")
    if op_name(node) in ("expand", "broadcast_to"):
        if problem := fixed_channel_entry(st, node, shape_entries(node), new_dim):
            return st.unsupported(node, problem)
    st.layouts[node] = Layout(new_dim, lay.slots)
    return None


def pixel_shuffle(st: PassState, node: fx.Node, lay: Layout, r: int) -> None:
    """PixelShuffle(r) (r > 0): input channels c*r^2 .. c*r^2+r^2-1 become output channel c, so they
    are one channel; PixelUnshuffle (r < 0): output channels c*r^2 .. are copies of input channel c."""
    r2 = r * r
    if r > 0:
        for c in range(len(lay.slots) // r2):
            block = lay.slots[c * r2:(c + 1) * r2]
            st.uf.union_all([block[0]] * (r2 - 1), block[1:])
        st.layouts[node] = Layout(1, lay.slots[::r2])
    else:
        st.layouts[node] = Layout(1, [s for s in lay.slots for _ in range(r2)])
    return None


def move_dims(st: PassState, node: fx.Node, name: str, x: fx.Node, lay: Layout) -> None:
    """permute/transpose/swapaxes/unsqueeze/squeeze: follow the channel dim to its new place."""
    in_ndim, out_ndim = len(st.shape(x)), len(st.shape(node))
    args = [st.value(a) for a in node.args[1:]] or list(st.value(list(node.kwargs.values())))
    if name == "permute":
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        new_dim = [norm_dim(d, in_ndim) for d in dims].index(lay.dim)
    elif name in ("transpose", "swapaxes"):
        a, b = (norm_dim(d, in_ndim) for d in args[:2])
        new_dim = b if lay.dim == a else a if lay.dim == b else lay.dim
    elif name == "unsqueeze":
        d = norm_dim(args[0], out_ndim)
        new_dim = lay.dim + (1 if d <= lay.dim else 0)
    else:  # squeeze
        shape = st.shape(x)
        if args and args[0] is not None:
            gone = {norm_dim(d, in_ndim) for d in (args[0] if isinstance(args[0], (tuple, list)) else (args[0],))}
        else:
            gone = set(range(in_ndim))
        gone = {d for d in gone if shape[d] == 1}
        if lay.dim in gone:
            return st.unsupported(node, f"squeeze of the channel dim at {where(node)}")
        new_dim = lay.dim - sum(1 for d in gone if d < lay.dim)
    st.layouts[node] = Layout(new_dim, lay.slots)
    return None


SPLIT_OPS = {"split", "chunk"}


def split(st: PassState, node: fx.Node, x: fx.Node, lay: Layout) -> None:
    """split/chunk: along the channel dim each part is its own channel range, a node member
    ``(node, "part<i>")`` whose removed positions ``apply`` takes from that part's size (the call is
    rewritten as a split with the new sizes); along another dim every part keeps the channels."""
    parts = st.values.get(node)
    if not isinstance(parts, (tuple, list)) or not all(getattr(p, "shape", None) for p in parts):
        return st.unsupported(node)
    ndim = len(st.shape(x))
    dim = norm_dim(st.value(arg(node, 2, "dim", 0)), ndim)
    if dim != lay.dim:
        st.part_layouts[node] = [lay for _ in parts]
        return None
    layouts, start = [], 0
    for i, part in enumerate(parts):
        size = part.shape[dim]
        slots = lay.slots[start:start + size]
        st.add_source(st.node_sources, (node.name, f"part{i}"), lay.dim - ndim, slots)
        layouts.append(Layout(lay.dim, slots))
        start += size
    st.part_layouts[node] = layouts
    return None


PARAM_VIEW_OPS = {"view", "reshape", "unsqueeze"}


def param_view(st: PassState, node: fx.Node, x: fx.Node) -> bool:
    """A per-channel parameter reshaped before use (timm's LayerScale2d: ``gamma.view(1, -1, 1, 1)``):
    record ``node`` as that parameter with its one non-1 dim moved (``st.param_views``), so an
    elementwise op slices the parameter with the channels it meets. False when ``node`` is no such view
    (more than one non-1 dim, or the channel entry of the shape is not -1: a constant would not follow
    a slice)."""
    if x.op == "get_attr":
        real = [i for i, d in enumerate(st.shape(x)) if d != 1]
        if len(real) != 1:
            return False
        target, param_dim, size = str(x.target), real[0], st.shape(x)[real[0]]
    elif x in st.param_views:
        target, param_dim, at = st.param_views[x]
        size = st.shape(x)[at]
    else:
        return False
    out = [i for i, d in enumerate(st.shape(node)) if d != 1]
    if len(out) != 1 or st.shape(node)[out[0]] != size:
        return False
    if op_name(node) != "unsqueeze" and shape_entries(node)[out[0]:out[0] + 1] != [-1]:
        return False
    st.param_views[node] = (target, param_dim, out[0])
    return True
