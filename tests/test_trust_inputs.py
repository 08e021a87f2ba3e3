"""Trust, round two (issue 18), inputs: every input file checked, every failure one line.

Symlink farms as folders and as zips (``zip -y``), YAML written as a user writes it, weights and
checkpoints with NaN/inf or an edited header, a ``--student`` of another architecture. Real digits
throughout; CLI cases run ``curlprune.cli.main`` in this process.
"""
from __future__ import annotations

import io
import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from curlprune.data.data import load_digits_dataset, load_image_folder
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.recover import load_stage_model
from curlprune.run.run_config import load_config, read_config_file
from curlprune.store import checkpoint
from curlprune.store.canonical import canonical_bytes

from trust_support import (  # noqa: F401 (cli, trained: fixtures; teacher comes from conftest)
    MODEL, TINY, assert_one_line_error, cli, files_under, one_line, poisoned, raw_checkpoint, trained, write_config,
)


# ================================================================ 1. symlinked folders
def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _farm(root: Path) -> Path:
    """A symlink farm: real images under ``store/``, the dataset under ``data/`` made of links.

    data/train -> ../store/train   (a symlinked split)
    data/test/a -> ../../store/test/a, data/test/b -> ../../store/test/b   (symlinked classes)
    data/test/c/                     a real class folder holding a symlinked image
    """
    for split in ("train", "test"):
        for k, cls in enumerate("abc"):
            (root / "store" / split / cls).mkdir(parents=True)
            for j in range(2):
                (root / "store" / split / cls / f"{j}.png").write_bytes(_png(40 * k + j))
    data = root / "data"
    (data / "test" / "c").mkdir(parents=True)
    (data / "train").symlink_to(Path("..") / "store" / "train", target_is_directory=True)
    for cls in "ab":
        (data / "test" / cls).symlink_to(Path("..") / ".." / "store" / "test" / cls, target_is_directory=True)
    for j in range(2):
        (data / "test" / "c" / f"{j}.png").symlink_to(root / "store" / "test" / "c" / f"{j}.png")
    return data


