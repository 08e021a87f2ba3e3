"""The claim rows of the ResNet-56 benchmark (issue 21) and their paired differences, as the report's
tables (bench_report.py) and its figure (bench_figure.py) both use them: one computation, so the
figure's error bars are the standard errors the verdicts rest on.
"""
from __future__ import annotations

from collections.abc import Mapping

import bench_plan as bp
from bench_images import combined_difference, image_difference, record_for, unpack
from bench_stats import paired_difference, verdict


def by(rows: Mapping[str, dict], family: str, target: float, epochs: int) -> list[dict]:
    """The rows of ``family`` at ``target`` with ``epochs`` recovery epochs, by seed."""
    return sorted((r for r in rows.values() if r.get("family") == family and r.get("target") == target
                   and r.get("epochs") == epochs), key=lambda r: r["seed"])


def claim_rows(rows: Mapping[str, dict], target: float, epochs: int) -> dict[str, list[dict]]:
    """family -> its finished rows by seed, for each family of ``bp.CLAIM`` with one at least.

    "tp-best"'s seed 0 is the seed-0 row of the variant it resolved to (the row that chose it:
    bench_plan's docstring); its other seeds are its own rows.
    """
    found_all = {}
    for family in bp.CLAIM:
        found = by(rows, family, target, epochs)
        if family == "tp-best":
            chosen = {r.get("resolved_to") for r in found} - {None}
            if chosen:
                found = by(rows, chosen.pop(), target, epochs)[:1] + found
        if found:
            found_all[family] = found
    return found_all


def records(rows: Mapping[str, dict], images, found: Mapping[int, dict], seeds, split: str) -> dict | None:
    """seed -> the correctness record (bool [N]) on ``split`` of ``found[seed]``; None unless every seed has one."""
    out = {s: record_for(rows, images, found[s]["id"]) for s in seeds}
    return None if any(r is None for r in out.values()) else {s: unpack(r[split]) for s, r in out.items()}


def vs(rows: Mapping[str, dict], images, a: dict, b: dict, split: str = "val") -> dict | None:
    """bench_images.image_difference of rows ``a`` and ``b`` on ``split``; None without both records."""
    ra, rb = record_for(rows, images, a["id"]), record_for(rows, images, b["id"])
    return None if ra is None or rb is None else image_difference(unpack(ra[split]), unpack(rb[split]))


def claim_difference(rows: Mapping[str, dict], images, a: Mapping[int, dict], b: Mapping[int, dict]) -> dict | None:
    """The paired test top-1 difference a - b (seed -> row each) and the standard error its verdict uses.

    Returns ``{"seed", "combined", "decided", "basis"}`` or None when no seed is shared:
    ``seed`` = bench_stats.paired_difference of the stored top-1s (seed SE); ``combined`` =
    bench_images.combined_difference (seed + images SE) when both rows have per-image records for
    every paired seed, else None; ``decided`` = ``combined`` when it has an SE (two seeds or more),
    else ``seed`` (the report's verdict and the figure's ± 2 SE bars use it); ``basis`` says which.
    """
    dt = paired_difference({s: r["test_top1"] for s, r in a.items()}, {s: r["test_top1"] for s, r in b.items()})
    if dt is None:
        return None
    ra, rb = records(rows, images, a, dt["seeds"], "test"), records(rows, images, b, dt["seeds"], "test")
    dc = combined_difference(dt, {s: (ra[s], rb[s]) for s in dt["seeds"]}) if ra and rb else None
    if dc is not None and dc["se"] is not None:
        return {"seed": dt, "combined": dc, "decided": dc, "basis": "combined SE"}
    basis = ("seed SE only: one seed" if dc is not None else
             "seed SE only: no per-image records for every paired seed of both rows")
    return {"seed": dt, "combined": dc, "decided": dt, "basis": basis}


def allocation_decision(rows: Mapping[str, dict], images, default_family: str) -> str | None:
    """The allocation study's decision, as one sentence (issue 21: every choice on val).

    The rule: curlprune's one default serves every target, so it changes only to an allocation that
    is ahead of it on val (after BN re-estimation, paired images SE, beyond 2 SE) at every target
    of the study; an allocation ahead at some targets only, or on par, leaves it. Candidates are
    the study's rows other than ``default_family``; an allocation whose rows are all identical in
    val to the default's counts as on par. Returns None until every target has the default's row
    and every candidate's record; the sentence names each candidate ahead somewhere with its
    differences.
    """
    study = [r for r in rows.values() if r.get("kind") == "alloc"]
    targets = sorted({r["target"] for r in study}, reverse=True)
    default = {t: next((r for r in study if r["target"] == t and r["family"] == default_family), None) for t in targets}
    if not targets or any(d is None for d in default.values()):
        return None
    diffs: dict[str, dict[float, dict]] = {}
    for r in study:
        if r["family"] == default_family:
            continue
        d = vs(rows, images, r, default[r["target"]])
        if d is None:
            return None
        diffs.setdefault(r["family"], {})[r["target"]] = d
    ahead = {f: d for f, d in diffs.items() if any(verdict(x) == "ahead" for x in d.values())}
    everywhere = [f for f, d in ahead.items() if len(d) == len(targets) and all(verdict(x) == "ahead" for x in d.values())]
    name = default_family.removeprefix("alloc:")
    if everywhere:
        best = max(everywhere, key=lambda f: min(x["mean"] for x in diffs[f].values()))
        return f"Decision: **{best.removeprefix('alloc:')}** is ahead of the default ({name}) on val at every target; the default should switch to it."
    if not ahead:
        return f"Decision: no allocation is ahead of the default ({name}) on val beyond 2 SE at any target; the default stays."
    parts = []
    for f, d in sorted(ahead.items()):
        parts.append(f"{f.removeprefix('alloc:')} (" + ", ".join(
            f"{t:.0%}: {x['mean']:+.2f} ± {x['se']:.2f}" for t, x in sorted(d.items(), reverse=True)) + ")")
    return (f"Decision: the default ({name}) stays. One default serves every target, so it changes only to an allocation "
            f"ahead of it on val beyond 2 SE at every target; ahead at some targets only: {'; '.join(parts)}.")
