"""The report of the small-data benchmark (issue 19 item 4): markdown + png, from the rows file alone."""
from __future__ import annotations

from pathlib import Path

import small_data_plan as sp
from bench_stats import fmt_mean_std, mean_std, paired_difference, verdict

RUN = """How to run (two background processes, one thread each, sharing the rows file; a finished row is
never recomputed, so the same commands resume after a stop):

    cd <checkout> && mkdir -p runs && export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
    python benchmarks/small_data.py --list        # planned rows in order, estimated CPU time, what is done
    setsid nohup python benchmarks/small_data.py > runs/bench-small-0.log 2>&1 < /dev/null &
    setsid nohup python benchmarks/small_data.py > runs/bench-small-1.log 2>&1 < /dev/null &   # a second process takes the next free row
    python benchmarks/small_data.py --report      # rewrite this file and the png from benchmarks/results/small_data.jsonl

Each process rewrites this file after every row it finishes. `--rows '50/*'` restricts to rows whose
id matches; `--smoke` runs a few-minute end-to-end check on tiny subsets (into runs/bench-small-smoke/)."""

PROTOCOL = """Protocol (benchmarks/small_data.py, small_data_plan.py). clothing10 at 32 px; ResNet-56 from CIFAR-10
pruned (kl, curlprune's default criterion) to ResNet-20's MACs. A validation split is held out of the
training images (seed 0, class-balanced; 50 per class: 20 per class held out, 50 per class drawn from
the rest; full split: 15% of every class) and never trained on. The teacher t is the finetune stage
with early stopping on val (patience {p50} / {pfull} epochs, cap {c50} / {cfull}), best epoch kept.
Choice phase: seed 0, at 50 per class only, val top-1 only (the test split is not evaluated): the
loss grid (feature weight, CE weight), then the refine grid (refine epochs, label step, expansion) on
its winner; recipe a = the best of those; the full split reuses it. Report phase: 3 seeds (training
randomness; the split, the teacher and the pruned model are shared); top-1 of the last epoch; t one
seed. Budget of every student row: B = {b50} (50 per class) / {bfull} (full) epochs-equivalent of the
training set: distill E = B - 6 R epochs + refine R epochs of the 6x expanded set (a-paper: R = 1;
without expansion 6 R epochs of the original images); b fine-tunes B epochs with CE; d1 fine-tunes
as many epochs as t ran. Paired differences over seeds with SE = std(d)/sqrt(n); "ahead"/"behind"
only beyond 2 SE. Training s: the rows' training stages (not the pruning, shared), one thread on
2 shared cores: indicative only."""


def _rows(done: dict, tset: str, name: str) -> list[dict]:
    """The finished rows of one name and set, by seed; an ablation equal to a stands for a's row."""
    found = []
    for r in done.values():
        if r.get("set") == tset and r.get("name") == name:
            found.append(done.get(r["same_as"], r) if r.get("same_as") else r)
    return sorted((r for r in found if "val_top1" in r), key=lambda r: r["seed"])


def _diff(d) -> str:
    return "-" if d is None else f"{d['mean']:+.2f}" + ("" if d["se"] is None else f" ± {d['se']:.2f}")


def _epochs(r: dict) -> str:
    e = r.get("epochs", {})
    if "distill" in e:
        refine = f" + refine {e['refine']}" + (" (6x)" if e.get("refine_expanded") else " (x6 epochs, no expansion)") if e["refine"] else ""
        return f"distill {e['distill']}{refine}"
    if "finetune" in e:
        return f"CE {e['finetune']}"
    return f"{r.get('epochs_run')} (best {r.get('best_epoch')})" if "epochs_run" in r else "-"


