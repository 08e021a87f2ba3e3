"""The op tables of the channel pass: which modules, functions and methods do what to channels.

Per-channel ops pass channels through, spatial ops need the channels on dim 1, cross-channel ops
make them unprunable; anything not listed here or in the layer table (``layers``: convs, linears,
norms) is unsupported (its channels become unprunable). Also the
small node helpers the op handlers share (target names, where a node sits, argument lookup).
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn
from torchvision.ops import StochasticDepth

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, StochasticDepth,
)
SPATIAL_MODULES = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd, nn.Upsample,
)
CROSS_CHANNEL_MODULES = (nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Softmax2d)
"""Parameter-free modules that mix channels at each position (norms with parameters are in ``layers``)."""
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

# Modules of other libraries that are exactly a torch.nn leaf (matched by (module, qualname), so no
# optional library is imported). fx only stops at torch.nn's own classes; traced through, these become
# functional ops on get_attr parameters, fail to trace (data-dependent padding), or freeze their
# train/eval branch into the traced graph. The last ones have their own layer rules keyed by the same
# (module, qualname) (``layers.CLASS_RULES``): timm's weight-standardised convs, BlurPool2d,
# GlobalResponseNorm and RMS norms.
STD_CONV_CLASSES = {
    ("timm.layers.std_conv", "StdConv2d"), ("timm.layers.std_conv", "StdConv2dSame"),
    ("timm.layers.std_conv", "ScaledStdConv2d"), ("timm.layers.std_conv", "ScaledStdConv2dSame"),
}
"""Convs whose weight is standardised per output channel before each call (BiT / NFNet)."""
BLUR_POOL_CLASSES = {("timm.layers.blur_pool", "BlurPool2d")}
"""A depthwise conv with a fixed (buffer) blur filter: per-channel, channels pass through."""
GRN_CLASSES = {("timm.layers.grn", "GlobalResponseNorm")}
"""ConvNeXt-V2's global response norm: per channel but for one mean over the channels."""
RMS_NORM_2D_CLASSES = {("timm.layers.norm", "RmsNorm2d"), ("timm.layers.norm", "RmsNorm2dFp32")}
"""timm's channels-first RMS norms (``rms_norm2d``: the mean of squares over dim 1); MobileNet-V5."""
RMS_NORM_CLASSES = {("timm.layers.norm", "RmsNorm"), ("timm.layers.norm", "RmsNormFp32")}
"""timm's RMS norms over the trailing ``normalized_shape`` dims (``F.rms_norm``), as ``nn.RMSNorm``."""
RMS_NORM_ACT_2D_CLASSES = {("timm.layers.norm_act", "RmsNormAct2d"), ("timm.layers.norm_act", "RmsNormAct2dFp32")}
RMS_NORM_ACT_CLASSES = {("timm.layers.norm_act", "RmsNormAct"), ("timm.layers.norm_act", "RmsNormActFp32")}
"""The same followed by an activation and dropout (``NORM_ACT_CLASSES``: leaves when both are elementwise)."""
LEAF_CLASSES = {
    ("timm.layers.conv2d_same", "Conv2dSame"),  # TF "same" padding (spatial) + F.conv2d(x, weight, bias)
    ("timm.layers.linear", "Linear"),  # F.linear(x, weight, bias)
    ("torchvision.ops.misc", "FrozenBatchNorm2d"),  # x * scale + bias from four buffers: a per-channel norm (layers)
    *STD_CONV_CLASSES,
    *BLUR_POOL_CLASSES,
    *GRN_CLASSES,
    *RMS_NORM_2D_CLASSES,
    *RMS_NORM_CLASSES,
}
ELEMENTWISE_CLASSES = {("timm.layers.drop", "DropPath")}  # per-sample drop of a whole residual branch
NORM_ACT_CLASSES = {
    ("timm.layers.norm_act", "BatchNormAct2d"), ("timm.layers.norm_act", "SyncBatchNormAct"),
    ("timm.layers.norm_act", "GroupNormAct"), ("timm.layers.norm_act", "GroupNorm1Act"),
    *RMS_NORM_ACT_2D_CLASSES, *RMS_NORM_ACT_CLASSES,
}
"""BatchNorm/GroupNorm/RMS norm subclasses that add an activation and dropout: leaves when both are
elementwise modules (their norm's layer rule applies)."""


