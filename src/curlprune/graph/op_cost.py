"""The op-level MACs convention shared by ``cost.count`` and the analytic cost table.

``CostMode`` is a TorchFunctionMode that sees every conv / transposed conv / linear / attention call
and every parameter passed to an op. It imports only the data model, so the shape recording pass
(``graph.shapes``) can measure each traced node with it, and ``cost.count`` the whole model.
``CostTerm`` is one term of the analytic cost, in which the layer rules (``graph.layers``) state a
layer's MACs and parameters. Convention: see :mod:`curlprune.cost.cost` (docs/method.md §8).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from curlprune.channels import SliceKey

CONVS = {F.conv1d, F.conv2d, F.conv3d}
TRANSPOSED_CONVS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@dataclass(frozen=True)
class CostTerm:
    """``factor * prod(size - removed[key] for size, key in sizes)``: MACs per sample (``macs``) or
    parameters, as a plan that removes ``removed[key]`` positions of member slice ``key`` leaves them.

    ``sizes`` holds each factor that a plan shrinks, with the member slice ``(module, role)`` that
    shrinks it; a term without sizes is a constant. ``gone_with``: a member slice whose losing any
    position removes the whole term (0 then): a weight-standardised conv's ``gain``, folded into its
    weight once its input channels are pruned (``graph.layers.StdConvRule``).
    """

    macs: bool
    factor: int
    sizes: tuple[tuple[int, SliceKey], ...]
    gone_with: SliceKey | None = None

    def value(self, removed: Mapping[SliceKey, int]) -> int:
        if self.gone_with is not None and removed.get(self.gone_with, 0):
            return 0
        total = self.factor
        for size, key in self.sizes:
            total *= size - removed.get(key, 0)
        return total


class CostMode(TorchFunctionMode):
    """Sums conv/linear/attention MACs and records the parameters that ops receive.

    Attributes:
        macs: multiply-accumulates of the calls made while the mode is active (whole batch).
        used: ``id -> Parameter`` of every parameter passed to an op.

    ``cost.count`` runs a model under it; shape propagation runs each traced node under a fresh one,
    so the analytic cost table covers exactly the ops ``count`` counts (docs/method.md §8).
    """

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.used: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") != "__get__":  # reading an attribute is not a use
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, nn.Parameter):
                    self.used[id(leaf)] = leaf
        self.macs += _call_macs(func, args, kwargs, out)
        return out


def _call_macs(func, args: tuple, kwargs: dict, out: Any) -> int:
    """Multiply-accumulates of one op call (whole batch); 0 for ops outside the convention."""
    if func in CONVS:
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return out.numel() * math.prod(weight.shape[1:])
    if func in TRANSPOSED_CONVS:
        x = kwargs.get("input", args[0])
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return x.numel() * math.prod(weight.shape[1:])
    if func is F.linear:
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return out.numel() * weight.shape[1]
    if func is F.multi_head_attention_forward:
        return _attention_projection_macs(_MHA_SIGNATURE.bind(*args, **kwargs).arguments)
    return 0


def _attention_projection_macs(a: dict[str, Any]) -> int:
    """MACs of the q/k/v input projections and the output projection of one attention call."""
    embed = a["embed_dim_to_check"]
    tokens = {name: a[name].numel() // a[name].shape[-1] for name in ("query", "key", "value")}
    widths = {name: a[name].shape[-1] for name in ("query", "key", "value")}
    projections = sum(tokens[name] * widths[name] * embed for name in tokens)
    return projections + tokens["query"] * embed * embed
