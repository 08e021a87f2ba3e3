"""Nothing claimed before it is valid (issue 18, items 6 and 9).

Item 6. Was: an unreachable target, a calibration set larger than the data, a target fraction
above 1, a ``--student`` of another architecture or NaN weights each left ``config.json`` (and
sometimes ``prune/``, a trained ``finetune/``) in the run folder, and the next run there was refused
("holds a run with different settings") though nothing had been done. Now every check that can be
made runs first (:meth:`curlprune.run.pipeline.Run.preflight`, :func:`curlprune.run.prune_check.preflight_prune`):
each bad input below is one line and exit 2, a new ``--out`` (with its missing parent folders) does
not exist afterwards, an existing one holds the same bytes as before, and the corrected command in
the same folder then succeeds.

Item 9. Was: ``curlprune report`` on any folder exited 0 and wrote ``report/`` into it, breaking a
dataset it was aimed at by mistake. Now a folder that holds no run is one line, non-zero, and
nothing is written.

Real inputs throughout: the digits teacher trained here, real sklearn digits, PNG files, a real
2-process torchrun.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from curlprune.store import checkpoint
from curlprune.data.data import load_digits_dataset, load_image_folder
from curlprune.errors import CurlpruneError
from curlprune.report.figures import write_report
from curlprune.models import build

from trust_support import MODEL, ONE_THREAD, assert_one_line_error, cli, poisoned, raw_checkpoint  # noqa: F401 (cli: a fixture; teacher comes from conftest)

BASE = {"model": MODEL, "data": "digits", "train_per_class": 20, "seed": 0, "stages": ["prune"],
        "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64, "eval_limit": 0}}
TRAIN_IMAGES = 10 * 20  # 20 training images per class, 10 classes


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (relative) with its bytes; folders map to None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, teacher) -> dict[str, Path]:
    """Teacher weights with a NaN, a student checkpoint with a NaN, a student of another architecture."""
    folder = tmp_path_factory.mktemp("bad")
    state, _ = poisoned(torch.load(teacher, weights_only=True), float("nan"))
    torch.save(state, folder / "nan-teacher.pt")
    raw_checkpoint(folder / "nan-student.safetensors", state)
    other = folder / "resnet20-student.safetensors"
    checkpoint.save(other, {"name": "cifar:resnet20", "kwargs": {}}, {}, build("cifar:resnet20").state_dict())
    return {"nan-teacher": folder / "nan-teacher.pt", "nan-student": folder / "nan-student.safetensors", "other-student": other}


def run_args(tmp_path: Path, teacher: Path, name: str, out: Path, prune: dict | None = None, **top) -> list:
    """``curlprune run`` of a config: BASE with the teacher, ``top`` and the prune section changed by ``prune``."""
    content = {**BASE, "weights": str(teacher), **top, "prune": {**BASE["prune"], **(prune or {})}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return ["run", path, "--out", out, "--no-report"]


def distill_args(teacher: Path, out: Path, *more) -> list:
    return ["distill", "--model", MODEL, "--weights", teacher, "--train-per-class", 20, "--epochs", 1, "--out", out, "--no-report", *more]


def prune_args(teacher: Path, out: Path, *more) -> list:
    return ["prune", "--model", MODEL, "--weights", teacher, "--data", "digits", "--eval-limit", 0, "--out", out, "--no-report", *more]


TRANSFER = {"stages": ["finetune", "prune"], "finetune": {"epochs": 1, "batch_size": 32, "new_head": True}}

# name -> (bad command, corrected command, fragments of the one-line error); each gets (tmp_path, teacher, bad_files, out)
CASES = {
    "unreachable MACs target": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"target_macs": 0.01}, stages=["prune", "distill"]),
        lambda t, w, f, o: run_args(t, w, "good", o),
        ("target 0.01 of the macs", "not reachable", "smallest reachable")),
    "unreachable params target": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"target_macs": None, "target_params": 0.01}),
        lambda t, w, f, o: run_args(t, w, "good", o),
        ("target 0.01 of the params", "not reachable")),
    "unreachable with round_to": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"round_to": 64}),
        lambda t, w, f, o: run_args(t, w, "good", o, {"round_to": 8}),
        ("not reachable",)),
    "unreachable with floor": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"floor": 0.9}),
        lambda t, w, f, o: run_args(t, w, "good", o, {"floor": 0.3}),
        ("with floor 0.9", "not reachable")),
    "protect pattern matching nothing": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"protect": ["layer9.*"]}),
        lambda t, w, f, o: run_args(t, w, "good", o, {"protect": ["layer1.*"]}),
        ("'layer9.*' matches no prunable group",)),
    "calibration set larger than the data": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"calib": 5000}, stages=["prune", "distill"]),
        lambda t, w, f, o: run_args(t, w, "good", o, {"calib": TRAIN_IMAGES}),
        ("calib 5000", f"the {TRAIN_IMAGES} training images")),
    "target fraction above 1": (
        lambda t, w, f, o: run_args(t, w, "bad", o, {"target_macs": 1.5}),
        lambda t, w, f, o: run_args(t, w, "good", o, {"target_macs": 1.0}),
        ("1.5", "at most 1")),
    "teacher weights with NaN": (
        lambda t, w, f, o: run_args(t, f["nan-teacher"], "bad", o),
        lambda t, w, f, o: run_args(t, w, "good", o),
        ("nan-teacher.pt", "NaN")),
    "unreachable target after a transfer stage": (  # was: finetune trained, then prune failed
        lambda t, w, f, o: run_args(t, w, "bad", o, {"target_macs": 0.01}, **TRANSFER),
        lambda t, w, f, o: run_args(t, w, "good", o, **TRANSFER),
        ("not reachable",)),
    "student of another architecture": (
        lambda t, w, f, o: distill_args(w, o, "--student", f["other-student"]),
        lambda t, w, f, o: distill_args(w, o),
        ("resnet20-student.safetensors", "cannot take this run's input")),
    "student with NaN": (
        lambda t, w, f, o: distill_args(w, o, "--student", f["nan-student"]),
        lambda t, w, f, o: distill_args(w, o),
        ("nan-student.safetensors", "NaN")),
    "prune command, unreachable target": (
        lambda t, w, f, o: prune_args(w, o, "--target-macs", 0.01),
        lambda t, w, f, o: prune_args(w, o, "--target-macs", 0.5, "--calib", 64),
        ("not reachable",)),
    "prune command, calibration set larger than the data": (
        lambda t, w, f, o: prune_args(w, o, "--target-macs", 0.5, "--calib", 99999),
        lambda t, w, f, o: prune_args(w, o, "--target-macs", 0.5, "--calib", 64),
        ("calib 99999",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_claims_nothing_and_the_corrected_run_succeeds(cli, tmp_path, teacher, bad_files, case):
    bad, good, fragments = CASES[case]
    top = tmp_path / "new"
    out = top / "deeper" / "run"  # its parents are missing too: the lock creates them, and removes them again
    assert_one_line_error(cli(*bad(tmp_path, teacher, bad_files, out)), *fragments)
    assert not top.exists(), snapshot(top)

    out.mkdir(parents=True)  # an existing folder (a user's notes in it) is left byte for byte as it was
    (out / "notes.txt").write_bytes(b"runs of the digits model\n")
    (out / "old").mkdir()
    before = snapshot(out)
    assert_one_line_error(cli(*bad(tmp_path, teacher, bad_files, out)), *fragments)
    assert snapshot(out) == before

    proc = cli(*good(tmp_path, teacher, bad_files, out))  # the same folder takes the corrected run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_bytes() == before["notes.txt"]


def test_a_batch_that_does_not_split_over_the_processes_claims_nothing(tmp_path, teacher):
    """Under torchrun with 2 processes a global batch of 33 is refused before config.json is written
    (was: after, so the corrected run was refused as "another run")."""
    out = tmp_path / "run"
    config = run_args(tmp_path, teacher, "ddp", out, stages=["prune", "distill"], distill={"epochs": 1, "batch_size": 33})[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "curlprune.cli",
               "run", str(config), "--out", str(out), "--no-report"]
    proc = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    # each rank says it in one line (torchrun then adds its own report of the failed processes)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "curlprune: error: batch_size 33 must be a multiple of the number of processes (2)" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists(), snapshot(out)


# ------------------------------------------------------------------------------------------------
# item 9: `curlprune report` writes only into a folder that holds a run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A real ImageFolder dataset: train/ and test/ with 2 PNG digits of each of the 10 classes."""
    root = tmp_path_factory.mktemp("digits-png")
    for split, images in load_digits_dataset(seed=0).items():
        for label in range(10):
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            for j, i in enumerate(torch.nonzero(images.labels == label).flatten()[:2].tolist()):
                Image.fromarray(images.images[i][0].numpy()).save(folder / f"{j}.png")
    return root


