"""Feature distillation aligned by the plan (issue 19 item 2; docs/method.md §5, "Feature distillation").

The student is the teacher sliced by a plan (group name -> kept channels of the ORIGINAL model), so
the channel map between their features is exact: the student's channel ``j`` of a tensor is the
teacher channel at the ``j``-th kept position of the same tensor. No adapter layers are learned.

* A **feature** is the output of a named module of the teacher (the sliced student keeps the names:
  a GraphModule from ``apply`` and a kept user class alike). A leaf module called several times in
  a forward (torchvision's ``BasicBlock.relu``) gives its last call's output; a container module
  (``layer1``, a block) gives the last tensor computed inside it. A channel group's name is the name
  of its first producing module, so a group name is a module name too.
* ``auto``: the output of every **residual stage**: for each distinct set of residual-stream
  (``outside``) groups a residual add writes into, the last such add; its feature is the outermost
  container module around it whose output still carries exactly those residual groups (``layer1``,
  ``layer2``, ``layer3`` of a CIFAR ResNet; the last residual block of each stage of a MobileNetV2).
* The **channel map** of a feature comes from the channel pass (:attr:`curlprune.cost.analysis.Analysis.channels`):
  for each position of the teacher's tensor, its (group, group channel); the kept positions are those
  whose channel the plan keeps (groups not in the plan are kept whole), in order.
* The **loss** per feature is the MSE between the student's feature and the teacher's feature at the
  kept positions, divided by the mean square of that teacher feature (per-layer normalisation, so
  each layer weighs the same whatever its scale; the normalised feature regression of FSKD, Li et al.
  CVPR 2020, and PRACTISE, Wang et al. CVPR 2023); the feature loss is the mean over the features.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from curlprune.channels import Plan
from curlprune.cost.analysis import Analysis, analyse
from curlprune.errors import CurlpruneError

AUTO = "auto"
_ADDS = {operator.add, operator.iadd, torch.add}
_EPS = 1e-12


@dataclass(frozen=True)
class FeatureMap:
    """One feature: ``module`` (its name as given), ``hook`` (the module whose output it is, hooked in
    teacher and student: the leaf module of the last call when the output is a module call's, which a
    sliced GraphModule runs too; else the container), ``dim`` (its channel dim) and ``kept`` (the
    teacher's positions along ``dim`` that the student's positions 0, 1, ... are)."""

    module: str
    hook: str
    dim: int
    kept: tuple[int, ...]


def _scopes(node: fx.Node) -> list[str]:
    """The module paths a traced node lies in, outermost first (the call of a leaf module included)."""
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def output_node(an: Analysis, name: str) -> fx.Node:
    """The traced node whose value is the output of module ``name``: the last call of a leaf module,
    the last node computed inside a container.

    Raises:
        CurlpruneError: no module of that name runs in the forward.
    """
    nodes = [n for n in an.gm.graph.nodes if n.op == "call_module" and n.target == name]
    nodes = nodes or [n for n in an.gm.graph.nodes if name in _scopes(n)]
    if not nodes:
        raise CurlpruneError(f"feature {name!r} is not a module of the model that runs in its forward: name a module "
                             f"(e.g. {', '.join(n.target for n in an.gm.graph.nodes if n.op == 'call_module')[:120]}) or use 'auto'")
    return nodes[-1]


def _residual_key(an: Analysis, node: fx.Node) -> frozenset[int]:
    """The residual-stream (outside) groups whose channels ``node``'s output carries."""
    layout = an.channels.get(node.name)
    if layout is None:
        return frozenset()
    return frozenset(g for g, _ in layout[1] if an.groups[g].kind == "outside")


def stage_outputs(an: Analysis) -> list[str]:
    """The modules ``auto`` names: the output of every residual stage (module docstring), in forward order."""
    last_add: dict[frozenset[int], fx.Node] = {}
    for n in an.gm.graph.nodes:
        is_add = (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))
        key = _residual_key(an, n) if is_add else frozenset()
        if key:
            last_add[key] = n
    names: list[str] = []
    for key, add in last_add.items():
        for scope in _scopes(add):  # outermost first
            if _residual_key(an, output_node(an, scope)) == key:
                if scope not in names:
                    names.append(scope)
                break
    return names


