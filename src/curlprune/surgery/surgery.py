"""Plans on models: check them, mask them (same shapes, zeros) and apply them (smaller model).

The invariant that holds the project together: for every supported model and plan,

    with mask(model, groups, plan):
        y_masked = model(x)
    y_sliced = apply(model, groups, plan)(x)

agree up to float round-off. ``mask`` zeroes the removed channels at the input of every module that
mixes channels (convs with ``groups == 1``, linears; also a global response norm, whose one mean over
the channels must not see them: the layers' ``"in"`` members): a removed channel reaches kept channels only
through such modules, because every other op the groups run through is per channel (BN,
activations, pooling, residual adds) or ties whole conv groups (depthwise/grouped convs), and
anything else makes the group unprunable in ``trace``.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.channels import ChannelGroup, Plan, SliceKey
from curlprune.graph.layer_rules import LayerRule, keep_index, replace_tensor
from curlprune.graph.layers import rule_for
from curlprune.graph.reparam import unwrapped
from curlprune.graph.capture import TRACE_META, capture_graph
from curlprune.graph.tracing import untouched

_MODULE_ROLES = ("out", "in", "channel")


def validate_plan(groups: Sequence[ChannelGroup], plan: Plan) -> None:
    """Check that ``plan`` is a valid plan for ``groups``.

    Args:
        groups: the channel groups of the model (``trace``).
        plan: group name -> kept channel indices: sorted, unique, in ``0..width-1``, at least one
            unit, whole units of grouped convs; an unprunable group only kept whole.

    Raises:
        CurlpruneError: the first problem found, with the group and what to do.

    Source: docs/method.md §1.
    """
    if not isinstance(plan, Mapping):
        raise CurlpruneError(f"a plan must be a dict of group name -> kept channel indices, got {type(plan).__name__}")
    by_name = {g.name: g for g in groups}
    for name, kept in plan.items():
        group = by_name.get(name)
        if group is None:
            valid = [g.name for g in groups if g.prunable][:5] or [g.name for g in groups][:5]
            raise CurlpruneError(
                f"plan names unknown group {name!r}; valid names include {', '.join(map(repr, valid))} "
                "(list them with curlprune.trace(model, x) or `curlprune groups`)"
            )
        _validate_kept(group, kept)


def _validate_kept(group: ChannelGroup, kept: object) -> None:
    name, width = group.name, group.width
    if not isinstance(kept, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise CurlpruneError(f"plan entry for group {name!r} must be a list of channel indices (ints)")
    if not kept:
        raise CurlpruneError(f"plan keeps 0 channels of group {name!r}; keep at least {group.unit}")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise CurlpruneError(f"kept indices of group {name!r} must be sorted and without duplicates")
    if kept[0] < 0 or kept[-1] >= width:
        raise CurlpruneError(f"kept index {kept[0] if kept[0] < 0 else kept[-1]} of group {name!r} is out of range 0..{width - 1}")
    if len(kept) < width and not group.prunable:
        raise CurlpruneError(f"group {name!r} is not prunable ({group.reason}); keep all its channels or leave it out of the plan")
    if group.unit > 1:
        per_unit: dict[int, int] = {}
        for i in kept:
            per_unit[i // group.unit] = per_unit.get(i // group.unit, 0) + 1
        cut = [u for u, n in per_unit.items() if n != group.unit]
        if cut:
            u = cut[0]
            raise CurlpruneError(
                f"plan cuts unit {u} (channels {u * group.unit}..{u * group.unit + group.unit - 1}) of group {name!r}: "
                f"it is pruned in whole units of {group.unit} channels (conv groups); keep all or none of them"
            )


def random_plan(
    groups: Sequence[ChannelGroup], rng: random.Random, *, group_share: float = 1.0, single_unit_share: float = 0.0
) -> Plan:
    """A random Plan of whole units, for checking the engine on arbitrary prunings.

    Args:
        groups: the channel groups of a model.
        rng: the random source (seeded by the caller).
        group_share: probability that a prunable group is pruned at all.
        single_unit_share: probability that a pruned group keeps exactly one unit (else a uniform
            number of random units).

    Returns:
        A valid Plan (only prunable groups; kept indices sorted, whole units).
    """
    plan: Plan = {}
    for g in groups:
        if not g.prunable or (group_share < 1.0 and rng.random() >= group_share):
            continue
        units = g.width // g.unit
        keep = 1 if single_unit_share and rng.random() < single_unit_share else rng.randint(1, units)
        kept = sorted(rng.sample(range(units), keep))
        plan[g.name] = [u * g.unit + j for u in kept for j in range(g.unit)]
    return plan


def removed_positions(groups: Sequence[ChannelGroup], plan: Plan) -> dict[SliceKey, list[int]]:
    """Sorted positions ``plan`` removes from each member slice, module members and node members.

    Args:
        groups: the channel groups.
        plan: a plan already validated against ``groups``.

    Returns:
        ``(module or node name, role) -> sorted positions`` along that member's dim.

    Raises:
        KeyError: ``plan`` names a group not in ``groups`` (validate it first).
    """
    by_name = {g.name: g for g in groups}
    removed: dict[SliceKey, list[int]] = {}
    for name, kept in plan.items():
        group = by_name[name]
        keep = set(kept)
        gone = [i for i in range(group.width) if i not in keep]
        if not gone:
            continue
        for m in list(group.members) + list(group.node_members):
            removed.setdefault((m.module, m.role), []).extend(p for i in gone for p in m.index[i])
    return {key: sorted(ps) for key, ps in removed.items()}


# ----------------------------------------------------------------------------------------------
# mask


class _ZeroInputChannels:
    """Forward pre-hook: zero some positions of the first input along one dim."""

    def __init__(self, dim: int, positions: list[int]) -> None:
        self.dim = dim
        self.positions = torch.tensor(positions, dtype=torch.long)
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        index = self._on.get(x.device)
        if index is None:
            index = self._on[x.device] = self.positions.to(x.device)
        dim = self.dim % x.dim()
        return (x.index_fill(dim, index, 0),) + tuple(args[1:])


def mask_points(groups: Sequence[ChannelGroup], plan: Plan) -> dict[str, list[int]]:
    """Module name -> input positions to zero so that the model computes as if ``plan`` was applied.

    These are the channel-mixing consumers (role ``"in"``: convs with groups == 1, linears, global
    response norms, RMS norms); their input dim is their rule's ``input_dim`` (1 for convs, the last dim for linears).

    Args:
        groups: the channel groups.
        plan: the plan.

    Returns:
        Module name -> sorted input positions to zero.

    Raises:
        CurlpruneError: the plan is invalid.
    """
    validate_plan(groups, plan)
    return {module: ps for (module, role), ps in removed_positions(groups, plan).items() if role == "in"}


def consumer_input_dim(module: nn.Module | None) -> int:
    """The dim of a channel-mixing consumer's input that holds the channels: its layer rule's
    ``input_dim`` (-1, the last dim, for linears and channels-last norms; 1 for convs).

    Args:
        module: the consumer (None, or a module without a layer rule: treated as a conv).

    Returns:
        ``-1`` or ``1``.
    """
    rule = rule_for(module) if module is not None else None
    return rule.input_dim(module) if rule is not None else 1


@contextmanager
def mask(model: nn.Module, groups: Sequence[ChannelGroup], plan: Plan) -> Iterator[nn.Module]:
    """Zero the channels ``plan`` removes, in place and without changing shapes, while inside.

    Installs forward pre-hooks on ``model``'s modules (looked up by name, so this works on the
    traced model, on an fx GraphModule of it, or on a copy with the same module names) and removes
    them on exit, also on exceptions.

    Args:
        model: the model the groups were traced from (or a module with the same module names).
        groups: its channel groups (``trace``).
        plan: group name -> kept channel indices.

    Returns:
        A context manager yielding ``model``; inside it, ``model(x)`` equals
        ``apply(model, groups, plan)(x)`` up to float round-off.

    Raises:
        CurlpruneError: the plan is invalid, or ``model`` lacks a module the groups name.

    Source: docs/method.md §1, §2 (the KL score masks channels this way).
    """
    handles = []
    try:
        for name, positions in mask_points(groups, plan).items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise CurlpruneError(f"model has no module {name!r}: the groups were traced from a different model") from None
            handles.append(module.register_forward_pre_hook(_ZeroInputChannels(consumer_input_dim(module), positions)))
        yield model
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# apply


def apply(model: nn.Module, groups: Sequence[ChannelGroup], plan: Plan) -> fx.GraphModule:
    """A new, physically smaller model with the channels ``plan`` removes sliced away.

    Returns a ``torch.fx.GraphModule``: an ordinary nn.Module (trains, switches train/eval, deep
    copies, keeps the original submodule names so state_dict keys match the original's). ``model``
    itself is not changed.

    Args:
        model: the model the groups were traced from.
        groups: its channel groups (``trace``).
        plan: group name -> kept channel indices.

    Returns:
        The sliced ``torch.fx.GraphModule``, in the same train/eval modes as ``model``.

    Raises:
        CurlpruneError: the plan is invalid or the groups were traced from another model.

    Source: docs/method.md §1.
    """
    validate_plan(groups, plan)
    removed = removed_positions(groups, plan)
    with untouched(model):  # the tracer's constants go to the copy only
        cap = capture_graph(model, part_counts=split_part_counts(groups))  # specialised to the traced example input where fx needs it (graph.capture)
        root = copy.deepcopy(model)
    gm = fx.GraphModule(root, cap.graph, class_name=type(model).__name__)
    cap.graph = None
    gm.meta[TRACE_META] = cap
    for child_name, child in root.named_children():  # keep the containers (``small.layer1[0]``)
        setattr(gm, child_name, child)
    for sub_name, sub in gm.named_modules():  # containers fx re-creates start in train mode
        sub.training = model.get_submodule(sub_name).training
    by_module = members_by_module(removed)
    nodes = {n.name: n for n in gm.graph.nodes}
    shared = tied_parameters(root)  # tied parameters (deepcopy keeps them one object)
    try:
        for name, roles in by_module.items():
            if slice_member(gm, name, roles, groups):
                continue
            if any(role.startswith("part") for role in roles):
                _shrink_split(nodes[name], name, roles, groups)
            elif any(role.startswith("select") for role in roles):
                _shrink_selection(nodes[name], roles)
            else:
                dim = next(m.dim for g in groups for m in g.node_members if m.module == name)
                _shrink_pad(nodes[name], roles, dim)
    except (AttributeError, KeyError, IndexError, RuntimeError) as exc:
        raise CurlpruneError(
            f"the groups do not fit this {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "trace this model and build the plan from its groups"
        ) from None
    retie(shared)
    gm.recompile()
    return gm


def split_part_counts(groups: Sequence[ChannelGroup]) -> dict[str, int]:
    """fx node name of a split along the channel dim -> its number of parts, from the groups' node
    members ``part<i>`` (every part of such a split holds channels of some group)."""
    counts: dict[str, int] = {}
    for g in groups:
        for m in g.node_members:
            if m.role.startswith("part"):
                counts[m.module] = max(counts.get(m.module, 0), int(m.role[len("part"):]) + 1)
    return counts


def members_by_module(removed: Mapping[SliceKey, list[int]]) -> dict[str, dict[str, list[int]]]:
    """``removed_positions`` regrouped: module (or node) name -> role -> removed positions."""
    by_module: dict[str, dict[str, list[int]]] = {}
    for (name, role), positions in removed.items():
        by_module.setdefault(name, {})[role] = positions
    return by_module


def tied_parameters(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Parameter id -> every ``(module, attribute)`` holding it, found before slicing (for :func:`retie`)."""
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in root.modules():
        for pname, p in sub._parameters.items():
            if p is not None:
                shared.setdefault(id(p), []).append((sub, pname))
    return shared


def slice_member(root: nn.Module, name: str, roles: dict[str, list[int]], groups: Sequence[ChannelGroup]) -> bool:
    """Slice one member of ``root`` in place: a module with a layer rule (its rule slices its tensors
    and sets its width attributes) or a get_attr parameter/buffer. The GraphModule of :func:`apply`
    and a copy of the user's own model (:mod:`curlprune.surgery.keep_class`) are sliced by this one function.

    Args:
        root: the module the member names are relative to (a private copy).
        name: the member's module or node name; roles: role -> removed positions.
        groups: the channel groups (the dim of a get_attr member).

    Returns:
        False for a node member (a channel zero-pad), which only a graph can change; True when sliced.

    Raises:
        AttributeError, KeyError, IndexError, RuntimeError: the member does not fit ``root``.
    """
    if "param" in roles:
        _slice_parameter(root, name, roles["param"], groups)
        return True
    if any(r in roles for r in _MODULE_ROLES):
        _slice_module(root.get_submodule(name), roles)
        return True
    return False


def retie(shared: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Tie shared parameters again after slicing: one sliced tensor for all users (docs/method.md §1).

    The trace puts all users of a tensor in one group, so every user was sliced the same way.

    Raises:
        CurlpruneError: a shared parameter was sliced two ways (an internal error).
    """
    for users in shared.values():
        if len(users) > 1:
            first = getattr(*users[0])
            for sub, pname in users[1:]:
                if getattr(sub, pname).shape != first.shape:
                    raise CurlpruneError(f"internal: the shared parameter {pname} was sliced two ways; please report the model")
                setattr(sub, pname, first)


def _slice_module(mod: nn.Module, roles: dict[str, list[int]]) -> None:
    """Slice a module with a layer rule in place (it is already a private copy)."""
    with unwrapped(mod):  # weight norm: slice the computed weight, then normalise it again (graph.reparam)
        (rule_for(mod) or LayerRule()).slice(mod, roles)  # no rule: the base rule's one-line error


def _slice_parameter(gm: nn.Module, name: str, positions: list[int], groups: Sequence[ChannelGroup]) -> None:
    """Slice a get_attr parameter/buffer along its member dim."""
    dim = next(m.dim for g in groups for m in g.members if m.module == name and m.role == "param")
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, attr)
    replace_tensor(owner, attr, old.index_select(dim, keep_index(old.shape[dim], positions)))


def split_sizes(name: str, roles: Mapping[str, list[int]], groups: Sequence[ChannelGroup]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """The parts of the channel split/chunk node ``name``: ``(sizes, kept sizes, dim)``.

    A part's size is the number of positions its node member ``part<i>`` holds over all groups
    (every channel of the part belongs to one group); a kept size is that less the positions
    ``roles["part<i>"]`` removes; ``dim`` counts from the end (negative)."""
    sizes: dict[int, int] = {}
    dim = -1
    for g in groups:
        for m in g.node_members:
            if m.module == name and m.role.startswith("part"):
                i = int(m.role[len("part"):])
                sizes[i] = sizes.get(i, 0) + sum(len(ps) for ps in m.index)
                dim = m.dim
    full = tuple(sizes[i] for i in range(len(sizes)))
    return full, tuple(size - len(roles.get(f"part{i}", ())) for i, size in enumerate(full)), dim


def _shrink_split(node: fx.Node, name: str, roles: dict[str, list[int]], groups: Sequence[ChannelGroup]) -> None:
    """split/chunk along the channel dim: ``torch.split`` by the sizes the plan keeps of each part
    (:func:`split_sizes`)."""
    _, kept, dim = split_sizes(name, roles, groups)
    node.op, node.target, node.args, node.kwargs = "call_function", torch.split, (node.args[0], kept, dim), {}


def _shrink_selection(node: fx.Node, roles: dict[str, list[int]]) -> None:
    """A constant channel range ``x[:, a:b]``: each bound less the removed input positions before it.

    The role ``select<i>`` names the index entry ``i`` holding the range (graph.shape_ops.getitem)."""
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    for role, removed in roles.items():
        pos = int(role[len("select"):])
        item = items[pos]

        def moved(bound: int | None) -> int | None:
            return None if bound is None else bound - sum(1 for r in removed if r < bound)

        items[pos] = slice(moved(item.start), moved(item.stop), item.step)
    node.args = (node.args[0], tuple(items) if isinstance(index, tuple) else items[0]) + tuple(node.args[2:])


def _shrink_pad(node: fx.Node, roles: dict[str, list[int]], dim: int) -> None:
    """Channel zero-pad: pad by as many zero channels as the plan keeps of each pad region.

    ``dim`` is the channel dim counted from the end (negative), so its pad pair is ``-dim - 1``.
    """
    in_args = len(node.args) > 1
    amounts = list(node.args[1] if in_args else node.kwargs["pad"])
    k = 2 * (-dim - 1)
    amounts[k] -= len(roles.get("pad_front", ()))
    amounts[k + 1] -= len(roles.get("pad_back", ()))
    if in_args:
        node.args = (node.args[0], tuple(amounts)) + tuple(node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "pad": tuple(amounts)}
