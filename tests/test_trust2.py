"""Trust, round two (issue 18): no wrong model with exit 0, every input file checked, every
failure one line.

Real inputs throughout: symlink farms and zips with symlink entries, YAML written as a user
writes it, real digits trained with a real diverging learning rate, state and checkpoint files
edited byte by byte, a real full filesystem (tmpfs in a private mount namespace, skipped where
``unshare`` is not allowed) and real SIGKILLs. CLI cases run ``curlprune.cli.main`` in this process
unless they need a process of their own.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from curlprune import checkpoint
from curlprune.canonical import canonical_bytes
from curlprune.cli import main
from curlprune.data import evaluate, load_digits_dataset, load_image_folder
from curlprune.digits import train_digits_model
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.recover import load_stage_model
from curlprune.recover.divergence import check_not_diverged
from curlprune.run_config import load_config, read_config_file
from curlprune.runlock import RunLock

MODEL = "small:resnet-digits"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def cli(capsys):
    """``curlprune ARGS`` in this process (no interpreter start-up): a CompletedProcess-like result."""

    def call(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, one line on stderr that contains every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("curlprune: error: "), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def one_line(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(train_digits_model(seed=0).state_dict(), path)
    return path


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


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


# ================================================================ 3. finite divergence
TINY = {  # real digits, 50 training images per class (as tests/test_trust.py)
    "model": MODEL, "data": "digits", "train_per_class": 50, "seed": 0,
    "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
}


def write_config(path: Path, **content) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, teacher) -> Path:
    """A run folder whose prune stage is finished (the digits ResNet at 50% of its MACs)."""
    directory = tmp_path_factory.mktemp("pruned")
    config = write_config(directory / "c.yaml", **TINY, weights=str(teacher), run_dir=str(directory / "run"), stages=["prune"])
    proc = subprocess.run([sys.executable, "-m", "curlprune.cli", "run", str(config), "--no-report"], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return directory / "run"


def test_distill_at_lr_9_diverges_without_nan_and_fails_with_one_line(cli, tmp_path, teacher, pruned_run):
    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    before = {name: (run / name).read_bytes() for name in ("model.safetensors", "summary.json")}  # of the prune-only run
    config = write_config(tmp_path / "c.yaml", **TINY, weights=str(teacher), run_dir=str(run), stages=["prune", "distill"],
                          distill={"epochs": 2, "batch_size": 32, "lr": 9.0, "progress": False})
    line = assert_one_line_error(cli("run", config, "--no-report"), "distill diverged", "before the stage", "one class",
                                 "the one it started from", "lr 9", str(run / "distill"))
    history = [json.loads(x) for x in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)  # no NaN: the old guard saw nothing
    assert history[-1]["test_top1"] <= 10.3  # one class of the 360 test digits
    for name in ("done.json", "model.safetensors", "checkpoint.safetensors", "best.safetensors"):
        assert not (run / "distill" / name).exists(), name
    assert {name: (run / name).read_bytes() for name in before} == before  # still the pruned model, not the diverged one
    assert (run / "model.safetensors").read_bytes() == (run / "prune" / "model.safetensors").read_bytes()
    assert cli("run", config, "--no-report").stderr.strip() == line  # a rerun trains nothing and says the same
    assert len((run / "distill" / "metrics.jsonl").read_text().splitlines()) == 2


def test_divergence_after_a_good_epoch_keeps_that_epoch_as_best(cli, tmp_path, teacher, pruned_run):
    """A warm-up so long that epoch 1 trains well (lr up to 0.225) and epoch 2 (up to 0.45) collapses."""
    student = pruned_run / "prune" / "model.safetensors"
    config = write_config(tmp_path / "c.yaml", model=MODEL, distill={"warmup_epochs": 40, "progress": False})
    out = tmp_path / "run"
    assert_one_line_error(cli("distill", "--config", config, "--weights", teacher, "--train-per-class", 50, "--student", student,
                              "--epochs", 2, "--lr", 9, "--out", out, "--no-report"), "distill diverged", "epoch 1", "best.safetensors")
    history = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["test_top1"] > 30 and history[1]["test_top1"] <= 10.3
    model = checkpoint.load(student)
    model.load_state_dict(load_file(str(out / "distill" / "best.safetensors")))
    top1 = 100 * evaluate(model, load_digits_dataset(seed=0)["test"], input_spec(MODEL))
    assert top1 == pytest.approx(history[0]["test_top1"])  # the kept weights are epoch 1's
    assert not (out / "distill" / "done.json").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("start, tops, flagged", [
    (29.2, [10.0, 9.7], True),       # the issue's case
    (None, [40.0, 9.7], True),       # a state from before start_top1 was kept: the epochs count
    (10.0, [10.0, 10.0], False),     # a new classifier that stays at chance: not below where it started
    (80.0, [60.0, 50.0], False),     # lower, but far above chance: a result, however poor
    (29.2, [10.0, 30.1], False),     # at chance mid-way, recovered by the end
    (12.0, [9.0, 9.5], False),       # below chance, but not far below the start
])
def test_divergence_rule(tmp_path, start, tops, flagged):
    history = [{"epoch": i + 1, "test_top1": t, "loss": 1.0 + i} for i, t in enumerate(tops)]
    if flagged:
        with pytest.raises(CurlpruneError) as info:
            check_not_diverged("distill", tmp_path, history, start, 10.28, 0.5)
        one_line(info, "diverged")
    else:
        check_not_diverged("distill", tmp_path, history, start, 10.28, 0.5)


# ================================================================ 4. edited or stale training state
STATE_KEY = "curlprune_train_state"


def edit_state(path: Path, meta=None, tensors=None) -> None:
    """Rewrite a state file with its JSON header and/or tensors changed in place by the callables given."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[STATE_KEY])
        content = {name: handle.get_tensor(name) for name in handle.keys()}
    header = meta(header) if meta else header
    if tensors:
        tensors(content)
    save_file(content, str(path), metadata={STATE_KEY: json.dumps(header)})


