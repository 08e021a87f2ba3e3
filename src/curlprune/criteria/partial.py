"""Run a traced network node by node, from any point, with a group's channels zeroed per sample.

This is what makes the exact KL criterion fast and the Fisher approximation possible:

* **Cuts.** Removing a group's channel is simulated exactly as :func:`curlprune.surgery.surgery.mask`
  does it: the channel is zeroed at the input of every channel-mixing consumer (members with role
  ``"in"``: convs with ``groups == 1`` and linears). A *cut* is one such consumer call in the fx
  graph, with the input positions of every group channel.
* **Partial evaluation.** Nothing before a group's first cut changes, so the values alive just
  before it (the *frontier*) are taken from one reference pass and only the rest of the network
  runs per ablation.
* **Stacked ablations.** Each row of a suffix batch is one (unit, image) pair with its own 0/1 keep
  mask, so many ablations share one forward call.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.graph import capture, fetch_attr
from curlprune.surgery import consumer_input_dim

Env = dict[str, Any]


@dataclass(frozen=True)
class Cut:
    """One consumer call that must see the group's channels as zeros.

    node:      the fx node calling the consumer module; its first argument is zeroed.
    dim:       the dimension of that argument holding the positions (1 for convs, -1 for linears).
    positions: for each group channel, its positions along ``dim``.
    """

    node: str
    dim: int
    positions: tuple[tuple[int, ...], ...]


class GraphRunner:
    """A traced private copy of a model (eval mode) that can run any slice of its graph.

    ``fold_bn`` folds each eval-mode BatchNorm into the conv before it (when that conv feeds only
    the BN): one pass over the activations less per conv, the same function up to float round-off.
    Cuts are unaffected: they zero conv *inputs*, and the folded conv keeps its name.
    ``example_input`` (a batch ``[N, C, H, W]``) is needed only for a model that iterates the parts
    of a split by an int size (``graph.tracing.CurlTracer``).
    """

    def __init__(self, model: nn.Module, channels_last: bool = True, fold_bn: bool = True, example_input: torch.Tensor | None = None) -> None:
        self.model = copy.deepcopy(model).eval()
        self.channels_last = channels_last
        self.gm = capture(self.model, example_input)  # symbolic, else specialised to example_input (or the last trace's)
        if fold_bn:
            from torch.fx.experimental.optimization import fuse

            self.gm = fuse(self.gm, inplace=True, no_trace=True)
        if channels_last:
            self.gm.to(memory_format=torch.channels_last)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.modules = dict(self.gm.named_modules())
        self.last_use: dict[str, int] = {}
        self.batched: set[str] = set()
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                self.last_use[inp.name] = i
            if node.op == "placeholder" or any(inp.name in self.batched for inp in node.all_input_nodes):
                self.batched.add(node.name)
        self.placeholders = [n.name for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise ValueError("the KL criteria need a model with exactly one input tensor")
        self.callers: dict[str, list[str]] = {}
        for node in self.nodes:
            if node.op == "call_module":
                self.callers.setdefault(str(node.target), []).append(node.name)

    # -- preparing inputs --------------------------------------------------------------------

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the runner's memory format."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images.contiguous()

    # -- cuts --------------------------------------------------------------------------------

    def cuts(self, group: ChannelGroup) -> list[Cut]:
        """The consumer calls where ``group``'s channels are zeroed (surgery.mask's points)."""
        found: list[Cut] = []
        for member in group.members:
            if member.role != "in":
                continue
            dim = consumer_input_dim(self.modules.get(member.module))
            for node_name in self.callers.get(member.module, ()):
                found.append(Cut(node_name, dim, member.index))
        found.sort(key=lambda c: self.index[c.node])
        return found

    # -- running -----------------------------------------------------------------------------

    def execute(self, node: fx.Node, env: Env, first_arg: Callable[[Any], Any] | None = None) -> Any:
        """Run one node with its inputs from ``env``; ``first_arg`` may replace its first argument."""
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if first_arg is not None:
            args = (first_arg(args[0]),) + tuple(args[1:])
        if node.op == "call_module":
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "get_attr":
            return fetch_attr(self.gm, str(node.target))
        if node.op == "output":
            return args[0]
        raise ValueError(f"cannot execute node {node.name} ({node.op})")

    def free(self, env: Env, after: int) -> None:
        """Drop the values no node after index ``after`` reads."""
        for name in [n for n in env if self.last_use.get(n, -1) <= after]:
            del env[name]

    def run(self, env: Env, start: int, cut_arg: dict[str, Callable[[Any], Any]] | None = None,
            on_value: Callable[[int, fx.Node, Any], None] | None = None) -> Any:
        """Run nodes ``start..`` to the output, reading and extending ``env`` (values are freed
        after their last use); ``cut_arg[node]`` rewrites that node's first argument."""
        cut_arg = cut_arg or {}
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "placeholder":  # provided in env
                continue
            value = self.execute(node, env, cut_arg.get(node.name))
            if node.op == "output":
                return value
            env[node.name] = value
            if on_value is not None:
                on_value(i, node, value)
            self.free(env, i)
        raise ValueError("graph has no output node")

    def forward(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """The whole network on ``images`` (optionally with cuts / a value callback)."""
        return logits_of(self.run({self.placeholders[0]: self.prepare(images)}, 0, **kwargs))


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, or the first tensor of a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"model output of type {type(output).__name__} is not a logits tensor")


def unit_positions(cut: Cut, u: int, unit: int) -> list[int]:
    """Positions along ``cut.dim`` of every channel of unit ``u``."""
    return [p for c in range(u * unit, (u + 1) * unit) for p in cut.positions[c]]


def gather(value: Any, rows: torch.Tensor, channels_last: bool) -> Any:
    """Rows ``rows`` of a batched value (tensors, or tuples/lists of them)."""
    if isinstance(value, torch.Tensor):
        out = value.index_select(0, rows)
        if channels_last and out.dim() == 4:
            out = out.contiguous(memory_format=torch.channels_last)
        return out
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(gather(v, rows, channels_last) for v in value)
    raise TypeError(type(value).__name__)


def is_gatherable(value: Any) -> bool:
    """Whether a batched value can be split by rows (tensors and containers of tensors)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return all(is_gatherable(v) for v in value)
    return False


def kl_to_reference(logits: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per row KL(q || p) in float64, q = softmax(logits), natural log, temperature 1."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    return (logq.exp() * (logq - reference_logp)).sum(-1)
