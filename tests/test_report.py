"""Run reports: figures of a real pipeline run on digits, and notes (not tracebacks) for damaged runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from curlprune.errors import CurlpruneError
from curlprune.report.figures import build_figures, write_report

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {  # real digits, 30 training images per class: prune -> distill (2 epochs) -> refine (1 epoch)
    "model": "small:resnet-digits",
    "data": "digits",
    "train_per_class": 30,
    "seed": 0,
    "stages": ["prune", "distill", "refine"],
    "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
    "distill": {"epochs": 2, "warmup_epochs": 0.5, "batch_size": 32},
    "refine": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A real `curlprune run` on the digits: a teacher trained for a few epochs, then the tiny pipeline."""
    from curlprune.data.digits import train_digits_model

    directory = tmp_path_factory.mktemp("report-run")
    teacher = directory / "teacher.pt"
    torch.save(train_digits_model(seed=0, epochs=4).state_dict(), teacher)
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump({**TINY, "weights": str(teacher), "run_dir": str(directory / "run")}))
    done = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", str(config)], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # `curlprune run` writes the report at the end by default and says where
    assert "report:" in done.stdout and (directory / "run" / "report" / "index.md").is_file()
    return directory / "run"


def labels(fig) -> set[tuple[str, str]]:
    return {(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes}


def test_figures_of_a_real_run_have_their_axes(demo_run):
    built = build_figures(demo_run)
    try:
        assert set(built.figures) == {"widths", "scores", "training-distill", "training-refine", "summary"}, built.notes
        assert built.notes == []
        widths = built.figures["widths"].axes[0]
        assert (widths.get_xlabel(), widths.get_ylabel()) == ("channel group", "channels (outline: before, filled: kept)")
        report = json.loads((demo_run / "prune" / "report.json").read_text())
        # one before + one after bar per prunable group, heights from report.json, both colours used
        assert len(widths.patches) == 2 * len(report["groups"])
        after = [p.get_height() for p in widths.patches[len(report["groups"]):]]
        assert after == [g["after"] for g in report["groups"].values()]
        kinds = {g["kind"] for g in report["groups"].values()}
        assert len({tuple(p.get_facecolor()) for p in widths.patches[len(report["groups"]):]}) == len(kinds) == 2
        scores_ax = built.figures["scores"].axes[0]
        assert scores_ax.get_yscale() == "log" and scores_ax.get_ylabel() == "channel score (log scale)"
        assert any(line.get_linestyle() == "--" for line in scores_ax.get_lines())  # the cut
        for stage, epochs in (("distill", 2), ("refine", 1)):
            fig = built.figures[f"training-{stage}"]
            assert labels(fig) == {("epoch", "training loss"), ("epoch", "top-1 (%)")}
            assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [epochs]
            assert {line.get_label() for line in fig.axes[1].get_lines()} == {"train top-1", "test top-1"}
        assert labels(built.figures["summary"]) == {("model", "test top-1 (%)"), ("cost", "fraction of the unpruned model")}
        summary = json.loads((demo_run / "summary.json").read_text())
        assert built.summary["top1"]["unpruned"] == pytest.approx(summary["unpruned_top1"])
        assert built.summary["ratios"]["MACs"] == pytest.approx(summary["macs_ratio"])
    finally:
        built.close()


def test_write_report_writes_every_figure(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    index = write_report(run)
    assert index == run / "report" / "index.md"
    text = index.read_text()
    for name in ("widths", "scores", "training-distill", "training-refine", "summary"):
        png = run / "report" / f"{name}.png"
        assert f"({name}.png)" in text
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
            assert np.asarray(image.convert("L")).std() > 5  # something is drawn
    assert "Left out" not in text
    assert not list((run / "report").glob("*.tmp*"))


def test_damaged_run_gives_notes_not_a_traceback(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "prune" / "report.json").write_text('{"model": "x", "groups": ')  # cut mid-write
    (run / "prune" / "scores.npz").write_bytes(b"PK\x03\x04 not a zip")
    with open(run / "distill" / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "loss": \n')
    (run / "refine" / "metrics.jsonl").unlink()
    index = write_report(run)
    text = index.read_text()
    assert "## Left out" in text
    assert "kept width per group: left out, prune/report.json is not readable JSON" in text
    assert "score distribution: left out, prune/scores.npz is not a readable scores file" in text
    assert "1 unreadable line(s) of distill/metrics.jsonl were skipped" in text
    assert (run / "report" / "training-distill.png").is_file()  # the readable epochs are still drawn
    assert not (run / "report" / "training-refine.png").exists()
    assert (run / "report" / "summary.png").is_file()  # from summary.json


def test_measured_latency_appears_in_the_summary(demo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    report = json.loads((run / "prune" / "report.json").read_text())
    # the keys curlprune.select.latency_select.LatencySelection.latency_dict() writes (checked in test_latency)
    report["selection"]["latency"] = {"achieved_fraction": 0.62, "achieved_ms": 3.1, "reference_ms": 5.0, "batch": 64, "threads": 1}
    (run / "prune" / "report.json").write_text(json.dumps(report))
    built = build_figures(run)
    try:
        cost_ax = built.figures["summary"].axes[1]
        assert [t.get_text() for t in cost_ax.get_xticklabels()] == ["MACs", "params", "latency"]
        assert cost_ax.patches[2].get_height() == pytest.approx(0.62)
    finally:
        built.close()
    assert "| latency, batch 64, 1 thread(s) | 3.1 ms (unpruned 5 ms) |" in write_report(run).read_text()


def test_prune_only_and_empty_run_dirs(demo_run, tmp_path):
    prune_only = tmp_path / "p"
    shutil.copytree(demo_run / "prune", prune_only)  # `curlprune prune --out p` puts its files at the top
    built = build_figures(prune_only)
    try:
        assert {"widths", "scores", "summary"} <= set(built.figures)
        assert any("no recovery stage" in note for note in built.notes)
    finally:
        built.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    built = build_figures(empty)  # reading an empty folder gives notes ...
    try:
        notes = "\n".join(built.notes)
    finally:
        built.close()
    assert "kept width per group: left out, report.json is missing" in notes
    assert "accuracy / MACs / latency summary: left out" in notes
    with pytest.raises(CurlpruneError, match="holds no curlprune run"):  # ... but no report is written into it (issue 18)
        write_report(empty)
    assert list(empty.iterdir()) == []
    with pytest.raises(CurlpruneError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def layout_problems(fig) -> list[str]:
    """What a reader would see wrong: a legend over the data area, a text running off the canvas."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    problems = []
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # inches -> pixels
    if tight.x0 < canvas.x0 - 1 or tight.y0 < canvas.y0 - 1 or tight.x1 > canvas.x1 + 1 or tight.y1 > canvas.y1 + 1:
        problems.append(f"drawn extent {tight.bounds} outside the canvas {canvas.bounds}")
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            if box.overlaps(ax.get_window_extent(renderer)):
                problems.append(f"legend {box.bounds} over the axes {ax.get_window_extent(renderer).bounds}")
    return problems


def test_group_figures_keep_the_legend_off_the_data_and_every_text_on_the_canvas(demo_run):
    built = build_figures(demo_run)
    try:
        for name in ("widths", "scores"):
            fig = built.figures[name]
            assert fig.legends, name  # the legend is the figure's, below the axes
            assert layout_problems(fig) == [], name
    finally:
        built.close()


@pytest.fixture(scope="module")
def many_groups_run(tmp_path_factory) -> Path:
    """A real prune run of torchvision's EfficientNet-B0 (40 channel groups; random weights, l1, 64 px input)."""
    out = tmp_path_factory.mktemp("effnet") / "run"
    done = subprocess.run([sys.executable, "-m", "curlprune.cli", "prune", "--model", "torchvision:efficientnet_b0", "--criterion", "l1",
                           "--target-macs", "0.5", "--input-size", "64", "--out", str(out), "--no-report"],
                          env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_forty_groups_become_rows_that_can_be_read(many_groups_run):
    report = json.loads((many_groups_run / "report.json").read_text())
    assert len(report["groups"]) >= 40
    built = build_figures(many_groups_run)
    try:
        for name in ("widths", "scores"):
            fig = built.figures[name]
            ax = fig.axes[0]
            assert ax.get_ylabel() == "channel group"  # groups are rows
            assert [t.get_text() for t in ax.get_yticklabels()] == list(report["groups"])
            assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 7
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
            assert all(a.y0 >= b.y1 - 0.5 or b.y0 >= a.y1 - 0.5 for a, b in zip(boxes, boxes[1:])), name  # no two names overlap
            assert layout_problems(fig) == [], name
    finally:
        built.close()
