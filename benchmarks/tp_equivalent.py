"""Torch-Pruning 1.6.1 on the CIFAR ResNet-56 with option-A (zero-padding) shortcuts.

Torch-Pruning's dependency graph does not understand a shortcut that zero-pads the channel axis
(``F.pad`` of ``x[:, :, ::2, ::2]``): it merges the residual streams of the three stages into one
16-channel group, and the pruned model fails at forward (see ``tp_as_is``). The model is
therefore re-expressed exactly:

* ``SelectConv``: each zero-pad shortcut becomes a stride-2 1x1 convolution with a fixed 0/1
  weight, ``W[j + pad, j] = 1``. A 1x1 stride-2 convolution reads ``x[:, :, ::2, ::2]``, and each
  output is one input times 1 plus zeros, so the outputs are bit-identical (checked on real images).
  Torch-Pruning handles it like a projection shortcut; its importance ignores these fixed weights
  (they are not trained parameters of the original model), and they get no gradient.
* ``GatherShortcut``: after pruning, every ``SelectConv`` (now a partial 0/1 selection) is turned
  back into a parameter-free gather (output channel ``dst[i]`` = input channel ``src[i]``,
  the others zero), so the pruned model has the original's parameters and MACs convention (a
  shortcut costs nothing) and is again bit-identical to the pruned ``SelectConv`` model.

Torch-Pruning is a benchmark-only dependency (``pip install curlprune[bench]``).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from curlprune.models.cifar import ZeroPadShortcut


class SelectConv(nn.Conv2d):
    """A fixed 0/1 1x1 convolution that only moves channels (a zero-pad shortcut in conv form)."""


class GatherShortcut(nn.Module):
    """``out[:, dst] = x[:, src, ::2, ::2]``, other output channels zero; no parameters."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, out_channels: int) -> None:
        super().__init__()
        self.register_buffer("src", torch.as_tensor(src, dtype=torch.int64))
        self.register_buffer("dst", torch.as_tensor(dst, dtype=torch.int64))
        self.register_buffer("out_channels", torch.tensor(int(out_channels), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        out = x.new_zeros(x.shape[0], int(self.out_channels), x.shape[2], x.shape[3])
        out[:, self.dst] = x[:, self.src]
        return out


def _children(model: nn.Module, kind: type):
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, kind):
                yield parent, name, child


def conv_shortcut_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ZeroPadShortcut replaced by an equal SelectConv."""
    model = copy.deepcopy(model)
    for parent, name, child in list(_children(model, ZeroPadShortcut)):
        block = parent
        planes = block.conv2.out_channels
        in_channels = block.conv1.in_channels
        conv = SelectConv(in_channels, planes, kernel_size=1, stride=2, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            for j in range(in_channels):
                conv.weight[j + child.pad, j, 0, 0] = 1.0
        conv.weight.requires_grad_(False)
        setattr(parent, name, conv)
    return model


def gather_model(model: nn.Module) -> nn.Module:
    """A deep copy of a (pruned) SelectConv model with every SelectConv replaced by a GatherShortcut."""
    model = copy.deepcopy(model)
    for parent, name, conv in list(_children(model, SelectConv)):
        w = conv.weight.detach()[:, :, 0, 0]
        if not bool(((w == 0) | (w == 1)).all()) or bool((w.sum(1) > 1).any()) or bool((w.sum(0) > 1).any()):
            raise ValueError(f"{name}: the shortcut weight is no longer a 0/1 selection")
        dst, src = torch.nonzero(w, as_tuple=True)
        setattr(parent, name, GatherShortcut(src, dst, conv.out_channels))
    return model


def load_gather_model(base: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a pruned gather model from its state dict on a copy of the unpruned ``base``."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if isinstance(module, nn.Conv2d):
            w = state[f"{name}.weight"]
            new = nn.Conv2d(w.shape[1], w.shape[0], module.kernel_size, module.stride, module.padding, bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(state[f"{name}.weight"].shape[0])
        elif isinstance(module, nn.Linear):
            w = state[f"{name}.weight"]
            new = nn.Linear(w.shape[1], w.shape[0])
        elif isinstance(module, ZeroPadShortcut):
            new = GatherShortcut(state[f"{name}.src"], state[f"{name}.dst"], int(state[f"{name}.out_channels"]))
        else:
            continue
        setattr(parent, attr, new)
    model.load_state_dict(state, strict=True)
    return model.eval()


class _TrainedLayer(type):
    """isinstance(x, TrainedLayer): conv / linear / BN, except the fixed SelectConv shortcuts."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)) and not isinstance(obj, SelectConv)


class TrainedLayer(metaclass=_TrainedLayer):
    pass


def tp_as_is(model: nn.Module, example: torch.Tensor) -> dict:
    """What Torch-Pruning does with the zero-pad model unchanged: its groups, and a global prune at 50%."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = {m: n for n, m in model.named_modules()}
    groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))
    stream = max(groups, key=len)
    stream_convs = sorted({modules[dep.target.module] for dep, _ in stream if isinstance(dep.target.module, nn.Conv2d)} - {""})
    record = {"groups": len(groups), "largest_group_channels": len(stream[0][1]),
              "largest_group_convs": len(stream_convs),
              "largest_group_spans": sorted({c.split(".")[0] for c in stream_convs})}
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  global_pruning=True, pruning_ratio=0.5, ignored_layers=[model.linear])
    try:
        pruner.step()
        model(example)
        record["forward_after_prune"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        record["forward_after_prune"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return record


def tp_prune(
    model: nn.Module,
    example: torch.Tensor,
    importance: str,
    target_macs: float,
    count: Callable[[nn.Module], float],
    calib: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    max_pruning_ratio: float = 1.0,
    shortcuts_in: bool = False,
    iterative_steps: int = 400,
    max_steps: int = 3200,
) -> tuple[nn.Module, dict]:
    """Torch-Pruning's global pruning, stopped at the step whose MACs are nearest ``target_macs``.

    Torch-Pruning's own CIFAR recipe (``reproduce/main.py`` of its 1.6.1 release, not in the pip
    package; ``progressive_pruning`` with ``--method group_norm`` and ``--global-pruning``, without
    group_sl's sparse-learning epochs; its GroupNormPruner adds only their regulariser): MetaPruner,
    global_pruning=True, pruning_ratio=1.0 reached over ``iterative_steps`` = 400 steps,
    max_pruning_ratio=1.0, the classifier ignored, the model in eval mode; Taylor importance from a
    fresh backward pass of the cross-entropy on ``calib`` before every step. The run keeps the
    model before each step and returns the step nearest the target (above or below); when that is
    not within 1%, it runs again with a schedule twice as fine (up to ``max_steps``) and, if still
    outside, returns the nearest with ``within_1pct`` False (the caller flags the row).

    importance: "l1" (GroupMagnitudeImportance(p=1)), "l2" (GroupMagnitudeImportance(p=2), its
    default, data-free) or "taylor" (GroupTaylorImportance()); group reduction mean, mean
    normalisation (their defaults). max_pruning_ratio: the most any layer loses (0.7 = keep 30%,
    curlprune's floor), in Torch-Pruning's semantics: a group leaves the ranking once a layer is
    below the limit *before* a step, so one step can take it a few channels below (measured: the
    16-channel stage-1 stream kept 4 at 30% of the MACs, l2, cap 0.7; the rows record the widths). shortcuts_in: the fixed 0/1 shortcut convs count in the importance (their
    weights get gradients for Taylor; they are still turned back into gathers, never trained).
    ``count(model) -> MACs`` is the MACs convention; the fixed shortcuts' MACs are taken off.
    Returns the pruned gather model and a record (steps, history, seconds, achieved MACs).
    """
    started = time.time()
    tries = []
    steps = iterative_steps
    while True:
        pruned, record = _tp_run(model, example, importance, target_macs, count, calib, max_pruning_ratio,
                                 shortcuts_in, steps)
        tries.append({"iterative_steps": steps, "macs": record["macs"], "within_1pct": record["within_1pct"]})
        if record["within_1pct"] or steps * 2 > max_steps:
            break
        steps *= 2
    record.update(tries=tries, seconds=time.time() - started)
    return pruned, record


def _tp_run(model, example, importance, target_macs, count, calib, max_pruning_ratio, shortcuts_in, iterative_steps):
    import torch_pruning as tp

    from bench_stats import nearest_step, within

    conv_model = conv_shortcut_model(model).eval()
    shortcut_positions: dict[SelectConv, int] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: shortcut_positions.__setitem__(mod, out.shape[2] * out.shape[3]))
             for m in conv_model.modules() if isinstance(m, SelectConv)]
    with torch.no_grad():
        conv_model(example)
    for h in hooks:
        h.remove()
    if shortcuts_in:
        for m in shortcut_positions:
            m.weight.requires_grad_(True)

    def macs() -> float:
        fixed = sum(m.out_channels * m.in_channels * hw for m, hw in shortcut_positions.items())
        return count(conv_model) - fixed

    types = [nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm] if shortcuts_in else [TrainedLayer]
    if importance in ("l1", "l2"):
        imp = tp.importance.GroupMagnitudeImportance(p=1 if importance == "l1" else 2, target_types=types)
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance(target_types=types)
    else:
        raise ValueError(importance)
    pruner = tp.pruner.MetaPruner(conv_model, example, importance=imp, global_pruning=True, pruning_ratio=1.0,
                                  iterative_steps=iterative_steps, max_pruning_ratio=max_pruning_ratio,
                                  ignored_layers=[conv_model.linear])
    history = [macs()]
    previous = None
    while history[-1] > target_macs and len(history) <= iterative_steps:
        if importance == "taylor":
            assert calib is not None
            conv_model.zero_grad()
            F.cross_entropy(conv_model(calib[0]), calib[1]).backward()
        previous = copy.deepcopy(conv_model)
        pruner.step()
        history.append(macs())
    best = nearest_step(history, target_macs)
    chosen = conv_model if best == len(history) - 1 or previous is None else previous
    chosen.zero_grad(set_to_none=True)
    pruned = gather_model(chosen).eval()
    achieved = count(pruned)
    if abs(achieved - history[best]) > 0.5:
        raise AssertionError(f"gather model MACs {achieved} != {history[best]}")
    x = calib[0][:64] if calib is not None else example
    with torch.no_grad():
        same = float((pruned(x) - chosen(x)).abs().max())
    return pruned, {"steps": best, "of_steps": iterative_steps, "macs": achieved,
                    "macs_history_tail": [round(h) for h in history[-3:]],
                    "within_1pct": within(achieved, target_macs), "max_pruning_ratio": max_pruning_ratio,
                    "shortcuts_in_importance": shortcuts_in, "gather_vs_selectconv_max_abs_diff": same}
