"""The figure of the ResNet-56 benchmark (issue 21): ``<rows>.png`` next to the report, drawn by
``--report`` (bench_report.write_markdown) from whatever rows have finished.

Per target, one column: above, test top-1 after the seeded recovery of the claim rows (mean ± std
over seeds, n in the label) and of every other finished single-seed row at those epochs (plain
points: the Torch-Pruning variants, the other curlprune criteria); below, the paired differences
curlprune default (kl-best) - each other claim row with ± 2 x the standard error its verdict uses
(bench_claims.claim_difference: the combined seed + images SE where both rows have per-image
records, else the seed SE), and a zero line: "ahead" is a bar clear of zero on the right.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bench_plan as bp  # noqa: E402
from bench_claims import claim_difference, claim_rows  # noqa: E402
from bench_stats import mean_std  # noqa: E402
from curlprune.store.rundir import atomic_write  # noqa: E402

LABELS = {"kl-best": "kl-best (curlprune default)", "tp-best": "TP best", "l1": "l1 (curlprune)",
          "kl-paper": "kl-paper (kl as published)"}
BASIS = {"combined SE": "combined SE", "seed SE only: one seed": "one seed, no SE"}  # else: the seed SE alone


def figure_data(rows: Mapping[str, dict], images, epochs: int) -> list[dict]:
    """The numbers the figure plots, per target (largest first) with a finished row at ``epochs``.

    Args:
        rows: id -> finished row (the rows file); images: id -> per-image record (the sidecar), or None.
        epochs: the seeded rows' recovery epochs (2).
    Returns:
        ``[{"target", "points", "diffs"}]``. ``points``: ``{"label", "mean", "std", "n", "claim"}``
        in top-1 points (%), the claim rows (bench_plan.CLAIM order; std None for one seed) then the
        other single-seed rows by test top-1 (``claim`` False; a ``same_as`` row is left out: it
        is the row it names). ``diffs``: per bench_plan.COMPARISONS pair with both rows,
        ``{"label", "mean", "se", "half_width", "n", "basis"}``: the paired test difference, the
        SE its verdict uses, ``half_width`` = 2 SE (None without an SE), n seeds, and which SE.
    """
    targets = sorted({r["target"] for r in rows.values() if r.get("epochs") == epochs and r.get("target")
                      and r.get("test_top1") is not None}, reverse=True)
    panels = []
    for target in targets:
        claims = claim_rows(rows, target, epochs)
        points, used = [], {r["id"] for found in claims.values() for r in found}
        for family, found in claims.items():
            mean, std = mean_std([r["test_top1"] for r in found])
            label = LABELS[family] + (f" = {found[0]['family']}" if family == "tp-best" else "")
            points.append({"label": label, "mean": mean, "std": std, "n": len(found), "claim": True})
        others = [r for r in rows.values() if r.get("target") == target and r.get("epochs") == epochs and r["id"] not in used
                  and r.get("family") not in bp.CLAIM and not r.get("same_as") and r.get("test_top1") is not None]
        points += [{"label": r["family"], "mean": r["test_top1"], "std": None, "n": 1, "claim": False}
                   for r in sorted(others, key=lambda r: (-r["test_top1"], r["family"]))]
        diffs = []
        for a, b, _ in bp.COMPARISONS:
            if a in claims and b in claims:
                d = claim_difference(rows, images, {r["seed"]: r for r in claims[a]}, {r["seed"]: r for r in claims[b]})
                if d is None:
                    continue
                se = d["decided"]["se"]
                diffs.append({"label": f"{a} - {b}", "mean": d["decided"]["mean"], "se": se,
                              "half_width": None if se is None else 2 * se, "n": d["decided"]["n"],
                              "basis": BASIS.get(d["basis"], "seed SE")})
        panels.append({"target": target, "points": points, "diffs": diffs})
    return panels


def plot(rows: Mapping[str, dict], images, epochs: int, path: str | Path) -> None:
    """Draw :func:`figure_data` to the PNG ``path`` (atomically; matplotlib, Agg): a column per
    target, top-1 above, the paired differences ± 2 SE below. With no finished trained row it
    draws one panel that says so (the file is always written)."""
    panels = figure_data(rows, images, epochs)
    cols = max(1, len(panels))
    fig, axes = plt.subplots(2, cols, figsize=(max(10.0, 7.5 * cols), 8.5), squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    if not panels:
        for ax in axes[:, 0]:
            ax.axis("off")
        axes[0][0].text(0.5, 0.5, f"no row with a {epochs}-epoch recovery has finished yet", ha="center", va="center")
    for col, panel in enumerate(panels):
        top, low = axes[0][col], axes[1][col]
        points = panel["points"]
        for y, p in enumerate(points):
            if p["claim"]:
                top.errorbar(p["mean"], y, xerr=p["std"] or 0.0, fmt="o", color="C0", capsize=4)
                text = f"{p['mean']:.2f}" + ("" if p["std"] is None else f" ± {p['std']:.2f}")
                top.annotate(text, (p["mean"], y), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
            else:
                top.plot(p["mean"], y, "s", color="grey", ms=5)
        top.set_yticks(range(len(points)), [f"{p['label']} (n={p['n']})" for p in points], fontsize=8)
        top.set_ylim(len(points) - 0.5, -0.7)
        top.set_xlabel(f"test top-1 (%), {epochs}-epoch recovery; claim rows: mean ± std over seeds (blue)")
        top.set_title(f"{panel['target']:.0%} of the MACs")
        top.grid(axis="x", alpha=0.3)
        diffs = panel["diffs"]
        low.axvline(0, color="black", lw=0.8)
        for y, d in enumerate(diffs):
            low.errorbar(d["mean"], y, xerr=d["half_width"] or 0.0, fmt="o", color="C1", capsize=4)
            text = f"{d['mean']:+.2f}" + ("" if d["half_width"] is None else f" ± {d['half_width']:.2f}")
            low.annotate(text, (d["mean"], y), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=8)
        low.set_yticks(range(len(diffs)), [f"{d['label']} (n={d['n']}, {d['basis']})" for d in diffs], fontsize=8)
        low.set_ylim(max(len(diffs), 1) - 0.5, -0.7)
        low.set_xlabel("paired test difference (points) ± 2 SE of the verdict: ahead only when clear of 0")
        low.grid(axis="x", alpha=0.3)
        if not diffs:
            low.text(0.5, 0.5, "no paired comparison yet", ha="center", va="center", transform=low.transAxes)
    fig.suptitle("ResNet-56, CIFAR-10, equal MACs: curlprune vs Torch-Pruning 1.6.1 (issue 21, finished rows)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
