"""Trust, round two (issue 18), runs: no wrong model with exit 0, nothing trusted that was edited,
nothing left behind by a kill, and a full disk is one line.

A real diverging learning rate on the real digits, state files edited field by field, a real full
filesystem (tmpfs in a private mount namespace, skipped where ``unshare`` is not allowed), real
SIGKILLs in the middle of a write. CLI cases run ``curlprune.cli.main`` in this process unless they
need a process of their own.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from curlprune.data.data import evaluate, load_digits_dataset
from curlprune.errors import CurlpruneError
from curlprune.models import input_spec
from curlprune.recover.divergence import check_not_diverged
from curlprune.store import checkpoint
from curlprune.store.runlock import RunLock

from trust_support import (  # noqa: F401 (cli, pruned_run, trained: fixtures; teacher comes from conftest)
    MODEL, ONE_THREAD, TINY, assert_one_line_error, cli, one_line, pruned_run, stage_args, trained,
    unfinish, write_config,
)


# ================================================================ 3. finite divergence

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


def test_divergence_after_a_good_epoch_keeps_that_epoch_as_best(cli, tmp_path, teacher):
    """A warm-up so long that epoch 1 trains well (lr up to 0.225) and epoch 2 (up to 0.45) collapses.
    The student is the sliced model without BN re-estimation: a weak start that epoch 1 improves on."""
    tiny = {**TINY, "prune": {**TINY["prune"], "bn_recalibrate": 0}}  # pruned_run's recipe, BN statistics as sliced
    sliced = write_config(tmp_path / "p.yaml", **tiny, weights=str(teacher), run_dir=str(tmp_path / "sliced"), stages=["prune"])
    assert cli("run", sliced, "--no-report").returncode == 0
    student = tmp_path / "sliced" / "prune" / "model.safetensors"
    # the paper's loss (ce_weight 0), which this lr schedule was tuned on: epoch 1 good, epoch 2 diverged
    config = write_config(tmp_path / "c.yaml", model=MODEL, distill={"warmup_epochs": 40, "progress": False, "ce_weight": 0})
    out = tmp_path / "run"
    assert_one_line_error(cli("distill", "--config", config, "--weights", teacher, "--train-per-class", 50, "--student", student,
                              "--epochs", 2, "--lr", 7, "--out", out, "--no-report"), "distill diverged", "epoch 1", "best.safetensors")
    history = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["test_top1"] > 30 and history[1]["test_top1"] <= 10.3
    model = checkpoint.load(student)
    model.load_state_dict(load_file(str(out / "distill" / "best.safetensors")))
    top1 = 100 * evaluate(model, load_digits_dataset(seed=0)["test"], input_spec(MODEL))
    assert top1 == pytest.approx(history[0]["test_top1"])  # the kept weights are epoch 1's
    assert not (out / "distill" / "done.json").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("start, tops, flagged", [
    (29.2, [10.0, 9.7], True),       # the case
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
    unfinish(out / "distill")
    state = out / "distill" / "state.safetensors"
    edit_state(state, meta, tensors)
    assert_one_line_error(cli(*stage_args("distill", teacher, out)), str(state), "does not fit this stage", *fragments)
    assert not (out / "distill" / "done.json").exists()


def test_unedited_state_resumes_to_the_same_model(cli, tmp_path, teacher, trained):
    out = tmp_path / "distill"
    shutil.copytree(trained["distill"], out)
    unfinish(out / "distill")
    edit_state(out / "distill" / "state.safetensors")  # rewritten, unchanged
    proc = cli(*stage_args("distill", teacher, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "distill" / "model.safetensors").read_bytes() == (trained["distill"] / "distill" / "model.safetensors").read_bytes()


def test_refine_label_store_of_another_shape_is_one_line(cli, tmp_path, teacher, trained):
    out = tmp_path / "refine"
    shutil.copytree(trained["refine"], out)
    unfinish(out / "refine")
    state = out / "refine" / "state.safetensors"
    rows = None

    def drop_a_row(tensors):
        nonlocal rows
        rows = tensors["stage.labels"].shape[0]
        tensors["stage.labels"] = tensors["stage.labels"][:-1].contiguous()

    edit_state(state, tensors=drop_a_row)
    assert_one_line_error(cli(*stage_args("refine", teacher, out)), str(state), "stage.labels", f"not [{rows}, 10]")


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


# ================================================================ 13. orphans of killed writes; lost log lines
def _killed_write(path: Path) -> None:
    """A real atomic write killed (SIGKILL) half-way: it leaves its temporary file behind."""
    code = ("import os, signal; from pathlib import Path; from curlprune.store.rundir import atomic_write\n"
            f"atomic_write({str(path)!r}, lambda tmp: (Path(tmp).write_bytes(b'x' * 4096), os.kill(os.getpid(), signal.SIGKILL)))")
    proc = subprocess.run([sys.executable, "-c", code], env=ONE_THREAD, capture_output=True, timeout=120)
    assert proc.returncode == -9


def _orphans(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def test_resumed_run_removes_the_temporary_files_of_killed_writes(cli, tmp_path, teacher, trained):
    out = tmp_path / "distill"
    shutil.copytree(trained["distill"], out)
    unfinish(out / "distill")  # killed after its last epoch: the rerun finishes the stage
    for target in (out / "distill" / "model.safetensors", out / "distill" / "state.safetensors", out / "model.safetensors",
                   out / "summary.json"):
        _killed_write(target)
    assert len(_orphans(out)) == 4
    (out / "notes.tmp").write_text("mine")  # not a temporary file of curlprune's: kept
    (out / "distill" / ".backup.tmp").write_text("mine")
    proc = cli(*stage_args("distill", teacher, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _orphans(out) == ["distill/.backup.tmp", "notes.tmp"]


def test_orphans_of_a_folder_locked_by_another_run_are_kept(tmp_path):
    run = tmp_path / "run"
    (run / "prune").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from curlprune.store.runlock import RunLock; "
                               f"RunLock({str(run / 'prune')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=ONE_THREAD, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _killed_write(run / "prune" / "scores.npz")  # as if the other run were writing it now
        _killed_write(run / "model.safetensors")
        # the lock over stage folders (issue 18 item 8): a run whose prune/ another run holds, or a folder
        # under it, is refused, and a refused lock touches no file
        with pytest.raises(CurlpruneError, match="in use by another run"):
            RunLock(run).acquire()
        with pytest.raises(CurlpruneError, match="in use by another run"):
            RunLock(run / "prune" / "sub").acquire()
        assert len(_orphans(run)) == 2
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # the holder is gone: its leftovers and the run's own are orphans now
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
    copy = tmp_path / "copy"  # copied without the files' times (cp -r): still nothing to restore
    shutil.copytree(run, copy, copy_function=shutil.copyfile)
    assert cli("run", config, "--out", copy, "--no-report").returncode == 0
    assert [(copy / p.relative_to(run)).read_bytes() for p in before] == list(before.values())
