"""The data model of channel pruning: Member, ChannelGroup and Plan.

A leaf module (it imports nothing of the package), so every module that only needs these types
imports them without the channel pass (like Torch-Pruning's ``node.py`` / ``group.py``).

* A ChannelGroup's channel ``i`` (0 <= i < width) is one channel that exists or dies together in
  every member. Each member says where that channel lives in one tensor of one module/parameter.
* A Plan is ``dict[str, list[int]]``: group name -> sorted kept channel indices (group index
  space). Groups not named are kept whole. JSON-serialisable as it is.

Source: docs/method.md §1 (channel groups, inside / outside).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

@dataclass(frozen=True)
class Member:
    """Where the group's channels live in one parameter tensor family of one module.

    module:   qualified name of the module (``"layer1.0.conv1"``) or, for a parameter used
              directly in the graph (``get_attr``), the qualified parameter name.
    role:     ``"out"`` (the module produces these channels: conv/linear weight dim 0, bias),
              ``"in"`` (the module consumes them: conv weight dim 1, linear weight dim 1),
              ``"channel"`` (per-channel module: BN/affine norm/PReLU weight, bias, running stats),
              ``"param"`` (a get_attr tensor sliced along ``dim``).
    dim:      tensor dimension that is sliced (for ``role == "in"`` of a conv: 1, of a linear: 1).
    index:    for each group channel i, the positions it occupies along ``dim``; one position per
              channel except flatten->linear, where channel i maps to a block of H*W columns.
    """

    module: str
    role: str
    dim: int
    index: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    name:       stable, human-readable (first producing module, e.g. ``"layer1.0.conv1"``).
    width:      number of channels.
    kind:       ``"outside"`` when the group runs through a residual add (the residual stream of a
                stage), else ``"inside"``.
    prunable:   False when removing any channel would change the model in a way a slice cannot
                express (model input/output, cross-channel normalisation, unknown op, ...).
    reason:     why not prunable (empty when prunable); names the op/node.
    unit:       channels are removed in contiguous units of this many channels (grouped convs:
                in/out channels per conv group; 1 otherwise). Kept indices must be whole units.
    members:    every module/parameter slice that must follow the plan.
    macs_per_channel: MACs removed by removing channel i alone, everything else full width.
    params_per_channel: parameters removed by removing channel i alone.
    nodes:      names of the fx nodes whose output carries the group's channels (for masking and
                partial evaluation); first is earliest in topological order.
    node_members: (added) slices of fx nodes whose *arguments* depend on the kept channels:
                ``module`` is the fx node name, ``role`` is ``"pad_front"`` / ``"pad_back"`` for a
                zero-pad along the channel axis (option-A shortcuts), ``dim`` the channel dim counted
                from the end (negative), ``index`` the padded positions (relative to the start of
                that pad region) this group owns.
    """

    name: str
    width: int
    kind: str
    prunable: bool
    reason: str
    unit: int
    members: list[Member]
    macs_per_channel: list[float]
    params_per_channel: list[float]
    nodes: list[str] = field(default_factory=list)
    node_members: list[Member] = field(default_factory=list)

    def copy(self) -> ChannelGroup:
        """A copy that callers may modify; Members are immutable and shared."""
        return dataclasses.replace(
            self,
            members=list(self.members),
            macs_per_channel=list(self.macs_per_channel),
            params_per_channel=list(self.params_per_channel),
            nodes=list(self.nodes),
            node_members=list(self.node_members),
        )


Plan = dict[str, list[int]]

SliceKey = tuple[str, str]
"""(module, parameter or fx node name; role): what one Member slices."""
