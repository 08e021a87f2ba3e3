"""Tracing against an example input: torch.fx with every node's value carried along.

torch.fx's symbolic trace stops where a forward turns a traced value into a Python value: a branch
on a shape (timm's VGG head ``if x.shape[-2] < 7``, MobileViT's ``if new_h != H``), ``max(pad, 0)``
in TF "same" padding (NASNet, PNASNet), ``int()``, ``len()``, ``range()`` of a size.
:class:`ConcreteTracer` traces the same way, but it also runs each node on the example input as it
records it, so every proxy knows its value. Where Python needs a value, the tracer answers with the
example input's and writes a *guard* into the graph (:func:`check_specialised`): a node that checks,
each time the graph runs, that the value is still the one the trace was made with, and raises
:class:`SpecialisedInputError` (one line) where it is not. The graph is therefore specialised to the
example input's shapes, and says so when it meets an input it does not fit, instead of silently
taking a branch the forward would not take. Integer arithmetic that Python does not force (``H // p``
passed on to a ``reshape``) stays in the graph as nodes, as in a symbolic trace.

A branch on a tensor's *values* (``if x.mean() > 0``, ``int(t.item())``) is not specialised: it is
a :class:`DataDependentError`, which the capture (:mod:`curlprune.graph.capture`) answers by keeping
the module that branches whole.

Source: docs/method.md §1 (tracing).
"""
from __future__ import annotations

import builtins
import dis
import inspect
import os
import sys
import traceback
from bisect import bisect_left
from collections.abc import Collection, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import has_side_effect
from torch.fx.proxy import Attribute

from curlprune.errors import CurlpruneError
from curlprune.graph.tracing import CurlTracer, _part_count, fetch_attr

SHAPE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous",
                 "is_floating_point", "is_complex", "element_size"}
"""Tensor methods that read a tensor's metadata, not its values."""
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized"}
"""Tensor attributes that are metadata, not values."""
PLAIN_ATTRIBUTES = {"dtype", "device", "is_cuda", "layout"}
"""Tensor attributes a concrete proxy answers with the example's plain value (``torch.autocast(device_type=
x.device.type)`` needs a str): the graph is specialised to the example's dtype and device, never to a size."""


class SpecialisedInputError(CurlpruneError):
    """A graph traced against an example input met an input on which one of its recorded branches
    (or sizes read as Python values) differs from the example's."""


class DataDependentError(Exception):
    """A forward branches on (or reads as a Python number) a tensor's values: no trace can hold it."""


@has_side_effect  # kept by dead-code elimination: the graph's check that it fits its input
def check_specialised(value: Any, expected: Any, site: str) -> Any:
    """The guard a specialised graph runs: ``value`` must be what the example input gave.

    Args:
        value: the value computed now (an int, bool or float read from shapes).
        expected: the value at the example input (a bool for a branch).
        site: where the forward read it (module path, source file and line).

    Returns:
        ``value`` unchanged.

    Raises:
        SpecialisedInputError: ``value`` differs (one line: where, the traced and the new value).
    """
    actual = bool(value) if isinstance(expected, bool) else value
    if actual != expected:
        raise SpecialisedInputError(
            f"this graph was traced against an example input and is specialised to it: at {site} the value was "
            f"{expected!r} there and is {actual!r} for this input; trace the model again with an input of this shape"
        )
    return value


