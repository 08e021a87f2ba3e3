"""Tracing: a model as a torch.fx graph, and the small helpers every pass over it needs.

``CurlTracer`` keeps torch.nn modules and torchvision's StochasticDepth as leaves and traces what is
computed from buffers; ``symbolic_trace`` turns any untraceable model into one CurlpruneError line;
``untouched`` keeps a trace from leaving attributes on the traced model; ``eval_mode`` runs a model in
eval mode and gives every submodule back its own mode.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.fx as fx
from torch import nn
from torchvision.ops import StochasticDepth

from curlprune.errors import CurlpruneError
from curlprune.graph.layers import registered_leaf
from curlprune.graph.ops import known_leaf


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
    """

    def __init__(self) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Parts(node, self) if _part_count(node) is not None else super().proxy(node)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, StochasticDepth) or known_leaf(m) or registered_leaf(m)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _part_count(node: fx.Node) -> int | None:
    """How many parts a ``chunk(n)`` / ``split([a, b, ...])`` call returns, known from its arguments."""
    if node.op not in ("call_method", "call_function"):
        return None
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    second = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    if name == "chunk" and isinstance(second, int):
        return second
    if name == "split" and isinstance(second, (list, tuple)):
        return len(second)
    return None


class _Parts(fx.Proxy):
    """The result of a chunk/split whose number of parts is known: ``len`` and iteration work, so
    ``list(x.chunk(2, 1))`` (YOLOv8's C2f) traces into one ``getitem`` per part."""

    def __len__(self) -> int:
        return _part_count(self.node)

    def __iter__(self) -> Iterator[fx.Proxy]:
        return iter([self[i] for i in range(_part_count(self.node))])


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares ``model``'s submodules and parameters.

    Args:
        model: any ``nn.Module`` whose forward is free of data-dependent Python control flow.

    Returns:
        A ``torch.fx.GraphModule`` (class name = the model's); its submodules are ``model``'s own.

    Raises:
        CurlpruneError: torch.fx cannot trace the model (one line, with fx's reason).
    """
    with untouched(model):
        try:
            graph = CurlTracer().trace(model)
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
