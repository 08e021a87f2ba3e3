"""benchmarks/scale.py (issue 20, item 6): a finished part is never recomputed, a skipped one is
retried, ``--redo`` measures again, each part is saved as it finishes; the extrapolation's
arithmetic; the report from the json alone; ``--device cuda`` without CUDA is one line, exit 2.
No timings are asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale as bench  # noqa: E402


def test_finished_parts_are_kept_skipped_ones_retried_and_redo_measures_again(tmp_path):
    path = tmp_path / "scale.json"
    calls: list[str] = []
    state = {"streaming_ready": False}

    def part(name):
        def run():
            calls.append(name)
            if name == "streaming" and not state["streaming_ready"]:
                return {"skipped": "not merged"}
            return {"value": len(calls)}
        return run

    runners = {p: part(p) for p in bench.PARTS}
    first = bench.run_parts(path, ["resnet50", "streaming"], runners, say=lambda _: None)
    assert calls == ["resnet50", "streaming"] and first["streaming"]["skipped"] == "not merged"
    assert json.loads(path.read_text())["resnet50"]["value"] == 1
    state["streaming_ready"] = True
    second = bench.run_parts(path, ["resnet50", "streaming"], runners, say=lambda _: None)
    assert calls == ["resnet50", "streaming", "streaming"]  # resnet50 kept, streaming retried
    assert second["resnet50"]["value"] == 1 and second["streaming"]["value"] == 3
    third = bench.run_parts(path, ["resnet50", "streaming"], runners, redo={"resnet50"}, say=lambda _: None)
    assert calls[-1] == "resnet50" and len(calls) == 4 and third["resnet50"]["value"] == 4
    assert third["streaming"]["value"] == 3
    for record in third.values():
        assert set(record["scale_run"]) >= {"finished", "part_seconds", "load_average_before", "cpu_count", "command"}


def test_a_part_that_fails_leaves_the_finished_ones_saved(tmp_path):
    path = tmp_path / "scale.json"

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        bench.run_parts(path, ["resnet50", "mobilenet_v2"], {"resnet50": lambda: {"value": 1}, "mobilenet_v2": boom},
                        say=lambda _: None)
    assert list(json.loads(path.read_text())) == ["resnet50"]


def test_extrapolation_scales_each_group_by_its_units_and_the_images_to_256():
    # 10 s sampled, 2 s without units -> 8 s of ablations, split 3:1 over groups a and b
    out = bench.extrapolate(10.0, 2.0, {"a": 3.0, "b": 1.0}, {"a": [0, 1], "b": [0]}, {"a": 10, "b": 4}, images=2)
    every_unit = 6.0 * 10 / 2 + 2.0 * 4 / 1  # 38 s on 2 images
    assert out["ms_per_unit_image_sampled"] == pytest.approx(1000 * 8.0 / (3 * 2), abs=0.01)
    assert out["ms_per_unit_image_all_units"] == pytest.approx(1000 * every_unit / (14 * 2), abs=0.01)
    assert out["hours_256"] == pytest.approx((every_unit + 2.0) / 2 * 256 / 3600, abs=0.01)


def test_a_small_model_measured_then_reported_from_the_json_alone(tmp_path):
    record = bench.measure_model("resnet18", size=32, per_group=1, images=2, approx_images=2)
    assert record["units"] > 0 and record["sample"]["units"] == record["groups"]
    assert record["sample"]["rows_total"] == record["sample"]["units"] * 2
    assert record["kl_cpu"]["hours_256"] > 0 and record["kl_approx_cpu_s_256"] > 0 and record["peak_rss_mb"] > 0
    path = tmp_path / "scale.json"
    results = bench.run_parts(path, ["resnet50"], {"resnet50": lambda: dict(record)}, say=lambda _: None)
    md = bench.markdown(json.loads(path.read_text()))
    assert f"{record['units']:,} ({record['groups']})" in md and f"**{record['kl_cpu']['hours_256']:,.1f} h**" in md
    assert "torchvision:mobilenet_v2 | not measured" in md and "No GPU figure has been measured" in md
    assert results["resnet50"]["scale_run"]["command"] in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "scale.json"
    assert bench.main(["--device", "cuda", "--json", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err
    assert not path.exists() and not path.with_suffix(".md").exists()
