"""The validation split (issue 21 item 1): held out of the training images, seeded, class-balanced,
deterministic across processes, never trained on (the calibration set included), reported by the
recovery stages, and kept by a resumed run. Real data: scikit-learn's digits written as PNG files."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from curlprune.store import checkpoint
from curlprune.data import data as datasets
from curlprune.cli import main
from curlprune.errors import CurlpruneError
from curlprune.report.figures import write_report
from curlprune.models import input_spec
from curlprune.run.pipeline import Run
from curlprune.run.run_data import load_splits
from curlprune.store.records import read_run_summary
from curlprune.report.report import print_summary
from curlprune.run.run_config import parse_config
from curlprune.store.scores_io import read_scores
from curlprune.data.valsplit import hold_out

MODEL = "small:resnet-digits"


def content(ds) -> list[str]:
    """SHA-256 of every image's pixels (the images' identity by content; the first channel: grey digits
    decode to three equal channels)."""
    return [hashlib.sha256(ds.images[i][0].contiguous().numpy().tobytes()).hexdigest() for i in range(len(ds))]


def write_digits_folder(root: Path, splits: dict) -> Path:
    """Every image of ``splits`` as a PNG in ``root/<split>/digit<c>/<i>.png``."""
    for split, ds in splits.items():
        for i in range(len(ds)):
            folder = root / split / f"digit{int(ds.labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(ds.images[i, 0].numpy()).save(buffer, "PNG")
            (folder / f"{i:04d}.png").write_bytes(buffer.getvalue())
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits"), datasets.load_digits_dataset(0))


def test_held_out_images_are_disjoint_from_train_and_balanced(digits_folder):
    full = datasets.load_image_folder(digits_folder, splits=("train",))["train"]
    assert len(set(content(full))) == len(full)  # no duplicate digits: content identifies an image
    splits, record = load_splits(str(digits_folder), None, 4, val_per_class=7)
    train, val = splits["train"], splits["val"]
    assert set(content(train)).isdisjoint(content(val))
    assert collections.Counter(content(train) + content(val)) == collections.Counter(content(full))  # nothing lost
    assert collections.Counter(val.labels.tolist()) == {c: 7 for c in range(10)}
    assert len(record["indices"]) == 70 and record["train_images"] == len(full)
    assert sorted(content(full.subset(record["indices"]))) == sorted(content(val))  # the record names the held-out images


def test_val_fraction_is_stratified(digits_folder):
    splits, _ = load_splits(str(digits_folder), None, 0, val_fraction=0.1)
    full = datasets.load_image_folder(digits_folder, splits=("train",))["train"]
    sizes = collections.Counter(full.labels.tolist())
    assert collections.Counter(splits["val"].labels.tolist()) == {c: max(1, round(0.1 * n)) for c, n in sizes.items()}
    assert set(content(splits["train"])).isdisjoint(content(splits["val"]))


def test_train_per_class_draws_from_what_remains(digits_folder):
    splits, _ = load_splits(str(digits_folder), 30, 0, val_per_class=20)
    assert collections.Counter(splits["train"].labels.tolist()) == {c: 30 for c in range(10)}
    assert set(content(splits["train"])).isdisjoint(content(splits["val"]))


SPLIT_IN_A_PROCESS = """
import json, sys
from curlprune.run.run_data import load_splits
print(json.dumps(load_splits(sys.argv[1], None, int(sys.argv[2]), val_per_class=5)[1]["indices"]))
"""


def test_split_is_the_same_in_another_process_and_differs_for_another_seed(digits_folder):
    def other_process(seed: int) -> list[int]:
        done = subprocess.run([sys.executable, "-c", SPLIT_IN_A_PROCESS, str(digits_folder), str(seed)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    here = load_splits(str(digits_folder), None, 3, val_per_class=5)[1]["indices"]
    assert other_process(3) == here
    assert other_process(4) != here
    digits = datasets.load_digits_dataset(0)["train"]  # the same rule on in-memory data
    assert hold_out(digits, 3, per_class=5).indices == hold_out(digits, 3, per_class=5).indices


@pytest.mark.parametrize("values, message", [
    ({"val_per_class": 0}, "'val_per_class' must be a positive whole number"),
    ({"val_per_class": 2.5}, "'val_per_class' must be a positive whole number"),
    ({"val_per_class": True}, "'val_per_class' must be a positive whole number"),
    ({"val_fraction": 0}, "'val_fraction' must be a number in (0, 1)"),
    ({"val_fraction": 1.0}, "'val_fraction' must be a number in (0, 1)"),
    ({"val_fraction": "half"}, "'val_fraction' must be a number in (0, 1)"),
    ({"val_per_class": 5, "val_fraction": 0.1}, "give val_per_class or val_fraction, not both"),
])
def test_bad_settings_are_one_line(values, message):
    with pytest.raises(CurlpruneError) as caught:
        parse_config({"model": MODEL, "stages": ["finetune"], **values}, "c.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_class_must_keep_a_training_image():
    digits = datasets.load_digits_dataset(0)["train"]
    small = datasets.class_balanced_subset(digits, 4, 0)
    with pytest.raises(CurlpruneError, match=r"class '0' has 4 training image\(s\): holding out 4 .* leaves none"):
        hold_out(small, 0, per_class=4)
    assert len(hold_out(small, 0, per_class=3).train) == 10


def test_command_line_flags_are_checked(capsys):
    assert main(["finetune", "--model", MODEL, "--val-fraction", "1.5", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val_fraction" in err[0] and "(0, 1)" in err[0], err


def test_data_with_its_own_val_split_uses_it(tmp_path):
    digits = datasets.load_digits_dataset(0)
    own = {"train": datasets.class_balanced_subset(digits["train"], 5, 0), "val": datasets.class_balanced_subset(digits["test"], 2, 0),
           "test": datasets.class_balanced_subset(digits["test"], 3, 1)}
    root = write_digits_folder(tmp_path / "d", own)
    splits, record = load_splits(str(root), None, 0)
    assert sorted(content(splits["val"])) == sorted(content(own["val"])) and len(splits["train"]) == 50
    assert record["source"] == "val/" and record["indices"] is None
    with pytest.raises(CurlpruneError, match="has its own val/ split"):
        load_splits(str(root), None, 0, val_per_class=1)


# ----- a run ------------------------------------------------------------------------------------
def run_config(run_dir: Path, teacher: Path, **changes) -> dict:
    return {"model": MODEL, "weights": str(teacher), "data": "digits", "seed": 0, "train_per_class": 30, "val_per_class": 10,
            "run_dir": str(run_dir), "stages": ["prune", "finetune"],
            "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
            "finetune": {"epochs": 2, "batch_size": 32, "progress": False, "device": "cpu"}, **changes}


@pytest.fixture(scope="module")
def val_run(tmp_path_factory, teacher) -> Path:
    run_dir = tmp_path_factory.mktemp("valrun") / "run"
    Run(parse_config(run_config(run_dir, teacher))).run()
    return run_dir


def test_run_never_calibrates_or_trains_on_the_validation_split(val_run, teacher):
    run = Run(parse_config(run_config(val_run, teacher)))
    val, train = run.data["val"], run.data["train"]
    assert set(content(train)).isdisjoint(content(val))
    # the prune stage's scores were computed on exactly the calibration images drawn from what remains
    calib = datasets.calibration_subset(train, 64, 0)
    batch = torch.cat([x for x, _ in datasets.batches(calib, input_spec(MODEL), 256)])
    _, fingerprint = read_scores(val_run / "prune" / "scores.npz")
    assert fingerprint["calib_sha256"] == hashlib.sha256(batch.contiguous().numpy().tobytes()).hexdigest()
    assert set(content(calib)).isdisjoint(content(val))


def test_stages_report_validation_top1(val_run, teacher):
    records = [json.loads(line) for line in (val_run / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["val_top1"] <= 100 for r in records)
    done = json.loads((val_run / "finetune" / "done.json").read_text())
    assert done["val_top1"] == records[-1]["val_top1"] and done["best_val_top1"] == max(r["val_top1"] for r in records)
    assert "best_epoch" not in done  # no early stopping
    summary = json.loads((val_run / "summary.json").read_text())
    assert summary["stages"]["finetune"]["val_top1"] == done["val_top1"]
    # the number is the final model's top-1 on the held-out images
    run = Run(parse_config(run_config(val_run, teacher)))
    model = checkpoint.load(val_run / "model.safetensors")
    assert 100.0 * datasets.evaluate(model, run.data["val"], input_spec(MODEL)) == pytest.approx(done["val_top1"])


def test_report_shows_validation_top1(val_run, capsys):
    done = json.loads((val_run / "finetune" / "done.json").read_text())
    index = write_report(val_run).read_text()
    assert f"| validation top-1, after finetune | {done['val_top1']:.2f}% |" in index
    print_summary(read_run_summary(val_run))
    printed = capsys.readouterr().out
    assert "val top-1" in printed and f"{done['val_top1']:.2f}%" in printed


def test_rerun_keeps_the_split_and_a_changed_split_is_refused(val_run, teacher):
    record = json.loads((val_run / "val_split.json").read_text())
    assert len(record["indices"]) == 100 and record["val_per_class"] == 10 and record["seed"] == 0
    before = (val_run / "summary.json").read_bytes()
    Run(parse_config(run_config(val_run, teacher))).run()  # everything finished: skipped, the same split
    assert (val_run / "summary.json").read_bytes() == before
    with pytest.raises(CurlpruneError, match=r"val_per_class=10 \(now 5\)"):
        Run(parse_config(run_config(val_run, teacher, val_per_class=5))).run()
    edited = {**record, "indices": record["indices"][:-1] + [record["indices"][-1] + 1]}
    (val_run / "val_split.json").write_text(json.dumps(edited))
    try:
        with pytest.raises(CurlpruneError, match="validation split drawn now differs from the one this run started with"):
            Run(parse_config(run_config(val_run, teacher))).run()
    finally:
        (val_run / "val_split.json").write_text(json.dumps(record))


def test_prune_command_calibrates_on_what_remains(tmp_path, teacher, capsys):
    out = tmp_path / "p"
    args = ["prune", "--model", MODEL, "--weights", str(teacher), "--data", "digits", "--criterion", "kl-approx",
            "--target-macs", "0.5", "--calib", "48", "--seed", "2", "--val-per-class", "30", "--out", str(out), "--no-report"]
    assert main(args) == 0
    remaining = load_splits("digits", None, 2, val_per_class=30)[0]["train"]
    calib = datasets.calibration_subset(remaining, 48, 2)
    batch = torch.cat([x for x, _ in datasets.batches(calib, input_spec(MODEL), 256)])
    assert read_scores(out / "scores.npz")[1]["calib_sha256"] == hashlib.sha256(batch.contiguous().numpy().tobytes()).hexdigest()
    capsys.readouterr()
    assert main(["prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "0.5", "--val-fraction", "0.1",
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --data too" in err[0], err
