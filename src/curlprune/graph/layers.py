"""The table of layer types: one rule per parameter-bearing layer type, the one place every pass reads.

The channel pass (``module_ops``), slicing and masking (``surgery``), the analytic cost
(``cost_plan``) and the KL score's one-step removal (``criteria.kl``) each make one lookup here,
``rule_for(module)``; how a rule is written is ``layer_rules``. A type without a rule is no layer the pass can slice: the op tables (``ops``)
decide what it does to channels (pass them through, or make them unprunable).

Rules are found through the type's MRO (a subclass of ``nn.Conv2d`` gets the conv rule unless it is
registered itself). The tracer stops at torch.nn's own modules, the known modules of other libraries
(``ops.LEAF_CLASSES``) and exactly the types given to ``register_layer`` (not their subclasses, whose
forward may compute something else).

Source: docs/method.md §1 (channel groups and their members), §8 (the MACs convention).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from curlprune.errors import CurlpruneError
from curlprune.graph.layer_rules import (
    ChannelMixing,
    InputPart,
    LayerRule,
    PerChannel,
    Roles,
    Shape,
    Terms,
    keep_index,
    replace_tensor,
    unsupported_module,
)
from curlprune.graph.norm_rules import RmsNormRule
from curlprune.graph.op_cost import CostTerm
from curlprune.graph.ops import (
    BLUR_POOL_CLASSES,
    GRN_CLASSES,
    RMS_NORM_2D_CLASSES,
    RMS_NORM_ACT_2D_CLASSES,
    RMS_NORM_ACT_CLASSES,
    RMS_NORM_CLASSES,
    STD_CONV_CLASSES,
    class_key,
    normalises_channels,
)



class ConvRule(LayerRule):
    """``nn.Conv1d/2d/3d`` (any ``_ConvNd`` that is not transposed): weight ``[Cout, Cin/groups, k...]``.

    groups == 1 mixes channels; a grouped conv with as many in as out channels (depthwise, tied
    grouped) passes them through in units of its conv groups; a depthwise conv with a channel
    multiplier k gives each input channel its k outputs; any other grouped conv is unprunable.
    """

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        if mod.transposed:
            return unsupported_module(mod, name)
        if lay_dim != 1:
            return f"conv {name} reads a tensor whose channels are not on dim 1"
        cin, cout, groups = mod.in_channels, mod.out_channels, mod.groups
        if groups == 1:
            return Roles(fresh=True, members=(("out", 0), ("in", 1)))
        if cin == cout:  # depthwise (or grouped with as many in as out channels per conv group): out i is in i
            return Roles(members=(("out", 0),), unit=cin // groups)
        if groups == cin and cout % cin == 0:  # channel multiplier k: input i owns outputs i*k .. i*k+k-1
            return Roles(members=(("out", 0),), repeat=cout // cin)
        return Roles(fresh=True, unprunable=f"grouped conv {name} (groups={groups}, {cin}->{cout} channels) cannot be sliced per channel")

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        out_keep = keep_index(mod.out_channels, removed.get("out"))
        weight = mod.weight.index_select(0, out_keep)
        if mod.groups == 1:
            in_keep = keep_index(mod.in_channels, removed.get("in"))
            weight = weight.index_select(1, in_keep)
            mod.in_channels = len(in_keep)
        else:  # depthwise/grouped conv sliced by whole conv groups (a channel multiplier included)
            in_per, out_per = mod.in_channels // mod.groups, mod.out_channels // mod.groups
            mod.groups = len(out_keep) // out_per
            mod.in_channels = mod.groups * in_per
        mod.out_channels = len(out_keep)
        replace_tensor(mod, "weight", weight)
        if mod.bias is not None:
            replace_tensor(mod, "bias", mod.bias.index_select(0, out_keep))

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        """``Cout * Cin/groups * k`` MACs per output position (a depthwise conv: ``C * k``)."""
        if out_shape is None:
            return [], {}
        k = math.prod(mod.kernel_size)
        cout, cin, groups = mod.out_channels, mod.in_channels, mod.groups
        if groups == 1:
            sizes, per = ((cout, (name, "out")), (cin, (name, "in"))), k
        elif cin == cout or groups == cin:  # depthwise (a channel multiplier included) / tied grouped
            sizes, per = ((cout, (name, "out")),), k * (cin // groups)
        else:  # other grouped convs are never sliced
            sizes, per = (), k * cout * (cin // groups)
        macs = [CostTerm(True, per * math.prod(out_shape[2:]) * out_shape[0] // batch, sizes)]
        return macs, _conv_params(mod, name, per, sizes)

    def input_part(self, mod: nn.Module) -> InputPart | None:
        if mod.transposed or mod.groups != 1:
            return None
        return lambda x, positions: mod._conv_forward(x, mod.weight.index_select(1, positions), None)


class StdConvRule(ConvRule):
    """timm's weight-standardised convs (``StdConv2d``, ``ScaledStdConv2d`` and their ``Same``
    forms; BiT / ResNetV2, NFNet): each call convolves with ``(W[o] - mean(W[o])) / std(W[o])``,
    the statistics taken per output channel over its ``Cin/groups x kh x kw`` weights (times
    ``gain[o] * scale``, ``scale = gamma * fan_in**-0.5``, when scaled).

    Output channels: channel ``o`` is standardised with its own weights only, so removing others
    leaves it exact: sliced like a conv's (``gain`` with them); the layer stays weight-standardised.
    Depthwise and tied grouped forms lose whole conv groups (a group's statistics go with it): the same.
    Input channels (``groups == 1``): the masked model zeroes them at the layer's input, so they
    contribute nothing whatever weights they meet, while the kept ones meet the weights standardised
    over ALL inputs. Removing any folds the standardisation: the standardised weight is computed from
    the full weight exactly as timm's forward does (``F.batch_norm`` over each output channel's
    weights, its ``eps``, the scaled form's ``gain * scale``), its kept inputs (and outputs) are
    sliced, and the layer becomes a plain conv holding it (``nn.Conv2d``; timm's ``Conv2dSame`` for a
    ``Same`` form with dynamic padding, which keeps the TF "same" padding at every input size). So the
    pruned layer computes exactly what the masked one does; ``gain`` is folded away (its parameters
    with it: its cost term is ``gone_with`` the input slice). A reload applies the plan again to the
    unpruned architecture (``store.checkpoint``), so it folds the same layers, then loads the weights.
    """

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        if mod.groups == 1 and removed.get("in"):
            fold_standardisation(mod)
            super().slice(mod, removed)  # a plain conv's slice from now on
            return
        out_keep = keep_index(mod.out_channels, removed.get("out"))
        super().slice(mod, removed)
        if isinstance(getattr(mod, "gain", None), nn.Parameter):  # ScaledStdConv2d: [Cout, 1, 1, 1]
            replace_tensor(mod, "gain", mod.gain.index_select(0, out_keep))

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        """A conv's terms, plus ``gain`` (one parameter per output channel) when scaled; with
        ``groups == 1`` it goes when any input channel does (folded into the weight)."""
        macs, params = super().cost(name, mod, in_shape, out_shape, batch)
        gain = getattr(mod, "gain", None)
        if out_shape is not None and isinstance(gain, nn.Parameter):
            sliced = mod.groups == 1 or mod.in_channels == mod.out_channels or mod.groups == mod.in_channels
            gone = (name, "in") if mod.groups == 1 else None
            params[id(gain)] = CostTerm(False, 1, ((mod.out_channels, (name, "out")),), gone) if sliced else CostTerm(False, gain.numel(), ())
        return macs, params

    def input_part(self, mod: nn.Module) -> InputPart | None:
        return None  # the standardised weight is no stored tensor; the score runs the layer


def standardised_weight(mod: nn.Module) -> torch.Tensor:
    """The weight a timm weight-standardised conv convolves with, computed by the same ops as its
    forward (so bit for bit): ``F.batch_norm`` over each output channel's weights with the layer's
    ``eps``, scaled by ``gain * scale`` for ``ScaledStdConv2d(Same)``. Shape of ``mod.weight``."""
    gain = getattr(mod, "gain", None)
    affine = (gain * mod.scale).view(-1) if isinstance(gain, nn.Parameter) else None
    flat = mod.weight.reshape(1, mod.out_channels, -1)
    return F.batch_norm(flat, None, None, weight=affine, training=True, momentum=0.0, eps=mod.eps).reshape_as(mod.weight)


def fold_standardisation(mod: nn.Module) -> None:
    """Turn a timm weight-standardised conv into the plain conv that computes the same, in place:
    its weight becomes :func:`standardised_weight`, ``gain`` and the standardisation attributes go,
    and its class becomes ``nn.Conv2d``, or timm's ``Conv2dSame`` for a ``Same`` form with dynamic
    padding (``same_pad``: the TF "same" padding computed from each input's size, as before).

    Source: docs/method.md §1 (what slicing keeps); timm ``layers/std_conv.py``.
    """
    with torch.no_grad():
        weight = standardised_weight(mod)
    replace_tensor(mod, "weight", weight)
    if "gain" in mod._parameters:
        del mod.gain
    # timm is loaded (``mod`` is its class); it is imported by name so that this module needs no timm
    same = importlib.import_module("timm.layers.conv2d_same").Conv2dSame if getattr(mod, "same_pad", False) else None
    for attr in ("eps", "scale", "gain_init", "same_pad"):
        mod.__dict__.pop(attr, None)
    mod.__class__ = same or nn.Conv2d


class BlurPoolRule(LayerRule):
    """timm's ``BlurPool2d``: pad, then a depthwise conv with a fixed binomial filter (a buffer
    ``filt`` of ``[C, 1, k, k]``, or ``[1, 1, k, k]`` expanded to the input's channels). Each
    output channel is its own input channel blurred: channels pass through; a per-channel filter
    is sliced with them. MACs: ``k*k`` per output element (a depthwise conv's)."""

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        if lay_dim != 1:
            return unsupported_module(mod, name)
        return Roles(members=(("channel", 0),))

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        if mod.channels is None or not removed.get("channel"):
            return
        keep = keep_index(mod.channels, removed.get("channel"))
        replace_tensor(mod, "filt", mod.filt.index_select(0, keep))
        mod.channels = len(keep)

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        if out_shape is None:
            return [], {}
        per = mod.filt_size**2 * math.prod(out_shape[2:]) * out_shape[0] // batch
        return [CostTerm(True, per, ((out_shape[1], (name, "channel")),))], {}


class GlobalResponseNormRule(PerChannel):
    """timm's ``GlobalResponseNorm`` (ConvNeXt-V2's MLP: fc1 -> GELU -> GRN -> fc2), channels on
    dim 1 or last: ``g = ||x||_2`` over H, W per channel, ``n = g / (mean_c(g) + eps)``,
    ``out = x + weight * (x * n) + bias``. Each channel is normalised on its own except for the one
    number ``mean_c(g)``, so its channels are prunable exactly:

    * the group's channels are zeroed at the GRN's input too (an ``"in"`` member: ``surgery.mask``
      zeroes them there, as at a conv's input), so a removed channel has ``g = 0`` and adds nothing
      to the channel sum; its output (``bias``) is zeroed at the next consumer's input, as a
      BatchNorm's shift is;
    * the kept channels of the masked GRN see ``sum_kept(g) / C``; the sliced GRN averages over its
      ``C'`` kept channels, ``sum_kept(g) / C'``. With ``r = C / C'``,
      ``w*x*g/(sum/C + eps) = (r*w)*x*g/(sum/C' + r*eps)``: slicing multiplies ``weight`` and
      ``eps`` by ``r`` (the layer stays a timm ``GlobalResponseNorm``; ``eps`` is no tensor, so a
      reload, which applies the plan again, sets it the same way).

    Weight and bias are per channel; no MACs (the convention counts convs and linears).
    Source: docs/method.md §1; timm ``layers/grn.py`` (ConvNeXt-V2, Woo et al. 2023).
    """

    def __init__(self) -> None:
        super().__init__(["weight", "bias"])

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        where = "its last dim" if mod.channel_dim == -1 else f"dim {mod.channel_dim}"
        if len(in_shape) != 4 or lay_dim != (3 if mod.channel_dim == -1 else mod.channel_dim):
            return f"global response norm {name} reads a tensor whose channels are not on {where}"
        return Roles(members=(("channel", 0), ("in", 0)))

    def input_dim(self, mod: nn.Module) -> int:
        return mod.channel_dim

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        width, gone = mod.weight.shape[0], len(removed.get("channel", ()))
        if not gone:
            return
        super().slice(mod, removed)
        ratio = width / (width - gone)
        replace_tensor(mod, "weight", mod.weight.detach() * ratio)
        mod.eps = mod.eps * ratio


class ConvTransposeRule(LayerRule):
    """``nn.ConvTranspose1d/2d/3d``: weight ``[Cin, Cout/groups, k...]``; only groups == 1 is followed."""

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        if lay_dim != 1 or mod.groups != 1:
            return unsupported_module(mod, name)
        return Roles(fresh=True, members=(("out", 1), ("in", 0)))

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        in_keep, out_keep = keep_index(mod.in_channels, removed.get("in")), keep_index(mod.out_channels, removed.get("out"))
        replace_tensor(mod, "weight", mod.weight.index_select(0, in_keep).index_select(1, out_keep))
        if mod.bias is not None:
            replace_tensor(mod, "bias", mod.bias.index_select(0, out_keep))
        mod.in_channels, mod.out_channels = len(in_keep), len(out_keep)

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        """``Cin * Cout/groups * k`` MACs per *input* position."""
        if out_shape is None or in_shape is None:
            return [], {}
        k = math.prod(mod.kernel_size)
        cout, cin, groups = mod.out_channels, mod.in_channels, mod.groups
        sizes = ((cin, (name, "in")), (cout, (name, "out"))) if groups == 1 else ()
        per = k if groups == 1 else k * cin * (cout // groups)
        macs = [CostTerm(True, per * math.prod(in_shape[2:]) * in_shape[0] // batch, sizes)]
        return macs, _conv_params(mod, name, per, sizes)


def _conv_params(mod: nn.Module, name: str, per: int, sizes: tuple) -> dict[int, CostTerm]:
    params = {id(mod.weight): CostTerm(False, per, sizes)}
    if mod.bias is not None:
        params[id(mod.bias)] = CostTerm(False, 1, ((mod.out_channels, (name, "out")),)) if sizes else CostTerm(False, mod.out_channels, ())
    return params


class LinearRule(ChannelMixing):
    """``nn.Linear``: weight ``[out, in]`` over the last dim of its input."""

    def __init__(self) -> None:
        super().__init__({"weight": ("out", "in"), "bias": ("out",)}, dim=-1, widths=("in_features", "out_features"), label="linear")

    def input_part(self, mod: nn.Module) -> InputPart | None:
        return lambda x, positions: F.linear(x, mod.weight.index_select(1, positions))


class PReLURule(PerChannel):
    """``nn.PReLU``: one slope per channel (any channel dim when it has a single slope)."""

    def __init__(self) -> None:
        super().__init__(["weight"], width="num_parameters")

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        return Roles() if mod.num_parameters == 1 else super().roles(mod, name, lay_dim, in_shape, out_shape)

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        return ([], {}) if mod.num_parameters == 1 else super().cost(name, mod, in_shape, out_shape, batch)


class GroupNormRule(PerChannel):
    """``nn.GroupNorm(G, C)``: statistics over each norm group of ``C/G`` consecutive channels, so a
    whole norm group can go (the others keep their statistics): pruned in units of ``C/G`` channels,
    per channel when ``G == C``; with one norm group (``G == 1``) every channel's statistics depend
    on all the others, so its channels cannot be pruned. Weight and bias are per channel."""

    def __init__(self) -> None:
        super().__init__(["weight", "bias"], width="num_channels")

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        if mod.num_groups == 1 and mod.num_channels > 1:
            return Roles(unprunable=f"normalised across channels by {type(mod).__name__} at {name}")
        roles = super().roles(mod, name, lay_dim, in_shape, out_shape)
        if isinstance(roles, str):
            return roles
        # a member even without affine parameters: ``apply`` must reach the module to set its counts
        return Roles(members=(("channel", 0),), unit=mod.num_channels // mod.num_groups)

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        per_group = mod.num_channels // mod.num_groups
        gone = len(removed.get("channel", ()))
        super().slice(mod, removed)
        mod.num_channels = mod.num_channels if mod.weight is not None else mod.num_channels - gone
        mod.num_groups = mod.num_channels // per_group


class LayerNormRule(LayerRule):
    """``nn.LayerNorm``: across channels (unprunable) when its trailing dims include the channel dim."""

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        if normalises_channels(lay_dim, len(out_shape), len(mod.normalized_shape)):
            return Roles(unprunable=f"normalised across channels by LayerNorm at {name}")
        return Roles()


CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
"""Per-channel norms: their weight, bias and running statistics are a ``"channel"`` member."""

_NORM = PerChannel(["weight", "bias", "running_mean", "running_var"], width="num_features")

_RULES: dict[type, LayerRule] = {
    nn.modules.conv._ConvNd: ConvRule(),
    nn.modules.conv._ConvTransposeNd: ConvTransposeRule(),
    nn.Linear: LinearRule(),
    **{norm: _NORM for norm in CHANNEL_NORMS},
    FrozenBatchNorm2d: PerChannel(["weight", "bias", "running_mean", "running_var"]),  # all four are buffers
    nn.PReLU: PReLURule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.RMSNorm: RmsNormRule(dim=-1),
}
"""The table: layer type -> its rule, looked up through the MRO; ``register_layer`` adds to it."""

_LEAVES: set[type] = set()  # the types registered by users: the tracer keeps exactly these as leaves
_VERSION = [0]  # bumped by every registration, so cached analyses of older tables are not reused


CLASS_RULES: dict[tuple[str, str], LayerRule] = {
    **{key: StdConvRule() for key in STD_CONV_CLASSES},
    **{key: BlurPoolRule() for key in BLUR_POOL_CLASSES},
    **{key: GlobalResponseNormRule() for key in GRN_CLASSES},
    **{key: RmsNormRule(dim=1) for key in RMS_NORM_2D_CLASSES | RMS_NORM_ACT_2D_CLASSES},
    **{key: RmsNormRule(dim=-1) for key in RMS_NORM_CLASSES | RMS_NORM_ACT_CLASSES},
}
"""Rules of other libraries' layers, keyed by (module, qualname) so no optional library is imported;
the exact class only (these are tracer leaves: ``ops.LEAF_CLASSES``)."""


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of ``module``'s type: its own, else that of the nearest base class in its MRO; None
    for a module that is no parameter-bearing layer the table knows. A registered type wins, then
    ``CLASS_RULES`` (exact class), then the MRO."""
    if type(module) not in _RULES and (keyed := CLASS_RULES.get(class_key(module))) is not None:
        return keyed
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def register_layer(cls: type[nn.Module], rule: LayerRule) -> None:
    """Teach curlprune a layer type of your own (or replace the rule of a known one).

    From then on the tracer keeps ``cls`` as a leaf (its forward is not traced into; subclasses of it
    are, unless registered themselves), and the channel pass, ``apply``, ``mask`` and the analytic
    cost read ``rule``. Register before tracing, and before ``curlprune.load`` of a checkpoint whose
    model uses the type.

    Args:
        cls: an ``nn.Module`` subclass.
        rule: e.g. ``ChannelMixing({"weight": ("out", "in"), "bias": ("out",)})`` for a conv-like
            layer or ``PerChannel(["weight", "bias"])`` for a per-channel scale; any ``LayerRule``.

    Raises:
        CurlpruneError: ``cls`` is not an ``nn.Module`` subclass or ``rule`` not a ``LayerRule``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CurlpruneError(f"register_layer: expected an nn.Module subclass, got {cls!r}")
    if not isinstance(rule, LayerRule):
        raise CurlpruneError(f"register_layer: expected a LayerRule (ChannelMixing, PerChannel, ...), got {type(rule).__name__}")
    _RULES[cls] = rule
    _LEAVES.add(cls)
    _VERSION[0] += 1


def registered_leaf(module: nn.Module) -> bool:
    """Whether ``module``'s exact type was given to ``register_layer`` (the tracer keeps it whole)."""
    return type(module) in _LEAVES


def table_version() -> int:
    """How many registrations the table has seen (part of the analysis cache key)."""
    return _VERSION[0]
