"""The per-group figures of a prune run (``widths.png``, ``scores.png``), readable at any group count.

Up to :data:`MANY_GROUPS` groups the groups are columns (names rotated), above it rows (the figure
grows with the count, so 40+ names of an EfficientNet stay readable); the legend lies below the
axes, never over the data, and constrained layout keeps every text on the canvas. ``run`` is a
:class:`curlprune.report.figures.RunFiles` (its ``prune_report()``, ``scores()``, ``plan()``).
"""
from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np

from curlprune.store import REPORT_FILE, SCORES_FILE

INSIDE_COLOUR, OUTSIDE_COLOUR, KEPT_COLOUR, REMOVED_COLOUR = "C0", "C1", "C2", "C3"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


class _Missing(Exception):
    """A part of the run directory that is absent or unreadable (message: which file, why)."""


def figure_widths(run: Any):
    """Kept width per prunable group before/after pruning; inside and outside groups coloured apart.

    Above :data:`MANY_GROUPS` groups the bars are horizontal (one readable name per row, the figure's
    height growing with the count); the legend lies below the axes, never over the bars.
    """
    report = run.prune_report()
    rows = [(name, g) for name, g in report.groups.items() if g.before is not None and g.after is not None]
    if not rows:
        raise _Missing(f"prune {REPORT_FILE} lists no prunable group")
    plt = _pyplot()
    fig, ax, horizontal = _group_figure(plt, len(rows))
    x = np.arange(len(rows))
    colours = [INSIDE_COLOUR if g.kind == "inside" else OUTSIDE_COLOUR for _, g in rows]
    bar = ax.barh if horizontal else ax.bar
    bar(x, [g.before for _, g in rows], color="none", edgecolor=colours, linewidth=1.0)
    bar(x, [g.after for _, g in rows], color=colours, alpha=0.85)
    _group_ticks(ax, [name for name, _ in rows], horizontal)
    (ax.set_xlabel if horizontal else ax.set_ylabel)("channels (outline: before, filled: kept)")
    ax.set_title(f"kept width per group ({report.model or 'model'})")
    from matplotlib.patches import Patch

    _legend_below(fig, [Patch(color=INSIDE_COLOUR, label="inside (within a block)"),
                        Patch(color=OUTSIDE_COLOUR, label="outside (residual stream)"),
                        Patch(facecolor="none", edgecolor="k", label="width before")])
    return fig


MANY_GROUPS = 30
"""Above this many groups the per-group figures turn horizontal: 40+ rotated names cannot be read."""


def _group_figure(plt, n: int):
    """(figure, axes, horizontal) for ``n`` groups: wide and vertical up to :data:`MANY_GROUPS`, else
    tall and horizontal; the size grows with ``n``; constrained layout keeps every text on the canvas."""
    horizontal = n > MANY_GROUPS
    size = (8.0, max(4.5, 0.16 * n + 2.0)) if horizontal else (max(6.0, 0.32 * n + 2), 4.8)
    fig, ax = plt.subplots(figsize=size, dpi=100, layout="constrained")
    return fig, ax, horizontal


def _group_ticks(ax, names: list[str], horizontal: bool) -> None:
    """One tick label per group: rows top-down when horizontal, rotated columns otherwise."""
    where = np.arange(len(names))
    if horizontal:
        ax.set_yticks(where, names, fontsize=7)
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first group on top, as in the table
        ax.set_ylabel("channel group")
    else:
        ax.set_xticks(where, names, rotation=90, fontsize=7)
        ax.set_xlabel("channel group")


def _legend_below(fig, handles=None) -> None:
    """The legend under the axes (outside them: it covers no data), long entries wrapped."""
    legend = fig.legend(handles=handles, loc="outside lower center", ncols=2 if handles is None else len(handles),
                        fontsize=7, frameon=False)
    for text in legend.get_texts():
        text.set_text(textwrap.fill(text.get_text(), 60))


def figure_scores(run: Any):
    """Per-channel scores of every scored group (log scale): kept vs removed, with the global cut."""
    scores = run.scores()
    plan = run.plan()
    names = [n for n in scores if scores[n].ndim == 1 and scores[n].size]
    if not names:
        raise _Missing(f"{SCORES_FILE} holds no per-group scores")
    removed_scores = []
    kept_masks = {}
    for name in names:
        width = scores[name].size
        kept = plan.get(name, range(width))
        mask = np.zeros(width, dtype=bool)
        mask[[i for i in kept if 0 <= int(i) < width]] = True
        kept_masks[name] = mask
        removed_scores.extend(scores[name][~mask].tolist())
    everything = np.concatenate([scores[n] for n in names])
    positive = everything[np.isfinite(everything) & (everything > 0)]
    floor_value = positive.min() / 10 if positive.size else 1e-12
    plt = _pyplot()
    fig, ax, horizontal = _group_figure(plt, len(names))
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        values = np.where(np.isfinite(scores[name]) & (scores[name] > 0), scores[name], floor_value)
        jitter = i + rng.uniform(-0.3, 0.3, values.size)
        mask = kept_masks[name]
        for keep, colour in ((mask, KEPT_COLOUR), (~mask, REMOVED_COLOUR)):
            where, value = (values[keep], jitter[keep]) if horizontal else (jitter[keep], values[keep])
            ax.scatter(where, value, s=6, color=colour, alpha=0.7, linewidths=0)
    (ax.set_xscale if horizontal else ax.set_yscale)("log")
    ax.scatter([], [], color=KEPT_COLOUR, label="kept channel")
    ax.scatter([], [], color=REMOVED_COLOUR, label="removed channel")
    finite_removed = [s for s in removed_scores if math.isfinite(s) and s > 0]
    if finite_removed:
        cut = max(finite_removed)
        try:  # a report from before allocations existed: the paper's raw ranking
            paper = (run.prune_report().allocation or "paper") == "paper"
        except _Missing:
            paper = True
        (ax.axvline if horizontal else ax.axhline)(
            cut, color="k", ls="--", lw=1, label=f"cut (highest removed score {cut:.3g})" if paper else
            f"highest removed score {cut:.3g} (ranked by score / cost saved: kept channels of cheap groups can lie below)")
    _group_ticks(ax, names, horizontal)
    (ax.set_xlabel if horizontal else ax.set_ylabel)("channel score (log scale)")
    ax.set_title("score distribution per group")
    _legend_below(fig)
    return fig
