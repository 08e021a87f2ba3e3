"""The ResNet-56 benchmark's side-by-side pruning-time row (issue 21: "re-measure every timing you
report, side by side in one run"): its place in the plan, a real run on a small bench (digits, a
randomly initialised CIFAR ResNet-20, Torch-Pruning 1.6.1) that times every method afresh and leaves
the score and pruned-model caches alone, and the report's table with and without the row."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_plan as bp  # noqa: E402
import cifar_resnet56 as bench  # noqa: E402
import curlprune  # noqa: E402
from bench_alias import pruned_digest  # noqa: E402
from bench_report import write_markdown  # noqa: E402
from bench_timing import BASE, CURL_METHODS, TP_METHODS, TITLE  # noqa: E402
from curlprune.cost.analysis import model_cost_fn  # noqa: E402
from curlprune.data.data import ImageDataset, batches  # noqa: E402
from curlprune.models import build, input_spec  # noqa: E402

ROW_ID = "timing-prune@0.5/e0/s0"
TABLE = TITLE.format(target=0.5)


def test_the_timing_prune_row_follows_the_allocation_study_and_parses():
    plan = bp.plan()
    ids = [r.id for r in plan]
    last_alloc = max(i for i, r in enumerate(plan) if r.kind == "alloc")
    assert ids.index(ROW_ID) == last_alloc + 1 and ids[last_alloc + 2] == "kl-best@0.5/e2/s0"
    assert ids.count(ROW_ID) == 1 and ids[0] == "timing"
    row = bp.parse_id(ROW_ID)
    assert row == bp.Row("timing-prune", 0.5, 0, 0) and row.id == ROW_ID and row.kind == "timing"
    assert bp.parse_id("timing") == bp.Row("timing") and bp.Row("timing").id == "timing"  # the finished row's id
    assert bp.estimate(row) == bp.COST["timing-prune"] > bp.estimate(bp.Row("timing"))
    assert ROW_ID in [r.id for r in bp.smoke_plan()]
    assert bp.plan(targets=(0.3,))[1 + len(bp.EXPLORE)].id == "timing-prune@0.3/e0/s0"  # the first target's


def _digits(indices):
    """Digits (sklearn) as CIFAR-shaped uint8 images: 8x8 -> 32x32, three channels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images[indices] * (255 / 16)).to(torch.uint8)
    images = images.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1).contiguous()
    return ImageDataset(images, digits.target[indices], [str(k) for k in range(10)])


def _bench(out: Path):
    """A real Bench without its CIFAR data: a randomly initialised CIFAR ResNet-20 (the ResNet-56's
    blocks, a third of the layers) and 8 digits calibration images."""
    torch.manual_seed(0)
    b = bench.Bench.__new__(bench.Bench)
    b.out, b.s = out, {**bench.SMOKE, "calib": 8}
    b.device, b.amp, b.workers, b.digests = torch.device("cpu"), None, 0, {}
    b.teacher, b.example, b.spec = build("cifar:resnet20").eval(), torch.zeros(1, 3, 32, 32), input_spec("cifar:resnet20")
    b.groups = curlprune.trace(b.teacher, b.example)
    b.cost_fn = model_cost_fn(b.teacher, b.example, b.groups)
    b.full_macs, b.full_params = curlprune.count(b.teacher, b.example)
    b.calib = tuple(map(torch.cat, zip(*batches(_digits(range(8)), b.spec, 8))))
    b.score_cpu, b.score_device = {}, {}
    return b


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def timed_row(tmp_path_factory):
    """The row run on the small bench, over an --out that already holds a (bogus) score and pruned
    model cache for every method: the row must neither read nor write them."""
    b = _bench(tmp_path_factory.mktemp("bench-out"))
    for criterion in ("kl-approx", "l1", "taylor", "kl"):
        (b.out / "scores").mkdir(exist_ok=True)
        (b.out / "scores" / f"{criterion}.npz").write_bytes(b"not scores")
    for family in CURL_METHODS + TP_METHODS:
        folder, path, info = b.cache_paths(family, 0.5)
        folder.mkdir(parents=True)
        path.write_bytes(b"not a model")
        info.write_text(json.dumps({"criterion": "bogus"}))
    before = _files(b.out)
    record = b.run_row(bp.parse_id(ROW_ID), {})
    return b, record, before


