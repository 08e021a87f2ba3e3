"""The typed records of a run folder (curlprune.store.records): each one's writer and reader round-trip,
the JSON is the form earlier versions wrote, files of earlier versions (keys missing) still read,
and ModelRef is the checkpoint header's model reference."""
from __future__ import annotations

import json

import pytest

from curlprune.errors import CurlpruneError
from curlprune.models import ModelRef
from curlprune.store.records import (
    GroupWidth,
    PruneAccuracy,
    PruneReport,
    PruneStep,
    RecordError,
    RunSummary,
    StageSummary,
    TrainStep,
    read_prune_report,
    read_run_summary,
    read_stage_summary,
    write_prune_report,
    write_run_summary,
    write_stage_summary,
)
from curlprune.store.rundir import DONE_FILE, REPORT_FILE, SUMMARY_FILE, json_text

from records_support import rewritten

SELECTION = {"target": {"metric": "macs", "value": 0.5, "absolute": 1000.0}, "top_k": 12, "removed_channels": 12,
             "macs": 990.0, "params": 500, "full_macs": 2000.0, "full_params": 900, "macs_ratio": 0.495,
             "params_ratio": 0.5555, "protected": [], "floor": 0.05, "filled": False, "note": ""}


def prune_report(**changes) -> PruneReport:
    fields = dict(model="small:resnet-digits", weights="teacher.pt", criterion="kl", allocation="cost-weighted",
                  selection=SELECTION, accuracy=PruneAccuracy(360, 97.5, 41.25),
                  groups={"conv1": GroupWidth("outside", 16, 9), "layer1.0.conv1": GroupWidth("inside", 16, 4)},
                  scores_seconds=1.25, scores_reused=False)
    return PruneReport(**{**fields, **changes})


def run_summary() -> RunSummary:
    stages = {"prune": PruneStep("kl", 0.495, 0.5555, 97.5, 41.25, "run/prune/model.safetensors"),
              "distill": TrainStep(4, 90.25, 91.0, 3.2, "run/distill/checkpoint.safetensors"),
              "refine": TrainStep(1, 92.0, 92.0, 1.1, "run/refine/checkpoint.safetensors")}
    return RunSummary.build("small:resnet-digits", stages, (990, 500), (2000, 900), "run/model.safetensors")


def test_prune_report_round_trip_and_the_form_of_the_file(tmp_path):
    report = prune_report()
    write_prune_report(tmp_path, report)
    assert read_prune_report(tmp_path) == report
    # the file is what prune.py wrote before the record existed: these keys, this order, indent 2
    assert (tmp_path / REPORT_FILE).read_text() == json_text({
        "model": "small:resnet-digits", "weights": "teacher.pt", "criterion": "kl", "allocation": "cost-weighted",
        "selection": SELECTION, "accuracy": {"test_images": 360, "top1_before": 97.5, "top1_after": 41.25},
        "groups": {"conv1": {"kind": "outside", "before": 16, "after": 9},
                   "layer1.0.conv1": {"kind": "inside", "before": 16, "after": 4}},
        "scores_seconds": 1.25, "scores_reused": False})
    assert (report.macs_ratio, report.params_ratio, report.latency) == (0.495, 0.5555, None)


def test_prune_report_of_an_earlier_version_reads_and_rewrites_unchanged(tmp_path):
    """0.1.0 wrote no allocation (it ranked raw scores); the record reads it as None and writes it back as it was."""
    old = prune_report(allocation=None).to_json()
    assert "allocation" not in old
    (tmp_path / REPORT_FILE).write_text(json_text(old))
    report, old_bytes, new_bytes = rewritten(REPORT_FILE, tmp_path, tmp_path / "again")
    assert report.allocation is None and report.criterion == "kl" and report.groups["conv1"].after == 9
    assert new_bytes == old_bytes
    # a damaged or partial file: what is missing or of the wrong type reads as None
    (tmp_path / REPORT_FILE).write_text(json.dumps({"model": "m", "accuracy": {"top1_before": "n/a"}, "groups": {"g": 3}}))
    partial = read_prune_report(tmp_path)
    assert partial.accuracy == PruneAccuracy(None, None, None) and partial.groups == {} and partial.macs_ratio is None


