"""The Torch-Pruning column of the coverage sweep (optional extra: ``pip install curlprune[bench]``).

Per model, on the same random weights and input as curlprune's row (scripts/coverage_measure.py):
Torch-Pruning's group L2-norm pruner as its README recommends it, ``tp.pruner.MetaPruner(model,
example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
ignored_layers=[final classifier])`` (50% of the channels of every layer, no global ranking), one
``pruner.step()``, then a forward pass of the pruned model.

The ignored layers: every conv / linear that produces a model output, directly or through BN and
activations (the classifier of most models, a detector backbone's FPN output convs or last convs), plus, for classification and segmentation,
every conv / linear with as many outputs as the model has classes (TP's README: ``out_features ==
1000``; this also catches SqueezeNet's conv classifier and both heads of LRASPP and the auxiliary
classifiers).

Result (``tp`` field, one short phrase): ``ok`` (the step ran, the pruned model runs and returns
outputs of the same shapes, and parameters were removed), ``no change`` (nothing was removed),
``output shape changed``, or ``<ExceptionClass> in <build graph|step|forward>``.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn
from torch.utils import _pytree as pytree

from coverage_measure import build_random, example_input, first_line

try:
    import torch_pruning as tp
except ImportError:  # the optional extra is missing: the sweep says so per row
    tp = None

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def tp_version() -> str | None:
    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return None


def ignored_layers(model: nn.Module, x: torch.Tensor, dense: bool) -> list[nn.Module]:
    """The layers Torch-Pruning is told to leave whole (see the module docstring); ``dense``: a
    detector backbone (no classes: only the layers that produce the model outputs)."""
    producer: dict[int, tuple[nn.Module, tuple]] = {}  # id(output) -> innermost module, its inputs
    alive: list = []  # every output kept alive while ids are compared (a freed tensor's id is reused)

    def hook(mod, args, out):
        alive.append(out)
        producer.setdefault(id(out), (mod, args))  # the innermost module's hook fires first

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    chosen: list[nn.Module] = []
    for leaf in leaves:  # back from each output through channel-preserving leaf modules (BN, activations)
        tensor = leaf
        while id(tensor) in producer:
            module, args = producer[id(tensor)]
            if isinstance(module, LAYERS):
                chosen += [module] if module not in chosen else []
                break
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            if next(module.children(), None) is not None or not inputs or inputs[0].shape != tensor.shape:
                break
            tensor = inputs[0]
    if not dense:
        classes = {t.shape[1] for t in leaves if t.dim() >= 2}
        chosen += [m for m in model.modules() if m not in chosen and (
            isinstance(m, nn.Linear) and m.out_features in classes
            or isinstance(m, nn.modules.conv._ConvNd) and m.out_channels in classes)]
    return chosen


def shapes(out) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def measure_tp(name: str, row: dict) -> None:
    """Torch-Pruning on ``name``: fills ``row`` (``tp``, ``tp_error``, ``tp_ignored``, params before and
    after, ``stage``); an exception of Torch-Pruning is the finding and is recorded, not raised."""
    if tp is None:
        row.update(tp="not installed", tp_error="torch_pruning is not installed (pip install curlprune[bench])")
        return
    row["stage"] = "build"
    model = build_random(name)
    row["stage"] = "input"
    x = example_input(model)
    row["input"] = "x".join(map(str, x.shape))
    with torch.no_grad():
        before = shapes(model(x))
    ignored = ignored_layers(model, x, dense=name.startswith("detection:"))
    names = {m: n for n, m in model.named_modules()}
    row["tp_ignored"] = [names[m] for m in ignored][:20]
    row["params_full"] = sum(p.numel() for p in model.parameters())
    step = "build graph"
    try:
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=ignored)
        step = "step"
        pruner.step()
        step = "forward"
        with torch.no_grad():
            after = shapes(model(x))
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failure is the measurement
        row.update(tp=f"{type(exc).__name__} in {step}", tp_error=f"{type(exc).__name__}: {first_line(exc)}")
        return
    row["params_tp"] = sum(p.numel() for p in model.parameters())
    if after != before:
        row.update(tp="output shape changed", tp_error=f"{before[:3]} -> {after[:3]}")
    elif row["params_tp"] >= row["params_full"]:
        row["tp"] = "no change"
    else:
        row["tp"] = "ok"
    row["stage"] = "done"