def test_the_row_times_every_method_afresh_and_leaves_the_caches_alone(timed_row):
    b, r, before = timed_row
    assert _files(b.out) == before  # nothing read (bogus files would fail to load), written or added
    assert (r["id"], r["family"], r["kind"], r["target"], r["device"], r["calib"]) == (ROW_ID, "timing-prune", "timing", 0.5, "cpu", 8)
    assert r["threads"] == torch.get_num_threads() and r["tp_steps"] == bench.SMOKE["tp_steps"]
    assert list(r["methods"]) == [*CURL_METHODS, *TP_METHODS] and list(r["scoring"]) == ["kl-approx", "l1", "taylor", "kl"]
    for part in [r["trace"], *r["scoring"].values(), *r["select_slice"].values(), *r["tp"].values(), *r["methods"].values()]:
        assert part["seconds"] > 0 and part["cpu_seconds"] > 0
    for family in CURL_METHODS:  # curlprune's way: trace + the criterion's scoring + select and slice
        part = r["select_slice"][family]
        assert part["criterion"] == bp.CURL[family][0] and part["allocation"] == bp.CURL[family][1]
        for key in ("seconds", "cpu_seconds"):
            assert r["methods"][family][key] == pytest.approx(r["trace"][key] + r["scoring"][part["criterion"]][key] + part[key], abs=2e-3)
    for family in TP_METHODS:
        assert r["methods"][family] == {k: r["tp"][family][k] for k in ("seconds", "cpu_seconds")}
        assert r["tp"][family]["within_1pct"] and 0 < r["tp"][family]["steps"] <= r["tp"][family]["of_steps"]
    for part in [*r["select_slice"].values(), *r["tp"].values()]:
        assert part["macs_ratio"] == pytest.approx(0.5, abs=0.01)
    assert len({part["pruned_sha256"] for part in r["tp"].values()}) == 3  # three different pruned models
    assert r["methods"]["kl-best"]["cpu_seconds"] > r["methods"][BASE]["cpu_seconds"]  # exact kl costs more than kl-approx
    json.dumps(r)


def test_the_timed_models_are_the_rows_models(timed_row, tmp_path):
    """The row times the rows' own computations: the same pruned models as Bench.curl_prune (through
    the score cache of another --out) and Bench.tp_prune give (the cheap criteria; kl is the same code)."""
    _, r, _ = timed_row
    other = _bench(tmp_path)
    for family in ("l1", "taylor"):
        model, info = other.curl_prune(family, 0.5)
        assert pruned_digest(model) == r["select_slice"][family]["pruned_sha256"]
    model, _ = other.tp_prune("tp-l1-free-out", 0.5)
    assert pruned_digest(model) == r["tp"]["tp-l1-free-out"]["pruned_sha256"]


def _synthetic(**digests):
    """A finished timing-prune row with round numbers (kla-best: 10 CPU s)."""
    part = lambda s, cpu: {"seconds": s, "cpu_seconds": cpu}  # noqa: E731
    select = {f: {**part(0.5, 0.5), "criterion": bp.CURL[f][0], "allocation": bp.CURL[f][1], "macs_ratio": 0.498,
                  "pruned_sha256": digests.get(f, f)} for f in CURL_METHODS}
    tp = {f: {**part(s, cpu), "steps": 140, "of_steps": 400, "within_1pct": True, "macs_ratio": 0.501, "pruned_sha256": digests.get(f, f)}
          for f, s, cpu in (("tp-taylor-free-out", 460.0, 450.0), ("tp-l1-free-out", 13.0, 12.5), ("tp-l2-free-out", 14.0, 13.0))}
    scoring = {"kl-approx": part(9.0, 9.0), "l1": part(0.1, 0.1), "taylor": part(3.0, 3.0), "kl": part(270.0, 265.0)}
    methods = {f: part(0.5 + 0.5 + scoring[select[f]["criterion"]]["seconds"], 0.5 + 0.5 + scoring[select[f]["criterion"]]["cpu_seconds"])
               for f in CURL_METHODS}
    methods.update({f: part(v["seconds"], v["cpu_seconds"]) for f, v in tp.items()})
    return {"id": ROW_ID, "family": "timing-prune", "kind": "timing", "target": 0.5, "epochs": 0, "seed": 0, "device": "cpu",
            "threads": 1, "calib": 256, "tp_steps": 400, "trace": part(0.5, 0.5), "scoring": scoring, "select_slice": select,
            "tp": tp, "methods": methods, "versions": {"torch": "2.x", "torch_pruning": "1.6.1", "curlprune": "0.1.0"}}