def feature_maps(teacher: nn.Module, example_input: torch.Tensor, plan: Plan, features: Sequence[str] | str) -> list[FeatureMap]:
    """The features to match and the channel map of each.

    Args:
        teacher: the unpruned model the plan was made on (traced once, cached; not changed).
        example_input: one batch it accepts (``[1, C, H, W]``, on the teacher's device).
        plan: group name -> kept channel indices of the original model (empty: the student is unpruned,
            every map is the identity).
        features: module (or group) names, or ``"auto"`` (:func:`stage_outputs`).
    Returns:
        One :class:`FeatureMap` per feature, in the given (or forward) order.
    Raises:
        CurlpruneError: an unknown name, a module whose output has no channel layout, a plan naming a
            group the model does not have, or ``auto`` on a model without residual stages.
    """
    an = analyse(teacher, example_input)
    names = [g.name for g in an.groups]
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise CurlpruneError(f"the plan names channel group {unknown[0]!r}, which the teacher does not have: "
                             "give the teacher the student was pruned from")
    modules = stage_outputs(an) if features == AUTO else list(features)
    if not modules:
        raise CurlpruneError("features: auto found no residual stage in the teacher: name the modules to match (features: [...])")
    kept_sets = {name: set(plan[name]) for name in plan}
    maps = []
    for module in modules:
        node = output_node(an, module)
        if node.name not in an.channels:
            raise CurlpruneError(f"feature {module!r}: its output has no channel dim the channel pass follows: name another module")
        dim, layout = an.channels[node.name]
        kept = tuple(p for p, (g, ch) in enumerate(layout) if names[g] not in kept_sets or ch in kept_sets[names[g]])
        maps.append(FeatureMap(module, node.target if node.op == "call_module" else module, dim, kept))
    return maps


class FeatureTap:
    """Forward hooks that keep the output of named modules (the last call's, per forward).

    Args:
        model: the model (teacher or student; not a DDP wrapper, whose ``module`` holds the names).
        modules: qualified module names.
    Raises:
        CurlpruneError: a name that is not a submodule of ``model``.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str]) -> None:
        found = dict(model.named_modules())
        missing = [m for m in modules if m not in found]
        if missing:
            raise CurlpruneError(f"feature {missing[0]!r} is not a module of the {type(model).__name__}: "
                                 "give module names the teacher and the student share")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [found[m].register_forward_hook(self._keeper(m)) for m in modules]

    def _keeper(self, name: str) -> Any:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[name] = output
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs kept since the last call (and forget them)."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.outputs = [], {}


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], maps: Sequence[FeatureMap]) -> torch.Tensor:
    """Mean over the features of ``MSE(s, t[kept]) / mean(t[kept]^2)`` (module docstring).

    Args:
        student, teacher: module name -> its output on the same batch (``[B, C, ...]``; the student's
            has ``len(kept)`` channels along ``dim``).
        maps: the features (:func:`feature_maps`).
    Returns:
        A scalar tensor (0 with no features).
    Raises:
        CurlpruneError: a feature missing from a forward, or a student feature whose shape is not the
            teacher's at the kept positions (the plan is not the one the student was sliced by).
    """
    total = None
    for fm in maps:
        if fm.hook not in student or fm.hook not in teacher:
            raise CurlpruneError(f"feature {fm.module!r} ({fm.hook}) was not computed in the forward: its output is a "
                                 "function's, not a module call's (a sliced GraphModule runs no containers): name a leaf module")
        t, s = teacher[fm.hook], student[fm.hook]
        t = t.index_select(fm.dim, torch.as_tensor(fm.kept, device=t.device, dtype=torch.long)).detach()
        if s.shape != t.shape:
            raise CurlpruneError(f"feature {fm.module!r}: the student's output is {tuple(s.shape)} but the teacher's kept "
                                 f"channels are {tuple(t.shape)}: give the plan the student was sliced by")
        term = (s.float() - t.float()).pow(2).mean() / (t.float().pow(2).mean() + _EPS)
        total = term if total is None else total + term
    return total / len(maps) if total is not None else torch.zeros(())
