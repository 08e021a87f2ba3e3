"""The ResNet-56 benchmark's pure parts (issue 21): paired differences and their standard error,
the "ahead only beyond 2 SE" rule, the resumable rows file (a finished row is never recomputed),
sharding without overlap, the Torch-Pruning stopping rule, and the plan's order."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_plan as bp  # noqa: E402
import cifar_resnet56 as bench  # noqa: E402
from bench_report import write_markdown  # noqa: E402
from bench_stats import (RowsFile, mean_std, mixed_devices, nearest_step, paired_difference, pending, run_on, run_pending,  # noqa: E402
                         shard, verdict, within)
from curlprune.errors import CurlpruneError  # noqa: E402

A = {0: 91.71, 1: 91.50, 2: 91.62}
B = {0: 91.31, 1: 91.40, 2: 91.10}


def test_paired_difference_matches_a_paired_t_test():
    d = paired_difference(A, B)
    diffs = np.array([A[s] - B[s] for s in (0, 1, 2)])
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["se"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(3))
    t = stats.ttest_rel(list(A.values()), list(B.values())).statistic  # t = mean / SE
    assert d["mean"] / d["se"] == pytest.approx(t)


def test_paired_difference_uses_only_shared_seeds():
    d = paired_difference({**A, 5: 10.0}, {1: 91.40, 2: 91.10, 7: 0.0})
    assert d["seeds"] == [1, 2] and d["mean"] == pytest.approx(((91.50 - 91.40) + (91.62 - 91.10)) / 2)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    one = paired_difference({0: 91.7}, {0: 91.3})
    assert one["se"] is None and verdict(one) == "one seed, no SE"


def test_verdict_needs_two_standard_errors():
    assert verdict({"mean": 0.40, "se": 0.21}) == "on par"
    assert verdict({"mean": 0.43, "se": 0.21}) == "ahead"
    assert verdict({"mean": -0.43, "se": 0.21}) == "behind"


def test_verdict_on_the_example_numbers():
    d = paired_difference(A, B)
    expected = "ahead" if d["mean"] > 2 * d["se"] else "on par"
    assert verdict(d) == expected


def test_mean_std_is_the_sample_std():
    values = [91.71, 91.50, 91.62]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([3.0]) == (3.0, None)


def test_rows_file_first_write_wins_and_torn_lines_are_ignored(tmp_path):
    store = RowsFile(tmp_path / "rows.jsonl")
    assert store.read() == {}
    assert store.append({"id": "kl-best@0.5/e2/s0", "test_top1": 91.7})
    assert not store.append({"id": "kl-best@0.5/e2/s0", "test_top1": 12.3})
    with open(store.path, "a") as fh:
        fh.write('{"id": "l1@0.5/e2/s0", "test_to')  # a process killed mid-line
    rows = store.read()
    assert list(rows) == ["kl-best@0.5/e2/s0"] and rows["kl-best@0.5/e2/s0"]["test_top1"] == 91.7
    assert pending(["kl-best@0.5/e2/s0", "l1@0.5/e2/s0"], rows) == ["l1@0.5/e2/s0"]


class Counting:
    """Stands in for the benchmark (which takes hours) in run(): counts what it is asked to compute."""

    def __init__(self):
        self.ran = []

    def run_row(self, row, done):
        self.ran.append(row.id)
        return {"id": row.id, "family": row.family, "val_top1": 50.0 + len(self.ran)}


def test_a_finished_row_is_never_recomputed(tmp_path):
    store = RowsFile(tmp_path / "rows.jsonl")
    rows = [bp.Row("kl-best", 0.5, 2, s) for s in (0, 1, 2)]
    store.append({"id": rows[1].id, "family": "kl-best", "val_top1": 91.0})
    first = Counting()
    bench.run(first, rows, store, report=lambda: None, wait=False)
    assert first.ran == [rows[0].id, rows[2].id]
    again = Counting()
    bench.run(again, rows, store, report=lambda: None, wait=False)
    assert again.ran == []
    assert store.read()[rows[1].id]["val_top1"] == 91.0
    assert len(store.path.read_text().splitlines()) == 3


def test_run_logs_each_finished_row_with_its_numbers_and_reports_after_it(tmp_path, capsys):
    store = RowsFile(tmp_path / "rows.jsonl")
    rows = [bp.Row("kl-best", 0.5, 2, s) for s in (0, 1)]
    reports = []
    left = bench.run(Counting(), rows, store, report=lambda: reports.append(len(store.read())), wait=False)
    assert left == [] and reports == [1, 2]  # the markdown is rewritten after every row, the row already in the file
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kl-best@")]
    assert lines == [f'{rows[0].id}: {{"macs_ratio": null, "val_top1": 51.0, "test_top1": null, "resolved_to": null, '
                     f'"score_seconds": null}}', f'{rows[1].id}: {{"macs_ratio": null, "val_top1": 52.0, "test_top1": null, '
                     f'"resolved_to": null, "score_seconds": null}}']


def test_shards_split_the_plan_without_overlap():
    plan = [r.id for r in bp.plan()]
    assert len(set(plan)) == len(plan)
    halves = [shard(plan, "0/2"), shard(plan, "1/2")]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(plan)
    assert halves[0][0] == "timing" and halves[1][0].startswith("alloc:")  # both start on the cheap rows that check the default
    with pytest.raises(ValueError):
        shard(plan, "2/2")


def test_plan_order_and_ids():
    plan = bp.plan()
    n_alloc = len(bp.TARGETS) * len(bp.EXPLORE)
    assert all(r.family.startswith("alloc:") and r.epochs == 0 for r in plan[1:1 + n_alloc])  # the allocation check first
    assert plan[1 + n_alloc].id == "timing-prune@0.5/e0/s0"  # then the side-by-side pruning times
    assert [r.id for r in plan[2 + n_alloc:5 + n_alloc]] == [f"kl-best@0.5/e2/s{s}" for s in (0, 1, 2)]
    assert all(bp.parse_id(r.id) == r for r in plan)
    ids = {r.id for r in plan}
    for target in bp.TARGETS:
        for family in ("kl-best", "l1", "kl-paper"):
            assert {f"{family}@{target:g}/e2/s{s}" for s in bp.SEEDS} <= ids
        assert {f"tp-best@{target:g}/e2/s{s}" for s in (1, 2)} <= ids  # seed 0: the chosen variant's row
        assert {f"{v}@{target:g}/e2/s0" for v in bp.TP_VARIANTS} <= ids
    assert {"kl-best@0.5/e10/s0", "tp-best@0.5/e10/s0"} <= ids
    assert bp.variants_of(plan) == bp.TP_VARIANTS  # once each, though planned at both targets
    assert len(bp.TP_VARIANTS) == 12 and bp.tp_settings("tp-l2-cap-in") == {
        "importance": "l2", "max_pruning_ratio": pytest.approx(0.7), "shortcuts_in": True}


def test_nearest_step_and_tolerance():
    history = [125.5, 70.0, 63.1, 62.2, 61.86]
    assert nearest_step(history, 62.6) == 3  # 62.2 (0.40 off) is nearer than 63.1 (0.50) and 61.86 (0.74)
    assert nearest_step(history, 62.74) == 2  # 63.1 (0.36 off) is nearer than 62.2 (0.54): above the target is allowed
    assert within(62.2, 62.6) and not within(61.0, 62.6)
    assert nearest_step([10.0, 8.0, 6.0], 7.0) == 1  # a tie goes to the earlier step


def test_tp_best_is_chosen_on_val_not_test():
    b = bench.Bench.__new__(bench.Bench)
    b.variants, b.variant_epochs = ["tp-l1-cap-out", "tp-l2-cap-out"], 2
    done = {"tp-l1-cap-out@0.5/e2/s0": {"family": "tp-l1-cap-out", "val_top1": 90.1, "test_top1": 91.0},
            "tp-l2-cap-out@0.5/e2/s0": {"family": "tp-l2-cap-out", "val_top1": 90.4, "test_top1": 90.2}}
    row = bp.Row("tp-best", 0.5, 2, 1)
    assert b.resolve(row, done) == "tp-l2-cap-out"
    del done["tp-l1-cap-out@0.5/e2/s0"]
    assert b.resolve(row, done) is None


def _row(family, seed, val, test, **extra):
    return {"id": bp.Row(family, 0.5, 2, seed).id, "family": family, "target": 0.5, "epochs": 2, "seed": seed, "kind": "x",
            "macs_ratio": 0.499, "within_1pct": True, "val_top1": val, "test_top1": test, "val_bn": 80.0, "test_bn": 80.0,
            "val_raw": 50.0, "test_raw": 50.0, "eval_seconds": 1.0, "prune": {}, "stream_widths": [16, 32, 64], **extra}


def test_report_shows_mean_std_and_the_paired_verdict(tmp_path):
    rows = {}
    for s in (0, 1, 2):
        rows[bp.Row("kl-best", 0.5, 2, s).id] = _row("kl-best", s, 90.0 + s / 10, A[s])
        rows[bp.Row("l1", 0.5, 2, s).id] = _row("l1", s, 90.0, B[s])
    path = tmp_path / "report.md"
    write_markdown(rows, path, variants=[], variant_epochs=2, settings=bench.FULL)
    text = path.read_text()
    mean, std = mean_std(list(A.values()))
    assert f"{mean:.2f} ± {std:.2f} (3)" in text
    d = paired_difference(A, B)
    assert f"{d['mean']:+.2f} ± {d['se']:.2f}" in text and f"a {verdict(d)}" in text
    assert "setsid nohup" in text and "a second process takes the next free row" in text
    json.dumps(rows)  # rows are plain JSON


def test_rows_without_a_device_read_as_cpu_float32_and_mixing_is_detected():
    old = _row("kl-best", 0, 90.0, 91.0)  # a row recorded before the device fields
    cpu = _row("kl-best", 1, 90.0, 91.0, device="cpu", amp="off")
    gpu = _row("kl-best", 2, 90.0, 91.0, device="cuda", amp="bf16", gpu="NVIDIA H200", workers=4)
    assert run_on(old) == run_on(cpu) == "cpu" and run_on(gpu) == "cuda, bf16"
    assert run_on({"device": "cuda", "amp": "off"}) == "cuda"
    assert mixed_devices([old, cpu]) == []
    assert mixed_devices([old, cpu, gpu]) == ["cpu", "cuda, bf16"]


def test_report_flags_a_comparison_over_rows_from_two_devices(tmp_path):
    rows = {}
    for s in (0, 1, 2):
        rows[bp.Row("kl-best", 0.5, 2, s).id] = _row("kl-best", s, 90.0, A[s])
        rows[bp.Row("l1", 0.5, 2, s).id] = _row("l1", s, 90.0, B[s])
    path = tmp_path / "report.md"
    write_markdown(rows, path, variants=[], variant_epochs=2, settings=bench.FULL)
    assert "**mixed devices:" not in path.read_text() and "Rows by device: cpu 6." in path.read_text()
    rows[bp.Row("l1", 0.5, 2, 2).id].update(device="cuda", amp="bf16")
    write_markdown(rows, path, variants=[], variant_epochs=2, settings=bench.FULL)
    text = path.read_text()
    l1_line = next(line for line in text.splitlines() if line.startswith("| l1 |"))
    kl_line = next(line for line in text.splitlines() if line.startswith("| kl-best |"))
    assert "**mixed devices: cpu / cuda, bf16**" in l1_line and "mixed" not in kl_line
    vs_l1 = next(line for line in text.splitlines() if line.startswith("| curlprune default vs curlprune l1"))
    assert "**mixed devices: cpu / cuda, bf16**" in vs_l1
    assert "Rows by device: cpu 5, cuda, bf16 1." in text and "| l1@0.5/e2/s2 | cuda, bf16 |" in text


def test_the_long_gpu_rows_come_after_the_default_plan():
    default = bp.plan()
    extended = bp.plan(extra_long_epochs=100)
    assert extended[:len(default)] == default  # every default row keeps its position (and shard)
    assert [r.id for r in extended[len(default):]] == ["kl-best@0.5/e100/s0", "tp-best@0.5/e100/s0"]
    assert bp.plan(extra_long_epochs=bp.LONG_EPOCHS) == default  # no duplicate of the 10-epoch rows


def test_the_device_is_checked_before_anything_runs():
    assert bench.choose_device("cpu", "off") == (torch.device("cpu"), None)
    assert bench.choose_device("cpu", "bf16") == (torch.device("cpu"), "bf16")  # torch's CPU autocast has bf16
    with pytest.raises(CurlpruneError, match="give auto, cpu, cuda or cuda:<index>"):
        bench.choose_device("gpu0", "off")
    if torch.cuda.is_available():
        with pytest.raises(CurlpruneError, match="CUDA device"):
            bench.choose_device(f"cuda:{torch.cuda.device_count()}", "off")
    else:
        with pytest.raises(CurlpruneError, match="CUDA is not available"):
            bench.choose_device("cuda", "off")


def test_processes_sharing_a_rows_file_split_rows_by_claims_and_take_over_a_killed_ones(tmp_path):
    store = RowsFile(tmp_path / "rows.jsonl")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert store.claim("a", pid=other.pid)  # another live process computes "a"
        assert not store.claim("a")
        ran = []

        def compute(row_id, done):
            ran.append(row_id)
            return {"id": row_id, "val_top1": 1.0}

        assert run_pending(["a", "b"], store, compute, report=lambda: None, wait=False, log=lambda m: None) == ["a"]
        assert ran == ["b"] and "a" not in store.read()
        other.kill()
        other.wait()
        assert run_pending(["a", "b"], store, compute, report=lambda: None, wait=False, log=lambda m: None) == []
        assert ran == ["b", "a"]  # the killed process's claim was taken over; "b" was not run again
        assert not store.claim("a")  # finished rows cannot be claimed
        assert json.loads(store.claims.read_text()) == {}  # every claim released
    finally:
        other.kill()