def _finished(family, sha):
    return {"id": bp.Row(family, 0.5, 2, 0).id, "family": family, "target": 0.5, "epochs": 2, "seed": 0, "kind": "curl",
            "macs_ratio": 0.5, "within_1pct": True, "val_raw": 10.0, "test_raw": 11.0, "val_bn": 60.0, "test_bn": 61.0,
            "val_top1": 88.5, "test_top1": 87.25, "prune_cpu_seconds": 0.2, "recovery_cpu_seconds": 1047.0, "prune": {},
            "pruned_sha256": sha}


def _line(text, start):
    return next(x for x in text.splitlines() if x.startswith(start))


def test_the_report_shows_the_side_by_side_table_of_a_timing_prune_row(tmp_path, timed_row):
    path = tmp_path / "report.md"
    rows = {ROW_ID: _synthetic(**{"kl-best": "k"}), "kl-best@0.5/e2/s0": _finished("kl-best", "k"),
            "l1@0.5/e2/s0": _finished("l1", "another model")}
    write_markdown(rows, path, variants=[], variant_epochs=2, settings=bench.FULL)
    text = path.read_text()
    assert f"## {TABLE}" in text and "1 CPU thread" in text and "256 calibration images" in text
    assert "| method | parts (wall s) | seconds wall | CPU seconds | CPU ratio to curlprune kl-approx |" in text
    assert _line(text, "| curlprune kla-best (kl-approx, cost-weighted) |") == (
        "| curlprune kla-best (kl-approx, cost-weighted) | trace 0.50 + kl-approx scoring 9.00 + select and slice 0.50 | "
        "10.00 | 10.00 | 1.00 | 0.498 | - |")
    assert _line(text, "| curlprune kl-best (kl, cost-weighted) |").endswith("| 271.00 | 266.00 | 26.60 | 0.498 | yes |")
    assert _line(text, "| curlprune l1 (l1, paper) |").endswith("| 1.10 | 1.10 | 0.11 | 0.498 | no |")
    assert _line(text, "| Torch-Pruning tp-taylor-free-out |") == (
        "| Torch-Pruning tp-taylor-free-out | stepped pruning, step 140 of 400 | 460.00 | 450.00 | 45.00 | 0.501 | - |")
    assert _line(text, "| Torch-Pruning tp-l2-free-out |").endswith("| 14.00 | 13.00 | 1.30 | 0.501 | - |")
    assert text.index(f"## {TABLE}") < text.index("## 50% of the MACs: the claims")
    assert "| timing-prune" not in text  # not a row of the per-row tables
    assert "The CPU-seconds columns are not comparable across rows (measured under different load)." in text
    # the real row of the small bench renders as well, and alone it opens no claims section
    _, real, _ = timed_row
    write_markdown({ROW_ID: real}, path, variants=[], variant_epochs=2, settings=bench.FULL)
    text = path.read_text()
    assert f"## {TABLE}" in text and "| curlprune kla-best (kl-approx, cost-weighted) |" in text
    assert _line(text, "| curlprune kla-best").split(" | ")[4] == "1.00" and "## 50% of the MACs" not in text


def test_the_report_renders_without_the_row_and_says_per_row_cpu_seconds_are_not_comparable(tmp_path):
    path = tmp_path / "report.md"
    write_markdown({"kl-best@0.5/e2/s0": _finished("kl-best", "k")}, path, variants=[], variant_epochs=2, settings=bench.FULL)
    text = path.read_text()
    assert "side by side (one process, one thread)" not in text and "## 50% of the MACs: the claims" in text
    assert "The CPU-seconds columns are not comparable across rows (measured under different load)." in text
    assert _line(text, "| kl-best@0.5/e2/s0 |").endswith("| 0 | 0 | 1047 |")
    write_markdown({}, path, variants=[], variant_epochs=2, settings=bench.FULL)  # nothing finished: no table, no note
    assert "not comparable" not in path.read_text()