def write_report(done: dict, path: Path, *, settings: dict, smoke: bool = False) -> None:
    """Write the markdown report of the finished rows ``done`` (id -> row) to ``path`` and the bar chart
    next to it (``.png``), atomically."""
    from curlprune.store.rundir import atomic_write_text

    s50, sfull = settings["50"], settings["full"]
    lines = ["# Small data: recovery recipes chosen on val, reported on test (issue 19)", ""]
    if smoke:
        lines += ["**SMOKE RUN**: tiny subsets and budgets: proves the script, the numbers mean nothing.", ""]
    lines += [RUN, "", PROTOCOL.format(p50=s50["patience"], pfull=sfull["patience"], c50=s50["teacher_cap"], cfull=sfull["teacher_cap"],
                                       b50=s50["budget"], bfull=sfull["budget"]), ""]
    choice = next((r["chosen"] for r in done.values() if r.get("chosen")), None)
    choose_rows = [r for r in done.values() if r.get("kind", "").startswith("choose")]
    if choose_rows:
        lines += [f"## Choice on val (set {sp.CHOOSE_SET} per class, seed 0, {choose_rows[0]['images']['val']} val images)", "",
                  "| config | recipe | val top-1 | val per-class mean | epochs | training s |", "|---|---|---|---|---|---|"]
        for r in sorted(choose_rows, key=lambda r: (r["kind"], -r["val_top1"])):
            mark = " **(a)**" if choice and r["config"] == choice["config"] else ""
            lines.append(f"| {r['config']}{mark} | {sp.Recipe.of(r['recipe']).describe()} | {r['val_top1']:.2f} | {r['val_per_class']:.2f} | "
                         f"{_epochs(r)} | {r['train_seconds']:.0f} |")
        lines.append("")
        if choice:
            lines += [f"Chosen recipe a: **{choice['config']}** ({sp.Recipe.of(choice['recipe']).describe()}), val top-1 "
                      f"{choice['val_top1']:.2f}.", ""]
    for tset in sp.SETS:
        if not any(r.get("set") == tset for r in done.values()):
            continue
        title = "50 images per class" if tset == "50" else "the full training split"
        lines += [f"## Report on test: {title}", "",
                  "| row | method | seeds | val top-1 | test top-1 | test per-class mean | MACs | params | epochs | training s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        per_seed, aliases = {}, set()
        for name in sp.REPORT:
            found = _rows(done, tset, name)
            if not found:
                continue
            same = [r for r in done.values() if r.get("set") == tset and r.get("name") == name and r.get("same_as")]
            per_seed[name] = {r["seed"]: r["test_top1"] for r in found}
            label = sp.NAMES[name] + (" (= a, not trained)" if same else "")
            aliases |= {name} if same else set()
            lines.append(f"| {name} | {label} | {len(found)} | {fmt_mean_std([r['val_top1'] for r in found])} | "
                         f"{fmt_mean_std([r['test_top1'] for r in found])} | {fmt_mean_std([r['test_per_class'] for r in found])} | "
                         f"{found[0]['macs'] / 1e6:.2f} M | {found[0]['params'] / 1e6:.3f} M | {_epochs(found[0])} | "
                         f"{mean_std([r['train_seconds'] for r in found])[0]:.0f} |")
        lines += ["", "| comparison (a - other, same seeds) | n | test diff ± SE | verdict |", "|---|---|---|---|"]
        for a, b, what in sp.COMPARISONS:
            if a in per_seed and b in per_seed and b not in aliases:
                d = paired_difference(per_seed[a], per_seed[b])
                goal = ""
                if b in sp.GOAL and d is not None and d["se"] is not None:
                    met = d["mean"] >= sp.GOAL[b] and d["mean"] > 2 * d["se"]
                    goal = f"; goal a >= {b} + {sp.GOAL[b]:g}: {'met' if met else 'not met'}"
                lines.append(f"| {what} | {d['n'] if d else 0} | {_diff(d)} | a {verdict(d)}{goal} |")
        teacher = done.get(sp.Row(tset, "t").id)
        if teacher:
            curve = ", ".join(f"{c['epoch']}: {c['val_top1']:.1f}/{c['test_top1']:.1f}" for c in teacher["curve"])
            lines += ["", f"Teacher curve (epoch: val/test top-1; early stopping on val, best epoch {teacher['best_epoch']} of "
                      f"{teacher['epochs_run']} run, cap {teacher['epoch_cap']}, patience {teacher['patience']}; test is monitoring "
                      f"only): {curve}."]
        lines.append("")
    finished = sorted(done.values(), key=lambda r: r["id"])
    if finished:
        lines += ["## Every finished row", "", "| id | val top-1 | test top-1 | epochs | training s | CPU s |", "|---|---|---|---|---|---|"]
        for r in finished:
            if r.get("same_as"):
                lines.append(f"| {r['id']} | = {r['same_as']} | | | | |")
                continue
            test = "-" if "test_top1" not in r else f"{r['test_top1']:.2f}"
            lines.append(f"| {r['id']} | {r['val_top1']:.2f} | {test} | {_epochs(r)} | {r['train_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    else:
        lines += ["No row has finished yet. The earlier protocol's results (no validation split, a teacher trained a fixed 18 or 10 epochs) "
                  "are in [transfer.md](transfer.md), [teacher_probe.md](teacher_probe.md), [refine_probe.md](refine_probe.md)."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    plot(done, path.with_suffix(".png"))


def plot(done: dict, path: Path) -> None:
    """Per set (a column): test top-1 of every trained report row (mean ± std over seeds; rows equal
    to a are left out), and below it the paired difference a - row with ± 2 SE bars, the goal's
    margins dashed: "ahead" is a bar clear of zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curlprune.store.rundir import atomic_write

    sets = [s for s in sp.SETS if any(r.get("set") == s and "test_top1" in r for r in done.values())]
    if not sets:
        return
    fig, axes = plt.subplots(2, len(sets), figsize=(6 * len(sets), 7), squeeze=False)
    for col, tset in enumerate(sets):
        aliases = {r.get("name") for r in done.values() if r.get("set") == tset and r.get("same_as")}
        names = [n for n in sp.REPORT if _rows(done, tset, n) and n not in aliases]
        stats = [mean_std([r["test_top1"] for r in _rows(done, tset, n)]) for n in names]
        top = axes[0][col]
        top.errorbar([m for m, _ in stats], range(len(names)), xerr=[sd or 0 for _, sd in stats], fmt="o", capsize=3)
        top.set_yticks(range(len(names)), names)
        top.invert_yaxis()
        top.set_xlabel("test top-1 (%), mean ± std over seeds")
        top.set_title(("50 images per class" if tset == "50" else "full training split") + ": top-1")
        top.grid(axis="x", alpha=0.3)
        per_seed = {n: {r["seed"]: r["test_top1"] for r in _rows(done, tset, n)} for n in names}
        diffs = [(b, paired_difference(per_seed["a"], per_seed[b])) for a, b, _ in sp.COMPARISONS
                 if a in per_seed and b in per_seed]
        diffs = [(b, d) for b, d in diffs if d is not None and d["se"] is not None]
        low = axes[1][col]
        low.errorbar([d["mean"] for _, d in diffs], range(len(diffs)), xerr=[2 * d["se"] for _, d in diffs], fmt="o", capsize=3,
                     color="C1")
        low.axvline(0, color="black", lw=0.8)
        for other, margin in sp.GOAL.items():
            low.axvline(margin, color="grey", ls="--", lw=0.8)
            low.annotate(f"goal vs {other}", (margin, 1.0), xycoords=("data", "axes fraction"), fontsize=7, va="bottom", ha="center")
        low.set_yticks(range(len(diffs)), [f"a - {b}" for b, _ in diffs])
        low.invert_yaxis()
        low.set_xlabel("paired difference on test (points), ± 2 SE")
        low.grid(axis="x", alpha=0.3)
    fig.suptitle("clothing10, 32 px: students at ResNet-20's MACs (t: ResNet-56), 3 seeds")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
