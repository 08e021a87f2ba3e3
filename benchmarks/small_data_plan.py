"""The rows of the small-data benchmark (issue 19 item 4), their recipes and the choice on val.

No torch here: tests/test_small_data.py checks every function.

A row id is ``<set>/<name>/s<seed>``; ``<set>`` is ``50`` (50 images per class) or ``full`` (the
whole training split). Names:

* ``t``: the teacher (ResNet-56 fine-tuned with early stopping on val, best epoch kept).
* ``choose:<config>``: the choice phase (seed 0, val top-1 only; the test split is not evaluated).
  First the loss grid (:data:`LOSS_GRID`: feature weight, CE weight); then the refine grid
  (:data:`REFINE_GRID`) on the loss grid's winner (``choose:+<refine>`` rows resolve to it).
  Recipe ``a`` is the best of the loss winner and the refine rows by val top-1 (ties: plan order).
* ``a`` (the chosen recipe), ``a-paper`` (``recipe: paper``), ``b`` (prune + CE), ``d1`` (ResNet-20
  pretrained + CE for as many epochs as ``t`` ran), and the ablations of ``a``: ``a-nofeat``,
  ``a-noce``, ``a-norefine``, ``a-noexpand`` (one ingredient off), and for the ingredients a leaves
  out the other direction: ``a+feat``, ``a+refine``, ``a+refine-noexp`` (switched on at the value the
  choice phase measured best, :func:`switch_on`). A variant equal to ``a`` is recorded as
  ``same_as`` and not trained.

Budgets: every student row (a, its ablations, a-paper, b) trains for B epochs-equivalent of its
training set: distill E = B - 6 R epochs + refine R epochs of the 6x expanded set (or 6 R epochs
of the original images without expansion); b fine-tunes B epochs with CE.
"""
from __future__ import annotations

from dataclasses import dataclass

SETS = ("50", "full")
SEEDS = (0, 1, 2)
CHOOSE_SET = "50"  # the choice is made once, on this set's val, and reused on the full split
EXPANSION = 6  # images per original image in the refine stage's expanded set (docs/method.md §7)

# set -> settings of the data split, the student budget B, the teacher's early stopping, the prune stage's calibration images
SETTINGS = {
    "50": {"per_class": 50, "val_per_class": 20, "val_fraction": None, "budget": 30, "teacher_cap": 60, "patience": 8,
           "calib": 256},
    "full": {"per_class": None, "val_per_class": None, "val_fraction": 0.15, "budget": 18, "teacher_cap": 40, "patience": 6,
             "calib": 256},
}
SMOKE_SETTINGS = {
    "50": {"per_class": 8, "val_per_class": 4, "val_fraction": None, "budget": 8, "teacher_cap": 3, "patience": 1, "calib": 16},
    "full": {"per_class": 10, "val_per_class": None, "val_fraction": 0.15, "budget": 7, "teacher_cap": 2, "patience": 1, "calib": 16},
}

# the loss grid: name -> (feature_weight, ce_weight); the refine grid: name -> (refine epochs R, label_lr, expand)
LOSS_GRID = {"kd": (0.0, 0.0), "kd+feat1": (1.0, 0.0), "kd+ce0.5": (0.0, 0.5), "kd+feat1+ce0.5": (1.0, 0.5),
             "kd+feat3+ce0.5": (3.0, 0.5)}
REFINE_GRID = {"r1": (1, 1.0, True), "r2": (2, 1.0, True), "r2-lab10": (2, 10.0, True), "r2-lab0": (2, 0.0, True),
               "r2-noexp": (2, 1.0, False)}
SMOKE_LOSS_GRID = {"kd": (0.0, 0.0), "kd+feat1+ce0.5": (1.0, 0.5)}
SMOKE_REFINE_GRID = {"r1": (1, 1.0, True)}

ABLATIONS = {"a-nofeat": "feature distillation off (feature_weight 0)", "a-noce": "CE weight 0 (the paper's loss)",
             "a-norefine": "refine off (distill the whole budget)", "a-noexpand": "refine on the original images (no 6x expansion)"}
# the other direction, for an ingredient a leaves out: a with it switched on, at the value the choice
# phase measured best for it on val (:func:`switch_on`); equal to a (not trained) when a has it already
SWITCH_ON = {"a+feat": "feature distillation on (the loss grid's best feature weight on val)",
             "a+refine": "refine on, 6x expansion (the refine grid's best on val; distill gets the rest of the budget)",
             "a+refine-noexp": "refine on, no expansion (as a+refine, on the original images)"}
