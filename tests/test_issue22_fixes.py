"""Small fixes of issue 22 (item 8): summary.json's best top-1 is the pruned model's, the report
lists the steps in time order, ``prune`` on data without a test split says so, and piped
``curlprune groups`` prints the group names whole."""
from __future__ import annotations

import torch

from curlprune.cli import main
from curlprune.data.data import load_digits_dataset
from curlprune.data.digits import train_digits_model
from curlprune.report.figures import RunFiles, summary_numbers
from curlprune.models import build
from curlprune.cost.analysis import trace
from curlprune.run.prune import run_prune
from curlprune.run.prune_config import PruneConfig
from curlprune.report.report import print_summary
from curlprune.store.records import GroupWidth, PruneAccuracy, PruneReport, PruneStep, RunSummary, TrainStep, write_prune_report, write_run_summary


def _transfer_summary() -> dict:
    """finetune (the unpruned model on the new data) -> prune -> distill: the fine-tuned teacher
    scores higher than the pruned model ever does."""
    return {"finetune": TrainStep(3, 95.0, 96.0, 1.0, "finetune"),
            "prune": PruneStep("kl", 0.5, 0.4, 95.0, 30.0, "prune/model.safetensors", 70.0),
            "distill": TrainStep(3, 88.0, 90.0, 1.0, "distill")}


def test_best_top1_is_the_pruned_models_best():
    summary = RunSummary.build("small:resnet-digits", _transfer_summary(), (1.0, 1.0), (2.0, 2.0), "model.safetensors")
    assert summary.best_top1 == 90.0 and summary.last_top1 == 88.0
    assert summary.to_json()["best_top1"] == 90.0
    plain = {"prune": _transfer_summary()["prune"], "distill": TrainStep(2, 80.0, 85.0, 1.0, "d"), "refine": TrainStep(2, 84.0, 84.0, 1.0, "r")}
    assert RunSummary.build("m", plain, (1.0, 1.0), (2.0, 2.0), "m").best_top1 == 85.0
    only_trained = {"finetune": TrainStep(2, 80.0, 81.0, 1.0, "f")}  # a finetune-only run: its own best
    assert RunSummary.build("m", only_trained, (1.0, 1.0), (1.0, 1.0), "m").best_top1 == 81.0


def test_report_steps_are_in_time_order(tmp_path):
    stages = _transfer_summary()
    write_run_summary(tmp_path, RunSummary.build("small:resnet-digits", stages, (1.0, 1.0), (2.0, 2.0), "model.safetensors"))
    (tmp_path / "prune").mkdir()
    write_prune_report(tmp_path / "prune", PruneReport("small:resnet-digits", None, "kl", "cost-weighted", {"macs_ratio": 0.5, "params_ratio": 0.4},
                                                       PruneAccuracy(360, 95.0, 30.0, 1437, 70.0), {"conv1": GroupWidth("outside", 16, 8)}))
    top1 = summary_numbers(RunFiles(tmp_path))["top1"]
    assert list(top1) == ["unpruned", "after finetune", "pruned, no training", "pruned, BN re-estimated", "after distill"]
    assert top1["pruned, BN re-estimated"] == 70.0 and top1["after distill"] == 88.0


def test_prune_report_alone_shows_the_bn_step(tmp_path):
    write_prune_report(tmp_path, PruneReport("m", None, "kl", "cost-weighted", {"macs_ratio": 0.5, "params_ratio": 0.4},
                                             PruneAccuracy(360, 95.0, 30.0, 1437, 70.0), {"conv1": GroupWidth("outside", 16, 8)}))
    assert list(summary_numbers(RunFiles(tmp_path))["top1"].items()) == [
        ("unpruned", 95.0), ("pruned, no training", 30.0), ("pruned, BN re-estimated", 70.0)]


def test_prune_without_a_test_split_says_so(tmp_path, capsys):
    weights = tmp_path / "digits.pt"
    torch.save(train_digits_model(seed=0, epochs=2).state_dict(), weights)
    train_only = {"train": load_digits_dataset(seed=0)["train"]}
    result = run_prune(PruneConfig(target_macs=0.5, calib=64), tmp_path / "run", model_name="small:resnet-digits",
                       weights=str(weights), data=train_only)
    said = [line for line in capsys.readouterr().out.splitlines() if "test split" in line]
    assert len(said) == 1 and "top-1 is not evaluated" in said[0]
    assert result.report.accuracy.test_images == 0 and result.report.accuracy.bn_images == 1437
    run_prune(PruneConfig(target_macs=0.5, calib=64, eval_limit=0), tmp_path / "quiet", model_name="small:resnet-digits",
              weights=str(weights), data=train_only)
    assert "test split" not in capsys.readouterr().out  # evaluation turned off on purpose: nothing to say


def test_piped_groups_prints_whole_names(capsys):
    model = "torchvision:efficientnet_b0"
    names = [g.name for g in trace(build(model).eval(), torch.zeros(1, 3, 224, 224))]
    assert max(len(n) for n in names) > 17
    assert main(["groups", "--model", model]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["#", "group"] and lines[-1].startswith(f"{len(names)} groups")
    rows = [line.split() for line in lines[2:-1]]
    assert [row[1] for row in rows] == names
    assert "…" not in out


def test_summary_table_shows_the_bn_row(capsys):
    summary = RunSummary.build("m", _transfer_summary(), (1.0, 1.0), (2.0, 2.0), "model.safetensors")
    print_summary(summary)
    out = " ".join(capsys.readouterr().out.split())
    assert "pruned, BN re-estimated" in out and "70.00%" in out
