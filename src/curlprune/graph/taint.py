"""Channel counts read as values: follow them into shapes, or make their channels unprunable.

``x.size(1)``, ``x.shape``, ``b, c, _, _ = x.size()``, ``x.numel()`` read a channel dim's size at run
time. After slicing, the pruned model reads the new count, so such a value is only safe where the
masked model's answer does not depend on it: as the channel entry of the shape a ``view`` /
``reshape`` / ``expand`` / ``broadcast_to`` produces, of the same channel group ("followed"; the
count and the shaped channels must end up in one class, checked when the pass is done). Python
arithmetic on a count carries the taint on; any other use (a scale ``y * c ** -0.5``, a tensor
constructor, an interpolation size, the model output) makes the channels unprunable with a reason
naming where the count was read and where it was used.

Source: docs/method.md §1.
"""
from __future__ import annotations

import builtins
import operator

import torch.fx as fx

from curlprune.graph.ops import arg, norm_dim, where
from curlprune.graph.pass_state import PassState

SHAPE_CONSUMERS = ("view", "reshape", "expand", "broadcast_to")


def record_shape_value(st: PassState, node: fx.Node, name: str | None) -> None:
    """Taint a non-tensor result that is (or is computed from) a channel dim's size."""
    x = node.args[0] if node.args else None
    lay = st.layout(x)
    here = where(node)
    if lay is not None and name == "size":
        d = arg(node, 1, "dim")
        if d is None:
            st.size_taint[node] = {lay.dim: (lay.slots, here)}
        elif norm_dim(st.value(d), len(st.shape(x))) == lay.dim:
            st.taint[node] = (lay.slots, here)
        return
    if lay is not None and node.target is builtins.getattr and node.args[1] == "shape":
        st.size_taint[node] = {lay.dim: (lay.slots, here)}
        return
    if lay is not None and (name in ("numel", "nelement") or (node.target is builtins.len and lay.dim == 0)):
        st.taint[node] = (lay.slots, here)
        return
    if node.target is operator.getitem and x in st.size_taint:
        index, size = st.value(node.args[1]), st.value(x)
        positions = list(range(len(size)))
        if isinstance(index, int):
            hit = st.size_taint[x].get(positions[index])
            if hit is not None:
                st.taint[node] = hit
        elif isinstance(index, slice):
            kept = positions[index]
            moved = {kept.index(p): t for p, t in st.size_taint[x].items() if p in kept}
            if moved:
                st.size_taint[node] = moved
        return
    if not st.tensor_inputs(node):  # Python arithmetic on sizes: the result depends on them too
        found = tainted_args(st, node)
        if found:
            st.taint[node] = (sorted({s for slots, _ in found for s in slots}), found[0][1])


def tainted_args(st: PassState, node: fx.Node) -> list[tuple[list[int], str]]:
    """(slots, where read) of every channel count among ``node``'s arguments."""
    found: list[tuple[list[int], str]] = []

    def visit(a: fx.Node) -> None:
        if a in st.taint:
            found.append(st.taint[a])
        elif a in st.size_taint:
            found.extend(st.size_taint[a].values())

    fx.node.map_arg((node.args, node.kwargs), visit)
    return found


def check_taint(st: PassState, node: fx.Node, name: str | None) -> None:
    """A channel count may flow into scalar arithmetic and into the channel entry of a shape only."""
    if not tainted_args(st, node):
        return
    if node.op != "output" and st.shape(node) is None and (
        node in st.taint or node in st.size_taint or not st.tensor_inputs(node)
    ):
        return  # propagated by record_shape_value
    if name in SHAPE_CONSUMERS and (lay := st.layout(node)) is not None:
        raw = list(node.args[1:]) if len(node.args) > 1 else [node.kwargs.get("shape", node.kwargs.get("size"))]
        if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
            raw = list(raw[0])
        ok = True
        for i, entry in enumerate(raw):
            if isinstance(entry, fx.Node) and entry in st.taint:
                if i == lay.dim and len(raw) == len(st.shape(node)):
                    st.followed.append((st.taint[entry][0], lay.slots, st.taint[entry][1], where(node)))
                else:
                    ok = False
            elif isinstance(entry, fx.Node) and entry in st.size_taint:
                ok = False
        if ok:
            return
    for slots, read in tainted_args(st, node):
        st.uf.mark(slots, f"channel count read at {read} is used as a value at {where(node)}")


def check_followed(st: PassState) -> None:
    """At the end of the pass: a followed count must be the size of the channels it shapes."""
    for count_slots, shaped_slots, read, use in st.followed:
        if {st.uf.find(a) for a in count_slots} != {st.uf.find(b) for b in shaped_slots}:
            reason = f"channel count read at {read} gives the shape of other channels at {use}"
            st.uf.mark(count_slots, reason)
            st.uf.mark(shaped_slots, reason)
