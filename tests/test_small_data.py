"""The small-data benchmark's logic (issue 19 item 4): the plan and its shards, the budgets, the
choice on val (never test), ablations equal to the chosen recipe, resumption (a finished row is
never recomputed, a row that waits for another is retried), and the report."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import small_data as bench  # noqa: E402
import small_data_plan as sp  # noqa: E402
from bench_stats import RowsFile, mean_std, paired_difference, run_pending, shard, verdict  # noqa: E402
from small_data_report import write_report  # noqa: E402


def test_plan_ids_round_trip_and_shards_split_without_overlap():
    plan = [r.id for r in sp.plan()]
    assert len(set(plan)) == len(plan)
    assert all(sp.parse_id(i).id == i for i in plan)
    halves = [shard(plan, "0/2"), shard(plan, "1/2")]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(plan)
    assert halves[0][0] == "50/t/s0" and halves[1][0] == "full/t/s0"  # the two teachers run side by side
    for tset in sp.SETS:
        for name in ("a", "a-paper", "b", "d1", *sp.ABLATIONS):
            assert {f"{tset}/{name}/s{s}" for s in sp.SEEDS} <= set(plan)
    choose = [i for i in plan if "/choose:" in i]
    assert len(choose) == len(sp.LOSS_GRID) + len(sp.REFINE_GRID) <= 10 and all(i.startswith("50/") and i.endswith("/s0") for i in choose)
    assert not any(i.startswith("full/choose") for i in plan)  # the full split reuses the choice


def test_budgets_are_equal_and_refine_takes_six_epochs_each():
    budget = sp.SETTINGS["50"]["budget"]
    r = sp.Recipe(1.0, 0.5, 2, 1.0, True)
    assert r.distill_epochs(budget) + sp.EXPANSION * r.refine == budget and r.refine_epochs() == 2
    no_exp = sp.Recipe(1.0, 0.5, 2, 1.0, False)
    assert no_exp.distill_epochs(budget) == r.distill_epochs(budget) and no_exp.refine_epochs() == 12  # as many images
    assert no_exp.distill_key(budget) == r.distill_key(budget)  # they share the distill stage
    assert sp.Recipe(1.0, 0.5, 0, 10.0, False) == sp.Recipe(1.0, 0.5)  # without refine, label_lr and expansion mean nothing
    with pytest.raises(ValueError):
        sp.Recipe(refine=5).distill_epochs(30)
    for tset, s in sp.SETTINGS.items():
        for name in sp.REFINE_GRID:
            assert sp.with_refine(sp.Recipe(), name).distill_epochs(s["budget"]) >= 6


def test_the_choice_is_made_on_val_in_two_steps():
    done = {}
    loss_val = {"kd": 60.0, "kd+feat1": 64.0, "kd+ce0.5": 61.0, "kd+feat1+ce0.5": 64.0, "kd+feat3+ce0.5": 63.0}
    for name, val in loss_val.items():
        done[sp.Row("50", f"choose:{name}").id] = {"config": name, "val_top1": val, "test_top1": 99.0 if name == "kd" else 1.0,
                                                   "recipe": sp.loss_recipe(name).as_dict()}
    assert sp.chosen(done) is None  # the refine grid is not finished
    assert sp.loss_winner(done) == "kd+feat1"  # a tie goes to the earlier config; test top-1 plays no part
    winner = sp.loss_recipe("kd+feat1")
    for name in sp.REFINE_GRID:
        recipe = sp.with_refine(winner, name)
        done[sp.Row("50", f"choose:+{name}").id] = {"config": f"kd+feat1+{name}", "val_top1": 65.0 if name == "r2" else 62.0,
                                                    "recipe": recipe.as_dict()}
    choice = sp.chosen(done)
    assert choice["config"] == "kd+feat1+r2" and sp.Recipe.of(choice["recipe"]) == sp.Recipe(1.0, 0.0, 2, 1.0, True)
    del done[sp.Row("50", "choose:kd").id]
    assert sp.loss_winner(done) is None and sp.chosen(done) is None


def test_ablations_switch_one_ingredient_off():
    a = sp.Recipe(1.0, 0.5, 2, 1.0, True)
    assert sp.ablation(a, "a-nofeat") == sp.Recipe(0.0, 0.5, 2, 1.0, True)
    assert sp.ablation(a, "a-noce") == sp.Recipe(1.0, 0.0, 2, 1.0, True)
    assert sp.ablation(a, "a-norefine") == sp.Recipe(1.0, 0.5)
    assert sp.ablation(a, "a-noexpand") == sp.Recipe(1.0, 0.5, 2, 1.0, False)
    plain = sp.Recipe(1.0, 0.0)
    assert sp.ablation(plain, "a-noce") == plain and sp.ablation(plain, "a-noexpand") == plain


def _choice_rows(val: dict) -> dict:
    """Finished choice rows: the loss grid, then the refine grid on kd+ce0.5; ``val`` overrides val top-1 by config."""
    done = {}
    for name in sp.LOSS_GRID:
        done[sp.Row("50", f"choose:{name}").id] = {"config": name, "val_top1": val.get(name, 60.0),
                                                   "recipe": sp.loss_recipe(name).as_dict()}
    for name in sp.REFINE_GRID:
        done[sp.Row("50", f"choose:+{name}").id] = {"config": f"kd+ce0.5+{name}", "val_top1": val.get(name, 50.0),
                                                    "recipe": sp.with_refine(sp.loss_recipe("kd+ce0.5"), name).as_dict()}
    return done


def test_switch_on_takes_each_left_out_ingredient_at_its_best_value_on_val():
    a = sp.Recipe(0.0, 0.5)  # kd+ce0.5: no features, no refine
    done = _choice_rows({"kd+ce0.5": 68.0, "kd+feat3+ce0.5": 66.0, "kd+feat1+ce0.5": 65.0, "kd+feat1": 67.0,
                         "r2-lab10": 67.0, "r2-noexp": 69.0, "r1": 66.0})
    # features: the best feature row with a's CE weight (feat3 at ce 0.5), not the better feat1 at ce 0
    assert sp.switch_on(a, "a+feat", done) == sp.Recipe(3.0, 0.5)
    # refine: the best row with expansion (r2-lab10); the better r2-noexp has no expansion and is not eligible
    assert sp.switch_on(a, "a+refine", done) == sp.Recipe(0.0, 0.5, 2, 10.0, True)
    assert sp.switch_on(a, "a+refine-noexp", done) == sp.Recipe(0.0, 0.5, 2, 10.0, False)
    # an ingredient a has already: a itself (recorded as same_as, not trained)
    refined = sp.Recipe(1.0, 0.5, 1, 1.0, True)
    assert sp.switch_on(refined, "a+feat", done) == refined and sp.switch_on(refined, "a+refine", done) == refined
    assert sp.switch_on(refined, "a+refine-noexp", done) == sp.Recipe(1.0, 0.5, 2, 10.0, False)
    del done[sp.Row("50", "choose:+r1").id]
    with pytest.raises(ValueError, match="choose:\\+r1"):
        sp.switch_on(a, "a+refine", done)


def test_the_switch_on_rows_come_after_every_earlier_row():
    rows = sp.plan()
    first = [r for r in rows if r.name not in sp.SWITCH_ON]
    assert rows[:len(first)] == first and len(rows) - len(first) == len(sp.SETS) * len(sp.SEEDS) * len(sp.SWITCH_ON)
    assert all(sp.parse_id(r.id).kind == "a" for r in rows[len(first):])


def _bench(tmp_path):
    """The benchmark object without its data and models: only what resolving rows needs."""
    b = bench.Bench.__new__(bench.Bench)
    b.out, b.settings, b.smoke = tmp_path, sp.SETTINGS, False
    b.loss_grid, b.refine_grid = sp.LOSS_GRID, sp.REFINE_GRID
    b.splits = {s: {"train": [0] * 500, "val": [0] * 200, "test": [0] * 713} for s in sp.SETS}
    return b


def test_rows_wait_for_the_teacher_and_the_choice(tmp_path):
    b = _bench(tmp_path)
    assert b.compute("50/b/s0", {}) is None and b.compute("full/d1/s1", {}) is None  # t unfinished
    done = {"50/t/s0": {"epochs_run": 20}, "full/t/s0": {"epochs_run": 12}}
    assert b.compute("50/choose:+r2/s0", done) is None  # the loss grid is unfinished
    assert b.compute("full/a/s0", done) is None and b.compute("50/a-noce/s2", done) is None  # no choice yet
    for name in sp.LOSS_GRID:
        done[f"50/choose:{name}/s0"] = {"config": name, "val_top1": 70.0 if name == "kd+feat1" else 60.0,
                                        "recipe": sp.loss_recipe(name).as_dict()}
    for name in sp.REFINE_GRID:
        done[f"50/choose:+{name}/s0"] = {"config": f"kd+feat1+{name}", "val_top1": 50.0,
                                         "recipe": sp.with_refine(sp.loss_recipe("kd+feat1"), name).as_dict()}
    # a = kd+feat1 (no CE, no refine): its CE-off, refine-off and expansion-off ablations are a itself, not trained
    for name in ("a-noce", "a-norefine", "a-noexpand"):
        row = b.compute(f"full/{name}/s1", done)
        assert row["same_as"] == "full/a/s1" and row["chosen"]["config"] == "kd+feat1" and "val_top1" not in row
    assert not (tmp_path / "full").exists()  # nothing was trained


class Counting:
    """Stands in for the benchmark in run_pending: counts what it is asked to compute; "late" rows
    wait (None) until "first" is finished."""

    def __init__(self):
        self.ran = []

    def compute(self, row_id, done):
        if row_id.startswith("late") and "first" not in done:
            return None
        self.ran.append(row_id)
        return {"id": row_id, "val_top1": 50.0 + len(self.ran)}


def test_a_finished_row_is_never_recomputed_and_a_waiting_row_is_retried(tmp_path):
    store = RowsFile(tmp_path / "rows.jsonl")
    ids = ["late", "first", "other"]
    store.append({"id": "other", "val_top1": 91.0})
    first = Counting()
    assert run_pending(ids, store, first.compute, report=lambda: None, wait=False, log=lambda m: None) == []
    assert first.ran == ["first", "late"]  # late waited for first, then ran; other was finished
    again = Counting()
    assert run_pending(ids, store, again.compute, report=lambda: None, wait=False, log=lambda m: None) == []
    assert again.ran == [] and store.read()["other"]["val_top1"] == 91.0
    assert len(store.path.read_text().splitlines()) == 3
    alone = RowsFile(tmp_path / "alone.jsonl")  # a shard whose row waits for another shard's: stops without waiting
    assert run_pending(["late"], alone, Counting().compute, report=lambda: None, wait=False, log=lambda m: None) == ["late"]


def _report_row(tset, name, seed, test, **extra):
    return {"id": sp.Row(tset, name, seed).id, "set": tset, "name": name, "seed": seed, "kind": sp.Row(tset, name, seed).kind,
            "val_top1": test - 1, "val_per_class": test - 2, "test_top1": test, "test_per_class": test - 2, "macs": 40.5e6,
            "params": 0.31e6, "epochs": {"finetune": 30}, "train_seconds": 100.0, "cpu_seconds": 90.0, **extra}


def test_report_shows_mean_std_paired_differences_and_aliases(tmp_path):
    a, b = {0: 70.1, 1: 71.3, 2: 70.6}, {0: 68.2, 1: 69.0, 2: 68.9}
    rows = {}
    for s in sp.SEEDS:
        rows[sp.Row("50", "a", s).id] = _report_row("50", "a", s, a[s])
        rows[sp.Row("50", "b", s).id] = _report_row("50", "b", s, b[s])
        rows[sp.Row("50", "a-noce", s).id] = {"id": sp.Row("50", "a-noce", s).id, "set": "50", "name": "a-noce", "seed": s,
                                              "kind": "a", "same_as": sp.Row("50", "a", s).id}
    path = tmp_path / "small.md"
    write_report(rows, path, settings=sp.SETTINGS)
    text = path.read_text()
    mean, std = mean_std(list(a.values()))
    assert f"{mean:.2f} ± {std:.2f} (3)" in text
    d = paired_difference(a, b)
    assert f"{d['mean']:+.2f} ± {d['se']:.2f}" in text and f"a {verdict(d)}" in text
    met = d["mean"] >= 1.0 and d["mean"] > 2 * d["se"]
    assert f"goal a >= b + 1: {'met' if met else 'not met'}" in text
    assert "(= a, not trained)" in text and "= 50/a/s0" in text
    assert "setsid nohup" in text and "a second process takes the next free row" in text and "OMP_NUM_THREADS=1" in text and "PYTHONPATH=$PWD/src" in text
    assert path.with_suffix(".png").stat().st_size > 1000


def test_estimates_are_positive_and_the_teacher_bounds_d1():
    for row in sp.plan():
        assert sp.estimate(row) > 0
    t = sp.estimate(sp.Row("50", "t"))
    assert sp.estimate(sp.Row("50", "d1"), expected_teacher_epochs={"50": 10}) < sp.estimate(sp.Row("50", "d1"), expected_teacher_epochs={"50": 40})
    assert t > sp.estimate(sp.Row("50", "d1"))
    assert {sp.phase(r) for r in sp.plan()} == {f"{s} {p}" for s in sp.SETS for p in ("teacher", "report")} | {"50 choice"}