def class_key(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__qualname__


def is_elementwise(m: nn.Module) -> bool:
    """An activation/dropout-like module: each channel's values depend on that channel only."""
    return isinstance(m, ELEMENTWISE_MODULES) or class_key(m) in ELEMENTWISE_CLASSES


def known_leaf(m: nn.Module) -> bool:
    """A module of another library that the tracer keeps as a leaf (see ``LEAF_CLASSES``)."""
    key = class_key(m)
    if key in LEAF_CLASSES or key in ELEMENTWISE_CLASSES:
        return True
    return key in NORM_ACT_CLASSES and all(is_elementwise(getattr(m, part, nn.Identity())) for part in ("act", "drop"))

UNARY_OPS = {
    "relu", "relu_", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "selu", "mish", "softplus", "hardtanh",
    "hardtanh_", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink", "threshold", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "clamp", "clamp_",
    "clamp_min", "clamp_max", "clip", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "log", "contiguous",
    "clone", "float", "half", "double", "bfloat16", "to", "type_as", "detach", "neg_", "abs_",
}
DTYPE_ONLY_OPS = {"to", "type_as"}
"""Unary ops whose tensor argument gives only a dtype/device (``x.to(other)``): not an operand."""
TENSOR_ARG_OPS = DTYPE_ONLY_OPS | {"expand_as", "view_as", "reshape_as", "layer_norm", "rms_norm", "group_norm"}
"""Ops whose tensor arguments give only a dtype or shape, or whose handler reads them (a layer or RMS
norm's affine parameters span the dims it normalises); any other op with a tensor argument besides its
input that is no elementwise operand makes the channels unprunable."""
BINARY_OPS = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "truediv", "div", "div_",
    "itruediv", "maximum", "minimum", "pow",
}
RESIDUAL_OPS = {"add", "add_", "iadd", "sub", "sub_", "isub", "rsub"}
SPATIAL_OPS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear",
}
REDUCE_OPS = {"mean", "sum", "amax", "amin", "norm", "var", "std"}
"""Reductions; ``norm`` (p, dim, keepdim) has its dims one argument later, ``var``/``std`` (dim,
unbiased, keepdim) their keepdim."""
SOFTMAX_OPS = {"softmax", "log_softmax", "softmin", "normalize"}
SHAPE_QUERIES = {"size", "dim", "numel", "nelement", "get_device", "len"}
"""Reads of a tensor's metadata (``len``: its first dim, in a trace against an example input)."""
TORCH_MODULES = ("torch", "_operator", "builtins")


def op_name(node: fx.Node) -> str | None:
    """Bare name of a call_function/call_method target from torch/operator, else None."""
    if node.op == "call_method":
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    if module.split(".")[0] in TORCH_MODULES:
        return getattr(node.target, "__name__", None)
    return None


def target_str(node: fx.Node) -> str:
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", str(node.target))
    return f"{module}.{name}" if module and module != "builtins" else name


def where(node: fx.Node) -> str:
    """``node <name> in <module path> (<class>)``: where a traced op sits in the model."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"node {node.name}"
    key, value = list(stack.items())[-1]
    path, cls = value if isinstance(value, tuple) and len(value) == 2 else (key, value)
    return f"node {node.name} in {path} ({getattr(cls, '__name__', cls)})"


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def normalises_channels(channel_dim: int, ndim: int, n_normalised: int) -> bool:
    """Whether a layer norm over the last ``n_normalised`` of ``ndim`` dims reaches the channel dim."""
    return channel_dim >= ndim - n_normalised


def fmt_index(item: Any) -> str:
    if isinstance(item, slice):
        return f"[{'' if item.start is None else item.start}:{'' if item.stop is None else item.stop}{'' if item.step is None else ':' + str(item.step)}]"
    return f"[{item!r}]"
