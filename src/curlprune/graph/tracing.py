"""Tracing: a model as a torch.fx graph, and the small helpers every pass over it needs.

``CurlTracer`` keeps torch.nn modules and torchvision's StochasticDepth as leaves, traces what is
computed from buffers and lets the parts of a channel split be iterated; ``symbolic_trace`` turns any untraceable model into one CurlpruneError line;
``untouched`` keeps a trace from leaving attributes on the traced model; ``eval_mode`` runs a model in
eval mode and gives every submodule back its own mode.
"""
from __future__ import annotations

import bisect
import contextlib
import dis
import inspect
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torchvision.ops import StochasticDepth

from curlprune.errors import CurlpruneError
from curlprune.graph.layers import registered_leaf
from curlprune.graph.ops import known_leaf


# model -> fx node name -> parts of an int-size split, as measured by its last trace with an input
_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


class CurlTracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn modules, torchvision's StochasticDepth, the modules of
    other libraries that behave exactly like a torch.nn leaf (``ops.LEAF_CLASSES``: timm's
    Conv2dSame, Linear, DropPath, BatchNormAct2d with elementwise act/drop) and the layer types
    given to ``register_layer`` (``layers``).

    StochasticDepth (and DropPath, BatchNormAct2d) are leaves so that their training-time behaviour
    stays a module (switched by ``train()``/``eval()``) instead of being traced into the graph.

    Buffers read in traced code are ``get_attr`` nodes (``proxy_buffer_attributes``): arithmetic on
    them stays in the graph, tied to the buffer, instead of being folded at trace time into a
    ``_tensor_constant`` that loading other buffer values would not change.

    The result of ``chunk(n)`` / ``split([a, b, ...])`` can be iterated (``list(x.chunk(2, 1))``);
    so can ``split(k)`` with an int size, whose number of parts (``ceil(size / k)``) depends on the
    input's shape: it is taken from ``part_counts`` (fx node name -> parts) or from the last count
    :func:`trace_graph` measured on the same model; else the trace stops with :class:`PartsUnknown`.

    Args:
        part_counts: fx node name of an int-size split -> its number of parts, or None.
    """

    def __init__(self, part_counts: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True
        self.part_counts = dict(part_counts or {})

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Parts(node, self) if _splits(node) else super().proxy(node)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, StochasticDepth) or known_leaf(m) or registered_leaf(m)
            or super().is_leaf_module(m, module_qualified_name)
        )

    def count_parts(self, node: fx.Node) -> int:
        """How many parts the chunk/split ``node`` returns (see the class docstring).

        Raises:
            PartsUnknown: an int-size split whose count is neither given nor measured before.
        """
        fixed = _part_count(node)
        if fixed is not None:
            return fixed
        known = self.part_counts.get(node.name, _MEASURED.get(self.root, {}).get(node.name))
        if known is None:
            raise PartsUnknown(node)
        return known


class PartsUnknown(Exception):
    """Raised inside a trace: the parts of the int-size split ``node`` are iterated, and their
    number is not known yet (:func:`trace_graph` measures it and traces again)."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__(
            f"the parts of {node.name} (split by an int size) are iterated, and their number depends on the "
            "input's shape; trace with an example input, or split by a list of sizes"
        )
        self.node = node


def trace_graph(model: nn.Module, example_inputs: Sequence[Any] | None = None, part_counts: Mapping[str, int] | None = None) -> fx.Graph:
    """The fx graph of ``model`` (a :class:`CurlTracer` trace). Call it inside :func:`untouched`.

    Where the parts of a ``split`` by an int size are iterated and their number is not known, the
    graph traced up to that split is run on ``example_inputs`` (eval mode, no gradients; the model
    is not changed), the number of parts noted (also for later traces of ``model``), and the model
    traced again.

    Args:
        model: the model to trace.
        example_inputs: the model's positional inputs (``(x,)``, ``x`` ``[N, C, H, W]``), or None.
        part_counts: fx node name of an int-size split -> its number of parts, when already known.

    Returns:
        The ``torch.fx.Graph``.

    Raises:
        PartsUnknown: such a split, and no ``example_inputs``.
        Exception: whatever torch.fx raises for an untraceable model.
    """
    counts = dict(part_counts or {})
    while True:
        tracer = CurlTracer(counts)
        try:
            return tracer.trace(model)
        except PartsUnknown as need:
            if example_inputs is None or need.node.name in counts:
                raise
            graph = fx.Graph()
            copies: dict[fx.Node, fx.Node] = {}
            graph.graph_copy(tracer.graph, copies)
            graph.output(copies[need.node])
            runner = fx.GraphModule(model, graph)
            runner.graph.eliminate_dead_code()
            runner.recompile()
            with eval_mode(model), torch.no_grad():
                counts[need.node.name] = len(runner(*example_inputs))
            _MEASURED.setdefault(model, {})[need.node.name] = counts[need.node.name]


