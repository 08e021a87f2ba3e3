"""An inference copy of a model: BN folded into its convs and residual adds done in place.

Removing channels only shortens the convs; what runs between them (batch norm, the residual
adds) does not shrink with the MACs, and a traced model (what :func:`curlprune.apply` returns)
loses the original's in-place ``out += identity``, because torch.fx records it as an
out-of-place add that allocates a fresh output every block. On ResNet-56 at batch 64 on one
CPU thread these two account for most of the gap between the MACs ratio and the measured
speed-up (``benchmarks/results/latency.md``, "Where the time goes").

:func:`optimize_for_inference` is what a deployment does to both the unpruned and the pruned
model, and what :func:`curlprune.cost.latency.prepare` measures:

1. trace with :class:`curlprune.graph.tracing.CurlTracer` (a GraphModule is used as it is);
2. fold every ``Conv -> BatchNorm`` pair whose conv output feeds only the BN into the conv,
   with torch's own pass (``torch.fx.experimental.optimization.fuse``);
3. turn ``a + b`` into ``a += b`` where ``a`` is the output of a conv, linear or batch-norm
   module that nothing else reads (the add is its only user, so no value anyone else sees
   changes; those modules' backward passes do not read their own output), and the sum has
   ``a``'s shape and dtype: known from an example input (``ShapeProp``), or else checked at each
   call (:func:`add_in_place`; a broadcast add such as GCNet's ``y + conv(y.mean((2, 3), keepdim=True))``
   then stays out of place).

The result is for inference: it is in eval mode, and a forward hook that keeps a reference to
a conv's output would see the sum, as it would on torchvision's ResNets.
"""
from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from curlprune.graph.capture import capture

_FRESH = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ADD_FUNCTIONS = (operator.add, torch.add)


def _is_add(node: fx.Node) -> bool:
    """``a + b``, ``torch.add(a, b)`` or ``a.add(b)`` with two positional operands and no
    keyword (``alpha=`` or ``out=`` change what the add computes)."""
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target == "add"


def add_in_place(a: torch.Tensor, b: object) -> torch.Tensor:
    """``a += b`` when the sum has ``a``'s shape and dtype, else ``a + b`` (same values either way).

    The in-place form :func:`inplace_adds` writes where shapes are not known before the call.

    Args:
        a: a tensor nothing else reads (a fresh conv/linear/BN output).
        b: the other operand (a tensor or a number).

    Returns:
        The sum: ``a`` itself when written in place, else a new tensor.
    """
    if (
        isinstance(b, torch.Tensor)
        and a.shape == torch.broadcast_shapes(a.shape, b.shape)
        and a.dtype == torch.result_type(a, b)
    ):
        a += b
        return a
    return a + b


def _writable(node: object, other: object, modules: dict[str, nn.Module]) -> object:
    """How the sum of ``node`` and ``other`` may be written into ``node``'s tensor, when ``node`` is
    a conv/linear/BN output that nothing else reads: ``operator.iadd`` when the recorded shapes and
    dtypes show that the sum has ``node``'s, :func:`add_in_place` when none are recorded; None when
    it may not."""
    if not isinstance(node, fx.Node) or not isinstance(other, fx.Node) or node is other:
        return None
    if node.op != "call_module" or len(node.users) != 1 or not isinstance(modules.get(node.target), _FRESH):
        return None
    metas = [n.meta.get("tensor_meta") for n in (node, other)]
    if all(isinstance(m, TensorMetadata) for m in metas):
        same_shape = metas[0].shape == torch.broadcast_shapes(metas[0].shape, metas[1].shape)
        same_dtype = metas[0].dtype == torch.promote_types(metas[0].dtype, metas[1].dtype)
        return operator.iadd if same_shape and same_dtype else None
    return add_in_place


def inplace_adds(gm: fx.GraphModule) -> int:
    """Rewrite ``a + b`` as ``a += b`` in ``gm`` (changed in place, recompiled) where ``a`` is
    the output of a conv/linear/BN module read only by this add and both operands are tensors.

    ``torch.add(a, b)`` and ``a.add(b)`` count as ``a + b``. When only ``b`` qualifies, the add
    becomes ``b += a`` (tensor addition is commutative, so the values are the same). With shape
    metadata (``ShapeProp``) the add becomes ``operator.iadd`` where the sum has ``a``'s shape and
    dtype; without it, :func:`add_in_place`, which checks that at each call.

    Returns the number of adds rewritten. The values computed are unchanged.
    """
    modules = dict(gm.named_modules())
    count = 0
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        first, second = node.args
        target = _writable(first, second, modules)
        if target is None:
            target = _writable(second, first, modules)
            first, second = second, first
        if target is None:
            continue
        node.op, node.target, node.args = "call_function", target, (first, second)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def optimize_for_inference(model: nn.Module, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """An eval-mode, channels_last inference copy of ``model`` that computes the same outputs.

    Args:
        model: any model :func:`curlprune.trace` handles (the original is not changed).
        example_input: optional input batch (e.g. ``[1, 3, H, W]``); when given, shapes are
            propagated so an add whose second operand broadcasts to a larger shape is left as is.
            Without it, an add with a fresh conv/linear/BN output as an operand checks the shapes
            at each call and adds in place where the sum fits (:func:`add_in_place`).

    Returns:
        A ``torch.fx.GraphModule``: BN folded into the preceding convs (and linears) whose
        output only the BN reads, residual adds in place (:func:`inplace_adds`), eval mode,
        4-D weights in channels_last.

    Raises:
        curlprune.errors.CurlpruneError: when the model cannot be traced (one line, as in
        :func:`curlprune.trace`).

    Source: docs/method.md §9 (measured latency).
    """
    clone = copy.deepcopy(model).eval()
    gm = clone if isinstance(clone, fx.GraphModule) else capture(clone, example_input)
    gm = fuse(gm, inplace=True, no_trace=True).eval()
    if example_input is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    inplace_adds(gm)
    return gm.to(memory_format=torch.channels_last)
