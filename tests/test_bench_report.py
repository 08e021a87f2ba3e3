"""The ResNet-56 benchmark's report (issue 21, referee read): its figure (a PNG drawn by --report
from whatever rows have finished, error bars = the verdicts' standard errors), the 10-epoch
comparison, one number for a column that is the same for every seed, and the protocol's computed
sentences (the seed SE's confidence with 3 seeds, the achieved MACs per family, the recovery loss)."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_plan as bp  # noqa: E402
import cifar_resnet56 as bench  # noqa: E402
from bench_claims import allocation_decision  # noqa: E402
from bench_figure import figure_data  # noqa: E402
from bench_images import combined_difference, image_difference, image_record, top1_of, unpack  # noqa: E402
from bench_report import write_markdown  # noqa: E402
from bench_stats import fmt_mean_std, mean_std, paired_difference  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _bits(n, p, seed):
    return torch.from_numpy(np.random.default_rng(seed).random(n) < p)


def _row(family, seed, test, *, epochs=2, kind="curl", ratio=0.499, test_bn=85.93, **extra):
    return {"id": bp.Row(family, 0.5, epochs, seed).id, "family": family, "target": 0.5, "epochs": epochs, "seed": seed,
            "kind": kind, "macs_ratio": ratio, "within_1pct": True, "val_top1": 96.0 + seed / 10, "test_top1": test,
            "val_bn": 92.16, "test_bn": test_bn, "val_raw": 50.0, "test_raw": 50.0, "prune": {}, "stream_widths": [16, 32, 64],
            **extra}


def _add(rows, images, row, test_bits=None):
    """Add ``row``; with ``test_bits`` (bool [N]) its per-image record too, its test top-1 theirs."""
    if test_bits is not None:
        row["test_top1"] = top1_of(test_bits)
        val = _bits(50, 0.9, sum(map(ord, row["id"])))
        row["val_top1"] = top1_of(val)
        images[row["id"]] = image_record(row["id"], val, test_bits)
    rows[row["id"]] = row
    return row


def _study(n=2000):
    """kl-best, l1 and TP best (resolved to tp-l1-free-out: its seed-0 row, own rows for seeds 1, 2)
    with 3 seeds and test records; kl-paper with seed 0 only; a second TP variant, its alias, and an
    allocation row (no training: never in the figure)."""
    rows, images = {}, {}
    tp = {"importance": "l1", "max_pruning_ratio": 1.0, "shortcuts_in": False, "tp": {"steps": 94, "of_steps": 400}}
    for s in (0, 1, 2):
        base = _bits(n, 0.91, 10 + s)
        _add(rows, images, _row("kl-best", s, 0.0), base)
        _add(rows, images, _row("l1", s, 0.0), base ^ _bits(n, 0.03 + 0.01 * s, 20 + s))
        tp_row = (_row("tp-l1-free-out", 0, 0.0, kind="tp", ratio=0.501, test_bn=61.04, prune=tp) if s == 0 else
                  _row("tp-best", s, 0.0, kind="tp", ratio=0.501, test_bn=61.04, resolved_to="tp-l1-free-out", prune=tp))
        _add(rows, images, tp_row, base ^ _bits(n, 0.05, 30 + s))
    _add(rows, images, _row("kl-paper", 0, 0.0, ratio=0.499), _bits(n, 0.88, 40))
    _add(rows, images, _row("tp-l2-cap-out", 0, 90.55, kind="tp", ratio=0.500, test_bn=60.0, prune={**tp, "importance": "l2"}))
    _add(rows, images, _row("tp-l1-free-in", 0, rows["tp-l1-free-out@0.5/e2/s0"]["test_top1"], kind="tp", ratio=0.501,
                            same_as="tp-l1-free-out@0.5/e2/s0", prune=tp))
    _add(rows, images, _row("alloc:kl / MACs", 0, 85.93, epochs=0, kind="alloc"))
    return rows, images


def _per_seed(rows, family, variant=None):
    found = {r["seed"]: r for r in rows.values() if r["family"] == family and r["epochs"] == 2}
    if variant:
        found[0] = rows[bp.Row(variant, 0.5, 2, 0).id]
    return found


def _write(rows, path, images=None):
    write_markdown(rows, path, variants=["tp-l1-free-out", "tp-l2-cap-out", "tp-l1-free-in"], variant_epochs=2,
                   settings=bench.FULL, images=images)
    return path.read_text()


def _line(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


# ---------------------------------------------------------------------------------- the figure


def test_the_figures_error_bars_are_2_x_the_se_the_verdict_uses(tmp_path):
    rows, images = _study()
    (panel,) = figure_data(rows, images, 2)
    assert panel["target"] == 0.5
    kl, l1, tp = _per_seed(rows, "kl-best"), _per_seed(rows, "l1"), _per_seed(rows, "tp-best", "tp-l1-free-out")
    diffs = {d["label"]: d for d in panel["diffs"]}
    assert set(diffs) == {"kl-best - tp-best", "kl-best - l1", "kl-best - kl-paper"}
    text = _write(rows, tmp_path / "r.md", images)
    for other, what in ((l1, "curlprune l1"), (tp, "Torch-Pruning's best")):
        seed_diff = paired_difference({s: r["test_top1"] for s, r in kl.items()}, {s: r["test_top1"] for s, r in other.items()})
        pairs = {s: (_test_bits(images, kl[s]), _test_bits(images, other[s])) for s in (0, 1, 2)}
        combined = combined_difference(seed_diff, pairs)
        d = diffs[f"kl-best - {'l1' if other is l1 else 'tp-best'}"]
        assert d["basis"] == "combined SE" and d["n"] == 3 and combined["se"] > seed_diff["se"]
        assert d["mean"] == pytest.approx(seed_diff["mean"]) and d["half_width"] == pytest.approx(2 * combined["se"], rel=1e-12)
        # the same SE the report's verdict column shows
        assert f"| {combined['se']:.2f} | a " in _line(text, f"| curlprune default vs {what}")
    one = diffs["kl-best - kl-paper"]  # kl-paper has seed 0 only: no SE, no bar
    assert one["n"] == 1 and one["se"] is None and one["half_width"] is None and one["basis"] == "one seed, no SE"
    # without the sidecar: the seed SE alone, as the verdict then uses
    (bare,) = figure_data(rows, None, 2)
    d = next(d for d in bare["diffs"] if d["label"] == "kl-best - l1")
    seed_diff = paired_difference({s: r["test_top1"] for s, r in kl.items()}, {s: r["test_top1"] for s, r in l1.items()})
    assert d["basis"] == "seed SE" and d["half_width"] == pytest.approx(2 * seed_diff["se"], rel=1e-12)
    # points: the claim rows (mean ± std over seeds), then the other single-seed rows; no alias, no
    # allocation row, and TP best's seed-0 variant row only inside TP best
    points = {p["label"]: p for p in panel["points"]}
    assert list(points) == ["kl-best (curlprune default)", "TP best = tp-l1-free-out", "l1 (curlprune)",
                            "kl-paper (kl as published)", "tp-l2-cap-out"]
    mean, std = mean_std([r["test_top1"] for r in kl.values()])
    assert points["kl-best (curlprune default)"]["mean"] == pytest.approx(mean) and points["kl-best (curlprune default)"]["std"] == pytest.approx(std)
    assert points["tp-l2-cap-out"] == {"label": "tp-l2-cap-out", "mean": 90.55, "std": None, "n": 1, "claim": False}


def _test_bits(images, row):
    return unpack(images[row["id"]]["test"])


@pytest.mark.parametrize("case", ["sidecar", "no sidecar", "no claim rows", "no rows"])
def test_report_writes_a_png_figure_from_whatever_has_finished_and_links_it(tmp_path, case):
    rows, images = _study()
    if case == "no claim rows":
        rows = {k: r for k, r in rows.items() if r["family"] not in bp.CLAIM and r["family"] != "tp-l1-free-out"}
    elif case == "no rows":
        rows = {}
    text = _write(rows, tmp_path / "cifar.md", images if case == "sidecar" else None)
    png = tmp_path / "cifar.png"
    assert png.read_bytes()[:8] == PNG
    pixels = plt.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert "](cifar.png)" in text and "![" in text
    panels = figure_data(rows, images, 2)
    if case == "no claim rows":
        assert [p["label"] for p in panels[0]["points"]] == ["tp-l2-cap-out"] and panels[0]["diffs"] == []
    if case == "no rows":
        assert panels == []


# ---------------------------------------------------------------------------------- the longer recovery


def test_the_10_epoch_difference_is_not_yet_measured_until_both_rows_exist(tmp_path):
    rows, images = _study()
    text = _write(rows, tmp_path / "r.md", images)
    assert ("kl-best - TP best at 50%, 10 epochs, seed 0 (test): not yet measured "
            "(missing kl-best@0.5/e10/s0, tp-best@0.5/e10/s0).") in text
    _add(rows, images, _row("kl-best", 0, 0.0, epochs=10), _bits(2000, 0.93, 50))
    text = _write(rows, tmp_path / "r.md", images)
    assert "10 epochs, seed 0 (test): not yet measured (missing tp-best@0.5/e10/s0)." in text
    assert _line(text, "| kl-best | 50% | 10 | 0 |")  # the row itself is in the table


def test_the_10_epoch_difference_has_its_images_se_and_says_whether_its_sign_is_the_2_epoch_ones(tmp_path):
    rows, images = _study()
    a = _add(rows, images, _row("kl-best", 0, 0.0, epochs=10), _bits(2000, 0.93, 50))
    b = _add(rows, images, _row("tp-best", 0, 0.0, epochs=10, kind="tp", resolved_to="tp-l1-free-out"),
             _bits(2000, 0.92, 51))
    text = _write(rows, tmp_path / "r.md", images)
    d = image_difference(_test_bits(images, a), _test_bits(images, b))
    assert d["mean"] == pytest.approx(a["test_top1"] - b["test_top1"], abs=1e-9)
    short = rows["kl-best@0.5/e2/s0"]["test_top1"] - rows["tp-l1-free-out@0.5/e2/s0"]["test_top1"]
    line = _line(text, "kl-best - TP best at 50%, 10 epochs, seed 0 (test):")
    assert f": {d['mean']:+.2f} ± {d['se']:.2f} (paired images SE, 2,000 test images; one seed, so a lower bound" in line
    same = (d["mean"] > 0) == (short > 0)
    assert line.endswith(f"At 2 epochs (seed 0) it is {short:+.2f}: {'the same sign' if same else '**the opposite sign**'}.")
    # the sign turned round at 2 epochs: said so
    rows["kl-best@0.5/e2/s0"]["test_top1"] = rows["tp-l1-free-out@0.5/e2/s0"]["test_top1"] - 0.5 * np.sign(d["mean"])
    line = _line(_write(rows, tmp_path / "r.md", None), "kl-best - TP best at 50%, 10 epochs")
    assert line.endswith(": **the opposite sign**.") and "(no per-image records for both rows: no SE)" in line
    # the 2-epoch seed-0 rows missing: said, no sign compared
    del rows["tp-l1-free-out@0.5/e2/s0"]
    line = _line(_write(rows, tmp_path / "r.md", images), "kl-best - TP best at 50%, 10 epochs")
    assert line.endswith("The 2-epoch difference (seed 0) is not yet measured.")


# ---------------------------------------------------------------------------------- one number, computed sentences


def test_a_number_identical_for_every_seed_is_shown_once():
    assert fmt_mean_std([85.93, 85.93, 85.93]) == "85.93 (all 3 identical)"
    assert fmt_mean_std([85.93, 85.93, 85.94]) == "85.93 ± 0.01 (3)"
    assert fmt_mean_std([85.93]) == "85.93 (1)" and fmt_mean_std([]) == "-"


def test_the_claims_table_shows_the_untrained_column_once_and_the_trained_one_as_mean_std(tmp_path):
    rows, images = _study()
    line = _line(_write(rows, tmp_path / "r.md", images), "| kl-best |")
    mean, std = mean_std([rows[bp.Row("kl-best", 0.5, 2, s).id]["test_top1"] for s in (0, 1, 2)])
    assert line.endswith(f"| {mean:.2f} ± {std:.2f} (3) | 85.93 (all 3 identical) |")


def test_the_protocol_states_the_seed_ses_confidence_tps_recipe_the_loss_and_the_macs_bias(tmp_path):
    rows, images = _study()
    rows["l1@0.5/e2/s1"]["config"] = {"ce_weight": 0.0}
    rows["l1@0.5/e2/s2"]["config"] = {"ce_weight": 0.5}
    text = _write(rows, tmp_path / "r.md", images)
    flat = " ".join(text.split())
    cover = 100 * (2 * stats.t.cdf(2, df=2) - 1)  # 81.6%
    assert f"about {cover:.0f}% two-sided (t with 2 df), not 95%" in flat and "combined SE (seeds + test images)" in flat
    assert "Torch-Pruning 1.6.1's `reproduce/main.py`" in flat and "group_sl (100 epochs of sparse-learning" in flat
    assert "uses the paper's loss, ce_weight 0" in flat
    trained = [r for r in rows.values() if r["epochs"] and not r.get("same_as")]
    assert (f"Recovery loss: ce_weight 0 recorded by 1 of {len(trained)} trained rows, {len(trained) - 2} from before the "
            "field (0 too). **Other ce_weight: l1@0.5/e2/s2**") in text
    # per pruned model: curlprune kl-best, l1, kl-paper at 0.499; TP tp-l1-free-out 0.501, tp-l2-cap-out 0.500 (alias left out)
    assert ("Achieved MACs ratio at 50% (mean, range): curlprune 0.4990 (0.499-0.499, 3 pruned models), Torch-Pruning "
            "0.5005 (0.500-0.501, 2 pruned models). Torch-Pruning's models keep 0.0015 of the unpruned MACs more on "
            "average: a slight bias in Torch-Pruning's favour.") in text


def _alloc(rows, images, family, target, val_bits):
    row = {"id": bp.Row(family, target, 0, 0).id, "family": family, "target": target, "epochs": 0, "seed": 0,
           "kind": "alloc", "macs_ratio": target, "within_1pct": True, "stream_widths": [16, 32, 64], "val_raw": 10.0,
           "test_raw": 10.0, "prune": {}}
    test = _bits(400, 0.8, 99)
    row.update(val_bn=top1_of(val_bits), test_bn=top1_of(test), val_top1=top1_of(val_bits), test_top1=top1_of(test))
    rows[row["id"]] = row
    images[row["id"]] = image_record(row["id"], val_bits, test)


def test_the_allocation_default_switches_only_to_a_row_ahead_beyond_2_se_at_every_target(tmp_path):
    """One default serves both targets: a candidate ahead beyond 2 SE on val at 50% but on par at 30%
    leaves it (the sentence names the candidate and both differences); ahead at both switches it;
    a missing record gives no decision."""
    n = 4000
    base = {t: _bits(n, 0.7, int(t * 10)) for t in (0.5, 0.3)}
    gain = _bits(n, 0.08, 7)  # images the candidate gets right on top of the default's
    rows, images = {}, {}
    for t in (0.5, 0.3):
        _alloc(rows, images, "alloc:kl / MACs", t, base[t])
    _alloc(rows, images, "alloc:kl / MACs, floor 0.1", 0.5, base[0.5] | gain)
    _alloc(rows, images, "alloc:kl / MACs, floor 0.1", 0.3, base[0.3])  # identical at 30%: on par
    d50 = image_difference(base[0.5] | gain, base[0.5])
    assert d50["mean"] > 2 * d50["se"]
    said = allocation_decision(rows, images, "alloc:kl / MACs")
    assert said.startswith("Decision: the default (kl / MACs) stays.")
    assert f"kl / MACs, floor 0.1 (50%: {d50['mean']:+.2f} ± {d50['se']:.2f}, 30%: +0.00 ± 0.00)" in said
    _alloc(rows, images, "alloc:kl / MACs, floor 0.1", 0.3, base[0.3] | gain)
    assert "**kl / MACs, floor 0.1** is ahead of the default" in allocation_decision(rows, images, "alloc:kl / MACs")
    _write(rows, tmp_path / "r.md", images)
    assert "the default should switch to it" in (tmp_path / "r.md").read_text()
    del images["alloc:kl / MACs@0.3/e0/s0"]
    assert allocation_decision(rows, images, "alloc:kl / MACs") is None
    rows2, images2 = {}, {}
    for t in (0.5, 0.3):
        _alloc(rows2, images2, "alloc:kl / MACs", t, base[t])
        _alloc(rows2, images2, "alloc:kl paper", t, base[t] & ~gain)  # behind everywhere
    assert "no allocation is ahead" in allocation_decision(rows2, images2, "alloc:kl / MACs")