class ConcreteTracer(CurlTracer):
    """A :class:`CurlTracer` that runs every node on ``inputs`` as it records it (see the module text).

    Args:
        inputs: the example input, one value per positional argument of the forward.
        leaves: qualified names of submodules to keep as leaves (called, not traced into).

    After ``trace``, ``guards`` lists one line per specialisation (where, and the value fixed there).
    The model must be in the mode the graph is for (eval) and gradients off while it traces.
    """

    def __init__(self, inputs: tuple, leaves: Collection[str] = ()) -> None:
        super().__init__()
        self.inputs = list(inputs)
        self.leaves = set(leaves)
        self.values: dict[fx.Node, Any] = {}
        self.data: set[fx.Node] = set()  # nodes whose value depends on a tensor's values
        self.guards: list[str] = []
        self._running = 0  # > 0 while a node runs: module calls and attribute reads are plain ones
        self._placeholders = 0
        self._defaults: list[Any] = []  # values of the forward's arguments after ``inputs`` (their defaults)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` at ``inputs``; the forward's later arguments keep their plain defaults
        (``mask=None``: fixed, as torch.fx's ``concrete_args``, instead of a proxy that is never None)."""
        if concrete_args is None and isinstance(root, nn.Module):
            kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            params = [p for p in list(inspect.signature(type(root).forward).parameters.values())[1:] if p.kind in kinds]
            later = params[len(self.inputs):]
            if all(p.default is not inspect.Parameter.empty for p in later):
                self._defaults = [p.default for p in later]
                concrete_args = {p.name: p.default for p in later if p.default is None or isinstance(p.default, (bool, int, float, str))}
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._running:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "curlprune_module"):  # the innermost module that failed to trace
                try:
                    exc.curlprune_module = self.path_of_module(m)
                except (AttributeError, NameError):
                    pass
            raise

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        return attr_val if self._running else super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            value = self._evaluate(node)
            self.values[node] = value
            if isinstance(value, torch.Tensor) or _reads_values(node, self.data):
                self.data.add(node)
        return node

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            i, self._placeholders = self._placeholders, self._placeholders + 1
            if i < len(self.inputs):
                return self.inputs[i]
            later = i - len(self.inputs)
            return self._defaults[later] if later < len(self._defaults) else (node.args[0] if node.args else None)
        self._running += 1
        try:
            if node.op == "get_attr":
                return fetch_attr(self.root, str(node.target))
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.values.__getitem__)
            try:
                if node.op == "call_module":
                    return self.root.get_submodule(str(node.target))(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
            except CurlpruneError:
                raise
            except Exception as exc:  # the model's own forward fails here: no trace can help
                raise EvaluationError(exc, site(self)) from exc
        finally:
            self._running -= 1

    # -- where Python needs a value --------------------------------------------------------------

    def concretise(self, proxy: fx.Proxy, what: str) -> Any:
        """The example input's value of ``proxy``, with a guard node that checks it at each run.

        Args:
            proxy: a traced value Python needs as a value.
            what: ``"branch"`` (a bool is needed), ``"length"`` (len), or ``"number"`` (int/float/index).

        Returns:
            The value at the example input (a bool for a branch).

        Raises:
            DataDependentError: the value depends on a tensor's values, not only on shapes.
        """
        node = proxy.node
        where = site(self)
        if node in self.data:
            raise DataDependentError(f"its forward reads a tensor's values as a Python {what} at {where}")
        value = self.values[node]
        expected = bool(value) if what == "branch" else value
        self.create_proxy("call_function", check_specialised, (proxy, expected, where), {})
        self.guards.append(f"{where}: {what} {expected!r}")
        return expected

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a traced value: the example's answer, guarded (``concretise``)."""
        return self.concretise(obj, "branch")

    def iter(self, obj: fx.Proxy) -> Iterator:
        """Iterating a traced value: one ``getitem`` per item, as many as the example has (guarded)."""
        return iter([obj[i] for i in range(len(obj))])

    def length(self, obj: fx.Proxy) -> int:
        """``len(obj)``: the part count of a chunk/split, else the example's, guarded."""
        parts = _part_count(obj.node)
        if parts is not None:
            return parts
        return self.concretise(self.create_proxy("call_function", builtins.len, (obj,), {}), "length")


class EvaluationError(Exception):
    """The model's own code failed on the example input while a node ran (not a tracing limit):
    ``graph.capture`` turns it into one line asking for an input the model accepts."""

    def __init__(self, exc: Exception, where: str) -> None:
        super().__init__(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]} at {where}")
        self.original = exc


def _reads_values(node: fx.Node, data: set[fx.Node]) -> bool:
    """Whether a non-tensor node's value depends on tensor values (``item()``) and not only on shapes."""
    if node.op in ("placeholder", "get_attr"):
        return False
    if node.op == "call_module":
        return True
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return False
    if node.target is builtins.getattr and len(node.args) > 1 and node.args[1] in SHAPE_ATTRIBUTES:
        return False
    if node.target is builtins.len:
        return False
    return any(n in data for n in node.all_input_nodes)


class _ConcreteProxy(fx.Proxy):
    """A proxy whose tracer knows its value: ``len``, iteration, ``int``/``float``/index work."""

    def __getattr__(self, k: str) -> Any:
        value = self.tracer.values.get(self.node) if k in PLAIN_ATTRIBUTES else None
        if isinstance(value, torch.Tensor):
            return getattr(value, k)
        return _ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is not None:  # ``a, b = proxy``: as many items as the unpacking names (as torch.fx)
            instructions = list(dis.get_instructions(caller.f_code))
            at = bisect_left(instructions, caller.f_lasti, key=lambda i: i.offset) if sys.version_info >= (3, 11) else caller.f_lasti // 2
            if at < len(instructions) and instructions[at].opname == "UNPACK_SEQUENCE":
                return iter([self[i] for i in range(instructions[at].argval)])
        return self.tracer.iter(self)

    def __index__(self) -> int:
        return self.tracer.concretise(self, "number")

    def __int__(self) -> int:
        return int(self.tracer.concretise(self, "number"))

    def __float__(self) -> float:
        return float(self.tracer.concretise(self, "number"))


class _ConcreteAttribute(Attribute, _ConcreteProxy):
    """``proxy.attr`` (``x.shape``) of a concrete proxy, itself concrete (``len(x.shape)`` works)."""


def site(tracer: fx.Tracer) -> str:
    """``module path (Class), file:line `code` `` of the forward line being traced now."""
    stack = list(getattr(tracer, "module_stack", {}).values())
    root = getattr(tracer, "root", None)
    module = (f"{stack[-1][0] or '<root>'} ({getattr(stack[-1][1], '__name__', stack[-1][1])})" if stack
              else f"<root> ({type(root).__name__})")
    here = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(torch_dir) or path.startswith(here):
            continue
        line = (frame.line or "").strip()
        code = f" `{line[:60]}{'...' if len(line) > 60 else ''}`" if line else ""
        return f"{module}, {os.sep.join(path.split(os.sep)[-2:])}:{frame.lineno}{code}"
    return module
