"""Shared (tied) parameters: one tensor cut by several members is one set of channels.

Slices are keyed by what they cut, a parameter tensor, not by the module that holds it: two member
slices that cut the same tensor along the same dim must be the same channels (their slots are
united), or, when their lengths differ or a use of the tensor is not modelled by the channel pass
(e.g. a classifier tied to an embedding through ``F.linear``), every channel that cuts it is
unprunable with a reason naming the parameter and its users. ``surgery.apply`` then keeps one
sliced tensor for all users.

Source: docs/method.md §1.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from curlprune.channels import SliceKey
from curlprune.graph.ops import where
from curlprune.graph.pass_state import PassState
from curlprune.graph.reparam import owned, reparametrised, stable, stored
from curlprune.graph.tracing import fetch_attr

_CUT = {"out": ("weight", "bias"), "in": ("weight",), "channel": ("weight", "bias", "running_mean", "running_var")}


def cut_tensors(st: PassState, key: SliceKey, dim: int) -> list[tuple[torch.Tensor, int, str]]:
    """(tensor, dim, qualified name) of every parameter/buffer the member slice ``key`` cuts."""
    module, role = key
    if role == "param":
        return [(fetch_attr(st.gm, module), dim, module)]
    mod = st.modules[module]
    if role == "out" and dim != 0:  # transposed conv: weight dim 1, bias dim 0
        cut = [(mod.weight, dim, f"{module}.weight"), (getattr(mod, "bias", None), 0, f"{module}.bias")]
    else:
        cut = [(getattr(mod, n, None), dim if n == "weight" else 0, f"{module}.{n}") for n in _CUT[role]]
    computed = reparametrised(mod)  # a computed weight is keyed by the tensors that store it (graph.reparam)
    if computed:
        with stable(mod):
            cut = [
                (s, d, n) for t, d, n in cut for s in ([t] if n.rpartition(".")[2] not in computed else stored(mod, n.rpartition(".")[2]))
                if n.rpartition(".")[2] not in computed or s.shape == t.shape
            ]
    return [(t, d, n) for t, d, n in cut if isinstance(t, torch.Tensor)]


def tie_shared_parameters(st: PassState, node_params: Mapping[fx.Node, Sequence[nn.Parameter]]) -> None:
    """Unite the members that cut one tensor; block those whose tensor has unmodelled uses.

    Args:
        st: the channel pass state after the walk.
        node_params: node -> the parameters its calls received (``graph.propagate``).
    """
    users: dict[tuple[int, int], list[tuple[SliceKey, str]]] = {}
    cutters: dict[int, list[tuple[SliceKey, str]]] = {}
    for key, src in st.sources.items():
        for tensor, d, tname in cut_tensors(st, key, src.dim):
            users.setdefault((id(tensor), d), []).append((key, tname))
            cutters.setdefault(id(tensor), []).append((key, tname))
    for entries in users.values():
        first_key, first_name = entries[0]
        for key, _ in entries[1:]:
            if key == first_key:
                continue
            a, b = st.sources[first_key].slots, st.sources[key].slots
            if len(a) == len(b):
                st.uf.union_all(a, b)
            else:
                reason = f"parameter {first_name} is shared by {first_key[0]} and {key[0]} with different channel layouts"
                st.uf.mark(a, reason)
                st.uf.mark(b, reason)
    for node, params in node_params.items():
        for p in params:
            if id(p) in cutters and not _models(st, node, p):
                for key, tname in cutters[id(p)]:
                    st.uf.mark(st.sources[key].slots, f"parameter {tname} is also used by {where(node)}")


def _models(st: PassState, node: fx.Node, p: nn.Parameter) -> bool:
    """Whether the channel pass modelled ``node``'s use of ``p`` as a member slice."""
    if node.op == "call_module":
        mod = st.modules[str(node.target)]
        own = any(q is p for q in owned(mod))
        return own and any(key[0] == str(node.target) for key in st.sources)
    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a.op == "get_attr" else None)
    return any((str(a.target), "param") in st.sources and fetch_attr(st.gm, str(a.target)) is p for a in found)