VARIANTS = {**ABLATIONS, **SWITCH_ON}  # a with one ingredient changed
NAMES = {"t": "ResNet-56 fine-tuned, early stopping on val (teacher, unpruned)", "a": "chosen recipe: kl prune t + distill (+ refine)",
         "a-paper": "kl prune t + recipe: paper (distill + refine, the authors' constants)", "b": "kl prune t + CE fine-tune",
         "d1": "ResNet-20 pretrained + CE fine-tune, as many epochs as t ran", **VARIANTS}
REPORT = ("t", "a", "a-paper", "b", "d1", *VARIANTS)
COMPARISONS = [("a", "b", "chosen recipe vs prune + CE"), ("a", "d1", "chosen recipe vs ResNet-20 pretrained"),
               ("a", "a-paper", "chosen recipe vs the paper's recipe"),
               *[("a", name, f"chosen recipe vs {what}") for name, what in VARIANTS.items()]]
GOAL = {"b": 1.0, "d1": 3.0}  # issue 19: a >= b + 1.0 and >= d1 + 3.0 points, beyond 2 SE


@dataclass(frozen=True)
class Recipe:
    """A student recipe: feature_weight, ce_weight (0 = off), refine epochs R (0 = no refine) with
    its label_lr and expansion (None when R = 0)."""

    feature_weight: float = 0.0
    ce_weight: float = 0.0
    refine: int = 0
    label_lr: float | None = None
    expand: bool | None = None

    def __post_init__(self) -> None:
        if self.refine == 0:  # label_lr and expansion mean nothing without refine: one recipe
            object.__setattr__(self, "label_lr", None)
            object.__setattr__(self, "expand", None)

    def distill_epochs(self, budget: int) -> int:
        """E = B - 6 R: the rest of the budget after refine (R epochs of the 6x set = 6 R epochs)."""
        epochs = budget - EXPANSION * self.refine
        if epochs < 1:
            raise ValueError(f"budget {budget} leaves no distill epoch after {self.refine} refine epoch(s) of the {EXPANSION}x set")
        return epochs

    def refine_epochs(self) -> int:
        """Epochs of the refine stage: R of the expanded set, or 6 R of the original images."""
        return self.refine if self.expand else EXPANSION * self.refine

    def as_dict(self) -> dict:
        return {"feature_weight": self.feature_weight, "ce_weight": self.ce_weight, "refine": self.refine,
                "label_lr": self.label_lr, "expand": self.expand}

    @classmethod
    def of(cls, value: dict) -> "Recipe":
        return cls(**value)

    def describe(self) -> str:
        refine = "no refine" if not self.refine else (f"refine {self.refine} ep{'' if self.expand else ' (no expansion)'}, "
                                                       f"label_lr {self.label_lr:g}")
        return f"feature_weight {self.feature_weight:g}, ce_weight {self.ce_weight:g}, {refine}"

    def distill_key(self, budget: int) -> str:
        """The folder name of the distill stage these settings share (e.g. with and without expansion)."""
        return f"f{self.feature_weight:g}-c{self.ce_weight:g}-e{self.distill_epochs(budget)}"


@dataclass(frozen=True)
class Row:
    set: str
    name: str
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.set}/{self.name}/s{self.seed}"

    @property
    def kind(self) -> str:
        """t, choose-loss, choose-refine, a (a and its ablations), a-paper, b or d1."""
        if self.name.startswith("choose:"):
            return "choose-refine" if self.name.startswith("choose:+") else "choose-loss"
        return "a" if self.name in ("a", *VARIANTS) else self.name


def parse_id(row_id: str) -> Row:
    """The :class:`Row` of an id (inverse of ``Row.id``)."""
    tset, name, seed = row_id.split("/")
    return Row(tset, name, int(seed[1:]))


def loss_recipe(name: str, grid: dict = LOSS_GRID) -> Recipe:
    feature_weight, ce_weight = grid[name]
    return Recipe(feature_weight, ce_weight)


def with_refine(base: Recipe, name: str, grid: dict = REFINE_GRID) -> Recipe:
    refine, label_lr, expand = grid[name]
    return Recipe(base.feature_weight, base.ce_weight, refine, label_lr, expand)


def _best(rows: list[dict]) -> dict:
    """The row with the highest val top-1; ties go to the earlier row in the list (plan order)."""
    return max(rows, key=lambda r: r["val_top1"]) if rows else None  # max keeps the first of equals


