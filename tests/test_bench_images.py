"""Per-image correctness records of the ResNet-56 benchmark (issue 21): packing, the paired images
standard error, the combined seed + images standard error, the report's columns, and the records
written when a row is evaluated and by --backfill-images (which refuses a row whose recomputed
top-1 is not the stored one)."""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_plan as bp  # noqa: E402
import cifar_resnet56 as bench  # noqa: E402
import curlprune  # noqa: E402
from bench_backfill import backfill  # noqa: E402
from bench_images import (combined_difference, image_difference, image_record, mismatch, pack, record_for,  # noqa: E402
                          sidecar_path, top1_of, unpack)
from bench_report import write_markdown  # noqa: E402
from bench_stats import RowsFile, paired_difference, verdict  # noqa: E402
from curlprune.data.data import ImageDataset, batches, evaluate  # noqa: E402
from curlprune.models import build, input_spec  # noqa: E402
from curlprune.recover.stage import load_stage_model  # noqa: E402
from curlprune.surgery.surgery import random_plan  # noqa: E402


def _bits(n, p=0.9, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


# ---------------------------------------------------------------------------------- records


def test_pack_round_trips_any_length_compactly():
    for n in (0, 1, 7, 8, 9, 4999, 10_001):
        bits = _bits(n, seed=n)
        text = pack(bits)
        back = unpack(text)
        assert back.dtype == torch.bool and back.shape == (n,) and torch.equal(back, bits)
        assert json.loads(json.dumps(text)) == text
    assert torch.equal(unpack(pack(np.array([True, False, True]))), torch.tensor([True, False, True]))
    assert len(pack(_bits(10_000))) < 1_700  # 1,250 bytes of bits in base64
    assert pack(torch.ones(9, dtype=torch.bool)) != pack(torch.ones(10, dtype=torch.bool))  # the length is kept
    for bad in ("", "abc", "x:AAAA", "16:AA=="):  # no length, not a number, fewer bits than it says
        with pytest.raises(ValueError):
            unpack(bad)


def test_top1_of_a_record_is_the_benchmarks_rounding():
    bits = _bits(5000, seed=3)
    assert top1_of(bits) == round(100.0 * (int(bits.sum()) / 5000), 2)
    assert top1_of(torch.tensor([True, False, False])) == 33.33


def test_a_record_is_used_only_with_the_rows_top1_and_an_alias_resolves_to_its_row():
    val, test = _bits(51, seed=1), _bits(37, seed=2)
    record = image_record("a", val, test)
    row = {"id": "a", "val_top1": top1_of(val), "test_top1": top1_of(test)}
    assert mismatch(row, record) is None
    edited = {**row, "val_top1": row["val_top1"] + 0.02}
    line = mismatch(edited, record)
    assert line.startswith("a: ") and "-0.02 / +0.00 points" in line and "no record written" in line
    rows = {"a": row, "b": {**row, "id": "b", "same_as": "a"}, "c": {**row, "id": "c", "same_as": "b"}, "d": {**edited, "id": "d"}}
    images = {"a": record, "d": {**record, "id": "d"}}
    assert record_for(rows, images, "a") is record and record_for(rows, images, "c") is record
    assert record_for(rows, images, "d") is None  # another model's record: never paired with this row's numbers
    assert record_for(rows, None, "a") is None and record_for(rows, images, "x") is None
    assert sidecar_path("benchmarks/results/cifar_resnet56.jsonl") == Path("benchmarks/results/cifar_resnet56_images.jsonl")


# ---------------------------------------------------------------------------------- standard errors


def test_the_paired_images_se_is_the_paired_t_tests_and_zero_for_identical_records():
    a, b = _bits(5000, 0.92, seed=4), _bits(5000, 0.90, seed=5)
    d = image_difference(a, b)
    diff = a.double().numpy() - b.double().numpy()
    direct = 100 * math.sqrt(((diff - diff.mean()) ** 2).sum() / (len(diff) - 1)) / math.sqrt(len(diff))
    assert d["n"] == 5000 and d["mean"] == pytest.approx(top1_of(a) - top1_of(b), abs=1e-9)
    assert d["se"] == pytest.approx(direct, rel=1e-12)
    t = stats.ttest_rel(a.double().numpy(), b.double().numpy()).statistic
    assert d["mean"] / d["se"] == pytest.approx(t, rel=1e-9)
    same = image_difference(a, a.clone())
    assert same["mean"] == 0.0 and same["se"] == 0.0
    with pytest.raises(ValueError, match="not the same images"):
        image_difference(a, b[:-1])


def _seeded(n=2000, seeds=(0, 1, 2), ahead=10, flips=50):
    """Records of a and b per seed on the same n images: b is a with ``flips + ahead`` of a's correct
    images wrong and ``flips`` of its wrong images right (a leads by exactly ``ahead`` images each seed)."""
    pairs = {}
    for s in seeds:
        g = np.random.default_rng(100 + s)
        a = g.random(n) < 0.9
        b = a.copy()
        b[g.choice(np.flatnonzero(a), flips + ahead, replace=False)] = False
        b[g.choice(np.flatnonzero(~a), flips, replace=False)] = True
        pairs[s] = (torch.from_numpy(a), torch.from_numpy(b))
    return pairs


def test_the_combined_se_adds_the_images_se_of_seed_averaged_differences():
    pairs = _seeded()
    seed_diff = paired_difference({s: top1_of(a) for s, (a, _) in pairs.items()}, {s: top1_of(b) for s, (_, b) in pairs.items()})
    c = combined_difference(seed_diff, pairs)
    dbar = np.mean([a.double().numpy() - b.double().numpy() for a, b in pairs.values()], axis=0)
    assert c["se_images"] == pytest.approx(100 * dbar.std(ddof=1) / math.sqrt(dbar.size), rel=1e-12)
    assert c["se_seeds"] == seed_diff["se"] and c["mean"] == seed_diff["mean"] == pytest.approx(100 * dbar.mean())
    assert c["se"] == pytest.approx(math.sqrt(c["se_seeds"] ** 2 + c["se_images"] ** 2))
    assert c["se"] >= c["se_seeds"] and c["se"] >= c["se_images"] > 0
    # every seed 0.5 points ahead: no seed SE, "ahead" on it; the images make it "on par"
    assert seed_diff["se"] == pytest.approx(0, abs=1e-9) and verdict(seed_diff) == "ahead" and verdict(c) == "on par"
    # a and b agree image by image: the images add nothing, the seed SE is all
    agree = {s: (a, a.clone()) for s, (a, _) in pairs.items()}
    stored = paired_difference({0: 91.5, 1: 91.8, 2: 91.2}, {0: 91.0, 1: 91.6, 2: 91.1})
    same = combined_difference(stored, agree)
    assert same["se_images"] == 0.0 and same["se"] == pytest.approx(stored["se"], rel=1e-12)
    # per-seed differences that cancel image by image over the seeds: dbar = 0, the seed SE alone
    a = _bits(300, seed=7)
    b0, b1 = a.clone(), a.clone()
    b0[:20], b1[:20] = ~a[:20], ~a[:20]
    cancel = {0: (a, b0), 1: (b1, a)}
    d = paired_difference({0: top1_of(a), 1: top1_of(b1)}, {0: top1_of(b0), 1: top1_of(a)})
    assert combined_difference(d, cancel)["se_images"] == 0.0 and combined_difference(d, cancel)["se"] == pytest.approx(d["se"])
    one = combined_difference(paired_difference({0: 91.0}, {0: 90.0}), {0: pairs[0]})
    assert one["se"] is None and one["se_images"] > 0  # one seed: no seed SE to combine with
    with pytest.raises(ValueError, match="seed"):
        combined_difference(seed_diff, {0: pairs[0]})


# ---------------------------------------------------------------------------------- the report


def _row(family, seed, val, test, kind="curl", epochs=2, **extra):
    return {"id": bp.Row(family, 0.5, epochs, seed).id, "family": family, "target": 0.5, "epochs": epochs, "seed": seed,
            "kind": kind, "macs_ratio": 0.5, "within_1pct": True, "val_top1": val, "test_top1": test, "val_bn": val,
            "test_bn": test, "val_raw": 50.0, "test_raw": 50.0, "prune": {}, "stream_widths": [16, 32, 64], **extra}


def _study():
    """Rows and sidecar records: kl-best and l1 with 3 seeds (_seeded test records), two allocation
    rows (the best by val and curlprune's default) and three TP variants, one an alias."""
    rows, images = {}, {}
    for s, (a, b) in _seeded().items():
        for family, test in (("kl-best", a), ("l1", b)):
            val = _bits(500, seed=10 * s + len(family))
            row = _row(family, s, top1_of(val), top1_of(test))
            rows[row["id"]], images[row["id"]] = row, image_record(row["id"], val, test)
    a, b = _seeded(n=5000, seeds=(0,), ahead=19, flips=60)[0]
    for family, val in (("alloc:kl / MACs, floor 0.1", a), ("alloc:kl / MACs", b)):
        row = _row(family, 0, top1_of(val), top1_of(_bits(10, seed=1)), kind="alloc", epochs=0)
        rows[row["id"]], images[row["id"]] = row, image_record(row["id"], val, _bits(10, seed=1))
    settings = {f: bp.tp_settings(f) for f in ("tp-l1-free-out", "tp-l1-free-in", "tp-l2-cap-out")}
    records = {"tp-l1-free-out": _bits(500, seed=20), "tp-l2-cap-out": _bits(500, 0.85, seed=21)}
    for family in settings:
        val = records.get(family, records["tp-l1-free-out"])
        row = _row(family, 0, top1_of(val), top1_of(_bits(10, seed=2)), kind="tp", prune={**settings[family], "tp": {"steps": 9, "of_steps": 400}},
                   **({"same_as": "tp-l1-free-out@0.5/e2/s0"} if family == "tp-l1-free-in" else {}))
        rows[row["id"]] = row
        if family in records:
            images[row["id"]] = image_record(row["id"], val, _bits(10, seed=2))
    return rows, images, list(settings)


def _line(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_the_report_shows_images_and_combined_se_and_decides_on_the_combined_one(tmp_path):
    rows, images, variants = _study()
    path = tmp_path / "report.md"
    write_markdown(rows, path, variants=variants, variant_epochs=2, settings=bench.FULL, images=images)
    text = path.read_text()
    assert "| test SE: images | test SE: combined | verdict (test) |" in text and "sqrt(seed SE^2 + images SE^2)" in text
    pairs = _seeded()
    seed_diff = paired_difference({s: top1_of(a) for s, (a, _) in pairs.items()}, {s: top1_of(b) for s, (_, b) in pairs.items()})
    c = combined_difference(seed_diff, pairs)
    line = _line(text, "| curlprune default vs curlprune l1")
    assert f"| {c['se_images']:.2f} | {c['se']:.2f} | a on par |" in line  # the seed SE alone would say "ahead"
    assert "Verdict on: curlprune default vs curlprune l1: combined SE." in text
    # the allocation study: best by val against the default, paired over the val images
    d = image_difference(*_seeded(n=5000, seeds=(0,), ahead=19, flips=60)[0])
    assert f"Best minus default on val: {d['mean']:+.2f} ± {d['se']:.2f} (paired images SE, 5,000 val images" in text
    assert f"{verdict(d)}." in _line(text, "Best by val: **kl / MACs, floor 0.1**")
    assert f"| {d['mean']:+.2f} ± {d['se']:.2f} |" in _line(text, "| kl / MACs, floor 0.1 |")
    assert _line(text, "| kl / MACs |").endswith("| default |")
    # the TP variants: each against the chosen best on val; the alias through the row it names
    v = image_difference(unpack(images["tp-l2-cap-out@0.5/e2/s0"]["val"]), unpack(images["tp-l1-free-out@0.5/e2/s0"]["val"]))
    assert _line(text, "| tp-l2-cap-out |").endswith(f"| {v['mean']:+.2f} ± {v['se']:.2f} |")
    assert _line(text, "| **tp-l1-free-out** (TP best) |").endswith("| best |")
    assert _line(text, "| tp-l1-free-in = ").endswith("| +0.00 ± 0.00 |")
    assert "Rows with per-image records: 11 of 11." in text


def test_the_report_falls_back_to_the_seed_se_and_renders_without_a_sidecar(tmp_path):
    rows, images, variants = _study()
    path = tmp_path / "report.md"
    del images["l1@0.5/e2/s2"]
    write_markdown(rows, path, variants=variants, variant_epochs=2, settings=bench.FULL, images=images)
    text = path.read_text()
    assert _line(text, "| curlprune default vs curlprune l1").endswith("| - | - | a ahead |")
    assert "curlprune default vs curlprune l1: seed SE only: no per-image records for every paired seed of both rows" in text
    for images in (None, {}):  # an older checkout: no sidecar
        write_markdown(rows, path, variants=variants, variant_epochs=2, settings=bench.FULL, images=images)
        text = path.read_text()
        assert _line(text, "| curlprune default vs curlprune l1").endswith("| - | - | a ahead |")
        assert "no per-image records for both rows yet (`--backfill-images`)" in text
        assert _line(text, "| tp-l2-cap-out |").endswith("| - |") and "Rows with per-image records: 0 of 11." in text
    write_markdown(rows, path, variants=variants, variant_epochs=2, settings=bench.FULL)  # the old signature
    assert "| val BN - default ± images SE |" in path.read_text()


# ---------------------------------------------------------------------------------- records of real rows, and backfill


def _digits(indices):
    """Digits (sklearn) as CIFAR-shaped uint8 images: 8x8 -> 32x32, three channels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images[indices] * (255 / 16)).to(torch.uint8)
    images = images.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1).contiguous()
    return ImageDataset(images, digits.target[indices], [str(k) for k in range(10)])


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    """A real Bench on a digits subset (64 training, 51 val, 37 test images) and a randomly
    initialised ResNet-56: rows pruned from a cached random plan, BN re-estimated, one distill step."""
    torch.manual_seed(0)
    b = bench.Bench.__new__(bench.Bench)
    b.out = tmp_path_factory.mktemp("bench-out")
    b.s, b.device, b.amp, b.workers, b.digests, b.eval_batch = bench.SMOKE, torch.device("cpu"), None, 0, {}, 16
    b.teacher, b.example, b.spec = build(bench.MODEL).eval(), torch.zeros(1, 3, 32, 32), input_spec(bench.MODEL)
    b.groups = curlprune.trace(b.teacher, b.example)
    b.full_macs, b.full_params = curlprune.count(b.teacher, b.example)
    b.train, b.val, b.test = _digits(range(64)), _digits(range(100, 151)), _digits(range(200, 237))
    b.monitor = b.val
    b.bn_images = torch.cat([x for x, _ in batches(b.train, b.spec, 32)])
    b.images = RowsFile(b.out / "rows_images.jsonl")
    plan = random_plan(b.groups, random.Random(3))
    for family in ("alloc:kl / MACs", "kl-best"):
        folder, path, info = b.cache_paths(family, 0.5)
        folder.mkdir(parents=True)
        small = curlprune.apply(b.teacher, b.groups, plan).eval()
        curlprune.save(path, bench.MODEL, plan, small.state_dict(), input_shape=[1, 3, 32, 32])
        info.write_text(json.dumps({"criterion": "kl"}))
    rows = RowsFile(b.out / "rows.jsonl")
    for row in (bp.Row("alloc:kl / MACs", 0.5, 0, 0), bp.Row("kl-best", 0.5, 1, 0)):
        rows.append(b.run_row(row, {}))
    return b, rows


def test_a_row_writes_its_record_when_evaluated_and_backfill_rebuilds_the_same(small_bench, tmp_path):
    b, rows = small_bench
    done, written = rows.read(), b.images.read()
    assert set(written) == set(done) == {"alloc:kl / MACs@0.5/e0/s0", "kl-best@0.5/e1/s0"}
    for row_id, row in done.items():
        record = written[row_id]
        assert mismatch(row, record) is None and len(unpack(record["val"])) == 51 and len(unpack(record["test"])) == 37
    assert done["kl-best@0.5/e1/s0"]["config"]["ce_weight"] == 0.0  # the paper's loss, recorded (not the product default)
    alloc = done["alloc:kl / MACs@0.5/e0/s0"]
    assert alloc["val_top1"] == alloc["val_bn"] and written[alloc["id"]]["test_top1"] == alloc["test_bn"]
    trained = b.load_cached("kl-best", b.cache_paths("kl-best", 0.5)[1])
    load_stage_model(trained, b.out / "t0.5" / "kl-best" / "distill-e1-s0", "distill")
    assert round(100 * evaluate(trained, b.val, b.spec, 16), 2) == done["kl-best@0.5/e1/s0"]["val_top1"]
    # every row has its record: nothing to do
    lines = []
    assert backfill(b, done, b.images, log=lines.append) == {"written": [], "refused": [], "skipped": []} and not lines
    # a fresh sidecar: backfill rebuilds both models and writes the very records written at evaluation
    fresh = RowsFile(tmp_path / "rows_images.jsonl")
    outcome = backfill(b, done, fresh, log=lines.append)
    assert outcome["written"] == list(done) and fresh.read() == written
    assert backfill(b, done, fresh, log=lines.append)["written"] == []  # resumable


def test_backfill_refuses_a_row_whose_recomputed_top1_is_not_the_stored_one(small_bench, tmp_path):
    b, rows = small_bench
    done = rows.read()
    edited = {k: dict(v) for k, v in done.items()}
    edited["alloc:kl / MACs@0.5/e0/s0"]["val_top1"] += 0.5  # the stored number of the row edited
    edited["kl-best@0.5/e1/s0"]["test_top1"] -= 0.02
    fresh, lines = RowsFile(tmp_path / "rows_images.jsonl"), []
    outcome = backfill(b, edited, fresh, log=lines.append)
    assert outcome["refused"] == list(done) and outcome["written"] == [] and not fresh.path.exists()
    assert lines[0].startswith("alloc:kl / MACs@0.5/e0/s0: recomputed val") and "(differ by -0.50 / +0.00 points)" in lines[0]
    assert lines[1].startswith("kl-best@0.5/e1/s0: ") and "(differ by +0.00 / +0.02 points)" in lines[1]
    # only the selected rows; a row of another device or without its cached model is left, said in a line
    lines.clear()
    other = {**done["kl-best@0.5/e1/s0"], "id": "kl-best@0.5/e1/s1", "seed": 1, "device": "cuda"}
    missing = {**done["alloc:kl / MACs@0.5/e0/s0"], "id": "alloc:l1 / MACs@0.5/e0/s0", "family": "alloc:l1 / MACs"}
    outcome = backfill(b, {r["id"]: r for r in (other, missing, done["kl-best@0.5/e1/s0"])}, fresh, "*/s1,alloc:*", log=lines.append)
    assert outcome == {"written": [], "refused": [], "skipped": ["kl-best@0.5/e1/s1", "alloc:l1 / MACs@0.5/e0/s0"]}
    assert "run it with --device cuda" in lines[0] and "no cached pruned model" in lines[1]
