"""Shape recording: run the traced graph once and keep every node's output shape.

The pass the channel pass and the cost table read: like torch.fx's ``ShapeProp``, but it keeps only
what they need (``TensorInfo``: shape and whether the value is a Parameter; plain values for
non-tensors, e.g. the ints of ``x.size()``), so no activation stays alive. Each node runs under
``cost.count``'s own ``CostMode``, so the MACs and parameters of every node are measured by the
same convention as ``count`` (the cost table is built from them: docs/method.md §8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.graph.op_cost import CostMode
from curlprune.graph.tracing import eval_mode


@dataclass(frozen=True)
class TensorInfo:
    """What shape propagation keeps of a tensor value: its shape and whether it is a Parameter."""

    shape: tuple[int, ...]
    is_param: bool = False


@dataclass
class Propagated:
    """What one run of the traced graph recorded.

    values:      node -> TensorInfo (tensors) or the plain value (non-tensors).
    node_macs:   node -> MACs of its calls (whole batch, ``cost.count``'s convention); nodes with none left out.
    node_params: node -> the parameters its calls received (each node's own list; shared ones repeat).
    batch:       the example batch size (MACs per sample = node_macs // batch).
    """

    values: dict[fx.Node, Any] = field(default_factory=dict)
    node_macs: dict[fx.Node, int] = field(default_factory=dict)
    node_params: dict[fx.Node, list[nn.Parameter]] = field(default_factory=dict)
    batch: int = 1


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once; keeps each node's output shape (or value) and measures its cost."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.found = Propagated()

    def run_node(self, n: fx.Node) -> Any:
        mode = CostMode()
        with mode:
            result = super().run_node(n)
        self.found.values[n] = _static(result)
        if mode.macs:
            self.found.node_macs[n] = mode.macs
        if mode.used:
            self.found.node_params[n] = list(mode.used.values())
        return result


def _static(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), isinstance(value, nn.Parameter))
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return type(value)(_static(v) for v in value) if isinstance(value, tuple) else [_static(v) for v in value]
    return value


def propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_input: Any) -> dict[fx.Node, Any]:
    """Shape/value of every node for ``example_input`` (``propagate(...).values``)."""
    return propagate(gm, model, example_input).values


def propagate(gm: fx.GraphModule, model: nn.Module, example_input: Any) -> Propagated:
    """Shape/value and measured cost of every node for ``example_input`` (eval mode, no grad; modes restored).

    Args:
        gm: ``model`` traced (``symbolic_trace``).
        model: the traced model (its train/eval modes are restored afterwards).
        example_input: one batch the model accepts, or a tuple of its positional inputs.

    Returns:
        A :class:`Propagated`: ``values`` (``node -> TensorInfo`` for tensor outputs, the plain value,
        possibly nested, otherwise), and each node's measured MACs and parameters.

    Raises:
        CurlpruneError: the model fails on ``example_input`` (one line, the first line of the error).
    """
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
    recorder.found.batch = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
    return recorder.found
