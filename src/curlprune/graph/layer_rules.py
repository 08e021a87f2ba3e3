"""How a layer rule is written: the vocabulary of ``graph.layers``, the table of layer types.

A rule says, for one module type, what a call does to channels (``roles``, carried out by the
channel pass in ``module_ops``), how to slice the module (``slice``, ``surgery.apply``), its MACs and
parameters as terms a plan shrinks (``cost``, the analytic cost table), which input dim a mask
zeroes when it consumes a group (``consumer_dim``: ``surgery.mask``, the KL score's cuts) and, for a
layer linear in its input, what some input channels contribute (``input_part``: the KL score's
one-step removal of a unit).

``ChannelMixing`` (a conv or linear of your own) and ``PerChannel`` (a norm or scale of your own)
state where the channels are in each parameter; members, slicing, cost terms and the consumer dim
all follow from that one statement. A rule that states the wrong MACs is caught: the cost table
compares them with what ``count`` measures on the call and makes the layer's groups unprunable.
Subclass ``LayerRule`` for a layer they do not fit (the built-in conv rules do).

Source: docs/method.md §1 (members ``out`` / ``in`` / ``channel``), §8 (the MACs convention).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.graph.op_cost import CostTerm

Shape = Sequence[int]
Terms = tuple[list[CostTerm], dict[int, CostTerm]]
"""(MACs terms per sample, parameter id -> its params term) of one call."""
InputPart = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x_part, positions) -> output``: what the input channels ``positions`` alone contribute to a call's
output (``x_part`` holds just those channels; bias excluded)."""


@dataclass(frozen=True)
class Roles:
    """What one call of a layer does to channels; the channel pass (``module_ops``) carries it out.

    fresh:      True: the output channels are new ones computed from all input channels (the layer
                produces one group and consumes another); False: output channel i is input channel i.
    dim:        fresh only: where the output's channels are (1, or -1 for the last dim).
    members:    ``(role, dim)`` slices of the layer's tensors the groups own: ``"out"`` and
                ``"channel"`` index the output's channels, ``"in"`` the input's; ``dim`` is the dim of
                the layer's ``weight`` (what magnitude criteria read).
    repeat:     pass-through where each input channel owns ``repeat`` consecutive output channels
                (a depthwise conv with a channel multiplier).
    unit:       channels go in blocks of ``unit`` (a grouped conv with as many in as out channels).
    unprunable: why the call's input and output channels cannot be pruned; empty when they can.
    unprunable_in: why only the call's input channels cannot be pruned (a layer whose output
                channels can go but whose input channels cannot); empty when they can.
    """

    fresh: bool = False
    dim: int = 1
    members: tuple[tuple[str, int], ...] = ()
    repeat: int = 1
    unit: int = 1
    unprunable: str = ""
    unprunable_in: str = ""


def unsupported_module(mod: nn.Module, name: str) -> str:
    """The reason given when the pass cannot follow a call of ``mod`` (named ``name``)."""
    return f"unsupported module {type(mod).__name__} at {name}"


def keep_index(size: int, removed: Sequence[int] | None) -> torch.Tensor:
    """Positions ``0..size-1`` without ``removed``, as a LongTensor for ``index_select``."""
    gone = set(removed or ())
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def replace_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``owner.<name>`` to a sliced ``value``: a new Parameter (same ``requires_grad``) for a
    parameter, a copy for a buffer or plain tensor attribute."""
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(owner, name, value.clone())


class LayerRule:
    """How one layer type carries channels. Subclass it for a layer the declarative rules do not fit.

    The defaults describe a layer the pass cannot follow: ``roles`` says unsupported, ``slice``
    raises and ``cost`` has no sliced terms (its measured cost stays a constant).
    """

    consumer_dim: int = 1
    """The dim of the layer's input that holds the channels it consumes (-1: the last dim)."""

    def input_dim(self, mod: nn.Module) -> int:
        """The dim of ``mod``'s input where a mask zeroes the channels it consumes (its ``"in"``
        member): ``consumer_dim``, unless the layer says per instance (a channels-last norm)."""
        return self.consumer_dim

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        """What the call does to channels.

        Args:
            mod: the module called; name: its qualified name.
            lay_dim: the dim of the first input that holds channels.
            in_shape, out_shape: the shapes of the first input and of the output (whole batch).

        Returns:
            The ``Roles``, or why the pass cannot follow the call (everything it touches is then
            unprunable with that reason).
        """
        return unsupported_module(mod, name)

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        """Slice ``mod`` in place (it is a private copy): ``removed`` maps each member role to the
        sorted positions a plan removes along that member's dims.

        Raises:
            CurlpruneError: the layer cannot be sliced (the groups come from another model).
        """
        raise CurlpruneError(f"cannot slice module {type(mod).__name__}: the groups were traced from a different model")

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        """(MACs terms per sample, parameter id -> params term) of one call, in the terms a plan shrinks.

        A term's sizes are keyed ``(name, role)``; MACs are per sample (whole-batch positions // ``batch``).
        The cost table checks the MACs terms against the measured MACs of the call.
        """
        return [], {}

    def input_part(self, mod: nn.Module) -> InputPart | None:
        """For a layer whose output is linear in its input plus a bias: the contribution of some input
        channels, which the KL score subtracts to remove a unit in one step (docs/method.md §2).
        None (the default, and the declarative rules'): no such shortcut; the score runs the layer."""
        return None


