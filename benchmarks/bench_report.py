"""The markdown of the ResNet-56 benchmark (issue 21), regenerated from the rows file alone."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import bench_plan as bp
from bench_claims import allocation_decision, by, claim_difference, claim_rows, vs
from bench_figure import plot
from bench_images import record_for
from bench_stats import fmt_mean_std, mean_std, mixed_devices, paired_difference, run_on, verdict
from bench_timing import timing_lines
from curlprune.store.rundir import atomic_write_text

CPU_NOTE = "not comparable across rows (measured under different load)"  # the per-row CPU seconds
DEFAULT_ALLOC = "alloc:kl / MACs"  # the allocation study's row of curlprune's default (kl-best's allocation)

RUN = """How to run (two background processes, one thread each, sharing the rows file; a finished row is
never recomputed, so the same commands resume after a stop):

    cd <checkout> && export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
    python benchmarks/cifar_resnet56.py --list        # planned rows in order, estimated cost
    setsid nohup python benchmarks/cifar_resnet56.py > runs/bench-r56-0.log 2>&1 < /dev/null &
    setsid nohup python benchmarks/cifar_resnet56.py > runs/bench-r56-1.log 2>&1 < /dev/null &   # a second process takes the next free row
    python benchmarks/cifar_resnet56.py --report      # rewrite this file from benchmarks/results/cifar_resnet56.jsonl

On a GPU (the literature's 100-epoch recovery of curlprune's default and TP best at 50%, seed 0;
carry runs/bench-r56/scores/ and runs/bench-r56/t0.5/ along so the rows prune the same models):

    python benchmarks/cifar_resnet56.py --device cuda --amp bf16 --extra-long-epochs 100 --rows '*/e100/*'

Each process rewrites this file after every row it finishes. `--rows 'kl-best@0.5/*,tp-*@0.5/*'`
restricts to rows whose id matches; `--smoke` runs a few-minute end-to-end check on a tiny subset
(into runs/bench-r56-smoke/).

Estimated one-thread CPU time per row kind (the smoke run scaled up, bench_plan.COST): a curlprune
row with 2 recovery epochs ~0.36 h; a Torch-Pruning variant with 2 epochs ~0.56 h (taylor, its
stepped pruning with a backward pass per step) or ~0.37 h (l1, l2); a 10-epoch row ~1.7 h; an
allocation-study row (no training) ~0.03 h; the timing row ~0.1 h. The whole plan: ~25 h of CPU,
so ~12-13 h on two free cores (2-3x longer when the cores are shared)."""

SETUP = """Protocol. 5,000 training images (500 per class, seeded) are held out as the validation split
(val); calibration ({calib} images), BN re-estimation ({bn} images) and recovery use only the other
training images. Every choice is made on val top-1: the allocation study, and "TP best" = the
Torch-Pruning variant with the best val top-1 after the seed-0 recovery. The test split (10,000
images) only reports. Recovery: curlprune's distill stage (mixup KD from the unpruned teacher, T=2,
alpha=0.7, batch 64, lr 0.02, warm-up 0.2 epoch + cosine, SGD momentum 0.9) from the BN-re-estimated
pruned model; the seed sets the data order and mixup; top-1 of the last epoch. Every recovery, of
both methods, uses the paper's loss, ce_weight 0 (mixup KD alone, while the product's default is
now 0.5); each row records it in its `config` (rows from before the field ran with 0 too, the
default then). MACs ratio: achieved MACs / unpruned; a row outside 1% of its target is flagged, and
under each target's table a sentence gives the achieved ratio per method family.

