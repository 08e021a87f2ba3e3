"""Early stopping on validation top-1 (issue 19 item 1): the stage keeps its best epoch, stops after
``patience`` epochs without improvement, and a run killed mid-stage resumes with the same best-so-far
and patience counter. Real computation: a pretrained digits model with a new classifier, fine-tuned
on 10 images per class at a learning rate warmed up far too high (tests/recover_job.py --early-stop),
so validation top-1 peaks early and collapses after."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curlprune.data import data as datasets
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.run.pipeline import Run
from curlprune.data.digits import train_digits_model
from curlprune.recover import DistillConfig, FinetuneConfig, distill, finetune
from curlprune.run.run_config import parse_config
from recover_job import MODEL, tiny_data
from recover_support import ENV, JOB, kill_mid_epoch

PATIENCE = 2


def run_job(run_dir: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, str(JOB), str(run_dir), "--early-stop", *args], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics_of(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    return metrics_of(run_dir, "finetune")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("early")
    run_job(run_dir)
    return run_dir


def test_keeps_the_best_epoch_and_stops_after_patience(reference):
    records = metrics(reference)
    vals = [r["val_top1"] for r in records]
    best_epoch = vals.index(max(vals)) + 1
    done = json.loads((reference / "finetune" / "done.json").read_text())
    assert done["best_epoch"] == best_epoch and done["best_val_top1"] == done["val_top1"] == max(vals)
    assert len(records) == done["epochs"] == best_epoch + PATIENCE < done["config"]["epochs"]  # stopped early
    assert vals[-1] < max(vals) and vals[-2] < max(vals)  # the case is real: later epochs are worse on validation
    assert done["last_top1"] == records[best_epoch - 1]["test_top1"]  # the output model's test top-1

    final = load_file(str(reference / "finetune" / "model.safetensors"))
    state = load_file(str(reference / "finetune" / "state.safetensors"))
    last = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    kept = {k.removeprefix("early."): v for k, v in state.items() if k.startswith("early.")}
    assert final.keys() == last.keys() == kept.keys()
    assert all(torch.equal(final[k], kept[k]) for k in final)  # the best epoch's weights ...
    assert any(not torch.equal(final[k], last[k]) for k in final)  # ... not the last epoch's
    model = build(MODEL)
    model.load_state_dict(final)
    data = tiny_data(None, reference, val=True)
    assert 100 * datasets.evaluate(model, data["val"], input_spec(MODEL)) == pytest.approx(max(vals))
    assert 100 * datasets.evaluate(model, data["test"], input_spec(MODEL)) == pytest.approx(done["last_top1"])


def test_killed_after_a_worse_epoch_resumes_with_the_same_best_and_counter(tmp_path, reference):
    records = metrics(reference)
    best_epoch = json.loads((reference / "finetune" / "done.json").read_text())["best_epoch"]
    trip = best_epoch + 2  # after one epoch without improvement: best-so-far and counter (1) are in the state
    assert trip <= len(records)
    kill_mid_epoch(tmp_path, "--early-stop", "--trip", "finetune", "--trip-epoch", str(trip))
    assert not (tmp_path / "finetune" / "done.json").exists()
    assert len(metrics(tmp_path)) == trip - 1

    run_job(tmp_path)

    def without_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_seconds(metrics(tmp_path)) == without_seconds(records)
    ours, theirs = (json.loads((d / "finetune" / "done.json").read_text()) for d in (tmp_path, reference))
    assert {k: v for k, v in ours.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    a, b = (load_file(str(d / "finetune" / "model.safetensors")) for d in (tmp_path, reference))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_early_stop_without_a_validation_split_is_refused(tmp_path):
    data = tiny_data(None, tmp_path)  # no val split
    cfg = FinetuneConfig(epochs=2, progress=False, device="cpu", early_stop={"patience": 1})
    with pytest.raises(CurlpruneError, match="early_stop monitors validation top-1 and needs a validation split"):
        finetune(build(MODEL), data, input_spec(MODEL), cfg, tmp_path)
    assert not (tmp_path / "finetune").exists()
    config = parse_config({"model": MODEL, "data": "digits", "run_dir": str(tmp_path / "run"), "stages": ["finetune"],
                           "finetune": {"epochs": 1, "early_stop": {"patience": 1}, "device": "cpu"}})
    with pytest.raises(CurlpruneError, match="set val_per_class or val_fraction"):
        Run(config).run()
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("value, message", [
    ({"patience": 0}, "patience must be a whole number of epochs >= 1"),
    ({"patience": 2.5}, "patience must be a whole number of epochs >= 1"),
    ({"min_delta": 0.1}, "patience must be a whole number"),
    ({"patience": 2, "min_delta": -1}, "min_delta must be a number of top-1 points >= 0"),
    ({"patience": 2, "mode": "max"}, "unknown key 'mode'"),
    (5, "'early_stop' must be a mapping or null (got 5)"),
])
def test_bad_early_stop_settings_are_one_line(value, message):
    with pytest.raises(CurlpruneError) as caught:
        parse_config({"model": MODEL, "stages": ["distill"], "val_per_class": 5, "distill": {"early_stop": value}}, "c.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_canonical_form_makes_equal_settings_equal():
    assert FinetuneConfig(early_stop={"patience": 3}).early_stop == FinetuneConfig(early_stop={"patience": 3.0, "min_delta": 0}).early_stop


def test_distill_stops_on_validation_too(tmp_path):
    """The same hook in the distill stage (with ce_weight): a random student taught by the trained digits model,
    patience 1; the output is the best epoch's weights, and a stop comes right after it."""
    data = tiny_data(None, tmp_path, val=True)
    teacher = train_digits_model(0, epochs=4)
    torch.manual_seed(2)
    student = build(MODEL)
    cfg = DistillConfig(epochs=6, batch_size=16, lr=0.1, warmup_epochs=0.0, seed=1, progress=False, device="cpu",
                        early_stop={"patience": 1}, ce_weight=0.5)
    result = distill(student, teacher, data, input_spec(MODEL), cfg, tmp_path)
    records = metrics_of(tmp_path, "distill")
    vals = [r["val_top1"] for r in records]
    done = json.loads((tmp_path / "distill" / "done.json").read_text())
    assert done["best_epoch"] == result.best_epoch == vals.index(max(vals)) + 1
    assert done["val_top1"] == max(vals) == result.val_top1
    state = load_file(str(tmp_path / "distill" / "state.safetensors"))
    final = load_file(str(tmp_path / "distill" / "model.safetensors"))
    assert all(torch.equal(final[k], state["early." + k]) for k in final)
    if len(records) < cfg.epochs:  # stopped: the epoch after the best did not improve
        assert len(records) == done["best_epoch"] + 1