def _folders(tmp_path: Path, dataset: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "a.txt").write_text("not a run\n")
    (other / "sub" / "b.bin").write_bytes(bytes(range(256)))
    (other / "config.yaml").write_text("model: x\n")  # a config, but no run
    return {"dataset": dataset, "dataset split": dataset / "train", "empty": empty, "other files": other}


def test_report_on_a_folder_without_a_run_is_one_line_and_writes_nothing(cli, tmp_path, dataset):
    classes = load_image_folder(dataset)["train"].classes
    for name, folder in _folders(tmp_path, dataset).items():
        before = snapshot(folder)
        proc = cli("report", folder)
        assert_one_line_error(proc, str(folder), "holds no curlprune run", "config.json", "point it at a run folder")
        assert snapshot(folder) == before, name
        with pytest.raises(CurlpruneError, match="holds no curlprune run"):
            write_report(folder)  # the library function refuses too
        assert snapshot(folder) == before, name
    assert load_image_folder(dataset)["train"].classes == classes  # the dataset still reads as before


def test_report_still_writes_into_a_prune_folder_and_a_run_folder(cli, tmp_path, teacher):
    prune_out = tmp_path / "p"
    proc = cli("prune", "--model", MODEL, "--criterion", "l1", "--target-macs", 0.5, "--out", prune_out, "--no-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = cli("report", prune_out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (prune_out / "report" / "index.md").is_file() and (prune_out / "report" / "widths.png").is_file()
    run = tmp_path / "run"  # a run folder a kill cut short after config.json: a report with notes
    run.mkdir()
    (run / "config.json").write_text("{}\n")
    assert cli("report", run).returncode == 0
    assert (run / "report" / "index.md").is_file()
