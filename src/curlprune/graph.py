"""Channel-group discovery: which channels of a CNN must be removed together.

CONTRACT (fixed; other modules rely on these names and meanings):

* ``trace(model, example_input) -> list[ChannelGroup]`` traces ``model`` with torch.fx
  (module leaves: torch.nn modules and torchvision's StochasticDepth), propagates shapes with
  ``example_input`` and returns the channel groups in topological order of their first member.
* A ChannelGroup's channel ``i`` (0 <= i < width) is one channel that exists or dies together in
  every member. Each member says where that channel lives in one tensor of one module/parameter.
* A Plan is ``dict[str, list[int]]``: group name -> sorted kept channel indices (group index
  space). Groups not named are kept whole. JSON-serialisable as it is.

HOW (the analysis below): every channel position of every traced tensor is a slot in a union-find.
Convs and linears create fresh output slots; per-channel ops (BN, activations, pooling, ...) pass the
slots through; residual adds, squeeze-excitation scales, depthwise convs, concatenation, channel
zero-padding and flatten tie slots together. The classes of the union-find are the channels of the
groups; classes that appear in exactly the same tensors form one group. Any op that mixes channels
other than a conv or linear, or that this module does not know, makes the channels it touches
unprunable with a reason, so a plan can never silently build a wrong model.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import math
import operator
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from torchvision.ops import StochasticDepth

from curlprune.errors import CurlpruneError

if TYPE_CHECKING:
    from curlprune.cost_plan import CostTable


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


Plan = dict[str, list[int]]

SliceKey = tuple[str, str]
"""(module, parameter or fx node name; role): what one Member slices."""


# ----------------------------------------------------------------------------------------------
# tracing


class CurlTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules and torchvision's StochasticDepth.

    StochasticDepth is a leaf so that its training-time behaviour stays a module (switched by
    ``train()``/``eval()``) instead of being traced into the graph.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, StochasticDepth) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares ``model``'s submodules and parameters."""
    try:
        graph = CurlTracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        raise CurlpruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "make its forward free of data-dependent Python control flow"
        ) from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` node's dotted ``target`` names under ``root``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class TensorInfo:
    """What shape propagation keeps of a tensor value: its shape and whether it is a Parameter."""

    shape: tuple[int, ...]
    is_param: bool = False


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and keeps each node's output shape (tensors) or value (non-tensors)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = _static(result)
        return result


def _static(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), isinstance(value, nn.Parameter))
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(_static(v) for v in value) if isinstance(value, tuple) else [_static(v) for v in value]
    return value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode while inside; then give every submodule back its own mode.

    Restoring per module (not ``model.train(was_training)``) keeps mixed modes, e.g. frozen
    batch norms in eval inside a model that trains.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_input: Any) -> dict[fx.Node, Any]:
    """Shape/value of every node for ``example_input`` (eval mode, no grad; modes restored)."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        recorder = _ShapeRecorder(gm)
        with torch.no_grad(), eval_mode(model):
            recorder.run(*inputs)
    except CurlpruneError:
        raise
    except Exception as exc:
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        first_line = (str(exc).strip().splitlines() or [""])[0]  # fx appends the failing node on more lines
        raise CurlpruneError(
            f"{type(model).__name__} failed on the example input of shape {shapes} ({type(exc).__name__}: {first_line}); "
            "pass an input the model accepts, e.g. torch.zeros(1, 3, 224, 224)"
        ) from None
    return recorder.values


# ----------------------------------------------------------------------------------------------
# union-find over channel slots


class _Slots:
    """Union-find over channel slots, with an unprunable reason and a residual flag per class."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}
        self.residual: set[int] = set()

    def fresh(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.reason:
            self.reason.setdefault(ra, self.reason.pop(rb))
        if rb in self.residual:
            self.residual.discard(rb)
            self.residual.add(ra)

    def union_all(self, xs: Sequence[int], ys: Sequence[int]) -> None:
        for a, b in zip(xs, ys, strict=True):
            self.union(a, b)

    def mark(self, slots: Iterable[int], reason: str) -> None:
        for s in slots:
            self.reason.setdefault(self.find(s), reason)

    def mark_residual(self, slots: Iterable[int]) -> None:
        for s in slots:
            self.residual.add(self.find(s))


@dataclass(frozen=True)
class _Layout:
    """Which dim of a tensor holds the channels, and the slot of each position along it."""

    dim: int
    slots: list[int]


@dataclass
class _Source:
    """One member-to-be: slots along ``dim`` of a module/parameter tensor family."""

    dim: int
    slots: list[int]


# ----------------------------------------------------------------------------------------------
# op tables

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, StochasticDepth,
)
_SPATIAL_MODULES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd, nn.Upsample,
)
CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
"""Per-channel norms: their weight, bias and running statistics are a ``"channel"`` member (surgery and cost follow)."""
_CROSS_CHANNEL_MODULES = (nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Softmax2d)
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

_UNARY_OPS = {
    "relu", "relu_", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "selu", "mish", "softplus", "hardtanh",
    "hardtanh_", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink", "threshold", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clamp", "clamp_",
    "clamp_min", "clamp_max", "clip", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "log", "contiguous",
    "clone", "float", "half", "double", "bfloat16", "to", "type_as", "detach", "neg_", "abs_",
}
_BINARY_OPS = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "truediv", "div", "div_",
    "itruediv", "maximum", "minimum", "pow",
}
_RESIDUAL_OPS = {"add", "add_", "iadd", "sub", "sub_", "isub", "rsub"}
_SPATIAL_OPS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear",
}
_REDUCE_OPS = {"mean", "sum", "amax", "amin"}
_SOFTMAX_OPS = {"softmax", "log_softmax", "softmin", "normalize"}
_SHAPE_QUERIES = {"size", "dim", "numel", "nelement", "get_device"}
_TORCH_MODULES = ("torch", "_operator", "builtins")


def _op_name(node: fx.Node) -> str | None:
    """Bare name of a call_function/call_method target from torch/operator, else None."""
    if node.op == "call_method":
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    if module.split(".")[0] in _TORCH_MODULES:
        return getattr(node.target, "__name__", None)
    return None


def _target_str(node: fx.Node) -> str:
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", str(node.target))
    return f"{module}.{name}" if module and module != "builtins" else name


def _where(node: fx.Node) -> str:
    """``node <name> in <module path> (<class>)``: where a traced op sits in the model."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"node {node.name}"
    key, value = list(stack.items())[-1]
    path, cls = value if isinstance(value, tuple) and len(value) == 2 else (key, value)
    return f"node {node.name} in {path} ({getattr(cls, '__name__', cls)})"


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ----------------------------------------------------------------------------------------------
# the analysis


class _ChannelAnalysis:
    """Walks the fx graph once and ties channel slots together (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
        self.gm = gm
        self.values = values
        self.modules = dict(gm.named_modules())
        self.uf = _Slots()
        self.layouts: dict[fx.Node, _Layout] = {}
        self.sources: dict[SliceKey, _Source] = {}
        self.node_sources: dict[SliceKey, _Source] = {}
        self.units: list[tuple[str, int, list[int]]] = []  # (conv name, channels per conv group, slots)

    # -- helpers -------------------------------------------------------------------------------

    def shape(self, n: Any) -> tuple[int, ...] | None:
        info = self.values.get(n) if isinstance(n, fx.Node) else None
        return info.shape if isinstance(info, TensorInfo) else None

    def value(self, a: Any) -> Any:
        """Concrete value of an argument (nodes resolved to what shape propagation saw)."""
        return fx.node.map_arg(a, lambda n: self.values.get(n))

    def layout(self, n: Any) -> _Layout | None:
        return self.layouts.get(n) if isinstance(n, fx.Node) else None

    def fresh_layout(self, n: fx.Node, dim: int) -> _Layout:
        return _Layout(dim, self.uf.fresh(self.shape(n)[dim]))

    def add_source(self, table: dict[SliceKey, _Source], key: SliceKey, dim: int, slots: list[int]) -> None:
        """Register a member slice; a module used twice must slice its tensors the same way."""
        if key not in table:
            table[key] = _Source(dim, slots)
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
        reason = reason or f"unsupported op {_target_str(node)} at {_where(node)}"
        for n in self.tensor_inputs(node):
            if (lay := self.layout(n)) is not None:
                self.uf.mark(lay.slots, reason)
        shape = self.shape(node)
        if shape is not None and len(shape) >= 2:
            lay = self.fresh_layout(node, 1)
            self.uf.mark(lay.slots, reason)
            self.layouts[node] = lay

    def cross_channel(self, node: fx.Node, lay: _Layout, what: str) -> None:
        """A per-position op that normalises/mixes across channels: pass through, unprunable."""
        self.uf.mark(lay.slots, f"normalised across channels by {what}")
        self.layouts[node] = lay

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = self.shape(node)
                if shape is not None and len(shape) >= 2:
                    lay = self.fresh_layout(node, 1)
                    self.uf.mark(lay.slots, "model input")
                    self.layouts[node] = lay
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_op(node)
            elif node.op == "output":
                for n in self.tensor_inputs(node):
                    if (lay := self.layout(n)) is not None:
                        self.uf.mark(lay.slots, "feeds the model output")

    # -- modules -------------------------------------------------------------------------------

    def call_module(self, node: fx.Node) -> None:
        name = str(node.target)
        mod = self.modules[name]
        x = node.args[0] if node.args else None
        lay = self.layout(x)
        if self.shape(node) is None or lay is None:
            return self.unsupported(node)
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
            return self.conv(node, name, mod, lay)
        if isinstance(mod, nn.Linear):
            return self.linear(node, name, lay)
        if isinstance(mod, CHANNEL_NORMS) and lay.dim == 1:
            if mod.weight is not None or mod.running_mean is not None:
                self.add_source(self.sources, (name, "channel"), 0, lay.slots)
            self.layouts[node] = lay
            return None
        if isinstance(mod, nn.PReLU) and (mod.num_parameters == 1 or lay.dim == 1):
            if mod.num_parameters > 1:
                self.add_source(self.sources, (name, "channel"), 0, lay.slots)
            self.layouts[node] = lay
            return None
        if isinstance(mod, _ELEMENTWISE_MODULES):
            self.layouts[node] = lay
            return None
        if isinstance(mod, _SPATIAL_MODULES) and lay.dim == 1 and not getattr(mod, "return_indices", False):
            self.layouts[node] = lay
            return None
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, _SOFTMAX_MODULES):
            if mod.dim is not None and _norm_dim(mod.dim, len(self.shape(x))) != lay.dim:
                self.layouts[node] = lay
                return None
            return self.cross_channel(node, lay, f"{type(mod).__name__} at {name}")
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(node, lay, len(mod.normalized_shape), f"LayerNorm at {name}")
        if isinstance(mod, _CROSS_CHANNEL_MODULES):
            return self.cross_channel(node, lay, f"{type(mod).__name__} at {name}")
        if isinstance(mod, nn.modules.padding._ConstantPadNd) and len(mod.padding) // 2 < len(self.shape(x)) - lay.dim:
            self.layouts[node] = lay
            return None
        return self.unsupported(node, f"unsupported module {type(mod).__name__} at {name}")

    def conv(self, node: fx.Node, name: str, mod: nn.Module, lay: _Layout) -> None:
        if lay.dim != 1:
            return self.unsupported(node, f"conv {name} reads a tensor whose channels are not on dim 1")
        cin, cout, groups = mod.in_channels, mod.out_channels, mod.groups
        if groups == 1:
            out = self.fresh_layout(node, 1)
            self.add_source(self.sources, (name, "out"), 0, out.slots)
            self.add_source(self.sources, (name, "in"), 1, lay.slots)
        elif cin == cout:
            # depthwise (or grouped with as many in as out channels per conv group): out i is in i
            out = lay
            self.add_source(self.sources, (name, "out"), 0, out.slots)
            if cin // groups > 1:
                self.units.append((name, cin // groups, out.slots))
        else:
            out = self.fresh_layout(node, 1)
            reason = f"grouped conv {name} (groups={groups}, {cin}->{cout} channels) cannot be sliced per channel"
            self.uf.mark(out.slots, reason)
            self.uf.mark(lay.slots, reason)
        self.layouts[node] = out
        return None

    def linear(self, node: fx.Node, name: str, lay: _Layout) -> None:
        ndim = len(self.shape(node))
        if lay.dim != len(self.shape(node.args[0])) - 1:
            return self.unsupported(node, f"linear {name} reads a tensor whose channels are not its last dim")
        out = self.fresh_layout(node, ndim - 1)
        self.add_source(self.sources, (name, "out"), 0, out.slots)
        self.add_source(self.sources, (name, "in"), 1, lay.slots)
        self.layouts[node] = out
        return None

    def layer_norm(self, node: fx.Node, lay: _Layout, n_normalised: int, what: str) -> None:
        if lay.dim >= len(self.shape(node)) - n_normalised:
            return self.cross_channel(node, lay, what)
        self.layouts[node] = lay
        return None

    # -- functions and methods -----------------------------------------------------------------

    def call_op(self, node: fx.Node) -> None:
        name = _op_name(node)
        if self.shape(node) is None:
            # a non-tensor result: shape queries are harmless, anything else reading channels is not
            if name in _SHAPE_QUERIES or node.target in (builtins.getattr, operator.getitem) or not any(
                self.layout(n) is not None for n in self.tensor_inputs(node)
            ):
                return None
            return self.unsupported(node)
        x = node.args[0] if node.args else None
        lay = self.layout(x)
        if name in _BINARY_OPS:
            return self.binary(node, name)
        if name == "getitem" and lay is not None:
            return self.getitem(node, x, lay)
        if name in ("cat", "concat", "concatenate"):
            return self.cat(node)
        if lay is None:
            return self.unsupported(node)
        if name in _UNARY_OPS:
            self.layouts[node] = lay
            return None
        if name in _SPATIAL_OPS and lay.dim == 1:
            self.layouts[node] = lay
            return None
        if name in _REDUCE_OPS:
            return self.reduce(node, x, lay)
        if name == "flatten":
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if name in ("view", "reshape"):
            return self.reshape(node, x, lay)
        if name in ("permute", "transpose", "swapaxes", "unsqueeze", "squeeze"):
            return self.move_dims(node, name, x, lay)
        if name == "pad":
            return self.pad(node, x, lay)
        if name in _SOFTMAX_OPS:
            dim = _arg(node, 1, "dim", 1 if name == "normalize" else None)
            if dim is not None and _norm_dim(self.value(dim), len(self.shape(x))) != lay.dim:
                self.layouts[node] = lay
                return None
            return self.cross_channel(node, lay, f"{name} at {_where(node)}")
        if name == "layer_norm":
            return self.layer_norm(node, lay, len(self.value(_arg(node, 1, "normalized_shape"))), f"layer_norm at {_where(node)}")
        if name in ("group_norm", "local_response_norm"):
            return self.cross_channel(node, lay, f"{name} at {_where(node)}")
        return self.unsupported(node)

    def binary(self, node: fx.Node, name: str) -> None:
        """Broadcasting elementwise op: operands carrying the full channel dim are tied."""
        out_shape = self.shape(node)
        ndim = len(out_shape)
        operands = list(node.args[:2])
        if len(operands) < 2:
            operands.append(node.kwargs.get("other", node.kwargs.get("exponent")))
        laid = [(a, self.layout(a)) for a in operands if self.layout(a) is not None]
        dims = {lay.dim + ndim - len(self.shape(a)) for a, lay in laid}
        if len(dims) != 1:
            return self.unsupported(node)
        dim = dims.pop()
        width = out_shape[dim]
        full = [lay for a, lay in laid if len(lay.slots) == width]
        if not full:
            return self.unsupported(node)
        out = _Layout(dim, full[0].slots)
        for a, lay in laid:
            if len(lay.slots) == width:
                self.uf.union_all(out.slots, lay.slots)
            else:
                self.uf.mark(lay.slots, f"broadcast across channels at {_where(node)}")
        for a in operands:
            shape = self.shape(a)
            if shape is None or self.layout(a) is not None:
                continue
            op_dim = dim - (ndim - len(shape))
            if op_dim < 0 or shape[op_dim] == 1:
                continue
            if a.op == "get_attr":  # a parameter/buffer used directly, e.g. ConvNeXt's layer_scale
                self.add_source(self.sources, (str(a.target), "param"), op_dim, out.slots)
            else:
                self.uf.mark(out.slots, f"combined with an untracked tensor at {_where(node)}")
        if name in _RESIDUAL_OPS and len(full) >= 2:
            self.uf.mark_residual(out.slots)
        self.layouts[node] = out
        return None

    def getitem(self, node: fx.Node, x: fx.Node, lay: _Layout) -> None:
        """Basic indexing that keeps every channel (e.g. ``x[:, :, ::2, ::2]``)."""
        index = self.value(node.args[1])
        index = index if isinstance(index, tuple) else (index,)
        in_shape = self.shape(x)
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:at] + (slice(None),) * (len(in_shape) - consumed) + index[at + 1:]
        in_dim = out_dim = 0
        new_dim = None
        for item in index:
            if item is None:
                out_dim += 1
                continue
            if in_dim == lay.dim:
                if not isinstance(item, slice) or range(*item.indices(in_shape[in_dim])) != range(in_shape[in_dim]):
                    return self.unsupported(node, f"channel selection {_fmt_index(item)} at {_where(node)}")
                new_dim = out_dim
            if isinstance(item, slice):
                out_dim += 1
            elif not isinstance(item, int):
                return self.unsupported(node)
            in_dim += 1
        if new_dim is None:
            new_dim = lay.dim - in_dim + out_dim
        self.layouts[node] = _Layout(new_dim, lay.slots)
        return None

    def cat(self, node: fx.Node) -> None:
        parts = _arg(node, 0, "tensors")
        lays = [self.layout(p) for p in parts]
        if any(lay is None for lay in lays) or len({lay.dim for lay in lays}) != 1:
            return self.unsupported(node)
        cdim = lays[0].dim
        dim = _norm_dim(self.value(_arg(node, 1, "dim", 0)), len(self.shape(node)))
        if dim == cdim:
            self.layouts[node] = _Layout(cdim, [s for lay in lays for s in lay.slots])
            return None
        if len({len(lay.slots) for lay in lays}) != 1:
            return self.unsupported(node)
        for lay in lays[1:]:
            self.uf.union_all(lays[0].slots, lay.slots)
        self.layouts[node] = lays[0]
        return None

    def pad(self, node: fx.Node, x: fx.Node, lay: _Layout) -> None:
        """F.pad; zero-padding the channel dim (option-A shortcut) adds fresh zero channels."""
        amounts = list(self.value(_arg(node, 1, "pad")))
        mode = self.value(_arg(node, 2, "mode", "constant"))
        k = len(self.shape(x)) - 1 - lay.dim  # pair index of the channel dim
        if len(amounts) <= 2 * k:
            self.layouts[node] = lay
            return None
        front, back = amounts[2 * k], amounts[2 * k + 1]
        if front == back == 0:
            self.layouts[node] = lay
            return None
        if mode != "constant" or front < 0 or back < 0:
            return self.unsupported(node, f"{mode} pad of the channel dim at {_where(node)}")
        front_slots, back_slots = self.uf.fresh(front), self.uf.fresh(back)
        from_end = lay.dim - len(self.shape(x))
        self.add_source(self.node_sources, (node.name, "pad_front"), from_end, front_slots)
        self.add_source(self.node_sources, (node.name, "pad_back"), from_end, back_slots)
        self.layouts[node] = _Layout(lay.dim, front_slots + lay.slots + back_slots)
        return None

    def reduce(self, node: fx.Node, x: fx.Node, lay: _Layout) -> None:
        ndim = len(self.shape(x))
        dims = self.value(_arg(node, 1, "dim"))
        if dims is None:
            return self.unsupported(node)
        dims = {_norm_dim(d, ndim) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if lay.dim in dims:
            return self.unsupported(node, f"{_op_name(node)} over the channel dim at {_where(node)}")
        keepdim = self.value(_arg(node, 2, "keepdim", False))
        new_dim = lay.dim if keepdim else lay.dim - sum(1 for d in dims if d < lay.dim)
        self.layouts[node] = _Layout(new_dim, lay.slots)
        return None

    def flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        """Merging dims start..end: channel c owns the positions of its block (flatten -> linear)."""
        in_shape = self.shape(x)
        lay = self.layout(x)
        ndim = len(in_shape)
        start, end = _norm_dim(self.value(start), ndim), _norm_dim(self.value(end), ndim)
        if lay.dim < start or end <= start:
            self.layouts[node] = lay
            return None
        if lay.dim > end:
            self.layouts[node] = _Layout(lay.dim - (end - start), lay.slots)
            return None
        if start == 0:
            return self.unsupported(node, f"flatten of the batch dim with channels at {_where(node)}")
        outer = math.prod(in_shape[start:lay.dim])
        inner = math.prod(in_shape[lay.dim + 1:end + 1])
        slots = [s for _ in range(outer) for s in lay.slots for _ in range(inner)]
        self.layouts[node] = _Layout(start, slots)
        return None

    def reshape(self, node: fx.Node, x: fx.Node, lay: _Layout) -> None:
        """view/reshape: identity or a flatten of adjacent dims; channel sizes must not be constants."""
        in_shape, out_shape = self.shape(x), self.shape(node)
        raw = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("shape"),)
        if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
            raw = tuple(raw[0])
        if in_shape == out_shape:
            self.layouts[node] = lay
            return None
        for start in range(len(in_shape)):
            for end in range(start + 1, len(in_shape)):
                merged = in_shape[:start] + (math.prod(in_shape[start:end + 1]),) + in_shape[end + 1:]
                if merged != out_shape:
                    continue
                if start <= lay.dim <= end and len(raw) == len(out_shape) and isinstance(raw[start], int) and raw[start] != -1:
                    return self.unsupported(node, f"reshape to a constant size {raw[start]} over channels at {_where(node)}")
                return self.flatten(node, x, start, end)
        return self.unsupported(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} at {_where(node)}")

    def move_dims(self, node: fx.Node, name: str, x: fx.Node, lay: _Layout) -> None:
        in_ndim, out_ndim = len(self.shape(x)), len(self.shape(node))
        args = [self.value(a) for a in node.args[1:]] or list(self.value(list(node.kwargs.values())))
        if name == "permute":
            dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            new_dim = [_norm_dim(d, in_ndim) for d in dims].index(lay.dim)
        elif name in ("transpose", "swapaxes"):
            a, b = (_norm_dim(d, in_ndim) for d in args[:2])
            new_dim = b if lay.dim == a else a if lay.dim == b else lay.dim
        elif name == "unsqueeze":
            d = _norm_dim(args[0], out_ndim)
            new_dim = lay.dim + (1 if d <= lay.dim else 0)
        else:  # squeeze
            shape = self.shape(x)
            if args and args[0] is not None:
                gone = {_norm_dim(d, in_ndim) for d in (args[0] if isinstance(args[0], (tuple, list)) else (args[0],))}
            else:
                gone = set(range(in_ndim))
            gone = {d for d in gone if shape[d] == 1}
            if lay.dim in gone:
                return self.unsupported(node, f"squeeze of the channel dim at {_where(node)}")
            new_dim = lay.dim - sum(1 for d in gone if d < lay.dim)
        self.layouts[node] = _Layout(new_dim, lay.slots)
        return None


def _fmt_index(item: Any) -> str:
    if isinstance(item, slice):
        return f"[{'' if item.start is None else item.start}:{'' if item.stop is None else item.stop}{'' if item.step is None else ':' + str(item.step)}]"
    return f"[{item!r}]"


# ----------------------------------------------------------------------------------------------
# from slot classes to ChannelGroups


@dataclass
class Analysis:
    """Everything one trace knows.

    gm:     the traced GraphModule; it shares the model's modules and its node names are the ones
            in ``ChannelGroup.nodes`` (for partial evaluation, e.g. by the KL criterion).
    groups: the channel groups (do not modify; ``trace`` returns copies).
    cost:   the cost table behind ``plan_cost`` and the per-channel savings.
    """

    gm: fx.GraphModule
    groups: list[ChannelGroup]
    cost: CostTable


def _build_groups(an: _ChannelAnalysis) -> list[ChannelGroup]:
    uf = an.uf
    nodes = [n for n in an.gm.graph.nodes if n in an.layouts]
    # where every class appears: node list (topological) and first position
    appears: dict[int, list[int]] = {}
    first_pos: dict[int, int] = {}
    for k, n in enumerate(nodes):
        for p, s in enumerate(an.layouts[n].slots):
            r = uf.find(s)
            seen = appears.setdefault(r, [])
            if not seen:
                first_pos[r] = p
            if not seen or seen[-1] != k:
                seen.append(k)
    by_signature: dict[tuple[int, ...], list[int]] = {}
    for r, seen in appears.items():
        by_signature.setdefault(tuple(seen), []).append(r)
    signatures = sorted(by_signature, key=lambda sig: (sig[0], min(first_pos[r] for r in by_signature[sig])))
    where: dict[int, tuple[int, int]] = {}  # class root -> (group id, channel)
    roots_of: list[list[int]] = []
    for gid, sig in enumerate(signatures):
        roots = sorted(by_signature[sig], key=first_pos.__getitem__)
        roots_of.append(roots)
        for ch, r in enumerate(roots):
            where[r] = (gid, ch)

    def members_of(table: dict[SliceKey, _Source]) -> list[list[Member]]:
        out: list[list[Member]] = [[] for _ in signatures]
        for (module, role), src in table.items():
            index: dict[int, list[list[int]]] = {}
            for p, s in enumerate(src.slots):
                gid, ch = where[uf.find(s)]
                if gid not in index:
                    index[gid] = [[] for _ in roots_of[gid]]
                index[gid][ch].append(p)
            for gid, positions in index.items():
                out[gid].append(Member(module, role, src.dim, tuple(tuple(ps) for ps in positions)))
        return out

    members = members_of(an.sources)
    node_members = members_of(an.node_sources)
    units = _group_units(an, where, roots_of)

    groups: list[ChannelGroup] = []
    used: dict[str, int] = {}
    for gid, sig in enumerate(signatures):
        roots = roots_of[gid]
        reason = next((uf.reason[r] for r in roots if r in uf.reason), "")
        unit, unit_problem = units.get(gid, (1, ""))
        reason = reason or unit_problem
        if not reason and any(not ps for m in members[gid] for ps in m.index):
            reason = "internal: a member misses some of the group's channels"
        producer = next((m.module for m in members[gid] if m.role == "out"), nodes[sig[0]].name)
        used[producer] = used.get(producer, 0) + 1
        name = producer if used[producer] == 1 else f"{producer}#{used[producer]}"
        groups.append(ChannelGroup(
            name=name,
            width=len(roots),
            kind="outside" if any(r in uf.residual for r in roots) else "inside",
            prunable=not reason,
            reason=reason,
            unit=unit,
            members=members[gid],
            macs_per_channel=[],
            params_per_channel=[],
            nodes=[nodes[k].name for k in sig],
            node_members=node_members[gid],
        ))
    return groups


def _group_units(an: _ChannelAnalysis, where: dict[int, tuple[int, int]], roots_of: list[list[int]]) -> dict[int, tuple[int, str]]:
    """Unit (channels per conv group) of groups that run through grouped convs, or why not usable."""
    result: dict[int, tuple[int, str]] = {}
    for conv, a, slots in an.units:
        for start in range(0, len(slots), a):
            block = [where[an.uf.find(s)] for s in slots[start:start + a]]
            gids = {gid for gid, _ in block}
            chans = [ch for _, ch in block]
            gid = block[0][0]
            aligned = len(gids) == 1 and chans == list(range(chans[0], chans[0] + a)) and chans[0] % a == 0
            known_unit = result.get(gid, (a, ""))[0]
            if not aligned or known_unit != a:
                problem = f"grouped conv {conv}: its conv groups of {a} channels do not line up with whole group channels"
                for g in gids:
                    result[g] = (result.get(g, (1, ""))[0], problem)
            elif gid not in result:
                result[gid] = (a, "")
    return result


# ----------------------------------------------------------------------------------------------
# public entry points


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Analysis]]" = weakref.WeakKeyDictionary()


def analyse(model: nn.Module, example_input: Any) -> Analysis:
    """Trace ``model`` and find its channel groups and cost table.

    Cached per model object, input shape and architecture fingerprint (module names, types and
    settings), so new weights reuse the analysis and a replaced/resized module triggers a new one.
    """
    if not isinstance(model, nn.Module):
        raise CurlpruneError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    from curlprune.cost_plan import build_cost_table

    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    key = (tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs), _fingerprint(model))
    cached = _CACHE.get(model, {})
    if key in cached:
        return cached[key]
    gm = symbolic_trace(model)
    values = _propagate_shapes(gm, model, example_input)
    an = _ChannelAnalysis(gm, values)
    an.run()
    groups = _build_groups(an)
    param_dims = {module: src.dim for (module, role), src in an.sources.items() if role == "param"}
    cost = build_cost_table(gm, values, param_dims)
    for g in groups:
        g.macs_per_channel, g.params_per_channel = cost.channel_savings(g)
    result = Analysis(gm, groups, cost)
    _CACHE.setdefault(model, {})[key] = result
    return result


def _fingerprint(model: nn.Module) -> tuple:
    """What the analysis depends on besides the code: every module's name, type and settings."""
    return tuple((name, type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules())


def trace(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Channel groups of ``model`` (see the module docstring), in topological order.

    ``example_input`` is one batch the model accepts (e.g. ``torch.zeros(1, 3, 224, 224)``);
    per-channel MACs are per sample at this input size. The model is run once in eval mode under
    ``no_grad``; its train/eval modes are restored. Each call returns fresh group objects.
    """
    return [_copy_group(g) for g in analyse(model, example_input).groups]


def _copy_group(g: ChannelGroup) -> ChannelGroup:
    """A copy that callers may modify; Members are immutable and shared."""
    return dataclasses.replace(
        g,
        members=list(g.members),
        macs_per_channel=list(g.macs_per_channel),
        params_per_channel=list(g.params_per_channel),
        nodes=list(g.nodes),
        node_members=list(g.node_members),
    )
