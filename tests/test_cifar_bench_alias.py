"""The ResNet-56 benchmark's aliases (issue 21): a row whose pruned model is bit-identical to a
finished row's (same target, epochs, seed, device) is recorded ``same_as`` it, not trained again."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_plan as bp  # noqa: E402
import cifar_resnet56 as bench  # noqa: E402
import curlprune  # noqa: E402
from bench_alias import find_same, pruned_digest  # noqa: E402
from bench_report import write_markdown  # noqa: E402
from curlprune.models import build  # noqa: E402
from curlprune.surgery.surgery import random_plan  # noqa: E402


def _small(width=8, stride=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, stride), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten())


def test_digest_is_equal_for_identical_models_and_sees_one_bit_and_one_width():
    a, b = _small(), _small()
    assert a is not b and pruned_digest(a) == pruned_digest(b)
    flipped = _small()
    with torch.no_grad():
        flipped[0].weight.view(-1)[5:6].view(torch.int32).bitwise_xor_(1)  # the lowest mantissa bit of one weight
    assert not torch.equal(flipped[0].weight, a[0].weight)
    assert pruned_digest(flipped) != pruned_digest(a)
    assert pruned_digest(_small(width=7)) != pruned_digest(a)
    assert pruned_digest(_small(stride=2)) != pruned_digest(a)  # same weights, another structure
    a[1].running_mean += 1.0  # a buffer counts as well
    assert pruned_digest(a) != pruned_digest(b)


@pytest.fixture(scope="module")
def resnet56():
    torch.manual_seed(0)
    model = build(bench.MODEL).eval()
    example = torch.zeros(1, 3, 32, 32)
    groups = curlprune.trace(model, example)
    return model, example, groups, random_plan(groups, random.Random(1)), random_plan(groups, random.Random(2))


def _bench(tmp_path, resnet56):
    """The benchmark object without its data: what pruning from the cache and recording need. Any
    evaluation or recovery fails the test: an alias row must need neither."""
    model, example, groups, _, _ = resnet56
    b = bench.Bench.__new__(bench.Bench)
    b.out, b.s, b.teacher, b.example, b.groups = tmp_path, bench.SMOKE, model, example, groups
    b.device, b.amp, b.workers, b.digests = torch.device("cpu"), None, 0, {}
    b.full_macs, b.full_params = curlprune.count(model, example)

    def fail(*args):
        raise AssertionError("evaluated or trained")
    b.top1 = b.bn_reestimated = b.recover = fail
    return b


def _cache(b, family, plan, target=0.5):
    """A cached pruned curlprune model, as Bench.pruned writes it."""
    folder, path, info = b.cache_paths(family, target)
    folder.mkdir(parents=True)
    small = curlprune.apply(b.teacher, b.groups, plan).eval()
    curlprune.save(path, bench.MODEL, plan, small.state_dict(), input_shape=[1, 3, 32, 32])
    info.write_text(json.dumps({"criterion": "kl", "prune_seconds": 1.5}))


def _finished(family, seed=0, epochs=2, **extra):
    """A row finished before the digests were recorded (no pruned_sha256)."""
    return {"id": bp.Row(family, 0.5, epochs, seed).id, "family": family, "target": 0.5, "epochs": epochs, "seed": seed,
            "kind": "curl", "macs_ratio": 0.5, "within_1pct": True, "val_raw": 10.0, "test_raw": 11.0, "val_bn": 60.0,
            "test_bn": 61.0, "val_top1": 88.5, "test_top1": 87.25, "monitor_val_top1_last": 88.0, "train_images": 45000,
            "config": {"lr": 0.02}, "recovery_cpu_seconds": 1200.0, "prune": {}, **extra}


def test_a_row_with_an_identical_pruned_model_is_recorded_same_as_without_training(tmp_path, resnet56):
    b = _bench(tmp_path, resnet56)
    _, _, _, plan, other_plan = resnet56
    _cache(b, "kl-best", plan)
    _cache(b, "kl-paper", plan)  # pruned separately, the same model
    done = {r["id"]: r for r in [_finished("kl-best")]}
    record = b.run_row(bp.Row("kl-paper", 0.5, 2, 0), done)
    assert record["same_as"] == "kl-best@0.5/e2/s0" and record["id"] == "kl-paper@0.5/e2/s0"
    assert record["family"] == "kl-paper" and record["prune"] == {"criterion": "kl", "prune_seconds": 1.5}
    for key in ("val_raw", "test_raw", "val_bn", "test_bn", "val_top1", "test_top1", "monitor_val_top1_last", "config"):
        assert record[key] == done["kl-best@0.5/e2/s0"][key]
    assert "recovery_cpu_seconds" not in record and record["macs"] < b.full_macs
    assert record["pruned_sha256"] == b.cached_digest(0.5, "kl-best")
    json.dumps(record)
    # the alias itself is no candidate, the row it names is; a digest recorded in the row is used as is
    done[record["id"]] = record
    _cache(b, "random", plan)
    assert b.run_row(bp.Row("random", 0.5, 2, 0), dict(reversed(done.items())))["same_as"] == "kl-best@0.5/e2/s0"
    # another seed or other epochs of the same pruned model: computed (the stand-ins fail)
    source = _finished("kl-best")
    for seed, epochs in ((1, 2), (0, 10)):
        with pytest.raises(AssertionError, match="evaluated or trained"):
            b.run_row(bp.Row("kl-paper", 0.5, epochs, seed), {source["id"]: source})
    # another pruned model, a missing cache, another device, another kind: computed
    _cache(b, "taylor", other_plan)
    cases = [("taylor", _finished("kl-best")), ("kl-paper", _finished("l1")),  # l1: no cached model
             ("kl-paper", _finished("kl-best", device="cuda", amp="off"))]
    for family, old in cases:
        with pytest.raises(AssertionError, match="evaluated or trained"):
            b.run_row(bp.Row(family, 0.5, 2, 0), {old["id"]: old})
    digest = record["pruned_sha256"]
    same = {source["id"]: {**source, "pruned_sha256": digest}}
    assert find_same("y", "curl", (0.5, 2, 0), digest, {}, same, lambda r: r["pruned_sha256"]) == "kl-best@0.5/e2/s0"
    assert find_same("y", "tp", (0.5, 2, 0), digest, {}, same, lambda r: r["pruned_sha256"]) is None
    assert find_same("y", "alloc", (0.5, 2, 0), digest, {"device": "cpu", "amp": "off"}, same, lambda r: r["pruned_sha256"])


def _variant(family, val, **extra):
    settings = bp.tp_settings(family)
    return {"id": bp.Row(family, 0.5, 2, 0).id, "family": family, "target": 0.5, "epochs": 2, "seed": 0, "kind": "tp",
            "macs_ratio": 0.499, "within_1pct": True, "val_top1": val, "test_top1": val - 1.0, "val_bn": 70.0,
            "test_bn": 69.0, "val_raw": 10.0, "test_raw": 10.0, "stream_widths": [16, 32, 64],
            "prune": {**settings, "tp": {"steps": 200, "of_steps": 400}}, **extra}


def test_the_report_shows_an_alias_row_with_its_numbers_and_tp_best_counts_it(tmp_path):
    variants = ["tp-taylor-cap-out", "tp-taylor-free-out", "tp-l1-cap-out"]
    rows = {r["id"]: r for r in [_variant("tp-taylor-cap-out", 90.12),
                                 _variant("tp-taylor-free-out", 90.12, same_as="tp-taylor-cap-out@0.5/e2/s0"),
                                 _variant("tp-l1-cap-out", 89.0)]}
    path = tmp_path / "report.md"
    write_markdown(rows, path, variants=variants, variant_epochs=2, settings=bench.FULL)
    text = path.read_text()
    line = next(x for x in text.splitlines() if x.startswith("| tp-taylor-free-out = "))
    assert "= tp-taylor-cap-out@0.5/e2/s0 (identical pruned model)" in line and "| 90.12 | 89.12 |" in line
    assert "| **tp-taylor-cap-out** (TP best) |" in text  # the tie goes to the earlier variant
    assert "| tp-taylor-free-out@0.5/e2/s0 = tp-taylor-cap-out@0.5/e2/s0 (identical pruned model) |" in text
    b = bench.Bench.__new__(bench.Bench)
    b.variants, b.variant_epochs = variants, 2
    assert b.resolve(bp.Row("tp-best", 0.5, 2, 1), rows) == "tp-taylor-cap-out"
    rows["tp-taylor-cap-out@0.5/e2/s0"]["val_top1"] = 80.0  # the alias alone is best: it stands for TP best
    assert b.resolve(bp.Row("tp-best", 0.5, 2, 1), rows) == "tp-taylor-free-out"
    del rows["tp-l1-cap-out@0.5/e2/s0"]
    assert b.resolve(bp.Row("tp-best", 0.5, 2, 1), rows) is None