def _zip_with_links(path: Path, files: dict[str, bytes], links: dict[str, str]) -> Path:
    """A zip as ``zip -y`` writes it: symlinks stored as entries with mode S_IFLNK and the target as content."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def test_symlinked_class_and_split_folders_are_followed(tmp_path):
    splits = load_image_folder(_farm(tmp_path))
    assert sorted(splits) == ["test", "train"]
    for split in splits.values():
        assert split.classes == ["a", "b", "c"] and split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits["train"].images[2, 0, 0, 0] == 40  # class b's first image, through the link
    assert torch.equal(splits["train"].images, splits["test"].images)


def test_symlink_cycle_in_a_folder_is_one_line(tmp_path):
    data = _farm(tmp_path)
    (tmp_path / "store" / "train" / "a" / "again").symlink_to("..", target_is_directory=True)  # train/a/again -> train
    with pytest.raises(CurlpruneError) as info:
        load_image_folder(data)
    one_line(info, "again", "symlink cycle")


def test_broken_symlink_in_a_folder_is_one_line(tmp_path):
    data = _farm(tmp_path)
    (tmp_path / "store" / "test" / "b" / "1.png").unlink()  # data/test/b/1.png: gone, the link to b stays
    (data / "test" / "c" / "1.png").unlink()
    (data / "test" / "c" / "1.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(CurlpruneError) as info:
        load_image_folder(data)
    one_line(info, "1.png", "nowhere.png", "broken symlink")


def test_zip_symlink_entries_are_followed_like_folder_links(tmp_path):
    # the same farm as _farm, in a zip (as `zip -r -y` stores it): links point into a hidden store
    archive = _zip_with_links(
        tmp_path / "farm.zip",
        {f".store/{split}/{cls}/{j}.png": _png(40 * k + j) for split in ("train", "test") for k, cls in enumerate("abc") for j in range(2)},
        {"train": ".store/train", "test/a": "../.store/test/a", "test/b": "../.store/test/b",
         "test/c/0.png": "../../.store/test/c/0.png", "test/c/1.png": "../../.store/test/c/1.png"},
    )
    from_zip = load_image_folder(archive)
    from_folder = load_image_folder(_farm(tmp_path / "f"))
    for split in ("train", "test"):
        assert from_zip[split].classes == from_folder[split].classes == ["a", "b", "c"]
        assert torch.equal(from_zip[split].images, from_folder[split].images)
        assert torch.equal(from_zip[split].labels, from_folder[split].labels)


@pytest.mark.parametrize("links, fragments", [
    ({"train/a/again": ".."}, ("train/a/again", "symlink cycle")),
    ({"train/a/self": "self"}, ("train/a/self", "symlink cycle")),
    ({"train/a/x.png": "../../../outside.png"}, ("train/a/x.png", "outside the archive")),
    ({"train/a/x.png": "missing.png"}, ("train/a/x.png", "broken symlink")),
])
def test_zip_symlink_cycles_and_dangling_links_are_one_line(tmp_path, links, fragments):
    files = {f"{split}/{cls}/0.png": _png(k) for split in ("train", "test") for k, cls in enumerate("ab")}
    with pytest.raises(CurlpruneError) as info:
        load_image_folder(_zip_with_links(tmp_path / "d.zip", files, links))
    one_line(info, *fragments)


def test_finetune_new_head_on_a_symlinked_class_trains_every_class(cli, tmp_path):
    """The issue's case end to end: 3 classes, one a symlink; the new head must have 3 outputs."""
    digits_dir = tmp_path / "farm"
    ds = load_digits_dataset(seed=0)
    for split, part in ds.items():
        for cls in ("0", "1", "2"):
            target = tmp_path / "store" if cls == "2" else digits_dir
            folder = target / split / cls
            folder.mkdir(parents=True)
            for j, i in enumerate(torch.nonzero(part.labels == int(cls)).flatten()[:8].tolist()):
                Image.fromarray(part.images[i, 0].numpy()).save(folder / f"{j}.png")
        (digits_dir / split / "2").symlink_to(tmp_path / "store" / split / "2", target_is_directory=True)
    out = tmp_path / "run"
    proc = cli("finetune", "--model", "cifar:resnet20", "--input-size", "8", "--data", digits_dir, "--new-head",
               "--epochs", "1", "--out", out, "--no-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = checkpoint.load(out / "model.safetensors")
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


# ================================================================ 2. duplicate YAML keys
@pytest.mark.parametrize("text, key, lines", [
    ("model: {m}\nseed: 0\nstages: [finetune]\nseed: 1\n", "seed", (2, 4)),
    ("model: {m}\nstages: [prune]\nprune: {{criterion: l1, target_macs: 0.5}}\ndata: digits\nprune:\n  criterion: kl\n", "prune", (3, 5)),
    ("model: {m}\nstages: [prune]\nprune: {{target_macs: 0.5, criterion: l1, target_macs: 0.3}}\n", "target_macs", (3, 3)),
    ("model: {m}\nstages: [distill]\ndistill:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "lr", (4, 6)),
    ("model: {m}\nstages: [prune]\nprune:\n  protect: [a]\n  target_macs: 0.5\n  'protect': [b]\n", "protect", (4, 6)),
])
def test_duplicate_yaml_keys_are_one_line_naming_key_and_lines(tmp_path, cli, text, key, lines):
    config = tmp_path / "c.yaml"
    config.write_text(text.format(m=MODEL))
    with pytest.raises(CurlpruneError) as info:
        load_config(config)
    one_line(info, str(config), f"'{key}'", f"line {lines[0]}", f"line {lines[1]}")
    assert_one_line_error(cli("run", config, "--out", tmp_path / "run"), f"'{key}'")
    assert not (tmp_path / "run").exists()


def test_yaml_merge_keys_and_distinct_nested_keys_are_accepted(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {MODEL}\nbase: &b {{epochs: 2, lr: 0.1}}\ndistill:\n  <<: *b\n  lr: 0.2\n"
                      "refine: {epochs: 2, lr: 0.1}\n")
    raw = read_config_file(config)
    assert raw["distill"] == {"epochs": 2, "lr": 0.2} and raw["refine"] == {"epochs": 2, "lr": 0.1}


# ================================================================ 5. NaN / inf in weights that are read
@pytest.mark.parametrize("suffix, value", [(".pt", float("nan")), (".safetensors", float("inf"))])
def test_teacher_weights_with_nan_or_inf_are_one_line_naming_the_tensor(cli, tmp_path, teacher, suffix, value):
    state, name = poisoned(torch.load(teacher, weights_only=True), value)
    bad = tmp_path / f"teacher{suffix}"
    torch.save(state, bad) if suffix == ".pt" else save_file(state, bad)
    kind = "NaN" if value != value else "inf"
    proc = cli("prune", "--model", MODEL, "--criterion", "kl", "--data", "digits", "--target-macs", "0.5", "--calib", 64,
               "--weights", bad, "--out", tmp_path / "p")
    assert_one_line_error(proc, str(bad), name, kind)
    assert not (tmp_path / "p").exists()
    config = write_config(tmp_path / "c.yaml", **TINY, weights=str(bad), run_dir=str(tmp_path / "run"), stages=["prune", "distill"])
    assert_one_line_error(cli("run", config), str(bad), name, kind)
    assert not (tmp_path / "run").exists()


def test_checkpoint_with_nan_is_refused_by_load_export_count_and_student(cli, tmp_path, teacher):
    state, name = poisoned(torch.load(teacher, weights_only=True), float("nan"))
    ckpt = raw_checkpoint(tmp_path / "model.safetensors", state)
    with pytest.raises(CurlpruneError) as info:
        checkpoint.load(ckpt)
    one_line(info, str(ckpt), name, "NaN")
    assert_one_line_error(cli("export", ckpt, tmp_path / "m.onnx"), str(ckpt), name, "NaN")
    assert not (tmp_path / "m.onnx").exists()
    assert_one_line_error(cli("count", ckpt), str(ckpt), name)
    assert_one_line_error(cli("distill", "--model", MODEL, "--weights", teacher, "--student", ckpt, "--epochs", 1,
                              "--out", tmp_path / "run"), str(ckpt), name, "NaN")


def test_stage_weights_with_inf_are_one_line(tmp_path, teacher, trained):
    run = tmp_path / "distill"
    shutil.copytree(trained["distill"], run)
    weights = run / "distill" / "model.safetensors"
    state, name = poisoned(load_file(str(weights)), float("inf"))
    save_file(state, str(weights))
    with pytest.raises(CurlpruneError) as info:
        load_stage_model(build(MODEL), run, "distill")
    one_line(info, str(weights), name, "inf")


# ================================================================ 10. damaged checkpoint headers
def _header_checkpoint(path: Path, change: dict) -> Path:
    """A real pruned checkpoint of the digits ResNet with header fields replaced (None: removed)."""
    good = path.with_name("good.safetensors")
    if not good.exists():
        plan = {"conv1": list(range(8))}
        checkpoint.save(good, MODEL, plan, checkpoint.build_pruned(MODEL, plan, [1, 1, 8, 8]).state_dict())
    with safe_open(str(good), framework="pt") as handle:
        metadata = dict(handle.metadata())
    for key, value in change.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    path.write_bytes(canonical_bytes(load_file(str(good)), metadata))
    return path


HEADER_CASES = {
    "plan-not-json": ({"plan": "{conv1: [0"}, "'plan'", "not JSON"),
    "extra-not-json": ({"extra": "{oops"}, "'extra'", "not JSON"),
    "input-shape-not-json": ({"input_shape": "[1, 1, 8"}, "'input_shape'", "not JSON"),
    "model-ref-missing": ({"model_ref": None}, "'model_ref'", "missing"),
    "model-ref-list": ({"model_ref": "[1, 2]"}, "'model_ref'", "registry name"),
    "model-ref-no-name": ({"model_ref": '{"kwargs": {}}'}, "'model_ref'", "registry name"),
    "model-ref-kwargs": ({"model_ref": json.dumps({"name": MODEL, "kwargs": [1]})}, "'model_ref'", "kwargs"),
    "model-ref-unknown": ({"model_ref": '{"name": "cifar:resnet7"}'}, "'model_ref'", "unknown model"),
    "plan-list": ({"plan": "[0, 1]"}, "'plan'", "mapping"),
    "plan-index-text": ({"plan": '{"conv1": ["a"]}'}, "'plan'", "conv1"),
    "plan-out-of-range": ({"plan": '{"conv1": [0, 99]}'}, "'plan'", "out of range"),
    "input-shape-3d": ({"input_shape": "[1, 8, 8]"}, "'input_shape'", "[1, 8, 8]"),
    "input-shape-negative": ({"input_shape": "[1, 1, -8, 8]"}, "'input_shape'", "positive"),
    "input-shape-channels": ({"input_shape": "[1, 3, 8, 8]"}, "'input_shape'", "does not fit"),
    "extra-list": ({"extra": "[1]"}, "'extra'", "mapping"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_damaged_checkpoint_header_is_one_line_in_load_count_export_and_student(cli, tmp_path, teacher, case):
    change, field, what = HEADER_CASES[case]
    ckpt = _header_checkpoint(tmp_path / "model.safetensors", change)
    with pytest.raises(CurlpruneError) as info:
        checkpoint.load(ckpt)
    one_line(info, str(ckpt), field, what)
    assert_one_line_error(cli("count", ckpt), str(ckpt), field)
    assert_one_line_error(cli("export", ckpt, tmp_path / "m.onnx"), str(ckpt), field)
    assert not (tmp_path / "m.onnx").exists()
    assert_one_line_error(cli("distill", "--model", MODEL, "--weights", teacher, "--student", ckpt, "--epochs", 1,
                              "--out", tmp_path / "run", "--no-report"), str(ckpt), field)


def test_unpruned_checkpoint_without_extra_still_loads(tmp_path):
    ckpt = _header_checkpoint(tmp_path / "model.safetensors", {"extra": None})
    assert checkpoint.read_metadata(ckpt)["extra"] == {}
    assert checkpoint.load(ckpt)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


# ================================================================ 12. a --student of another architecture
@pytest.mark.parametrize("name, kwargs, fragments", [
    ("cifar:resnet20", {}, ("cifar:resnet20", "[1, 3, 32, 32]", "cannot take this run's input", "[1, 1, 8, 8]")),
    (MODEL, {"num_classes": 5}, ("outputs 5 classes", "10")),
])
def test_student_of_another_architecture_is_one_line_before_anything_is_written(cli, tmp_path, teacher, name, kwargs, fragments):
    student = tmp_path / "student.safetensors"
    checkpoint.save(student, {"name": name, "kwargs": kwargs}, {}, build(name, **kwargs).state_dict())
    for stage in ("distill", "finetune", "refine"):
        out = tmp_path / stage
        proc = cli(stage, "--model", MODEL, "--weights", teacher, "--student", student, "--epochs", 1, "--out", out, "--no-report")
        assert_one_line_error(proc, str(student), *fragments)
        assert not out.exists(), files_under(out)
