"""MACs and parameters in the paper's convention, and CPU latency.

Convention (torchsummaryX "Mult-Adds", as CURL reports them), per ONE example:

* MACs: multiply-accumulates of convolutions and linear layers only. A conv costs
  ``Cout * Cin/groups * kH*kW * Hout*Wout`` (a depthwise conv ``C * k*k * H*W``), a transposed
  conv ``Cin * Cout/groups * kH*kW * Hin*Win``, a linear ``in * out`` per position it is applied
  at (tokens of ``[N, H, W, C]`` inputs), and ``nn.MultiheadAttention`` its four projections.
  BN, activations, pooling, residual adds and attention matmuls are not counted.
* Params: every ``nn.Parameter`` the forward pass uses, each once: conv/linear weights and biases,
  norm weights and biases (BN/LN/GN affine; running statistics are buffers, not counted) and any
  other parameter (ConvNeXt layer scale, ViT class token). Parameters of modules the eval-mode
  forward never touches (e.g. training-only auxiliary heads) are not counted.

Both are measured by running the model once under a TorchFunctionMode that sees every
convolution/linear call and every parameter passed to an op, so they work for any ``nn.Module``
(fx GraphModules and functional code included) and on the ``meta`` device.
"""
from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from curlprune.graph import eval_mode

CONVS = {F.conv1d, F.conv2d, F.conv3d}
TRANSPOSED_CONVS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class _CostMode(TorchFunctionMode):
    """Sums conv/linear MACs and records the parameters that ops receive."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.used: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") != "__get__":  # reading an attribute is not a use
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, nn.Parameter):
                    self.used[id(leaf)] = leaf
        self.macs += _call_macs(func, args, kwargs, out)
        return out


def _call_macs(func, args: tuple, kwargs: dict, out: Any) -> int:
    """Multiply-accumulates of one op call (whole batch); 0 for ops outside the convention."""
    if func in CONVS:
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return out.numel() * math.prod(weight.shape[1:])
    if func in TRANSPOSED_CONVS:
        x = kwargs.get("input", args[0])
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return x.numel() * math.prod(weight.shape[1:])
    if func is F.linear:
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return out.numel() * weight.shape[1]
    if func is F.multi_head_attention_forward:
        return _attention_projection_macs(_MHA_SIGNATURE.bind(*args, **kwargs).arguments)
    return 0


def _attention_projection_macs(a: dict[str, Any]) -> int:
    """MACs of the q/k/v input projections and the output projection of one attention call."""
    embed = a["embed_dim_to_check"]
    tokens = {name: a[name].numel() // a[name].shape[-1] for name in ("query", "key", "value")}
    widths = {name: a[name].shape[-1] for name in ("query", "key", "value")}
    projections = sum(tokens[name] * widths[name] * embed for name in tokens)
    return projections + tokens["query"] * embed * embed


def count(model: nn.Module, example_input: Any) -> tuple[int, int]:
    """(MACs per example, params) of ``model`` at the size of ``example_input`` (eval mode).

    The model's train/eval mode is restored afterwards.

    Args:
        model: any ``nn.Module`` (fx GraphModules and models on the ``meta`` device included).
        example_input: a batch ``[N, ...]`` (MACs are divided by ``N``) or a tuple of positional inputs.

    Returns:
        ``(macs, params)``: multiply-accumulates of convs, linears and attention projections per
        example, and the parameters the forward pass uses, each counted once.

    Source: docs/method.md §8 (the paper's MACs convention).
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = inputs[0].shape[0]
    mode = _CostMode()
    with torch.no_grad(), eval_mode(model), mode:
        model(*inputs)
    params = sum(p.numel() for p in mode.used.values())
    return round(mode.macs / batch), params


def measure_latency(model: nn.Module, example_input: torch.Tensor, warmup: int = 5, repeats: int = 20) -> dict[str, float]:
    """Wall-clock time of one forward pass of ``example_input`` in eval mode, channels_last.

    Converts the model to channels_last in place (values are unchanged) and restores its
    train/eval mode.

    Args:
        model: the model to time.
        example_input: the batch to run (``[N, C, H, W]``).
        warmup: untimed runs first.
        repeats: timed runs.

    Returns:
        ``median_ms``, ``mean_ms``, ``min_ms``, ``max_ms`` (milliseconds per forward of the whole
        batch), ``batch`` and ``threads`` (torch intra-op threads).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("measure_latency needs repeats >= 1 and warmup >= 0")
    model.to(memory_format=torch.channels_last)
    x = example_input.contiguous(memory_format=torch.channels_last) if example_input.dim() == 4 else example_input
    times = []
    with torch.inference_mode(), eval_mode(model):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "batch_size": int(x.shape[0]),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
