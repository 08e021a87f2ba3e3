"""MACs and parameters in the paper's convention (latency: :mod:`curlprune.cost.latency`).

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

from typing import Any

import torch
from torch import nn

from curlprune.graph import eval_mode
from curlprune.graph.op_cost import CostMode


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
    mode = CostMode()
    with torch.no_grad(), eval_mode(model), mode:
        model(*inputs)
    params = sum(p.numel() for p in mode.used.values())
    return round(mode.macs / batch), params