def loss_winner(done: dict, loss_grid: dict = LOSS_GRID) -> str | None:
    """The loss-grid config with the best val top-1 (seed 0), None while one is unfinished."""
    ids = [Row(CHOOSE_SET, f"choose:{name}").id for name in loss_grid]
    if any(i not in done for i in ids):
        return None
    return _best([done[i] for i in ids])["config"]


def chosen(done: dict, loss_grid: dict = LOSS_GRID, refine_grid: dict = REFINE_GRID) -> dict | None:
    """``{"config", "recipe", "val_top1"}`` of recipe a: the best by val top-1 of the loss winner and
    the refine rows on it; None while a choice row is unfinished."""
    winner = loss_winner(done, loss_grid)
    if winner is None:
        return None
    ids = [Row(CHOOSE_SET, f"choose:{winner}").id] + [Row(CHOOSE_SET, f"choose:+{name}").id for name in refine_grid]
    if any(i not in done for i in ids):
        return None
    best = _best([done[i] for i in ids])
    return {"config": best["config"], "recipe": best["recipe"], "val_top1": best["val_top1"]}


def ablation(recipe: Recipe, name: str) -> Recipe:
    """Recipe a with one ingredient off (``name`` in :data:`ABLATIONS`; ``a`` gives it unchanged)."""
    fields = recipe.as_dict()
    if name == "a-nofeat":
        fields["feature_weight"] = 0.0
    elif name == "a-noce":
        fields["ce_weight"] = 0.0
    elif name == "a-norefine":
        fields["refine"] = 0
    elif name == "a-noexpand" and recipe.refine:
        fields["expand"] = False
    return Recipe.of(fields)


def switch_on(recipe: Recipe, name: str, done: dict, loss_grid: dict = LOSS_GRID, refine_grid: dict = REFINE_GRID) -> Recipe:
    """Recipe a with one ingredient it leaves out switched on (``name`` in :data:`SWITCH_ON`), at the
    value the choice phase measured best on val (seed 0): ``a+feat`` the feature weight of the best
    loss-grid row with features and a's CE weight (any CE weight if none); ``a+refine`` the refine
    epochs and label step of the best refine-grid row with expansion; ``a+refine-noexp`` the same
    without expansion. An ingredient a has already gives a unchanged.

    Raises:
        ValueError: a choice row it needs is not in ``done``.
    """
    fields = recipe.as_dict()
    if name == "a+feat":
        if recipe.feature_weight:
            return recipe
        names = [n for n in loss_grid if loss_grid[n][0] > 0]
        names = [n for n in names if loss_grid[n][1] == recipe.ce_weight] or names
        best = _best([done[Row(CHOOSE_SET, f"choose:{n}").id] for n in names])
        fields["feature_weight"] = Recipe.of(best["recipe"]).feature_weight
        return Recipe.of(fields)
    if recipe.refine and (name == "a+refine" or not recipe.expand):
        return recipe
    ids = [Row(CHOOSE_SET, f"choose:+{n}").id for n in refine_grid if refine_grid[n][2]]
    if any(i not in done for i in ids):
        raise ValueError(f"{name} needs the refine grid's rows on val ({', '.join(i for i in ids if i not in done)} unfinished)")
    best = Recipe.of(_best([done[i] for i in ids])["recipe"])
    fields.update(refine=best.refine, label_lr=best.label_lr, expand=name == "a+refine")
    return Recipe.of(fields)


def plan(sets=SETS, seeds=SEEDS, loss_grid: dict = LOSS_GRID, refine_grid: dict = REFINE_GRID) -> list[Row]:
    """Every row, in an order that keeps two shards busy: the teachers; the loss grid and the rows
    that need only the teacher (b, a-paper, d1) at 50 per class; the refine grid; the same rows on the
    full split; then a and its ablations at 50 per class and on the full split."""
    rows = [Row(s, "t") for s in sets]
    independent = lambda s: [Row(s, n, seed) for seed in seeds for n in ("b", "a-paper", "d1")]  # noqa: E731
    if CHOOSE_SET in sets:
        rows += [Row(CHOOSE_SET, f"choose:{n}") for n in loss_grid]
        rows += independent(CHOOSE_SET)
        rows += [Row(CHOOSE_SET, f"choose:+{n}") for n in refine_grid]
    for s in sets:
        if s != CHOOSE_SET:
            rows += independent(s)
    for s in sets:
        rows += [Row(s, "a", seed) for seed in seeds]
        rows += [Row(s, n, seed) for seed in seeds for n in ABLATIONS]
    for s in sets:  # added after the first rows had run: last, so the earlier rows keep their places
        rows += [Row(s, n, seed) for seed in seeds for n in SWITCH_ON]
    return rows


