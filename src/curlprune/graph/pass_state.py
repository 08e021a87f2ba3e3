"""The state of the channel pass and the moves every op handler makes.

``PassState`` holds the traced graph, the shapes shape propagation recorded, the union-find of
channel slots, each tensor's channel ``Layout`` and the member slices found so far. Its methods are
the moves shared by the op handlers (``module_ops``, ``tensor_ops``, ``shape_ops``): read a shape
or a concrete argument, give a tensor fresh channels, register a member slice, give up on an op.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from curlprune.channels import SliceKey
from curlprune.graph.ops import normalises_channels, target_str, where
from curlprune.graph.shapes import TensorInfo
from curlprune.graph.slots import Layout, Slots, Source


class PassState:
    """What the channel pass knows so far (see ``channel_pass``); handlers read and extend it."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
        self.gm = gm
        self.values = values
        self.modules = dict(gm.named_modules())
        self.uf = Slots()
        self.layouts: dict[fx.Node, Layout] = {}
        self.sources: dict[SliceKey, Source] = {}
        self.node_sources: dict[SliceKey, Source] = {}
        self.units: list[tuple[str, int, list[int]]] = []  # (conv name, channels per conv group, slots)
        self.part_layouts: dict[fx.Node, list[Layout]] = {}
        self.param_views: dict[fx.Node, tuple[str, int, int]] = {}  # parameter reshaped: (target, its dim, dim here)  # split/chunk: the layout of each part
        self.tuple_dims: dict[fx.Node, int] = {}  # non-tensor outputs of unsupported ops: their input's channel dim
        # channel counts read as values (graph.taint): node -> (slots whose count it is, where read);
        # a torch.Size / shape tuple: node -> {position: (slots, where read)}
        self.taint: dict[fx.Node, tuple[list[int], str]] = {}
        self.size_taint: dict[fx.Node, dict[int, tuple[list[int], str]]] = {}
        self.followed: list[tuple[list[int], list[int], str, str]] = []  # (count's slots, shaped slots, read, use)

    def shape(self, n: Any) -> tuple[int, ...] | None:
        info = self.values.get(n) if isinstance(n, fx.Node) else None
        return info.shape if isinstance(info, TensorInfo) else None

    def value(self, a: Any) -> Any:
        """Concrete value of an argument (nodes resolved to what shape propagation saw)."""
        return fx.node.map_arg(a, lambda n: self.values.get(n))

    def layout(self, n: Any) -> Layout | None:
        return self.layouts.get(n) if isinstance(n, fx.Node) else None

    def fresh_layout(self, n: fx.Node, dim: int) -> Layout:
        return Layout(dim, self.uf.fresh(self.shape(n)[dim]))

    def add_source(self, table: dict[SliceKey, Source], key: SliceKey, dim: int, slots: list[int]) -> None:
        """Register a member slice; a module used twice must slice its tensors the same way."""
        if key not in table:
            table[key] = Source(dim, slots)
            return
        known = table[key]
        if len(known.slots) == len(slots) and known.dim == dim:
            self.uf.union_all(known.slots, slots)
        else:
            reason = f"{key[0]} is used twice with different channel counts"
            self.uf.mark(known.slots, reason)
            self.uf.mark(slots, reason)

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if self.shape(n) is not None else None)
        return found

    def unsupported(self, node: fx.Node, reason: str | None = None) -> None:
        """Everything this op touches becomes unprunable; its output gets fresh (unprunable) slots."""
        reason = reason or f"unsupported op {target_str(node)} at {where(node)}"
        dims = set()
        for n in self.tensor_inputs(node):
            if (lay := self.layout(n)) is not None:
                self.uf.mark(lay.slots, reason)
                out = self.shape(node)
                if out is None or (len(self.shape(n)) == len(out) and self.shape(n)[lay.dim] == out[lay.dim]):
                    dims.add(lay.dim)
        shape = self.shape(node)
        if not dims:  # e.g. item 0 of an unsupported module's tuple output (attention)
            dims = {self.tuple_dims[n] for n in node.all_input_nodes if n in self.tuple_dims}
        if shape is None and len(dims) == 1:
            self.tuple_dims[node] = next(iter(dims))
        if shape is not None and len(shape) >= 2:
            # the channels stay on the dim the input kept them on ([N, T, C] tokens: the last), else dim 1
            dim = dims.pop() if len(dims) == 1 else 1
            lay = self.fresh_layout(node, dim if dim < len(shape) else 1)
            self.uf.mark(lay.slots, reason)
            self.layouts[node] = lay

    def cross_channel(self, node: fx.Node, lay: Layout, what: str) -> None:
        """A per-position op that normalises/mixes across channels: pass through, unprunable."""
        self.uf.mark(lay.slots, f"normalised across channels by {what}")
        self.layouts[node] = lay

    def layer_norm(self, node: fx.Node, lay: Layout, n_normalised: int, what: str) -> None:
        if normalises_channels(lay.dim, len(self.shape(node)), n_normalised):
            return self.cross_channel(node, lay, what)
        self.layouts[node] = lay
        return None
