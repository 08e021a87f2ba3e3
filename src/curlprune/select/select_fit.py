"""Bringing a selection into its target's tolerance band from both sides (docs/method.md §3).

:func:`curlprune.select.search.select` bisects over how many ranked units to walk: the result is at or
below the target, but one step of the walk can remove a lot at once (a wide group, or with
``round_to`` a whole rounded unit of 8 channels of a residual stream), so it can land far below.
These steps, in order, bring it into ``[target * (1 - tolerance), target]``:

* :func:`fill`: from the last prefix *above* the target, remove further ranked units in rank order,
  skipping any whose removal lands below the band (CURL's ranking, continued).
* :func:`give_back`: from the bisection's plan *below* the band, add back whole units (rounded
  units with ``round_to``: the width stays a multiple of it) of removed channels, the most
  important (highest-ranked) first, whenever the result stays at or below the target.
* :func:`swap`: when every single give-back overshoots the target (few, wide units, e.g. ResNet-20
  with ``round_to=8``), exchange whole units between groups: give one back and remove the next of
  another group (its lowest-ranked kept channels, under the floor), or remove one and fill the room
  with give-backs; the most important give-back and the least important removal first.

Each group keeps its highest-ranked channels throughout. When none reaches the band, the
closest plan below the target is kept and :func:`miss_note` says by how much it missed and why.
The states are :class:`curlprune.select.search._Walk` objects (``removed``, ``units_total``, ``allows``,
``remove``, ``undo``, ``step``); this module imports nothing of the package.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_TRIES = 4096  # cost evaluations per step (each is an analytic count: well under a second in all)


def settle(ranked: Sequence[Any], lo: int, hi: int, walk_at: Callable[[int], Any], round_to: int | None, goal: float,
           tolerance: float, value_of: Callable[[Any], float], fmt: Callable[[float], str]) -> tuple[Any, int, int, int, str]:
    """The plan in ``[goal * (1 - tolerance), goal]`` found by :func:`fill`, else :func:`give_back`
    and :func:`swap`, else the closest below the goal with :func:`miss_note`.

    Args:
        ranked: the global ranking; lo, hi: the bisection's last prefix above the goal and first at
            or below it; walk_at: ``top_k -> walk`` of the first ``top_k`` ranked units.
        round_to: the rounding of widths (None: off); goal, tolerance: the target and its band;
        value_of: ``walk -> value``; fmt: formats a value for the note.
    Returns:
        ``(walk, top_k, units filled, units given back or exchanged, note)``; the note is empty
        when the band was reached.
    """
    low = goal * (1.0 - tolerance)
    state = walk_at(lo)
    filled = fill(state, ranked, lo, goal, low, value_of)
    if filled is not None:
        return state, filled[0], filled[1], 0, ""
    back = walk_at(hi).rounded(round_to)  # add back whole (rounded) units, most important first
    rank = {(entry.group, entry.unit): position for position, entry in enumerate(ranked)}
    value, given, overshoot = give_back(back, rank, goal, low, value_of)
    if value >= low:
        return back, hi, 0, given, ""
    by_group: dict[str, list[Any]] = {}
    for entry in ranked:
        by_group.setdefault(entry.group, []).append(entry)
    swapped = swap(back, by_group, rank, goal, low, value_of)
    if swapped is not None:
        return back, hi, 0, given + swapped[1], ""
    return back, hi, 0, given, miss_note(value, goal, tolerance, round_to, overshoot, fmt)


def fill(state: Any, ranked: Sequence[Any], start: int, goal: float, low: float,
         value_of: Callable[[Any], float], max_tries: int = MAX_TRIES) -> tuple[int, int] | None:
    """Remove ranked units after ``start`` (in rank order) until the value lands in ``[low, goal]``.

    Args:
        state: the walk of the first ``start`` ranked units (value above ``goal``); modified.
        ranked: the global ranking; goal, low: the band; value_of: ``state -> value``.
    Returns:
        ``(top_k, removed)`` (ranked units walked, units removed beyond ``start``) when the band is
        reached, else None (``state`` is then left above the goal).
    """
    count = 0
    for position in range(start, min(len(ranked), start + max_tries)):
        entry = ranked[position]
        if not state.allows(entry):
            continue
        state.remove(entry)
        value = value_of(state)
        if value > goal:
            count += 1
            continue
        if value >= low:
            return position + 1, count + 1
        state.undo(entry)
    return None


def give_back(state: Any, rank: Mapping[tuple[str, int], int], goal: float, low: float,
              value_of: Callable[[Any], float], max_tries: int = MAX_TRIES, keep: str | None = None) -> tuple[float, int, float | None]:
    """Add back whole units of removed channels, most important first, while the value stays <= ``goal``.

    A group gives back its last-removed (highest-ranked) ``state.step(name)`` units at a time, so a
    rounded width stays rounded. After every accepted give-back the scan starts again from the most
    important removed unit; it ends in the band ``[low, goal]``, when nothing fits, or after
    ``max_tries`` evaluations.

    Args:
        state: a walk whose removed lists are already rounded (``_Walk.rounded``); modified.
        rank: ``(group, unit) -> position`` in the global ranking (higher = more important).
        goal, low: the band; value_of: ``state -> value``.
        keep: a group whose removed units stay removed (the one :func:`swap` just took from).
    Returns:
        ``(value, units given back, smallest overshoot)``: the final value, and when the band was
        not reached, by how much the cheapest give-back of the last scan exceeded ``goal`` (None
        when there was nothing left to give back).
    """
    value, given, tries = value_of(state), 0, 0
    overshoot: float | None = None
    while value < low and tries < max_tries:
        overshoot, accepted = None, False
        for name in sorted(state.removed, key=lambda n: -rank[(n, state.removed[n][-1])]):
            if name == keep:
                continue
            removed = state.removed[name]
            back = min(state.step(name), len(removed))
            taken = removed[len(removed) - back:]
            del removed[len(removed) - back:]
            if not removed:
                del state.removed[name]
            candidate = value_of(state)
            tries += 1
            if candidate <= goal:
                value, given, accepted = candidate, given + back, True
                break
            state.removed.setdefault(name, []).extend(taken)
            overshoot = candidate - goal if overshoot is None else min(overshoot, candidate - goal)
            if tries >= max_tries:
                break
        if not accepted:
            break
    return value, given, overshoot


def swap(state: Any, by_group: Mapping[str, Sequence[Any]], rank: Mapping[tuple[str, int], int], goal: float, low: float,
         value_of: Callable[[Any], float], max_tries: int = MAX_TRIES) -> tuple[float, int] | None:
    """Exchange units between groups until the value lands in ``[low, goal]``.

    Two kinds of exchange, each over every group, the least important removal first:

    1. give back the most important removed unit of one group (which alone overshoots) and remove
       the next whole unit of another;
    2. remove the next whole unit of one group, then give back (:func:`give_back`) the most
       important removed units that fit; repeat with the same group while its floor allows.

    Args:
        state: a walk with rounded removed lists (after :func:`give_back`); modified only on success.
        by_group: group -> its ranked units in rank order (``curlprune.select.search.RankedUnit``).
        rank: ``(group, unit) -> position`` in the global ranking; goal, low: the band;
        value_of: ``state -> value``.
    Returns:
        ``(value, units moved)`` for the first exchange that lands in the band, else None.
    """
    saved = _copy(state.removed)
    tries = [0]

    def evaluate(st: Any) -> float:
        tries[0] += 1
        return value_of(st)

    def take(name: str) -> bool:
        """Remove the next whole unit of ``name`` in rank order; False when the floor stops it."""
        gone = set(state.removed.get(name, ()))
        entries = [e for e in by_group[name] if e.unit not in gone][: state.step(name)]
        for entry in entries:
            if not state.allows(entry):
                return False
            state.remove(entry)
        return bool(entries)

    def candidates() -> list[str]:
        """Groups with a unit left to remove, the least important next unit first."""
        found = []
        for n, entries in by_group.items():
            gone = set(state.removed.get(n, ()))
            nxt = next((e for e in entries if e.unit not in gone), None)
            if nxt is not None:
                found.append((rank[(n, nxt.unit)], n))
        return [n for _, n in sorted(found)]

    def pair() -> bool:
        """Give back one whole unit of a group and take one of another: True when in the band (kept)."""
        here = _copy(state.removed)
        takes = candidates()
        for name in sorted(here, key=lambda n: -rank[(n, here[n][-1])]):
            for other in takes:
                if other == name or tries[0] >= max_tries:
                    continue
                removed = state.removed[name]
                del removed[len(removed) - min(state.step(name), len(removed)):]
                if not removed:
                    del state.removed[name]
                if take(other) and low <= evaluate(state) <= goal:
                    return True
                _reset(state, here)
        return False

    if pair():
        return value_of(state), 2
    for other in candidates():  # take one, give back what fits (then try one pair); again while the floor allows
        while tries[0] < max_tries and take(other):
            value, _, _ = give_back(state, rank, goal, low, evaluate, max_tries - tries[0], keep=other)
            if low <= value <= goal or pair():
                return value_of(state), sum(abs(len(state.removed.get(n, ())) - len(saved.get(n, ()))) for n in by_group)
        _reset(state, saved)
    return None


def _copy(removed: Mapping[str, list[int]]) -> dict[str, list[int]]:
    return {name: list(units) for name, units in removed.items()}


def _reset(state: Any, removed: Mapping[str, list[int]]) -> None:
    """``state.removed`` back to a saved copy."""
    state.removed.clear()
    state.removed.update(_copy(removed))


def miss_note(value: float, goal: float, tolerance: float, round_to: int | None, overshoot: float | None,
              fmt: Callable[[float], str]) -> str:
    """One sentence: the target was missed, by how much (% of the target) and why.

    Args:
        value: the kept plan's value (below ``goal * (1 - tolerance)``).
        goal: the target (absolute); tolerance: the allowed shortfall (a fraction of the target).
        round_to: the rounding of widths (None: off); overshoot: :func:`give_back`'s smallest overshoot.
        fmt: formats a value for the message.
    """
    below = 1.0 - value / goal
    what = f"whole units of {round_to} channels" if round_to else "whole units"
    why = (f"widths are kept in {what}; every unit that could be added back exceeds the target "
           f"(the cheapest by {overshoot / goal:.2%} of it)") if overshoot is not None else \
          "nothing removed could be added back without exceeding the target"
    why += ", and no exchange of whole units between groups lands within the tolerance"
    if round_to:
        why += "; a smaller --round-to or another target lands closer"
    return (f"target missed: {fmt(value)} is {below:.1%} below the target {fmt(goal)} (tolerance {tolerance:.0%}): "
            f"{why}; the closest plan below the target is used")