def smoke_plan() -> list[Row]:
    """Every path once, tiny: both teachers, the smoke grids, a/b/d1 with two seeds, a-paper and every
    ablation at 50 per class, a and b on the full split."""
    rows = [Row(s, "t") for s in SETS]
    rows += [Row("50", f"choose:{n}") for n in SMOKE_LOSS_GRID] + [Row("50", f"choose:+{n}") for n in SMOKE_REFINE_GRID]
    rows += [Row("50", n, s) for s in (0, 1) for n in ("a", "b", "d1")] + [Row("50", "a-paper")]
    rows += [Row("50", n) for n in VARIANTS] + [Row("full", n) for n in ("a", "b")]
    return rows


# One-thread CPU seconds per training image of each stage kind (per-epoch val evaluation included) and
# per evaluated image, from the smoke run's rows (their "cpu_seconds", less about 1.5 s of set-up per
# run, divided by the images trained on): distill 8 epochs x 80 images with features 10.5 s, without
# 10.2 s; CE on the pruned model 8.0 s; ResNet-20 CE 3 x 80 images 1.6 s; the teacher 3 x 80 images
# + 3 x 240 evaluated 7.9 s; refine 1 epoch of the 6x set (480 images, teacher labels included) after
# 2 distill epochs 11.0 s; exact kl scoring 20.6 s for 16 calibration images -> 256: ~330 s (the
# README's 330 s). The smoke run's wall time was ~3x its CPU time (a loaded machine).
COST = {"r56_ce": 0.022, "pruned_ce": 0.009, "r20_ce": 0.006, "kd": 0.013, "kd_feat": 0.014, "refine": 0.012,
        "eval_r56": 0.007, "eval_small": 0.003, "prune": 330.0}
TEST_IMAGES = 713
TRAIN_IMAGES = {"50": 500, "full": 2608}  # the splits of seed 0 (benchmarks/small_data.py)
VAL_IMAGES = {"50": 200, "full": 460}


def estimate(row: Row, settings: dict = SETTINGS, expected_teacher_epochs: dict | None = None) -> float:
    """Estimated one-thread CPU seconds of ``row`` (from :data:`COST`). The teacher is counted at its
    epoch cap (an upper bound: early stopping ends it sooner), d1 at the teacher's epochs (run, or
    ``expected_teacher_epochs`` per set, else half the cap); a row that prunes first, or shares a
    distill stage, is counted in full (an upper bound)."""
    s = settings[row.set]
    n, val = TRAIN_IMAGES[row.set], VAL_IMAGES[row.set]
    budget = s["budget"]
    if row.kind == "t":
        return s["teacher_cap"] * (n * COST["r56_ce"] + (val + TEST_IMAGES) * COST["eval_r56"])
    if row.kind == "d1":
        epochs = (expected_teacher_epochs or {}).get(row.set) or s["teacher_cap"] // 2
        return epochs * (n * COST["r20_ce"] + val * COST["eval_small"]) + TEST_IMAGES * COST["eval_small"]
    final_eval = (val + (0 if row.kind.startswith("choose") else TEST_IMAGES)) * COST["eval_small"]
    per_epoch_eval = val * COST["eval_small"]
    if row.kind == "b":
        return COST["prune"] / len(SEEDS) + budget * (n * COST["pruned_ce"] + per_epoch_eval) + final_eval
    if row.kind == "a-paper":
        recipe = Recipe(0.0, 0.0, 1, 1.0, True)
    else:  # a, its variants and the choice rows: a typical recipe (features on, refine 1 epoch)
        recipe = Recipe(1.0, 0.5, 0 if row.name in ("choose:kd", "a-norefine") else 1, 1.0, True)
    distill = recipe.distill_epochs(budget) * (n * COST["kd_feat" if recipe.feature_weight else "kd"] + per_epoch_eval)
    refine = EXPANSION * recipe.refine * n * COST["refine"] + recipe.refine_epochs() * per_epoch_eval
    return distill + refine + final_eval


def phase(row: Row) -> str:
    """The phase a row belongs to in --list's subtotals: ``<set> teacher``, ``<set> choice`` or ``<set> report``."""
    return f"{row.set} " + ("teacher" if row.kind == "t" else "choice" if row.kind.startswith("choose") else "report")
