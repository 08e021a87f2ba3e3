"""Per-group limits of the selection (``--max-ratio PATTERN=R``, config ``max_ratio: {PATTERN: R}``):
no group whose name matches the glob PATTERN loses more than R of its channels. They sit next to
the global floor (no group keeps less than ``floor`` of its channels) and ``--protect`` (R = 0 in
effect); the selection's walk skips a channel a limit forbids, so the target is still met by the
other groups (:class:`curlprune.select.search._Walk`, docs/method.md §3).
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from curlprune.channels import ChannelGroup
from curlprune.errors import CurlpruneError


def check_ratio(pattern: str, ratio: Any) -> float:
    """``ratio`` as a float in [0, 1).

    Raises:
        CurlpruneError: not a number in [0, 1) (1 would allow removing every channel: no limit).
    """
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(ratio, bool) or not 0.0 <= value < 1.0:
        raise CurlpruneError(f"max_ratio for {pattern!r} must be a fraction of the group's channels in [0, 1) "
                             f"(the most it may lose, e.g. 0.5), got {ratio!r}")
    return value


def parse_max_ratio(items: Iterable[str] | Mapping[str, Any] | None) -> dict[str, float] | None:
    """The limits from ``--max-ratio PATTERN=R`` arguments or a config mapping: ``{pattern: R}``.

    Args:
        items: ``["layer1.*=0.5", ...]`` or ``{"layer1.*": 0.5}``; None or empty = no limits.
    Returns:
        ``{pattern: R}`` with R in [0, 1), or None when there are none.
    Raises:
        CurlpruneError: an item without ``=``, an empty pattern, or R outside [0, 1).
    """
    if not items:
        return None
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            pattern, sep, ratio = str(item).rpartition("=")
            if not sep or not pattern:
                raise CurlpruneError(f"--max-ratio {item!r} must be PATTERN=R, e.g. 'layer1.*=0.5' (a group name or glob, the most it may lose)")
            pairs.append((pattern, ratio))
    out: dict[str, float] = {}
    for pattern, ratio in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise CurlpruneError(f"max_ratio keys must be group names or globs, got {pattern!r}")
        out[pattern] = check_ratio(pattern, ratio)
    return out


def resolve_limits(groups: Sequence[ChannelGroup], max_ratio: Mapping[str, float]) -> dict[str, float]:
    """Group name -> the largest fraction of its channels it may lose, for the prunable groups
    matched by ``max_ratio``'s patterns (exact names or ``fnmatch`` globs); a group matched by
    several patterns gets the smallest R.

    Raises:
        CurlpruneError: a pattern matches no prunable group (a typo must not silently limit nothing).

    Source: docs/method.md §3 (floor, protected groups and per-group limits).
    """
    names = [g.name for g in groups if g.prunable]
    limits: dict[str, float] = {}
    for pattern, ratio in max_ratio.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise CurlpruneError(f"--max-ratio {pattern!r} matches no prunable group: use a group name or glob "
                                 f"(e.g. {', '.join(names[:4])}); `curlprune groups --model ...` lists them")
        for name in hits:
            limits[name] = min(ratio, limits.get(name, 1.0))
    return limits
