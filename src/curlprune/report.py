"""Tables for the terminal (rich) and the numbers behind them."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from curlprune.graph import ChannelGroup

console = Console(stderr=False)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def groups_table(groups: list[ChannelGroup], title: str = "channel groups") -> Table:
    """One row per group: what it is, how wide, whether and why not it can be pruned."""
    table = Table(title=title)
    for col in ("#", "group", "kind", "width", "unit", "MACs/ch", "prunable"):
        table.add_column(col, justify="right" if col in ("#", "width", "unit", "MACs/ch") else "left")
    for i, g in enumerate(groups):
        mean_macs = sum(g.macs_per_channel) / max(1, len(g.macs_per_channel))
        table.add_row(str(i), g.name, g.kind, str(g.width), str(g.unit), human(mean_macs), "yes" if g.prunable else f"no: {g.reason}")
    return table


def plan_table(groups: list[ChannelGroup], plan: dict[str, list[int]], macs_before_per_group: dict[str, float] | None = None) -> Table:
    """Per group: width before -> after, kept fraction and (optionally) its share of the MACs."""
    table = Table(title="pruning plan")
    for col in ("group", "kind", "before", "after", "kept", "MACs share"):
        table.add_column(col, justify="left" if col in ("group", "kind") else "right")
    total = sum(macs_before_per_group.values()) if macs_before_per_group else 0.0
    for g in groups:
        if not g.prunable:
            continue
        kept = len(plan.get(g.name, range(g.width)))
        share = f"{100 * macs_before_per_group[g.name] / total:.1f}%" if total else "-"
        table.add_row(g.name, g.kind, str(g.width), str(kept), f"{kept / g.width:.2f}", share)
    return table
