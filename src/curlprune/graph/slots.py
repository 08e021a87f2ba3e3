"""Union-find over channel slots: the bookkeeping of the channel pass.

Every channel position of every traced tensor is a slot. Ops that make two positions the same
channel unite their slots; a class can carry why it is unprunable and whether it runs through a
residual add. ``Layout`` says where a tensor's channels are; ``Source`` is a member-to-be.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Slots:
    """Union-find over channel slots, with an unprunable reason and a residual flag per class."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}
        self.residual: set[int] = set()

    def fresh(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.reason:
            self.reason.setdefault(ra, self.reason.pop(rb))
        if rb in self.residual:
            self.residual.discard(rb)
            self.residual.add(ra)

    def union_all(self, xs: Sequence[int], ys: Sequence[int]) -> None:
        for a, b in zip(xs, ys, strict=True):
            self.union(a, b)

    def mark(self, slots: Iterable[int], reason: str) -> None:
        for s in slots:
            self.reason.setdefault(self.find(s), reason)

    def mark_residual(self, slots: Iterable[int]) -> None:
        for s in slots:
            self.residual.add(self.find(s))


@dataclass(frozen=True)
class Layout:
    """Which dim of a tensor holds the channels, and the slot of each position along it."""

    dim: int
    slots: list[int]


@dataclass
class Source:
    """One member-to-be: slots along ``dim`` of a module/parameter tensor family."""

    dim: int
    slots: list[int]