def test_stage_summary_round_trip_and_an_older_file(tmp_path):
    summary = StageSummary("distill", 90.25, 91.0, 4, 3.25, {"epochs": 4, "lr": 0.01, "seed": 0})
    write_stage_summary(tmp_path, summary)
    assert read_stage_summary(tmp_path) == summary
    assert list(json.loads((tmp_path / DONE_FILE).read_text())) == ["stage", "last_top1", "best_top1", "epochs", "seconds", "config"]
    (tmp_path / DONE_FILE).write_text(json.dumps({"last_top1": 50.0, "epochs": 2}))  # keys an older file may lack
    assert read_stage_summary(tmp_path) == StageSummary(None, 50.0, None, 2, None, None)


def test_run_summary_round_trip_and_its_optional_keys(tmp_path):
    summary = run_summary()
    assert (summary.unpruned_top1, summary.pruned_top1, summary.last_top1, summary.best_top1) == (97.5, 41.25, 92.0, 92.0)
    assert summary.macs_ratio == 990 / 2000 and summary.params_ratio == 500 / 900
    write_run_summary(tmp_path, summary)
    assert read_run_summary(tmp_path) == summary
    assert list(json.loads((tmp_path / SUMMARY_FILE).read_text())) == [
        "model", "stages", "macs", "params", "base_macs", "base_params", "macs_ratio", "params_ratio", "checkpoint",
        "unpruned_top1", "pruned_top1", "last_top1", "best_top1"]
    # a run without prune (finetune only) has no unpruned/pruned keys; one without training no last/best
    trained = RunSummary.build("m", {"finetune": TrainStep(1, 80.0, 81.0, 2.0, "c")}, (10, 5), (10, 5), "r")
    assert "unpruned_top1" not in trained.to_json() and trained.to_json()["best_top1"] == 81.0
    pruned = RunSummary.build("m", {"prune": PruneStep("l1", 0.5, 0.5, None, None, "c")}, (5, 3), (10, 6), "r")
    assert pruned.to_json()["unpruned_top1"] is None and "last_top1" not in pruned.to_json()  # null when not evaluated
    for record in (trained, pruned):
        write_run_summary(tmp_path / "x", record)
        assert read_run_summary(tmp_path / "x") == record
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"model": "m", "stages": {"prune": {"criterion": "kl"}}}))
    old = read_run_summary(tmp_path)
    assert old.stages["prune"] == PruneStep("kl", None, None, None, None, None) and old.macs is None


def test_unreadable_records_say_which_file_and_why(tmp_path):
    with pytest.raises(RecordError) as missing:
        read_stage_summary(tmp_path)
    assert missing.value.reason == "missing" and missing.value.path == tmp_path / DONE_FILE
    assert isinstance(missing.value, CurlpruneError) and "delete" in str(missing.value)
    (tmp_path / SUMMARY_FILE).write_text('{"model": ')
    with pytest.raises(RecordError, match="cannot be read") as cut:
        read_run_summary(tmp_path)
    assert cut.value.reason == "unreadable"
    (tmp_path / REPORT_FILE).write_text("[1, 2]")
    with pytest.raises(RecordError, match="is not a JSON object") as array:
        read_prune_report(tmp_path)
    assert array.value.reason == "not-object"


def test_model_ref_is_the_checkpoint_headers_form():
    ref = ModelRef.of({"name": "cifar:resnet20", "kwargs": {"num_classes": 4}})
    assert ref == ModelRef("cifar:resnet20", {"num_classes": 4}) == ModelRef.of(ref)
    assert json.dumps(ref.as_dict()) == '{"name": "cifar:resnet20", "kwargs": {"num_classes": 4}}'  # key order kept
    assert ModelRef.of("cifar:resnet20").as_dict() == {"name": "cifar:resnet20", "kwargs": {}}
    assert ModelRef.of({"name": "small:resnet-digits"}).kwargs == {}
