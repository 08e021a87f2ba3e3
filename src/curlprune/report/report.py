"""Tables for the terminal (rich) and the numbers behind them."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from curlprune.channels import ChannelGroup
from curlprune.store import PruneStep, RunSummary, TrainStep

console = Console(stderr=False, markup=False)  # user text (paths, layer names, shapes like [1, 3, 32, 32]) is never markup


def human(n: float) -> str:
    """A count with a k/M/G suffix and 2 decimals: 1234567 -> '1.23M' (below 1000: the integer)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def groups_table(groups: list[ChannelGroup], title: str = "channel groups") -> Table:
    """One row per group: what it is, how wide, whether and why not it can be pruned."""
    table = Table(title=title)
    for col in GROUP_COLUMNS:
        table.add_column(col, justify="right" if col in ("#", "width", "unit", "MACs/ch") else "left")
    for row in _group_rows(groups):
        table.add_row(*row)
    return table


def groups_text(groups: list[ChannelGroup], title: str = "channel groups") -> str:
    """:func:`groups_table` as plain aligned text, every name whole (for output that is not a
    terminal: the group names are what ``--protect`` and ``--max-ratio`` take, and a pipe has no
    window to widen)."""
    rows = [GROUP_COLUMNS, *_group_rows(groups)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(GROUP_COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join([title, *lines])


GROUP_COLUMNS = ("#", "group", "kind", "width", "unit", "MACs/ch", "prunable")


def _group_rows(groups: list[ChannelGroup]) -> list[tuple[str, ...]]:
    rows = []
    for i, g in enumerate(groups):
        mean_macs = sum(g.macs_per_channel) / max(1, len(g.macs_per_channel))
        rows.append((str(i), g.name, g.kind, str(g.width), str(g.unit), human(mean_macs), "yes" if g.prunable else f"no: {g.reason}"))
    return rows


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


def print_summary(summary: RunSummary) -> None:
    """Print a run's summary table: test top-1 after every stage (unpruned and pruned without
    recovery too) and the final cost.

    Args:
        summary: the run's :class:`~curlprune.store.records.RunSummary` (:attr:`curlprune.run.pipeline.Run.summary`; accuracies in %).
    """
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}%"

    with_val = any(isinstance(r, TrainStep) and r.val_top1 is not None for r in summary.stages.values())
    table = Table(title=f"run summary: {summary.model}, test top-1")
    for col in ("stage", "epochs", "last top-1", "best top-1") + (("val top-1",) if with_val else ()) + ("seconds",):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, r in summary.stages.items():
        if isinstance(r, PruneStep):
            table.add_row("unpruned", "", percent(r.top1_before), "", *([""] if with_val else []), "")
            table.add_row(f"pruned ({r.criterion}, {100 * r.macs_ratio:.1f}% MACs)", "", percent(r.top1_after), "",
                          *([""] if with_val else []), "")
            if r.top1_after_bn is not None:
                table.add_row("pruned, BN re-estimated", "", percent(r.top1_after_bn), "", *([""] if with_val else []), "")
        else:
            epochs = str(r.epochs) + (f" (best {r.best_epoch})" if r.best_epoch is not None else "")
            table.add_row(stage, epochs, percent(r.last_top1), percent(r.best_top1), *([percent(r.val_top1)] if with_val else []),
                          f"{r.seconds:.1f}")
    console.print(table)
    console.print(f"final model: {human(summary.macs)} MACs ({100 * summary.macs_ratio:.1f}%), "
                  f"{human(summary.params)} params ({100 * summary.params_ratio:.1f}%) -> {summary.checkpoint}")


def print_prune_summary(groups: list[ChannelGroup], selection: Any, accuracy: dict[str, Any], model_name: str,
                        allocation: str | None = None) -> None:
    """Print the prune stage's per-group table, the cost before -> after and test top-1 before -> after.

    Args:
        groups: the traced groups.
        selection: :class:`curlprune.select.search.Selection` (plan, MACs/params before and after, top_k,
            protected); a target it did not meet within its tolerance gets a line of its own (its note).
        accuracy: ``{"test_images", "top1_before", "top1_after"}`` (top-1 in %), and optionally
            ``"bn_images", "top1_after_bn"`` (after the BN re-estimation).
        model_name: registry name, for the line.
        allocation: the allocation's name (``PruneConfig.resolved_allocation``), named in the line; None leaves it out.
    """
    shares = {g.name: float(sum(g.macs_per_channel)) for g in groups if g.prunable}
    console.print(plan_table(groups, selection.plan, shares))
    s = selection
    console.print(
        f"{model_name}: MACs {human(s.full_macs)} -> {human(s.macs)} ({s.macs / s.full_macs:.3f}), "
        f"params {human(s.full_params)} -> {human(s.params)} ({s.params / s.full_params:.3f}); "
        f"{s.removed_channels} channels removed, top_k {s.top_k}"
        + (f", allocation {allocation}" if allocation else "")
        + (f", protected: {', '.join(s.protected)}" if s.protected else "")
    )
    if not getattr(s, "met", True) and s.target.metric != "latency":  # said again in report.json's selection
        console.print(f"{model_name}: {s.note}")
    if accuracy["test_images"]:
        console.print(f"test top-1 on {accuracy['test_images']} images, no fine-tuning: "
                      f"{accuracy['top1_before']:.2f}% -> {accuracy['top1_after']:.2f}% sliced"
                      + (f" -> {accuracy['top1_after_bn']:.2f}% after BN re-estimation ({accuracy['bn_images']} training images)"
                         if accuracy.get("top1_after_bn") is not None else ""))
