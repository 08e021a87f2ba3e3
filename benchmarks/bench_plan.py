"""The rows of the ResNet-56 benchmark (issue 21), in the order that decides the claim.

A row id is ``<family>@<target>/e<epochs>/s<seed>`` (``timing`` for the scoring-time row): the
key of the rows file, so a finished row is never recomputed. Families:

* timing (kind ``timing``, bench_timing.py): ``timing`` (exact kl vs kl-approx scoring of the
  unpruned model) and ``timing-prune`` (``timing-prune@0.5/e0/s0``: every method's time from the
  unpruned model to its pruned model at the target, side by side in one process, one thread).
* curlprune: ``kl-best`` (curlprune's default: kl, its default cost-weighted allocation, floor
  0.3), ``kl-paper`` (kl as published: raw global ranking, floor 0.3), ``l1``, ``kla-best``,
  ``taylor``, ``random``; ``alloc:<name>`` the tier-0 allocation study (epochs 0).
* Torch-Pruning: ``tp-<importance>-<width>-<shortcuts>``: importance taylor | l1 | l2
  (GroupTaylorImportance, GroupMagnitudeImportance p=1, p=2 = its default, data-free); width
  ``cap`` (max_pruning_ratio = 1 - floor = 0.7, comparable to curlprune's floor) or ``free``
  (max_pruning_ratio 1.0, its benchmark's setting); shortcuts ``in`` / ``out`` of the importance
  (the fixed 0/1 shortcut convs of tp_equivalent.py).
* ``tp-best``: the Torch-Pruning variant with the best *validation* top-1 after the 2-epoch
  recovery with seed 0 at that target, resolved when all variants have finished (until then the
  row waits).
"""
from __future__ import annotations

from dataclasses import dataclass

FLOOR = 0.3
TARGETS = (0.5, 0.3)
SEEDS = (0, 1, 2)
EPOCHS = 2
LONG_EPOCHS = 10

CURL = {  # family -> (criterion, allocation name or Allocation fields, label)
    "kl-best": ("kl", "cost-weighted", "curlprune default: kl, cost-weighted (inside + outside)"),
    "kl-paper": ("kl", "paper", "curlprune kl, as published (raw global ranking, floor 0.3)"),
    "l1": ("l1", "paper", "curlprune l1 (raw ranking, floor 0.3)"),
    "kla-best": ("kl-approx", "cost-weighted", "curlprune kl-approx, cost-weighted"),
    "taylor": ("taylor", "paper", "curlprune taylor (raw ranking, floor 0.3)"),
    "random": ("random", "paper", "curlprune random (raw ranking, floor 0.3)"),
}
EXPLORE = {  # tier-0 allocation study: name -> (criterion, Allocation fields); chosen on val top-1 (BN)
    "kl paper": ("kl", {}),
    "kl norm mean": ("kl", {"normalize": "mean"}),
    "kl norm max": ("kl", {"normalize": "max"}),
    "kl floor 0.1": ("kl", {"floor": 0.1}),
    "kl / MACs^0.5": ("kl", {"cost_power": 0.5}),
    "kl / MACs": ("kl", {"cost_power": 1.0}),
    "kl / MACs, floor 0.1": ("kl", {"cost_power": 1.0, "floor": 0.1}),
    "kl / MACs, floor 0.2": ("kl", {"cost_power": 1.0, "floor": 0.2}),
    "kl / MACs, floor 0.4": ("kl", {"cost_power": 1.0, "floor": 0.4}),
    "kl-approx / MACs": ("kl-approx", {"cost_power": 1.0}),
    "l1 / MACs": ("l1", {"cost_power": 1.0}),
    "taylor / MACs": ("taylor", {"cost_power": 1.0}),
}
TIMING = ("timing", "timing-prune")  # the timing rows' families (kind "timing", no model of their own)
TP_IMPORTANCE = ("taylor", "l1", "l2")
TP_WIDTH = {"cap": 1.0 - FLOOR, "free": 1.0}
TP_VARIANTS = [f"tp-{imp}-{width}-{sc}" for imp in TP_IMPORTANCE for width in TP_WIDTH for sc in ("out", "in")]
CLAIM = ("kl-best", "tp-best", "l1", "kl-paper")  # the families the claims rest on (3 seeds)
# (a, b, what) paired comparisons of the report
COMPARISONS = [("kl-best", "tp-best", "curlprune default vs Torch-Pruning's best"),
               ("kl-best", "l1", "curlprune default vs curlprune l1"),
               ("kl-best", "kl-paper", "curlprune default vs kl as published")]


@dataclass(frozen=True)
class Row:
    family: str
    target: float = 0.0
    epochs: int = 0
    seed: int = 0

    @property
    def id(self) -> str:
        if self.family == "timing":
            return "timing"
        return f"{self.family}@{self.target:g}/e{self.epochs}/s{self.seed}"

    @property
    def kind(self) -> str:
        if self.family in TIMING:
            return "timing"
        if self.family.startswith("alloc:"):
            return "alloc"
        return "tp" if self.family.startswith("tp-") else "curl"


def parse_id(row_id: str) -> Row:
    """The :class:`Row` of an id (inverse of ``Row.id``)."""
    if row_id == "timing":
        return Row("timing")
    family, _, rest = row_id.partition("@")
    target, epochs, seed = rest.split("/")
    return Row(family, float(target), int(epochs[1:]), int(seed[1:]))


def tp_settings(family: str) -> dict:
    """``tp-<importance>-<width>-<shortcuts>`` -> {importance, max_pruning_ratio, shortcuts_in}."""
    _, importance, width, shortcuts = family.split("-")
    return {"importance": importance, "max_pruning_ratio": TP_WIDTH[width], "shortcuts_in": shortcuts == "in"}


