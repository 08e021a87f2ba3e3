"""Group building: from the classes of the slot union-find to ChannelGroups.

The classes of the union-find are the channels of the groups; classes that appear in exactly the
same tensors form one group (ordered by their first tensor, then position). A group's members are
the slices of module/parameter tensors (and of channel pads) its channels own; its unit is the
channels per conv group of the grouped convs it runs through. Costs are filled in later (analysis).

Source: docs/method.md §1.
"""
from __future__ import annotations

from curlprune.channels import ChannelGroup, Member, SliceKey
from curlprune.graph.pass_state import PassState
from curlprune.graph.slots import Source


def _channel_classes(an: PassState) -> tuple[list, list[tuple[int, ...]], list[list[int]], dict[int, tuple[int, int]]]:
    """The pass's channel classes sorted into groups: ``(nodes with a layout in topological order,
    one signature (node indices) per group, each group's class roots in channel order,
    class root -> (group id, channel))``; group ids are the order :func:`build_groups` returns."""
    uf = an.uf
    nodes = [n for n in an.gm.graph.nodes if n in an.layouts]
    # where every class appears: node list (topological) and first position
    appears: dict[int, list[int]] = {}
    first_pos: dict[int, int] = {}
    for k, n in enumerate(nodes):
        for p, s in enumerate(an.layouts[n].slots):
            r = uf.find(s)
            seen = appears.setdefault(r, [])
            if not seen:
                first_pos[r] = p
            if not seen or seen[-1] != k:
                seen.append(k)
    by_signature: dict[tuple[int, ...], list[int]] = {}
    for r, seen in appears.items():
        by_signature.setdefault(tuple(seen), []).append(r)
    signatures = sorted(by_signature, key=lambda sig: (sig[0], min(first_pos[r] for r in by_signature[sig])))
    where: dict[int, tuple[int, int]] = {}  # class root -> (group id, channel)
    roots_of: list[list[int]] = []
    for gid, sig in enumerate(signatures):
        roots = sorted(by_signature[sig], key=first_pos.__getitem__)
        roots_of.append(roots)
        for ch, r in enumerate(roots):
            where[r] = (gid, ch)
    return nodes, signatures, roots_of, where


def node_channels(an: PassState) -> dict[str, tuple[int, tuple[tuple[int, int], ...]]]:
    """Where every channel of every node's output comes from: the channel map a feature needs.

    Args:
        an: the state ``channel_pass`` returned.
    Returns:
        fx node name -> ``(dim, ((group id, channel), ...))``: the tensor dim that holds the channels and,
        for each position along it, the group (its index in :func:`build_groups`' list) and the group
        channel it is. Nodes without a channel layout are left out.
    """
    nodes, _, _, where = _channel_classes(an)
    return {n.name: (an.layouts[n].dim, tuple(where[an.uf.find(s)] for s in an.layouts[n].slots)) for n in nodes}


def build_groups(an: PassState) -> list[ChannelGroup]:
    """The channel groups the finished channel pass ``an`` found, in topological order.

    Args:
        an: the state ``channel_pass`` returned.

    Returns:
        ChannelGroups with members, node members, units, reasons and kinds; ``macs_per_channel`` and
        ``params_per_channel`` are empty (the analysis fills them from the cost table).
    """
    uf = an.uf
    nodes, signatures, roots_of, where = _channel_classes(an)

    def members_of(table: dict[SliceKey, Source]) -> list[list[Member]]:
        out: list[list[Member]] = [[] for _ in signatures]
        for (module, role), src in table.items():
            index: dict[int, list[list[int]]] = {}
            for p, s in enumerate(src.slots):
                gid, ch = where[uf.find(s)]
                if gid not in index:
                    index[gid] = [[] for _ in roots_of[gid]]
                index[gid][ch].append(p)
            for gid, positions in index.items():
                out[gid].append(Member(module, role, src.dim, tuple(tuple(ps) for ps in positions)))
        return out

    members = members_of(an.sources)
    node_members = members_of(an.node_sources)
    units = _group_units(an, where, roots_of)

    groups: list[ChannelGroup] = []
    used: dict[str, int] = {}
    for gid, sig in enumerate(signatures):
        roots = roots_of[gid]
        reason = next((uf.reason[r] for r in roots if r in uf.reason), "")
        unit, unit_problem = units.get(gid, (1, ""))
        reason = reason or unit_problem
        if not reason and any(not ps for m in members[gid] for ps in m.index):
            reason = "internal: a member misses some of the group's channels"
        producer = next((m.module for m in members[gid] if m.role == "out"), nodes[sig[0]].name)
        used[producer] = used.get(producer, 0) + 1
        name = producer if used[producer] == 1 else f"{producer}#{used[producer]}"
        groups.append(ChannelGroup(
            name=name,
            width=len(roots),
            kind="outside" if any(r in uf.residual for r in roots) else "inside",
            prunable=not reason,
            reason=reason,
            unit=unit,
            members=members[gid],
            macs_per_channel=[],
            params_per_channel=[],
            nodes=[nodes[k].name for k in sig],
            node_members=node_members[gid],
        ))
    return groups


def _group_units(an: PassState, where: dict[int, tuple[int, int]], roots_of: list[list[int]]) -> dict[int, tuple[int, str]]:
    """Unit (channels per conv group) of groups that run through grouped convs, or why not usable."""
    result: dict[int, tuple[int, str]] = {}
    for conv, a, slots in an.units:
        for start in range(0, len(slots), a):
            block = [where[an.uf.find(s)] for s in slots[start:start + a]]
            gids = {gid for gid, _ in block}
            chans = [ch for _, ch in block]
            gid = block[0][0]
            aligned = len(gids) == 1 and chans == list(range(chans[0], chans[0] + a)) and chans[0] % a == 0
            known_unit = result.get(gid, (a, ""))[0]
            if not aligned or known_unit != a:
                problem = f"grouped conv {conv}: its conv groups of {a} channels do not line up with whole group channels"
                for g in gids:
                    result[g] = (result.get(g, (1, ""))[0], problem)
            elif gid not in result:
                result[gid] = (a, "")
    return result