Statistics. Mean ± std over seeds (n in brackets; a number that is the same for every seed, e.g.
top-1 of the pruned model before training, is shown once); paired difference a - b over the same
seeds with its standard error std(d)/sqrt(n) (the seed SE); "ahead"/"behind" only beyond 2 SE,
else "on par" (the issue's rule). With 3 seeds the seed SE has 2 degrees of freedom, so ± 2 seed
SE is a confidence interval of only about {cover:.0f}% two-sided (t with 2 df), not 95%: a verdict
on the seed SE alone is weak. That is why the verdict uses the combined SE (seeds + test images)
wherever the per-image records exist. The seed SE sees training noise only: every row is scored on
the same 10,000 test (5,000 val) images, so each row also keeps which images it gets right, and the
images SE is std/sqrt(N) of the per-image differences (averaged over the paired seeds). The verdict
uses the combined SE, sqrt(seed SE^2 + images SE^2) (slightly conservative: the seed x image
interaction is in both), when both rows have per-image records for every paired seed; a single-run
comparison (allocation study, Torch-Pruning variants, the longer recovery) has the images SE alone
(for trained rows a lower bound: one seed has no training noise in it). A row whose pruned model is
bit-identical (sha256 of its widths and weights) to a finished row's with the same target, epochs,
seed and device is not trained again: it is marked "= <that row> (identical pruned model)" and
carries that row's numbers (the recovery is deterministic given the pruned model, seed and epochs;
e.g. a width cap that never binds).

Torch-Pruning. Its variants follow the group-norm recipe of Torch-Pruning 1.6.1's
`reproduce/main.py` (`progressive_pruning`: global pruning, iterative over 400 steps towards
pruning_ratio 1.0, stopped at the step nearest the target; group importance with the mean
normalizer and mean group reduction; the classifier ignored; its GroupNormPruner adds only the
sparse-learning regulariser, unused without it), with the importances l1, l2 (its default) and
taylor, a width cap or none, and its shortcut convs in or out of the importance. Its headline
ResNet-56 method there, group_sl (100 epochs of sparse-learning training before pruning,
`--sl-total-epochs 100`), is not run: "TP best" is its best importance without sparse learning
("w/o SL" in its reproduce/readme.md), recovered like every other row.

Devices. Every row records where it ran: `device` (cpu | cuda) and `amp` (off | bf16) of its
scoring, BN re-estimation, evaluation and recovery (Torch-Pruning's stepped pruning always runs on
the CPU); a row without the fields ran on the CPU in float32. The device is not part of a row's id:
a finished row is kept, never recomputed on another device. GPU kernels (and bf16 more so) round
differently from the CPU's, so a row is the same measurement up to that noise, not the same
numbers: a mean or a paired difference over rows from more than one device is flagged **mixed
devices**, and the device of each row is in the last table.

Caveat on the validation split: the published ResNet-56 was trained on all 50,000 training images,
so the held-out images are training images of the unpruned model (its val top-1 is near 100%).
Val top-1 of a pruned model partly measures what it retains of images its parent memorised: a
biased but test-free basis for the choices. Every row reports test top-1 next to val top-1, so a
choice that val and test would make differently is visible in the tables."""


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mixed(rows) -> str:
    labels = mixed_devices(rows)
    return f" **mixed devices: {' / '.join(labels)}**" if labels else ""


def _same(r: dict) -> str:
    """The marker of a row recorded as ``same_as`` another (bench_alias): its numbers are that row's."""
    return f" = {r['same_as']} (identical pruned model)" if r.get("same_as") else ""


def _diff(d) -> str:
    if d is None:
        return "-"
    return f"{d['mean']:+.2f}" + ("" if d["se"] is None else f" ± {d['se']:.2f}")