def _unfinish(stage_dir: Path) -> None:
    """What a kill right after the last epoch's state leaves: the state, no result."""
    for name in ("done.json", "model.safetensors", "checkpoint.safetensors"):
        (stage_dir / name).unlink(missing_ok=True)


def _stage_args(stage: str, teacher: Path, out: Path) -> list:
    return [stage, "--model", MODEL, "--weights", teacher, "--train-per-class", 20, "--epochs", 2, "--out", out, "--no-report"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher) -> dict[str, Path]:
    """Finished 2-epoch distill and refine runs (the unpruned digits model, 20 images per class)."""
    base = tmp_path_factory.mktemp("trained")
    runs = {}
    for stage in ("distill", "refine"):
        proc = subprocess.run([sys.executable, "-m", "curlprune.cli", *map(str, _stage_args(stage, teacher, base / stage))],
                              env=ONE_THREAD, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[stage] = base / stage
    return runs


def _set(key, value):
    def change(header):
        header[key] = value
        return header
    return change


def _momentum_of_another_shape(tensors):
    name = next(k for k in tensors if k.startswith("optim.") and tensors[k].dim() == 4)
    tensors[name] = tensors[name][:, :-1].contiguous()


def _history_top1(header):
    header["history"][0]["test_top1"] = 250.0
    return header


@pytest.mark.parametrize("meta, tensors, fragments", [
    (_set("epoch", 99), None, ("'epoch' is 99, outside 1..2",)),
    (_set("epoch", 0), None, ("'epoch' is 0",)),
    (_set("epoch", "2"), None, ("'epoch'",)),
    (lambda h: {**h, "iteration": h["iteration"] + 1}, None, ("'iteration'",)),
    (lambda h: {**h, "history": h["history"][:1]}, None, ("'history' holds 1 epochs, not 2",)),
    (_history_top1, None, ("'history' epoch 1", "top-1")),
    (_set("world_size", 3), None, ("'world_size' 3 does not divide the batch size 32",)),
    (_set("world_size", 2), None, ("'rank_rng'", "2 process(es)")),
    (_set("stage", "refine"), None, ("'stage' is 'refine', not 'distill'",)),
    (_set("order_generator", "AAAA"), None, ("'order_generator'",)),
    (lambda h: {**h, "optimizer": {**h["optimizer"], "param_groups": h["optimizer"]["param_groups"] * 2}}, None, ("'optimizer'",)),
    (_set("config", None), None, ("'config'",)),
    (lambda h: [h], None, ("the header is list",)),
    (None, _momentum_of_another_shape, ("momentum_buffer", "shape")),
], ids=["epoch-99", "epoch-0", "epoch-text", "iteration", "history-short", "history-top1", "world-size-batch",
        "world-size-rng", "stage", "order-generator", "optimizer-groups", "config", "not-a-mapping", "momentum-shape"])
def test_edited_state_header_is_one_line_naming_the_file(cli, tmp_path, teacher, trained, meta, tensors, fragments):
    out = tmp_path / "distill"
    shutil.copytree(trained["distill"], out)
    _unfinish(out / "distill")
    state = out / "distill" / "state.safetensors"
    edit_state(state, meta, tensors)
    assert_one_line_error(cli(*_stage_args("distill", teacher, out)), str(state), "does not fit this stage", *fragments)
    assert not (out / "distill" / "done.json").exists()


def test_unedited_state_resumes_to_the_same_model(cli, tmp_path, teacher, trained):
    out = tmp_path / "distill"
    shutil.copytree(trained["distill"], out)
    _unfinish(out / "distill")
    edit_state(out / "distill" / "state.safetensors")  # rewritten, unchanged
    proc = cli(*_stage_args("distill", teacher, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "distill" / "model.safetensors").read_bytes() == (trained["distill"] / "distill" / "model.safetensors").read_bytes()


def test_refine_label_store_of_another_shape_is_one_line(cli, tmp_path, teacher, trained):
    out = tmp_path / "refine"
    shutil.copytree(trained["refine"], out)
    _unfinish(out / "refine")
    state = out / "refine" / "state.safetensors"
    rows = None

    def drop_a_row(tensors):
        nonlocal rows
        rows = tensors["stage.labels"].shape[0]
        tensors["stage.labels"] = tensors["stage.labels"][:-1].contiguous()

    edit_state(state, tensors=drop_a_row)
    assert_one_line_error(cli(*_stage_args("refine", teacher, out)), str(state), "stage.labels", f"not [{rows}, 10]")


# ================================================================ 5. NaN / inf in weights that are read
def _poison(state: dict, value: float) -> tuple[dict, str]:
    state = {k: v.clone() for k, v in state.items()}
    name = "layer1.0.conv2.weight"
    state[name].view(-1)[3] = value
    return state, name


def _raw_checkpoint(path: Path, state: dict) -> Path:
    """A curlprune checkpoint written past curlprune.save's own check (as a damaged or foreign file would be)."""
    clean = path.with_suffix(".clean.safetensors")
    checkpoint.save(clean, MODEL, {}, {k: torch.zeros_like(v) for k, v in state.items()})
    metadata = checkpoint.read_metadata(clean)
    header = {"curlprune_format": "1", **{k: json.dumps(v) for k, v in metadata.items()}}
    path.write_bytes(canonical_bytes(state, header))
    clean.unlink()
    return path


@pytest.mark.parametrize("suffix, value", [(".pt", float("nan")), (".safetensors", float("inf"))])
def test_teacher_weights_with_nan_or_inf_are_one_line_naming_the_tensor(cli, tmp_path, teacher, suffix, value):
    state, name = _poison(torch.load(teacher, weights_only=True), value)
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
    state, name = _poison(torch.load(teacher, weights_only=True), float("nan"))
    ckpt = _raw_checkpoint(tmp_path / "model.safetensors", state)
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
    state, name = _poison(load_file(str(weights)), float("inf"))
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


# ================================================================ 11. a full disk in a training stage
def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\"", "/tmp"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -rm` (user + mount namespaces) to mount a private tmpfs")
TMPFS_BYTES = 4 * 2**20


def _pages(size: int) -> int:
    return -(-size // 4096) * 4096


def in_full_tmpfs(mount: Path, free: int, *args) -> subprocess.CompletedProcess:
    """``curlprune ARGS`` in a private mount namespace where ``mount`` is a 4 MiB tmpfs with ``free`` bytes left;
    stderr ends with a listing of every file left under ``mount`` (after a line ``--``)."""
    mount.mkdir(parents=True, exist_ok=True)
    command = " ".join([sys.executable, "-m", "curlprune.cli", *(f"'{a}'" for a in args)])
    script = (f"mount -t tmpfs -o size={TMPFS_BYTES} tmpfs '{mount}' && head -c {TMPFS_BYTES - free} /dev/zero > '{mount}/.filler' "
              f"2>/dev/null; {command}; rc=$?; echo -- 1>&2; cd '{mount}' && find . -type f 1>&2; exit $rc")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ONE_THREAD, capture_output=True, text=True, timeout=300)


@needs_mount
@pytest.mark.parametrize("fails_at", ["state.safetensors", "model.safetensors"])
def test_full_disk_in_a_training_stage_is_one_line(tmp_path, teacher, fails_at):
    quiet = write_config(tmp_path / "quiet.yaml", model=MODEL, distill={"progress": False})
    args = ["distill", "--config", quiet, "--weights", teacher, "--train-per-class", 20, "--epochs", 1, "--no-report"]
    reference = tmp_path / "ref"
    proc = subprocess.run([sys.executable, "-m", "curlprune.cli", *map(str, args), "--out", str(reference)], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size = {p.name: _pages(p.stat().st_size) for p in (reference / "distill").iterdir()}
    # written before the stage's first safetensors file: config.json, .lock, student.json (one page each)
    free = 3 * 4096 + size.get("best.safetensors", 0)
    if fails_at == "model.safetensors":
        free += size["state.safetensors"] + size["metrics.jsonl"]
    free += size[fails_at] // 2
    mount = tmp_path / "full"
    proc = in_full_tmpfs(mount, free, *args, "--out", mount / "run")
    error, listing = proc.stderr.split("\n--\n")
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", error),
                          str(mount / "run" / "distill" / fails_at), "the disk is full")
    left = listing.split()
    assert not any(name.endswith(".tmp") for name in left), left
    assert f"./run/distill/{fails_at}" not in left and "./run/distill/done.json" not in left, left


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


# ================================================================ 13. orphans of killed writes; lost log lines
def _killed_write(path: Path) -> None:
    """A real atomic write killed (SIGKILL) half-way: it leaves its temporary file behind."""
    code = ("import os, signal; from pathlib import Path; from curlprune.rundir import atomic_write\n"
            f"atomic_write({str(path)!r}, lambda tmp: (Path(tmp).write_bytes(b'x' * 4096), os.kill(os.getpid(), signal.SIGKILL)))")
    proc = subprocess.run([sys.executable, "-c", code], env=ONE_THREAD, capture_output=True, timeout=120)
    assert proc.returncode == -9


def _orphans(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def test_resumed_run_removes_the_temporary_files_of_killed_writes(cli, tmp_path, teacher, trained):
    out = tmp_path / "distill"
    shutil.copytree(trained["distill"], out)
    _unfinish(out / "distill")  # killed after its last epoch: the rerun finishes the stage
    for target in (out / "distill" / "model.safetensors", out / "distill" / "state.safetensors", out / "model.safetensors",
                   out / "summary.json"):
        _killed_write(target)
    assert len(_orphans(out)) == 4
    (out / "notes.tmp").write_text("mine")  # not a temporary file of curlprune's: kept
    (out / "distill" / ".backup.tmp").write_text("mine")
    proc = cli(*_stage_args("distill", teacher, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _orphans(out) == ["distill/.backup.tmp", "notes.tmp"]


def test_orphans_of_a_folder_locked_by_another_run_are_kept(tmp_path):
    run = tmp_path / "run"
    (run / "prune").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from curlprune.runlock import RunLock; "
                               f"RunLock({str(run / 'prune')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=ONE_THREAD, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _killed_write(run / "prune" / "scores.npz")  # as if the other run were writing it now
        _killed_write(run / "model.safetensors")
        with RunLock(run):
            left = _orphans(run)
            assert len(left) == 1 and left[0].startswith("prune/.scores.npz."), left  # the run's own orphan is gone
        with RunLock(run / "prune" / "sub"):  # under a folder another run holds: nothing is touched
            pass
        assert len(_orphans(run)) == 1
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run / "prune"):  # the holder is gone: its leftovers are orphans now
        assert _orphans(run) == []


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_lines_lost_to_a_kill_after_done_json_are_restored(cli, tmp_path, teacher, pruned_run):
    run = tmp_path / "run"
    shutil.copytree(pruned_run, run)
    config = write_config(tmp_path / "c.yaml", **TINY, weights=str(teacher), run_dir=str(run), stages=["prune", "distill"],
                          distill={"epochs": 1, "batch_size": 32, "progress": False})
    assert cli("run", config, "--no-report").returncode == 0
    whole_run_log, whole_prune_log = _log(run / "log.jsonl"), _log(run / "prune" / "log.jsonl")
    assert [r["stage"] for r in whole_run_log] == ["prune", "distill"] and whole_prune_log[-1]["event"] == "done"
    # the state a kill between each stage's done.json and its log append leaves behind
    (run / "log.jsonl").write_text("")
    (run / "prune" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole_prune_log[:-1]))
    assert cli("run", config, "--no-report").returncode == 0
    restored = _log(run / "log.jsonl")
    assert [(r["stage"], r.get("rebuilt")) for r in restored] == [("prune", True), ("distill", True)]
    assert restored[1]["seconds"] == pytest.approx(whole_run_log[1]["seconds"], abs=0.01)
    assert restored[0]["time"] == pytest.approx((run / "prune" / "done.json").stat().st_mtime, abs=0.01)
    prune_log = _log(run / "prune" / "log.jsonl")
    assert prune_log[-1]["event"] == "done" and prune_log[-1]["rebuilt"] and len(prune_log) == len(whole_prune_log)
    before = {p: p.read_bytes() for p in (run / "log.jsonl", run / "prune" / "log.jsonl")}
    assert cli("run", config, "--no-report").returncode == 0  # restored once: a rerun writes nothing
    assert {p: p.read_bytes() for p in before} == before
