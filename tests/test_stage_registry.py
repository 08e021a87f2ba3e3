"""The recovery-stage table (curlprune.recover.registry) is what the run config, the pipeline, the
commands and the report read: a stage registered in a test (label-smoothed cross-entropy, one file's
worth of code and one row) is validated in a config, trained by the pipeline, has a command and
gets its training curves in the report; unregistered, it is an unknown stage again."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from curlprune.cli import build_parser
from curlprune.errors import CurlpruneError
from curlprune.recover import DistillConfig, FinetuneConfig, RefineConfig
from curlprune.recover.registry import RecoveryStage, get_stage, recovery_stages, register_stage, unregister_stage
from curlprune.recover.stage import Stage, TrainConfig
from curlprune.report.figures import build_figures
from curlprune.run.pipeline import Run
from curlprune.run.run_config import all_stages, parse_config, stage_config


@dataclass
class SmoothConfig(TrainConfig):
    """Label-smoothed cross-entropy: ``smoothing`` of the target mass spread over the classes."""

    epochs: int = 1
    smoothing: float = 0.1


class SmoothStage(Stage):
    name = "smooth"

    def loss(self, model, x, y, index):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.smoothing), logits


SMOOTH = RecoveryStage("smooth", SmoothConfig, lambda cfg, teacher, head: SmoothStage(cfg),
                       help="recover accuracy with label-smoothed cross-entropy")


@pytest.fixture
def smooth():
    register_stage(SMOOTH)
    try:
        yield SMOOTH
    finally:
        unregister_stage("smooth")


def test_the_table_holds_the_built_in_stages():
    assert [(s.name, s.config, s.needs_teacher, s.transfer) for s in recovery_stages()] == [
        ("finetune", FinetuneConfig, False, True), ("distill", DistillConfig, True, False), ("refine", RefineConfig, True, False)]
    assert all_stages() == ("prune", "finetune", "distill", "refine")
    assert all(stage_config(s.name) is s.config for s in recovery_stages())
    with pytest.raises(CurlpruneError, match="unknown recovery stage 'polish'"):
        get_stage("polish")
    with pytest.raises(ValueError, match="registered twice"):
        register_stage(RecoveryStage("distill", DistillConfig, lambda cfg, teacher, head: None, help="again"))
    with pytest.raises(ValueError, match="lacks body_lr_mult, head_epochs, new_head"):
        register_stage(RecoveryStage("other", SmoothConfig, lambda cfg, teacher, head: None, help="x", transfer=True))


def test_a_registered_stage_is_validated_by_the_config(smooth):
    cfg = parse_config({"model": "small:resnet-digits", "stages": ["prune", "smooth"], "prune": {"target_macs": 0.5}, "smooth": {"smoothing": 0.2}})
    assert isinstance(cfg.sections["smooth"], SmoothConfig) and cfg.sections["smooth"].smoothing == 0.2
    with pytest.raises(CurlpruneError, match="unknown key 'smothing' in section 'smooth'; valid keys: .*smoothing"):
        parse_config({"model": "small:resnet-digits", "stages": ["smooth"], "smooth": {"smothing": 0.2}})
    with pytest.raises(CurlpruneError, match="'prune' must be the first stage, or follow only 'finetune'"):
        parse_config({"model": "small:resnet-digits", "stages": ["smooth", "prune"]})
    assert build_parser().parse_args(["smooth", "--epochs", "2"]).epochs == 2  # a command of its own


def test_an_unregistered_stage_is_unknown():
    with pytest.raises(CurlpruneError, match="unknown stage 'smooth'; stages are prune, finetune, distill, refine"):
        parse_config({"model": "small:resnet-digits", "stages": ["smooth"]})


def test_the_pipeline_and_the_report_run_a_registered_stage(smooth, tmp_path):
    torch.manual_seed(0)
    cfg = parse_config({"model": "small:resnet-digits", "data": "digits", "train_per_class": 10, "run_dir": str(tmp_path / "run"),
                        "stages": ["smooth"], "smooth": {"epochs": 2, "batch_size": 20, "progress": False, "device": "cpu",
                                                         "channels_last": False}})
    summary = Run(cfg).run()
    assert list(summary["stages"]) == ["smooth"] and summary["stages"]["smooth"]["epochs"] == 2
    done = json.loads((tmp_path / "run" / "smooth" / "done.json").read_text())
    assert done["stage"] == "smooth" and done["epochs"] == 2 and done["config"]["smoothing"] == 0.1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["smooth"] == {
        "epochs": 2, "last_top1": done["last_top1"], "best_top1": done["best_top1"], "seconds": round(done["seconds"], 1),
        "checkpoint": str(tmp_path / "run" / "smooth" / "checkpoint.safetensors")}
    lines = (tmp_path / "run" / "smooth" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    built = build_figures(tmp_path / "run")
    try:
        assert "training-smooth" in built.figures and "after smooth" in built.summary["top1"]
    finally:
        built.close()