def plan(targets=TARGETS, seeds=SEEDS, epochs=EPOCHS, long_epochs=LONG_EPOCHS, tp_variants=TP_VARIANTS,
         explore=tuple(EXPLORE), extra_long_epochs=0) -> list[Row]:
    """Every row, in the order that decides the claim.

    The timing row; the tier-0 allocation study at every target (no training, about a minute a row:
    it checks on val the allocation that curlprune's default rows use before hours go into them);
    the side-by-side time to a pruned model at the first target (``timing-prune``, no training).
    Then per target (50% first): curlprune's default with every seed; the Torch-Pruning variants
    (seed 0, they choose "TP best" on val); TP best with the other seeds; curlprune l1 and kl as
    published with every seed. Then the long-recovery rows (curlprune default and TP best at the
    first target, seed 0) and the other curlprune criteria (seed 0).

    ``extra_long_epochs`` N > 0 (default 0: none) appends the literature's longer recovery (N = 100,
    meant for a GPU): curlprune's default and TP best at the first target, seed 0, N epochs. They
    come after every other row, so the positions (and shards) of the others do not move.
    """
    rows = [Row("timing")]
    for target in targets:
        rows += [Row(f"alloc:{name}", target, 0, seeds[0]) for name in explore]
    rows.append(Row("timing-prune", targets[0], 0, seeds[0]))
    for target in targets:
        rows += [Row("kl-best", target, epochs, s) for s in seeds]
        rows += [Row(v, target, epochs, seeds[0]) for v in tp_variants]
        rows += [Row("tp-best", target, epochs, s) for s in seeds[1:]]
        for family in ("l1", "kl-paper"):
            rows += [Row(family, target, epochs, s) for s in seeds]
    if long_epochs:
        rows += [Row(f, targets[0], long_epochs, seeds[0]) for f in ("kl-best", "tp-best")]
    for target in targets:
        rows += [Row(f, target, epochs, seeds[0]) for f in ("kla-best", "taylor", "random")]
    if extra_long_epochs and extra_long_epochs not in (epochs, long_epochs):
        rows += [Row(f, targets[0], extra_long_epochs, seeds[0]) for f in ("kl-best", "tp-best")]
    return rows


def variants_of(rows: list[Row]) -> list[str]:
    """The Torch-Pruning variants planned in ``rows``, each once, in plan order (a variant is planned
    at every target; "TP best" is chosen among them, and the report lists each once per target)."""
    return list(dict.fromkeys(r.family for r in rows if r.family in TP_VARIANTS))


def smoke_plan() -> list[Row]:
    """A few rows that exercise every path: timing, curlprune with two seeds, two TP variants, TP
    best resolved for seed 1, one allocation row, the side-by-side pruning times; one target, 1 epoch."""
    variants = ["tp-l2-cap-out", "tp-taylor-free-in"]
    return [Row("timing"), *[Row("kl-best", 0.5, 1, s) for s in (0, 1)], *[Row(v, 0.5, 1, 0) for v in variants],
            Row("tp-best", 0.5, 1, 1), Row("alloc:kl / MACs", 0.5, 0, 0), Row("timing-prune", 0.5, 0, 0)]


# Estimated one-thread CPU seconds, scaled from the smoke run (1,300 training, 200 val, 500 test
# images, 32 calibration images; CPU time of the process, so other jobs on the cores do not count):
# evaluation raw + BN on val and test, 3.9 s for 1,400 images -> 30,000 images: ~85 s; one recovery
# epoch, 17.5 s for 1,300 images -> 45,000 images (+ 1,000 monitor images): ~610 s; Torch-Pruning's
# stepped pruning, taylor 23 s for 100 steps with a backward pass on 32 images -> 400 steps on 256
# images: ~700 s, l1 / l2 9.5 s for 300 steps -> ~40 s; the timing row (exact kl 33 s CPU on 32
# images -> 256 images, plus kl-approx): ~300 s. The timing-prune row, from the finished rows (CPU s
# at 50%, 256 images): exact kl 265 + kl-approx 6 + taylor 3 + l1 0 + 4 selections and slicings
# ~1, Torch-Pruning taylor (140 of 400 steps) ~445 + l1 ~10 + l2 ~10: ~780 s. Wall time on shared
# cores is 2-3x longer.
COST = {"eval": 85.0, "epoch": 610.0, "tp_taylor": 700.0, "tp_magnitude": 40.0, "timing": 300.0, "timing-prune": 780.0}


def listing(rows: list[Row], done) -> list[str]:
    """The lines of ``--list``: position, id, "done" or the estimated cost of each row, and a total
    (``done``: the ids of finished rows)."""
    lines, total = [], 0.0
    for position, row in enumerate(rows):
        cost = estimate(row)
        total += 0 if row.id in done else cost
        lines.append(f"{position:3d}  {row.id:38s}  {'done' if row.id in done else f'~{cost / 3600:.2f} h'}")
    return lines + [f"{len(rows)} rows, {sum(r.id in done for r in rows)} done; ~{total / 3600:.1f} h of one-thread CPU left"]


def estimate(row: Row) -> float:
    """Estimated one-thread CPU seconds of ``row`` (scores and pruned models are cached and shared:
    the kl scores are counted in the timing row, a TP variant's pruning in its seed-0 row)."""
    if row.kind == "timing":
        return COST[row.family]
    seconds = COST["eval"] + row.epochs * COST["epoch"]
    if row.family in TP_VARIANTS:
        seconds += COST["tp_taylor"] if tp_settings(row.family)["importance"] == "taylor" else COST["tp_magnitude"]
    return seconds
