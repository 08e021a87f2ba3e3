"""Capturing a model's graph: torch.fx's symbolic trace, else a trace against the example input,
else the same with the modules that cannot be traced kept whole.

1. :class:`~curlprune.graph.tracing.CurlTracer` (symbolic): the graph holds for every input size.
2. When that fails and an example input is known, :class:`~curlprune.graph.concrete.ConcreteTracer`
   traces against it: branches and Python numbers read from shapes take the example's values and
   the graph checks them at each run (guards). The groups and costs are those of that input size.
3. When a submodule still cannot be traced (its forward branches on a tensor's values), it becomes
   an *opaque leaf*: called as one module, its input and output channels unprunable with the reason,
   the rest of the model traced as before. A failure in the model's own forward itself (not in a
   submodule) cannot be helped: one line naming it.

A traced graph always reproduces the model: the specialised trace's output on the example input is
compared with the model's own forward before it is used. The example input and the leaves of a
specialised trace are remembered per architecture (:func:`architecture_key`), so ``apply`` and the
KL criterion, which trace again without an input, get the same graph (same node names).

Source: docs/method.md §1 (tracing).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from curlprune.errors import CurlpruneError, exception_summary
from curlprune.graph.concrete import ConcreteTracer, DataDependentError, EvaluationError
from curlprune.graph.tracing import eval_mode, trace_graph, untouched

TRACE_META = "curlprune_trace"
"""``GraphModule.meta`` key holding the :class:`Capture` (without its graph) of a captured model."""
MAX_LEAVES = 64
"""Most submodules a capture makes opaque before it gives up."""
_RECIPES: "OrderedDict[tuple, tuple[tuple, dict[str, str], tuple]]" = OrderedDict()
"""Architecture key -> (example input, opaque leaves, the key) of its last specialised capture (a deep copy finds it)."""
_OWN_RECIPES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, str], tuple]]" = weakref.WeakKeyDictionary()
"""Model -> the same, of its own last specialised capture (found first)."""
_MAX_RECIPES = 16


class SpecialisedTraceWarning(UserWarning):
    """A model was traced against its example input (torch.fx's symbolic trace fails): its groups and
    costs hold at that input size; the message says how (one line)."""


@dataclass
class Capture:
    """How a model's graph was captured.

    graph:       the traced ``fx.Graph`` (targets relative to the model).
    specialised: True when traced against an example input (torch.fx's symbolic trace failed).
    input_shapes: the example input's shapes a specialised graph holds for (``[(1, 3, 64, 64)]``).
    guards:      one line per value fixed to the example's (where, and the value).
    opaque:      qualified module name -> why it is kept whole (an opaque leaf).
    symbolic_error: why the symbolic trace failed ("" when it did not).
    """

    graph: fx.Graph | None
    specialised: bool = False
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    symbolic_error: str = ""

    def summary(self) -> str:
        """One line: how the graph was captured ("" for a symbolic trace)."""
        if not self.specialised:
            return ""
        kept = f"; {len(self.opaque)} module(s) kept whole ({', '.join(sorted(self.opaque)[:3])})" if self.opaque else ""
        return (f"traced against the example input {self.input_shapes} (torch.fx's symbolic trace fails: "
                f"{self.symbolic_error}); {len(self.guards)} value(s) read from shapes are fixed to that input's{kept}; "
                "the groups and costs hold at that input size")


def architecture_key(model: nn.Module) -> tuple:
    """What a trace depends on besides the code: every module's name, type and settings."""
    return tuple((name, type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules())


def capture_graph(model: nn.Module, example_input: Any = None, part_counts: Mapping[str, int] | None = None) -> Capture:
    """The graph of ``model``: symbolic if torch.fx can, else specialised to ``example_input``.

    Call it inside :func:`~curlprune.graph.tracing.untouched` (the tracers store tensor constants on
    the model) and build what needs them there.

    Args:
        model: the model (train/eval modes restored afterwards; a specialised trace runs it in eval mode).
        example_input: one batch the model accepts (``[N, C, H, W]``) or a tuple of its positional
            inputs; None: the one a previous specialised capture of this architecture used, if any.
        part_counts: fx node name of a split by an int size -> its number of parts, when known
            (:func:`curlprune.graph.tracing.trace_graph`; ``apply`` passes the groups' counts).

    Returns:
        A :class:`Capture`.

    Raises:
        CurlpruneError: the symbolic trace fails and no example input is known; the model fails on
            the example input; its root forward itself cannot be traced; or the trace does not
            reproduce the model's output (one line each, saying what to do).
    """
    try:
        return Capture(trace_graph(model, None if example_input is None else _as_tuple(example_input), part_counts))
    except Exception as exc:  # fx raises many types for untraceable code
        symbolic = exception_summary(exc)
    key = architecture_key(model)
    own = _OWN_RECIPES.get(model)
    recipe = own if own is not None and own[2] == key else _RECIPES.get(key)
    if example_input is None and recipe is None:
        raise CurlpruneError(
            f"cannot trace {type(model).__name__} with torch.fx ({symbolic}); pass an example input "
            "(curlprune.trace(model, x)) to trace it against that input, or make its forward free of data-dependent Python control flow"
        )
    inputs = _as_tuple(example_input) if example_input is not None else _on_device(recipe[0], model)
    leaves = dict(recipe[1]) if recipe is not None and example_input is None else {}
    cap = _specialised(model, inputs, leaves, symbolic)
    _RECIPES[key] = (tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs), dict(cap.opaque), key)
    _RECIPES.move_to_end(key)
    _OWN_RECIPES[model] = _RECIPES[key]
    while len(_RECIPES) > _MAX_RECIPES:
        _RECIPES.popitem(last=False)
    return cap


def capture(model: nn.Module, example_input: Any = None, part_counts: Mapping[str, int] | None = None) -> fx.GraphModule:
    """``model`` as a GraphModule sharing its submodules (:func:`capture_graph`); the model is left untouched.

    Args:
        model: any ``nn.Module``.
        example_input, part_counts: as in :func:`capture_graph`.

    Returns:
        A ``torch.fx.GraphModule`` (class name = the model's); ``gm.meta[TRACE_META]`` is the
        :class:`Capture` without its graph.

    Raises:
        CurlpruneError: as :func:`capture_graph`.
    """
    with untouched(model):
        cap = capture_graph(model, example_input, part_counts)
        gm = fx.GraphModule(model, cap.graph, class_name=type(model).__name__)
    cap.graph = None
    gm.meta[TRACE_META] = cap
    return gm


def inherit_trace(model: nn.Module, source: nn.Module) -> None:
    """Let ``model`` (e.g. ``source`` pruned, the user's class) be captured without an example input
    as ``source`` was: the same example input and opaque leaves. Nothing when ``source`` needed none.

    Args:
        model: a model of ``source``'s forward that takes the same inputs (a sliced copy).
        source: a model captured before (against an example input).
    """
    recipe = _OWN_RECIPES.get(source)
    if recipe is None:
        return
    key = architecture_key(model)
    _RECIPES[key] = (recipe[0], dict(recipe[1]), key)
    _OWN_RECIPES[model] = _RECIPES[key]
    while len(_RECIPES) > _MAX_RECIPES:
        _RECIPES.popitem(last=False)


def _specialised(model: nn.Module, inputs: tuple, leaves: dict[str, str], symbolic: str) -> Capture:
    """Trace against ``inputs``, making each submodule that cannot be traced a leaf, then check the graph."""
    name = type(model).__name__
    for _ in range(MAX_LEAVES + 1):
        tracer = ConcreteTracer(inputs, leaves)
        try:
            with torch.no_grad(), eval_mode(model):
                graph = tracer.trace(model)
        except EvaluationError as exc:
            shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
            raise CurlpruneError(
                f"{name} failed on the example input of shape {shapes} ({exc}); pass an input the model accepts, "
                "e.g. torch.zeros(1, 3, 224, 224)"
            ) from None
        except Exception as exc:
            path = getattr(exc, "curlprune_module", None)
            why = str(exc) if isinstance(exc, DataDependentError) else exception_summary(exc)
            if not path or path in leaves:
                raise CurlpruneError(
                    f"cannot trace {name}, neither with torch.fx ({symbolic}) nor against the example input: {why}; "
                    f"move that code into a submodule (it is then kept whole) or make {name}'s forward free of it"
                ) from None
            module = model.get_submodule(path)
            leaves[path] = f"{path} ({type(module).__name__}) cannot be traced ({why}), so it is kept whole"
            continue
        _check_reproduces(model, graph, tracer, inputs)
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        return Capture(graph, True, shapes, list(tracer.guards), dict(leaves), symbolic)
    raise CurlpruneError(f"cannot trace {name}: more than {MAX_LEAVES} of its modules cannot be traced ({symbolic})")


def _check_reproduces(model: nn.Module, graph: fx.Graph, tracer: ConcreteTracer, inputs: tuple) -> None:
    """The traced output on the example input must be the model's own output (no silently wrong graph)."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    traced = fx.node.map_arg(out_node.args[0], tracer.values.__getitem__)
    with torch.no_grad(), eval_mode(model):
        own = model(*inputs)
    left, spec_a = tree_flatten(traced)
    right, spec_b = tree_flatten(own)
    same = spec_a == spec_b and all(
        (not isinstance(a, torch.Tensor) and a == b) or (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6))
        for a, b in zip(left, right)
    )
    if not same:
        raise CurlpruneError(
            f"the trace of {type(model).__name__} against the example input does not reproduce its output; "
            "it cannot be pruned safely (please report the model)"
        )


def _as_tuple(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _on_device(inputs: tuple, model: nn.Module) -> tuple:
    """Remembered inputs moved to the device of ``model``'s first parameter or buffer."""
    device = next((t.device for t in list(model.parameters()) + list(model.buffers())), torch.device("cpu"))
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
