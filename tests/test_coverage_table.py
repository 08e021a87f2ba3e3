"""The coverage sweep's tooling (scripts/coverage_table.py and its modules, issue 23 "Coverage,
measured"): the resumable rows file (a finished model is never measured again), shards without
overlap, the model filter, the prunable share of channels on a model small enough to count by
hand, its medians, and the report written from the rows file alone."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import coverage_report  # noqa: E402
import coverage_table  # noqa: E402
from coverage_measure import all_names, channel_counts  # noqa: E402
from coverage_rows import RowsFile, matching, shard, todo  # noqa: E402

from curlprune.cost.analysis import trace  # noqa: E402


class Tiny(nn.Module):
    """conv(3->8) -> BN -> ReLU -> conv(8->4) -> ReLU -> mean over H, W -> Linear(4->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.bn(self.a(x))))).mean((2, 3)))


def test_prunable_share_of_channels_on_a_tiny_model():
    groups = trace(Tiny().eval(), torch.randn(1, 3, 8, 8))
    widths = sorted((g.width, g.prunable) for g in groups)
    # the model input (3, not prunable), a's output (8), b's output (4), the logits (2, not prunable)
    assert widths == [(2, False), (3, False), (4, True), (8, True)]
    counts = channel_counts(groups)
    assert counts["channels_prunable"] == 12 and counts["channels_all"] == 17
    assert counts["share"] == pytest.approx(12 / 17)


def test_median_share_counts_a_failed_model_as_zero_and_leaves_out_a_timeout():
    rows = [{"status": "ok", "share": 0.8}, {"status": "partly", "share": 0.5}, {"status": "crash", "share": 0.9},
            {"status": "timeout"}]
    assert [coverage_report.share_of(r) for r in rows] == [0.8, 0.5, 0.0, None]
    assert coverage_report.median_share(rows) == "50.0% of 3 models"


def test_rows_file_keeps_the_first_row_of_an_id_and_replace_is_atomic(tmp_path):
    store = RowsFile(tmp_path / "rows.jsonl")
    assert store.append({"id": "curl:a", "v": 1})
    assert not store.append({"id": "curl:a", "v": 2})  # another shard finished it first
    assert store.append({"id": "tp:a", "v": 3})
    with open(store.path, "a") as fh:
        fh.write('{"id": "curl:b", "v"')  # a line cut by a killed process
    assert {k: r["v"] for k, r in store.read().items()} == {"curl:a": 1, "tp:a": 3}
    assert store.append({"id": "curl:b", "v": 4})  # written on its own line after the torn one
    store.replace({"id": "curl:a", "v": 5})
    assert {k: r["v"] for k, r in store.read().items()} == {"curl:a": 5, "tp:a": 3, "curl:b": 4}
    assert len(store.path.read_text().splitlines()) == 3 and not list(tmp_path.glob("*.tmp*"))


def test_todo_skips_finished_pairs_unless_redone():
    names = ["timm:x", "timm:y"]
    done = {"curl:timm:x", "tp:timm:x", "curl:timm:y"}
    assert todo(names, ["curl", "tp"], done) == [("timm:y", "tp")]
    assert todo(names, ["curl", "tp"], done, ["timm:x"]) == [("timm:x", "curl"), ("timm:x", "tp"), ("timm:y", "tp")]
    assert todo(names, ["curl"], done, ["tp:timm:x"]) == []


def test_shards_split_the_models_without_overlap_and_globs_select_them():
    names = all_names()
    assert len(names) == len(set(names))
    parts = [shard(names, f"{i}/2") for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(names) and not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="need 0 <= i < n"):
        shard(names, "2/2")
    dense = matching(names, "segmentation:*,detection:*")
    assert {"segmentation:fcn_resnet50", "segmentation:deeplabv3_mobilenet_v3_large", "segmentation:lraspp_mobilenet_v3_large",
            "detection:fasterrcnn_resnet50_fpn.backbone", "detection:fasterrcnn_mobilenet_v3_large_fpn.backbone",
            "detection:retinanet_resnet50_fpn.backbone", "detection:fcos_resnet50_fpn.backbone",
            "detection:ssdlite320_mobilenet_v3_large.backbone"} <= set(dense)
    assert matching(names, "resnet18") == ["torchvision:resnet18", "timm:resnet18"]


@pytest.mark.slow
def test_a_finished_model_is_not_measured_again_and_redo_replaces_it(tmp_path, capsys):
    rows = tmp_path / "coverage.jsonl"
    name = "torchvision:squeezenet1_1"
    assert coverage_table.main(["--models", name, "--tool", "curl", "--rows", str(rows)]) == 0
    first = RowsFile(rows).read()
    row = first[f"curl:{name}"]
    assert row["status"] == "ok" and 0 < row["share"] < 1 and row["channels_prunable"] < row["channels_all"]
    before = rows.read_bytes()
    assert coverage_table.main(["--models", name, "--tool", "curl", "--rows", str(rows)]) == 0
    assert "0 to measure" in capsys.readouterr().out
    assert rows.read_bytes() == before  # nothing measured, nothing written
    store = RowsFile(rows)
    store.replace({**row, "status": "timeout"})  # as a shard killed by its time limit leaves it
    assert coverage_table.main(["--models", name, "--tool", "curl", "--rows", str(rows)]) == 0
    assert "0 to measure" in capsys.readouterr().out  # a timeout is finished too, unless --retry
    assert coverage_table.main(["--models", name, "--tool", "curl", "--rows", str(rows), "--retry"]) == 0
    assert "1 to measure" in capsys.readouterr().out and store.read()[f"curl:{name}"]["status"] == "ok"
    store.replace({**row, "stale": True})
    assert coverage_table.main(["--models", name, "--tool", "curl", "--rows", str(rows), "--redo", name]) == 0
    again = store.read()
    assert list(again) == [f"curl:{name}"] and len(rows.read_text().splitlines()) == 1
    assert "stale" not in again[f"curl:{name}"] and again[f"curl:{name}"]["channels_all"] == row["channels_all"]
    out = tmp_path / "coverage.md"
    assert coverage_table.main(["--report", "--rows", str(rows), "--out", str(out)]) == 0
    text = out.read_text()
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    assert f"{row['channels_prunable']:,} / {row['channels_all']:,} | {row['share']:.1%}" in line
    assert f"torchvision {row['share']:.1%} of 1 models" in text and "dense prediction no models yet" in text
    assert json.loads(rows.read_text())["versions"]["curlprune_commit"]