def _se(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _comparison(rows: dict, images, what: str, a: Mapping[int, dict], b: Mapping[int, dict]) -> tuple[str, str]:
    """The table line of a paired comparison a - b (seed -> row each) and what its verdict rests on."""
    dv = paired_difference({s: r["val_top1"] for s, r in a.items()}, {s: r["val_top1"] for s, r in b.items()})
    d = claim_difference(rows, images, a, b)
    dt, dc = (d["seed"], d["combined"]) if d else (None, None)
    seeds = dt["seeds"] if dt else []
    paired = [f[s] for f in (a, b) for s in seeds]
    line = (f"| {what}{_mixed(paired)} | {len(seeds)} | {_diff(dv)} | {_diff(dt)} | {_se(dc and dc['se_images'])} | "
            f"{_se(dc and dc['se'])} | a {verdict(d and d['decided'])} |")
    return line, f"{what}: {d['basis'] if d else 'seed SE only: no per-image records for every paired seed of both rows'}"


def _best_vs_default(rows: dict, images, best: dict, default: dict | None) -> str:
    """The sentence on the allocation study's best-by-val row against curlprune's default row."""
    if default is None:
        return "The default's row has not finished."
    if best is default or best["val_bn"] == default["val_bn"]:
        return "The default is best by val." if best is default else "The default ties it on val."
    d = vs(rows, images, best, default)
    if d is None:
        return "Best minus default on val: no per-image records for both rows yet (`--backfill-images`)."
    return (f"Best minus default on val: {_diff(d)} (paired images SE, {d['n']:,} val images, one run each): "
            f"{verdict(d)}.")


def _t2_coverage(k: float = 2.0) -> float:
    """Two-sided coverage (%) of ± k SE for Student's t with 2 degrees of freedom (3 seeds):
    P(|T| < k) = k / sqrt(2 + k^2) (the closed form of its CDF; 81.6% for k = 2)."""
    return 100.0 * k / math.sqrt(2.0 + k * k)


def _macs_line(rows: dict, target: float) -> str | None:
    """The sentence on the achieved MACs ratio per method family at ``target``: mean and range over
    the trained pruned models (one per family or Torch-Pruning variant, whatever its seeds and
    epochs), and which side a difference favours (more MACs kept = an easier model)."""
    models: dict[str, dict[str, float]] = {"curlprune": {}, "Torch-Pruning": {}}
    for r in rows.values():
        if r.get("target") != target or not r.get("epochs") or r.get("macs_ratio") is None or r.get("same_as"):
            continue
        model = r.get("resolved_to") or r["family"]
        side = "Torch-Pruning" if model.startswith("tp-") else "curlprune" if model in bp.CURL else None
        if side:
            models[side][model] = r["macs_ratio"]
    stats = {k: (mean_std(list(v.values()))[0], min(v.values()), max(v.values()), len(v)) for k, v in models.items() if v}
    if not stats:
        return None
    parts = [f"{k} {m:.4f} ({lo:.3f}-{hi:.3f}, {n} pruned model{'s' * (n > 1)})" for k, (m, lo, hi, n) in stats.items()]
    line = f"Achieved MACs ratio at {target:.0%} (mean, range): " + ", ".join(parts) + "."
    if len(stats) == 2:
        gap = stats["Torch-Pruning"][0] - stats["curlprune"][0]
        if abs(gap) >= 5e-5:
            favoured = "Torch-Pruning's" if gap > 0 else "curlprune's"
            line += (f" Torch-Pruning's models keep {abs(gap):.4f} of the unpruned MACs {'more' if gap > 0 else 'less'} on "
                     f"average: a slight bias in {favoured} favour.")
    return line


def _loss_line(rows: dict) -> str | None:
    """The recovery loss the trained rows record (``config.ce_weight``; absent in rows from before
    the field, which ran with 0, the default then); any other value is flagged. A ``same_as`` row
    was not trained: it is left out."""
    trained = [r for r in rows.values() if r.get("epochs") and r.get("val_top1") is not None and not r.get("same_as")]
    if not trained:
        return None
    recorded = [r for r in trained if "ce_weight" in (r.get("config") or {})]
    other = sorted(r["id"] for r in recorded if r["config"]["ce_weight"] != 0)
    line = (f"Recovery loss: ce_weight 0 recorded by {len(recorded) - len(other)} of {len(trained)} trained rows, "
            f"{len(trained) - len(recorded)} from before the field (0 too).")
    return line + (f" **Other ce_weight: {', '.join(other)}**" if other else "")


def _long_comparison(rows: dict, images, target: float, epochs: int, short_epochs: int) -> str:
    """The line of curlprune's default minus TP best at ``epochs`` (seed 0, test top-1): the
    difference with its paired images SE (one seed: a lower bound, no training noise in it), and
    whether its sign is that of the same difference after ``short_epochs`` (seed 0)."""
    head = f"kl-best - TP best at {target:.0%}, {epochs} epochs, seed 0 (test)"
    a, b = rows.get(bp.Row("kl-best", target, epochs, 0).id), rows.get(bp.Row("tp-best", target, epochs, 0).id)
    if a is None or b is None:
        missing = [bp.Row(f, target, epochs, 0).id for f, r in (("kl-best", a), ("tp-best", b)) if r is None]
        return f"{head}: not yet measured (missing {', '.join(missing)})."
    d = a["test_top1"] - b["test_top1"]
    im = vs(rows, images, a, b, "test")
    se = (f" ± {im['se']:.2f} (paired images SE, {im['n']:,} test images; one seed, so a lower bound: no training noise in it)"
          if im and im["se"] is not None else " (no per-image records for both rows: no SE)")
    line = f"{head}{_mixed([a, b])}: {d:+.2f}{se}."
    sa = rows.get(bp.Row("kl-best", target, short_epochs, 0).id)
    sb = rows.get(bp.Row(b.get("resolved_to", ""), target, short_epochs, 0).id)
    if sa is None or sb is None:
        return line + f" The {short_epochs}-epoch difference (seed 0) is not yet measured."
    ds = sa["test_top1"] - sb["test_top1"]
    if d == 0 or ds == 0:
        agree = "one of them is zero, no sign to compare"
    else:
        agree = "the same sign" if (d > 0) == (ds > 0) else "**the opposite sign**"
    return line + f" At {short_epochs} epochs (seed 0) it is {ds:+.2f}: {agree}."


def _longer(rows: dict, images, epochs_seeded: int) -> list[str]:
    """The "Longer recovery" section: its rows, and per planned (target, epochs) the comparison line."""
    long_rows = [r for r in rows.values() if r.get("family") in ("kl-best", "tp-best") and r.get("epochs", 0) > epochs_seeded]
    lines = ["## Longer recovery", ""]
    if long_rows:
        lines += ["| row | target | epochs | seed | device | MACs ratio | val top-1 | test top-1 | same seed, "
                  f"{epochs_seeded} epochs: test |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(long_rows, key=lambda r: (-r["target"], r["family"], r["epochs"], r["seed"])):
            family = r["family"] if r["family"] != "tp-best" else f"tp-best ({r.get('resolved_to')})"
            short = rows.get(bp.Row(r["family"], r["target"], epochs_seeded, r["seed"]).id)
            if short is None and r["family"] == "tp-best" and r["seed"] == 0:
                short = rows.get(bp.Row(r.get("resolved_to", ""), r["target"], epochs_seeded, 0).id)
            lines.append(f"| {family}{_same(r)} | {r['target']:.0%} | {r['epochs']} | {r['seed']} | {run_on(r)} | {r['macs_ratio']:.3f} | "
                         f"{_pct(r['val_top1'])} | {_pct(r['test_top1'])} | {_pct(short['test_top1'] if short else None)} |")
        lines.append("")
    planned = {(bp.TARGETS[0], bp.LONG_EPOCHS)} | {(r["target"], r["epochs"]) for r in long_rows}
    lines += [_long_comparison(rows, images, t, e, epochs_seeded) for t, e in sorted(planned, key=lambda p: (-p[0], p[1]))]
    return lines + [""]


def write_markdown(rows: dict, path: Path, *, variants, variant_epochs: int, settings: dict, smoke: bool = False,
                   images: Mapping[str, dict] | None = None) -> None:
    """Write the report of the finished ``rows`` (id -> row) to ``path`` (atomically).

    ``images``: id -> per-image record (the sidecar, bench_images); None or {} (an older checkout
    without one): every standard error is the seed SE alone and the image columns show "-".
    """
    lines = ["# ResNet-56 on lossless CIFAR-10: curlprune vs Torch-Pruning at equal MACs (issues 9, 21)", ""]
    if smoke:
        lines += ["**SMOKE RUN**: a tiny subset, 1 epoch: proves the script, the numbers mean nothing.", ""]
    lines += [RUN, "", SETUP.format(calib=settings["calib"], bn=settings["bn_images"], cover=_t2_coverage()), ""]
    timing = rows.get("timing")
    if timing:
        t, v = timing["teacher"], timing["versions"]
        lines += [f"Unpruned ResNet-56: val {t['val_top1']:.2f}%, test {t['test_top1']:.2f}%, {t['macs'] / 1e6:.2f} M MACs, "
                  f"{t['params'] / 1e6:.3f} M params; images {timing['images']}; torch {v['torch']}, torch-pruning "
                  f"{v['torch_pruning']}. Scoring the unpruned model on {timing['calib']} calibration images, side by side "
                  f"in one process, {timing['threads']} thread: exact kl {timing['score_seconds']['kl']:.1f} s, kl-approx "
                  f"{timing['score_seconds']['kl-approx']:.1f} s (wall; CPU {timing['score_cpu_seconds']['kl']:.1f} s and "
                  f"{timing['score_cpu_seconds']['kl-approx']:.1f} s).", ""]
    lines += timing_lines(rows)  # the side-by-side times to a pruned model (bench_timing)
    epochs_seeded = variant_epochs
    targets = sorted({r["target"] for r in rows.values() if r.get("target") and r.get("kind") != "timing"}, reverse=True)
    figure = path.with_suffix(".png")
    loss = _loss_line(rows)
    lines += ([loss, ""] if loss else []) + [
        f"![test top-1 after the {epochs_seeded}-epoch recovery, mean ± std over seeds, and the paired differences "
        f"± 2 SE of the verdicts]({figure.name})", "",
        f"The figure ([{figure.name}]({figure.name}), drawn by `--report` from the finished rows): per target, test top-1 of "
        "the claim rows (mean ± std over seeds, n in the label) and of the other single-seed rows (grey squares); below, "
        "kl-best minus each other claim row with ± 2 x the SE its verdict uses (combined where both rows have per-image "
        "records).", ""]
    for target in targets:
        lines += [f"## {target:.0%} of the MACs: the claims ({epochs_seeded}-epoch recovery)", "",
                  "| row | method | MACs ratio | val top-1 | test top-1 | test top-1 BN, no training |", "|---|---|---|---|---|---|"]
        per_seed = {}
        for family, found in claim_rows(rows, target, epochs_seeded).items():
            per_seed[family] = {r["seed"]: r for r in found}
            label = bp.CURL.get(family, ("", "", "Torch-Pruning's best by val"))[2]
            if family == "tp-best":
                label += f" ({found[0]['family']})"
            label += "".join(f"; seed {r['seed']}{_same(r)}" for r in found if r.get("same_as"))
            ratios = sorted({r["macs_ratio"] for r in found})
            flag = "" if all(r["within_1pct"] for r in found) else " **outside 1%**"
            lines.append(f"| {family} | {label}{_mixed(found)} | {'/'.join(f'{x:.3f}' for x in ratios)}{flag} | "
                         f"{fmt_mean_std([r['val_top1'] for r in found])} | {fmt_mean_std([r['test_top1'] for r in found])} | "
                         f"{fmt_mean_std([r['test_bn'] for r in found])} |")
        macs = _macs_line(rows, target)
        lines += ["", macs] if macs else []
        lines += ["", "| comparison (a - b, same seeds) | n | val diff ± SE | test diff ± SE | test SE: images | test SE: combined | "
                  "verdict (test) |", "|---|---|---|---|---|---|---|"]
        bases = []
        for a, b, what in bp.COMPARISONS:
            if a in per_seed and b in per_seed:
                line, basis = _comparison(rows, images, what, per_seed[a], per_seed[b])
                lines.append(line)
                bases.append(basis)
        if bases:
            lines += ["", "Verdict on: " + "; ".join(bases) + "."]
        lines.append("")
    if targets:
        lines += _longer(rows, images, epochs_seeded)
    for target in targets:
        found = [r for v in variants for r in by(rows, v, target, variant_epochs) if r["seed"] == 0]
        if not found:
            continue
        best = max(found, key=lambda r: r["val_top1"]) if len(found) == len(variants) else None
        lines += [f"## Torch-Pruning 1.6.1 variants at {target:.0%} (seed 0, {variant_epochs} epochs; best chosen on val){_mixed(found)}", "",
                  "| variant | importance | max_pruning_ratio | shortcuts in importance | MACs ratio | steps | val BN | val top-1 | test top-1 | "
                  "val - TP best ± images SE |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in found:
            p = r["prune"]
            ratio = f"{r['macs_ratio']:.3f}" + ("" if r["within_1pct"] else " **outside 1%**")
            name = (f"**{r['family']}** (TP best)" if best is r else r["family"]) + _same(r)
            vs_best = "best" if best is r else ("-" if best is None else _diff(vs(rows, images, r, best)))
            lines.append(f"| {name} | {p['importance']} | {p['max_pruning_ratio']:g} | {'yes' if p['shortcuts_in'] else 'no'} | {ratio} | "
                         f"{p['tp']['steps']}/{p['tp']['of_steps']} | {_pct(r['val_bn'])} | {_pct(r['val_top1'])} | {_pct(r['test_top1'])} | "
                         f"{vs_best} |")
        lines.append("")
    others = [r for r in rows.values() if r.get("family") in ("kla-best", "taylor", "random")]
    if others:
        lines += ["## Other curlprune criteria (seed 0)", "", "| row | target | MACs ratio | val BN | val top-1 | test top-1 |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(others, key=lambda r: (-r["target"], r["family"])):
            lines.append(f"| {r['family']}{_same(r)} | {r['target']:.0%} | {r['macs_ratio']:.3f} | {_pct(r['val_bn'])} | {_pct(r['val_top1'])} | "
                         f"{_pct(r['test_top1'])} |")
        lines.append("")
    for target in targets:
        study = [r for r in rows.values() if r.get("kind") == "alloc" and r.get("target") == target]
        if not study:
            continue
        best = max(study, key=lambda r: r["val_bn"])
        default = next((r for r in study if r["family"] == DEFAULT_ALLOC), None)
        lines += [f"## Allocation study at {target:.0%}, no training (chosen on val top-1 after BN re-estimation)", "",
                  f"Best by val: **{best['family'][6:]}**; curlprune's default is kl / MACs, floor 0.3. {_best_vs_default(rows, images, best, default)}", "",
                  "| allocation | MACs ratio | stream widths | val raw | val BN | test BN | val BN - default ± images SE |", "|---|---|---|---|---|---|---|"]
        for r in sorted(study, key=lambda r: -r["val_bn"]):
            against = "default" if r is default else ("-" if default is None else _diff(vs(rows, images, r, default)))
            lines.append(f"| {r['family'][6:]}{_same(r)} | {r['macs_ratio']:.3f} | {'/'.join(map(str, r['stream_widths']))} | "
                         f"{_pct(r['val_raw'])} | {_pct(r['val_bn'])} | {_pct(r['test_bn'])} | {against} |")
        lines.append("")
    decision = allocation_decision(rows, images, DEFAULT_ALLOC)
    lines += [decision, ""] if decision else []
    flagged = sorted(r["id"] for r in rows.values() if r.get("within_1pct") is False)
    if flagged:
        lines += ["## Flagged: achieved MACs outside 1% of the target", "", *[f"- {i}" for i in flagged], ""]
    finished = [r for r in rows.values() if r["kind"] != "timing"]
    devices = {label: sum(run_on(r) == label for r in finished) for label in sorted({run_on(r) for r in finished})}
    recorded = sum(record_for(rows, images, r["id"]) is not None for r in finished)
    lines += [] if not finished else ["## Every finished row", "", "Rows by device: " + ", ".join(f"{k} {n}" for k, n in devices.items()) + ". "
                                      f"Rows with per-image records: {recorded} of {len(finished)}.", "",
                                      f"The CPU-seconds columns are {CPU_NOTE}.", "",
                                      "| id | device | MACs ratio | val raw | val BN | val top-1 | test top-1 | CPU s: prune | evaluation | recovery |",
                                      "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(finished, key=lambda r: r["id"]):
        lines.append(f"| {r['id']}{' -> ' + r['resolved_to'] if r.get('resolved_to') else ''}{_same(r)} | {run_on(r)} | {r['macs_ratio']:.3f} | "
                     f"{_pct(r['val_raw'])} | {_pct(r['val_bn'])} | {_pct(r['val_top1'])} | {_pct(r['test_top1'])} | "
                     f"{r.get('prune_cpu_seconds', 0):.0f} | {r.get('eval_cpu_seconds', 0):.0f} | {r.get('recovery_cpu_seconds', 0):.0f} |")
    if not rows:
        lines += ["", "No row has finished yet with this protocol. The single-seed results of the issue-9 protocol (no "
                  "validation split, test-chosen allocation, one seed) are in [cifar_resnet56_issue9.md](cifar_resnet56_issue9.md) "
                  "(data: cifar_resnet56.json)."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    plot(rows, images, epochs_seeded, figure)