def _splits(node: fx.Node) -> bool:
    """Whether ``node`` is a chunk/split call (its result is a tuple of parts)."""
    if node.op not in ("call_method", "call_function"):
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in ("chunk", "split")


def _part_count(node: fx.Node) -> int | None:
    """How many parts a ``chunk(n)`` / ``split([a, b, ...])`` call returns, known from its arguments
    (None for ``split(k)`` with an int size, whose count depends on the input's shape)."""
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    second = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    if name == "chunk" and isinstance(second, int):
        return second
    if name == "split" and isinstance(second, (list, tuple)):
        return len(second)
    return None


class _Parts(fx.Proxy):
    """The result of a chunk/split: ``len`` and iteration work, so ``list(x.chunk(2, 1))`` (YOLOv8's
    C2f) and ``list(x.split(k, 1))`` trace into one ``getitem`` per part."""

    def __len__(self) -> int:
        return self.tracer.count_parts(self.node)

    def __iter__(self) -> Iterator[fx.Proxy]:
        caller = inspect.currentframe().f_back
        unpacked = _unpacked_count(caller) if caller is not None else None
        return iter([self[i] for i in range(unpacked if unpacked is not None else len(self))])


def _unpacked_count(frame: FrameType) -> int | None:
    """``n`` when ``frame`` is at an ``UNPACK_SEQUENCE n`` (``a, b = x.split(k, 1)``), else None: as
    torch.fx's own ``Proxy.__iter__`` does, so unpacking needs no part count."""
    instructions = list(dis.get_instructions(frame.f_code))
    at = bisect.bisect_left(instructions, frame.f_lasti, key=lambda ins: ins.offset)
    inst = instructions[at] if at < len(instructions) else None
    return inst.argval if inst is not None and inst.opname == "UNPACK_SEQUENCE" else None


def symbolic_trace(
    model: nn.Module, example_inputs: Sequence[Any] | None = None, part_counts: Mapping[str, int] | None = None
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares ``model``'s submodules and parameters.

    Args:
        model: any ``nn.Module`` whose forward is free of data-dependent Python control flow.
        example_inputs: the model's positional inputs (e.g. ``(x,)``, ``x`` ``[N, C, H, W]``), needed
            only when the parts of a ``split`` by an int size are iterated (:func:`trace_graph`).
        part_counts: fx node name of such a split -> its number of parts, when already known.

    Returns:
        A ``torch.fx.GraphModule`` (class name = the model's); its submodules are ``model``'s own.

    Raises:
        CurlpruneError: torch.fx cannot trace the model (one line, with fx's reason).
    """
    with untouched(model):
        try:
            graph = trace_graph(model, example_inputs, part_counts)
        except PartsUnknown as exc:
            raise CurlpruneError(f"cannot trace {type(model).__name__}: {exc}") from None
        except Exception as exc:  # fx raises many types for untraceable code
            raise CurlpruneError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
                "make its forward free of data-dependent Python control flow"
            ) from None
        return fx.GraphModule(model, graph, class_name=type(model).__name__)


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[nn.Module]:
    """Remove, on exit, every attribute added to ``model`` (the root) while inside.

    torch.fx stores the tensor constants it meets (``_tensor_constant0``, ...) on the traced root;
    build what needs them (the GraphModule, a deep copy) inside, and the user's model is left as it was.

    Args:
        model: the module about to be traced.

    Returns:
        A context manager yielding ``model``.
    """
    tables = ("__dict__", "_parameters", "_buffers", "_modules")
    before = {t: set(getattr(model, t) if t != "__dict__" else vars(model)) for t in tables}
    try:
        yield model
    finally:
        for t in tables:
            table = vars(model) if t == "__dict__" else getattr(model, t)
            for key in set(table) - before[t]:
                del table[key]


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` node's dotted ``target`` names under ``root``.

    Args:
        root: the traced module.
        target: a dotted attribute path, e.g. ``"features.1.layer_scale"``.

    Returns:
        The attribute (a Parameter, buffer or module).

    Raises:
        AttributeError: ``target`` does not exist under ``root``.
    """
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode while inside; then give every submodule back its own mode.

    Restoring per module (not ``model.train(was_training)``) keeps mixed modes, e.g. frozen
    batch norms in eval inside a model that trains.

    Args:
        model: the module to switch (in place).

    Returns:
        A context manager yielding ``model``.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
