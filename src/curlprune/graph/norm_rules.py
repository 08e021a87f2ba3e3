"""Layer rules of RMS norms: a norm across the channels that slices exactly.

An RMS norm (Zhang & Sennrich 2019) divides each position's channel vector by its root mean square,
``y_c = x_c / sqrt(mean_c(x^2) + eps) * w_c``, with no mean subtracted and no bias. A removed channel
is zeroed at the norm's input in the masked model (an ``"in"`` member, as at a conv's input), so it
adds nothing to the sum of squares; the kept channels are divided by ``sqrt(sum_kept / C + eps)``.
The sliced norm averages over its ``C'`` kept channels instead; with ``r = C / C'``,
``sum/C' + r*eps = r * (sum/C + eps)``, so multiplying ``eps`` by ``r`` and the weight by ``sqrt(r)``
makes the sliced norm compute exactly what the masked one does. A LayerNorm (or timm's SimpleNorm,
``x / std(x)``) subtracts the mean over the channels, which a zeroed channel changes: those stay
unprunable with their reason (``layers.LayerNormRule``, the op tables).

Source: docs/method.md §1 (channel groups, what slicing keeps); timm ``layers/norm.py`` and
``layers/fast_norm.py`` (``rms_norm``, ``rms_norm2d``); ``torch.nn.RMSNorm``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from curlprune.graph.layer_rules import PerChannel, Roles, Shape, replace_tensor


class RmsNormRule(PerChannel):
    """An RMS norm with a ``normalized_shape``, an ``eps`` and an optional per-channel ``weight``
    (no bias): ``torch.nn.RMSNorm`` and timm's ``RmsNorm`` / ``RmsNormFp32`` (and their ``Act``
    forms) over the trailing ``normalized_shape`` dims (``dim=-1``), timm's ``RmsNorm2d`` /
    ``RmsNorm2dFp32`` (and ``RmsNormAct2d``) over dim 1 of an NCHW tensor (``dim=1``).

    Roles: over the channel dim alone, the channels pass through and are prunable (members
    ``"channel"`` and ``"in"``: zeroed at the norm's input by ``surgery.mask``); over the channels
    together with other dims (a ``normalized_shape`` of several dims reaching the channel dim), they
    are unprunable with that reason; over other dims only, each channel is normalised on its own and
    passes through (the weight spans those dims, not the channels).

    Slicing ``C`` channels to ``C'`` (``r = C / C'``): the weight of the kept channels times
    ``sqrt(r)``, ``eps`` times ``r``, ``normalized_shape`` ``(C',)`` (the module docstring's
    identity). A norm without a weight (``affine=False``) has nothing to carry ``sqrt(r)``: its
    channels stay unprunable, with that reason. ``nn.RMSNorm(eps=None)`` takes
    ``torch.finfo(dtype).eps`` of its input; the sliced one holds ``r`` times that of its weight's
    dtype, exact at that dtype. ``eps`` is no tensor: a reload applies the plan again (``store.checkpoint``)
    and sets it the same way. Weight per channel; no MACs (the convention counts convs and linears).
    """

    def __init__(self, *, dim: int) -> None:
        super().__init__(["weight"], dim=dim)

    def __repr__(self) -> str:
        return f"RmsNormRule(dim={self.dim})"

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        ndim, n = len(in_shape), len(mod.normalized_shape)
        normalised = {1} if self.dim == 1 else set(range(ndim - n, ndim))
        if lay_dim not in normalised:
            return Roles()
        if len(normalised) > 1:
            return Roles(unprunable=f"normalised across channels by {type(mod).__name__} at {name} (over the channels and {n - 1} more dims)")
        if mod.weight is None:
            return Roles(unprunable=f"normalised across channels by {type(mod).__name__} at {name}, which has no weight to rescale when sliced")
        return Roles(members=(("channel", 0), ("in", 0)))

    def input_dim(self, mod: nn.Module) -> int:
        return self.dim

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        width, gone = mod.normalized_shape[0], len(removed.get("channel", ()))
        if not gone:
            return
        ratio = width / (width - gone)
        super().slice(mod, removed)
        replace_tensor(mod, "weight", mod.weight.detach() * math.sqrt(ratio))
        eps = mod.eps if mod.eps is not None else torch.finfo(mod.weight.dtype).eps
        mod.eps = eps * ratio
        mod.normalized_shape = (width - gone,)
