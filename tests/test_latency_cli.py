"""The latency target and the report from the command line: validation, a real measured prune on the
digits model, the report written at the end (or not), and `curlprune report` on a damaged folder."""
from __future__ import annotations

import json

import pytest
import torch

from curlprune.cost.analysis import trace
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.run.prune import PruneConfig
from curlprune.select.allocation import COST_WEIGHTED, ranking_scores
from curlprune.select.search import rank_units, walk
from curlprune.store.scores_io import read_scores

from trust_support import cli  # noqa: F401 (a fixture: the command in this process, one thread; tests/test_cli.py runs it as a process)

BASE = ["prune", "--model", "small:resnet-digits", "--criterion", "l1", "--eval-limit", "0"]


@pytest.mark.parametrize("extra, words", [
    (["--target-latency", "2"], "(0, 1]"),
    (["--target-latency", "12 parsecs"], "unknown unit"),
    (["--target-latency", "fast"], "not a number"),
    (["--target-latency", "0.5", "--latency-batch", "0"], "latency_batch"),
    (["--target-latency", "0.5", "--latency-threads", "-1"], "latency_threads"),
])
def test_bad_latency_options_are_one_line_exit_2(cli, tmp_path, extra, words):
    done = cli(*BASE, "--out", str(tmp_path / "out"), *extra)
    assert done.returncode == 2 and words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_exactly_one_target_and_config_fields(cli, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse: the two targets are mutually exclusive
        cli(*BASE, "--out", "x", "--target-macs", "0.5", "--target-latency", "0.5")
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(CurlpruneError, match="exactly one target"):
        PruneConfig(target_macs=0.5, target_latency="12ms")
    config = PruneConfig(target_latency="12ms", latency_batch=8, latency_threads=1)
    assert config.target() is None and config.latency_target().ms == pytest.approx(12.0)


def test_prune_to_a_measured_latency_on_digits_writes_the_report(cli, tmp_path):
    """Real clock on a loaded machine: the tiny digits model is overhead-bound (its fastest plan measures
    ~0.8 of the unpruned latency), so the goal is loose; what matters is the path end to end."""
    out = tmp_path / "fast"
    done = cli(*BASE, "--target-latency", "0.97", "--latency-batch", "32", "--latency-threads", "1", "--allocation", "cost-weighted",
               "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    latency = report["selection"]["latency"]
    assert report["selection"]["target"]["metric"] == "latency"
    assert latency["goal_fraction"] == pytest.approx(0.97) and latency["batch"] == 32 and latency["threads"] == 1
    assert latency["reference_ms"] > 0 and latency["achieved_ms"] > 0 and latency["evaluations"] >= 1
    assert 0 < report["selection"]["macs_ratio"] <= 1  # MACs next to the latency
    settings = json.loads((out / "done.json").read_text())["settings"]["config"]
    assert (settings["target_latency"], settings["latency_batch"], settings["latency_threads"]) == (0.97, 32, 1)  # one canonical form (issue 18 item 7)
    assert "measured latency" in done.stdout and "report:" in done.stdout
    # the latency search walks the same ranking as a MACs target would: here score / MACs saved
    assert report["allocation"] == "cost-weighted"
    model = build("small:resnet-digits").eval()
    groups = trace(model, torch.zeros(1, 1, 8, 8))
    scores, _ = read_scores(out / "scores.npz")
    ranked, normalize = ranking_scores(groups, scores, COST_WEIGHTED, "latency")
    plan = json.loads((out / "plan.json").read_text())
    assert walk(rank_units(groups, ranked, normalize=normalize), groups, report["selection"]["top_k"], 0.3).plan() == plan
    index = (out / "report" / "index.md").read_text()
    assert "latency, batch 32" in index and (out / "report" / "widths.png").stat().st_size > 0


def test_no_report_skips_it_and_report_command_notes_damage(cli, tmp_path):
    out = tmp_path / "half"
    done = cli(*BASE, "--target-macs", "0.5", "--out", str(out), "--no-report")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "report.json").is_file() and not (out / "report").exists()
    (out / "report.json").write_text("{ not json")
    done = cli("report", str(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "note:" in done.stdout and "report.json" in done.stdout
    assert (out / "report" / "index.md").is_file()
    missing = cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