def _role_sizes(t: torch.Tensor, spec: Sequence[str | None], name: str) -> tuple[tuple[int, tuple[str, str]], ...]:
    return tuple((t.shape[d], (name, role)) for d, role in enumerate(spec) if role is not None)


def _param_terms(mod: nn.Module, name: str, params: Mapping[str, Sequence[str | None]]) -> dict[int, CostTerm]:
    """One params term per listed parameter (buffers are not parameters): numel over its channel dims.

    A weight computed from stored parameters (weight norm: ``graph.reparam``) gets a term too, keyed
    by the tensor read here; the cost table moves it onto the stored tensors."""
    terms: dict[int, CostTerm] = {}
    for pname, spec in params.items():
        p = getattr(mod, pname, None)
        if isinstance(p, torch.Tensor) and pname not in mod._buffers:
            sizes = _role_sizes(p, spec, name)
            terms[id(p)] = CostTerm(False, p.numel() // math.prod(s for s, _ in sizes), sizes)
    return terms


def _slice_tensors(mod: nn.Module, params: Mapping[str, Sequence[str | None]], removed: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Slice every listed tensor along its role dims; returns role -> kept count."""
    keep: dict[str, torch.Tensor] = {}
    for pname, spec in params.items():
        t = getattr(mod, pname, None)
        if t is None:
            continue
        value = t
        for d, role in enumerate(spec):
            if role is not None:
                if role not in keep:
                    keep[role] = keep_index(t.shape[d], removed.get(role))
                value = value.index_select(d, keep[role])
        replace_tensor(mod, pname, value)
    return {role: len(k) for role, k in keep.items()}


def _channel_dim_problem(label: str, name: str, dim: int, lay_dim: int, in_shape: Shape) -> str:
    want = len(in_shape) - 1 if dim == -1 else dim
    if lay_dim == want:
        return ""
    return f"{label} {name} reads a tensor whose channels are not {'its last dim' if dim == -1 else f'on dim {dim}'}"


class ChannelMixing(LayerRule):
    """A layer whose every output channel mixes all its input channels: a conv (groups=1) or linear.

    Args:
        params: parameter (or buffer) name -> the role of each of its leading dims: ``"out"`` (an
            output channel), ``"in"`` (an input channel) or None. A conv weight
            ``[Cout, Cin, kh, kw]`` is ``("out", "in")``, its bias ``("out",)``. List the weight first:
            the members' dims are its dims. A tensor that is None on a module is skipped.
        dim: where the input's and output's channels are: 1 (``[N, C, ...]``, convs) or -1 (the last
            dim, linears); also where a mask zeroes the consumed channels.
        macs: the parameter each of whose elements is one multiply-accumulate per output position
            (a conv's or linear's weight): MACs per sample = its numel * output positions / batch.
        widths: the attributes holding the (input, output) channel counts, set when sliced
            (``("in_channels", "out_channels")``); None for none.
        label: how reasons name the layer (default: its class name).

    Raises:
        CurlpruneError: a role other than ``"out"``/``"in"``/None, no ``"out"`` or ``"in"`` anywhere,
            ``dim`` not 1 or -1, or ``macs`` not a listed parameter with both roles.
    """

    def __init__(
        self,
        params: Mapping[str, Sequence[str | None]],
        *,
        dim: int = 1,
        macs: str = "weight",
        widths: tuple[str | None, str | None] = (None, None),
        label: str | None = None,
    ) -> None:
        self.params = {name: tuple(spec) for name, spec in params.items()}
        _check_roles(self.params, {"out", "in"}, type(self).__name__)
        if dim not in (1, -1):
            raise CurlpruneError(f"ChannelMixing: dim must be 1 or -1, got {dim!r}")
        if not {"out", "in"} <= set(self.params.get(macs, ())):
            raise CurlpruneError(f"ChannelMixing: macs={macs!r} must name a listed parameter with an 'out' and an 'in' dim")
        self.dim = self.consumer_dim = dim
        self.macs, self.widths, self.label = macs, widths, label
        self.members = tuple((role, _first_dim(self.params, role)) for role in ("out", "in"))

    def __repr__(self) -> str:
        return f"ChannelMixing({self.params!r}, dim={self.dim}, macs={self.macs!r}, widths={self.widths!r})"

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        problem = _channel_dim_problem(self.label or type(mod).__name__, name, self.dim, lay_dim, in_shape)
        return problem or Roles(fresh=True, dim=self.dim, members=self.members)

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        widths = _slice_tensors(mod, self.params, removed)
        for role, attr in zip(("in", "out"), self.widths):
            if attr is not None and role in widths:
                setattr(mod, attr, widths[role])

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        if out_shape is None:
            return [], {}
        weight = getattr(mod, self.macs)
        sizes = _role_sizes(weight, self.params[self.macs], name)
        per = weight.numel() // math.prod(s for s, _ in sizes)
        positions = math.prod(out_shape) // out_shape[self.dim]
        return [CostTerm(True, per * positions // batch, sizes)], _param_terms(mod, name, self.params)


class PerChannel(LayerRule):
    """A layer that transforms each channel with its own parameters (BatchNorm, PReLU): output
    channel i is input channel i, and the group owns index i of every listed tensor.

    Args:
        params: parameter or buffer names indexed by channel on dim 0 (None ones are skipped).
        width: the attribute holding the channel count, set when sliced; None for none.
        dim: where the input's channels are: 1 or -1 (the last dim); other calls are unsupported.

    Raises:
        CurlpruneError: ``dim`` not 1 or -1, or no params.
    """

    def __init__(self, params: Sequence[str], *, width: str | None = None, dim: int = 1) -> None:
        if dim not in (1, -1) or not params:
            raise CurlpruneError(f"PerChannel: needs parameter names and dim 1 or -1, got {list(params)!r}, dim={dim!r}")
        self.params = {name: ("channel",) for name in params}
        self.width, self.dim = width, dim

    def __repr__(self) -> str:
        return f"PerChannel({list(self.params)!r}, width={self.width!r}, dim={self.dim})"

    def roles(self, mod: nn.Module, name: str, lay_dim: int, in_shape: Shape, out_shape: Shape) -> Roles | str:
        if lay_dim != (len(in_shape) - 1 if self.dim == -1 else self.dim):
            return unsupported_module(mod, name)
        present = any(getattr(mod, p, None) is not None for p in self.params)
        return Roles(members=(("channel", 0),) if present else ())

    def slice(self, mod: nn.Module, removed: Mapping[str, Sequence[int]]) -> None:
        widths = _slice_tensors(mod, self.params, removed)
        if self.width is not None and "channel" in widths:
            setattr(mod, self.width, widths["channel"])

    def cost(self, name: str, mod: nn.Module, in_shape: Shape | None, out_shape: Shape | None, batch: int) -> Terms:
        """No MACs (a zero term, so that a layer that does count some is caught), one term per parameter."""
        return [CostTerm(True, 0, ())], _param_terms(mod, name, self.params)


def _check_roles(params: Mapping[str, tuple[str | None, ...]], allowed: set[str], what: str) -> None:
    found = {role for spec in params.values() for role in spec if role is not None}
    if found != allowed or any(len([r for r in spec if r]) != len({r for r in spec if r}) for spec in params.values()):
        raise CurlpruneError(
            f"{what}: each parameter's roles must be {sorted(allowed)} or None, each at most once, and every role used; got {dict(params)!r}"
        )


def _first_dim(params: Mapping[str, tuple[str | None, ...]], role: str) -> int:
    return next(spec.index(role) for spec in params.values() if role in spec)
