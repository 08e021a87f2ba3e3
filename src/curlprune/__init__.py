"""curlprune: residual-aware channel pruning (CURL) and limited-data accuracy recovery.

Public API (imported lazily so that ``import curlprune`` stays cheap):

    pruned = curlprune.prune(model, example_input, data=images, target_macs=0.5)  # the CLI's prune, one call
    pruned.model, pruned.plan, pruned.report                                    # Pruned
    student = curlprune.distill(pruned.model, model, "data.zip", input_spec=spec, epochs=30)
    curlprune.recalibrate_bn(model, images, 2048)         # re-estimate BN statistics in place
    groups = curlprune.trace(model, example_input)        # list[ChannelGroup]
    with curlprune.mask(model, groups, plan): ...         # zero removed channels in place
    small = curlprune.apply(model, groups, plan)          # physically smaller copy, your own class kept
    macs, params = curlprune.count(model, example_input)  # paper's convention
    curlprune.save(path, model_ref, plan, state_dict); model = curlprune.load(path)
    fast = curlprune.optimize_for_inference(small)       # BN folded, residual adds in place
    curlprune.register_layer(MyConv, curlprune.ChannelMixing({"weight": ("out", "in")}))  # your own layer
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "prune": "curlprune.run.api",
    "distill": "curlprune.run.api",
    "Pruned": "curlprune.run.prune_core",
    "recalibrate_bn": "curlprune.recover.bn",
    "trace": "curlprune.cost.analysis",
    "ChannelGroup": "curlprune.channels",
    "Member": "curlprune.channels",
    "Plan": "curlprune.channels",
    "mask": "curlprune.surgery.surgery",
    "apply": "curlprune.surgery.keep_class",
    "KeepClassWarning": "curlprune.surgery.keep_class",
    "validate_plan": "curlprune.surgery.surgery",
    "count": "curlprune.cost.cost",
    "plan_cost": "curlprune.cost.analysis",
    "save": "curlprune.store.checkpoint",
    "load": "curlprune.store.checkpoint",
    "export_onnx": "curlprune.store.checkpoint",
    "optimize_for_inference": "curlprune.surgery.inference",
    "CurlpruneError": "curlprune.errors",
    "register_layer": "curlprune.graph.layers",
    "LayerRule": "curlprune.graph.layer_rules",
    "ChannelMixing": "curlprune.graph.layer_rules",
    "PerChannel": "curlprune.graph.layer_rules",
}

__all__ = sorted(_API) + ["models", "__version__"]


def __getattr__(name: str):
    if name == "models":
        return importlib.import_module("curlprune.models")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'curlprune' has no attribute {name!r}")
