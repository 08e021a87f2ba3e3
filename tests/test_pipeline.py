"""`curlprune run` end to end on real digits: prune -> distill -> refine, skip on rerun, resume
after SIGKILL with bitwise-equal final weights, torchrun with two CPU processes, and one-line
errors for bad configs, a teacher that does not fit the data and a missing student."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from curlprune.cli import main
from curlprune.cost.cost import count
from curlprune.models import build, digits_resnet
from curlprune.run.run_config import config_to_dict, parse_config
from curlprune.store import checkpoint

MODEL = "small:resnet-digits"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {  # real digits, 50 training images per class; a budget that runs in seconds
    "model": MODEL,
    "data": "digits",
    "train_per_class": 50,
    "seed": 0,
    "stages": ["prune", "distill", "refine"],
    "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
    "distill": {"epochs": 4, "warmup_epochs": 0.5, "batch_size": 32},
    "refine": {"epochs": 1, "batch_size": 32, "lr": 1e-3},
}


def write_config(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(changes))
    return path


def tiny_config(directory: Path, teacher: Path, **changes) -> Path:
    """TINY with ``changes`` (a key set to None is left out)."""
    content = {**TINY, "weights": str(teacher), "run_dir": str(directory / "run"), **changes}
    return write_config(directory / "config.yaml", **{k: v for k, v in content.items() if v is not None})


def curlprune(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curlprune.cli", *args], env=ONE_THREAD, capture_output=True, text=True, timeout=300, **kwargs)


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Modification time and bytes of every file under ``run_dir``."""
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("curlprune: error: "), err
    return err[0]


# ----- a full run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, teacher) -> Path:
    directory = tmp_path_factory.mktemp("full")
    done = curlprune("run", str(tiny_config(directory, teacher)))
    assert done.returncode == 0, done.stderr[-3000:]
    return directory / "run"


def test_run_writes_summary_and_a_loadable_model_at_half_the_macs(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert list(summary["stages"]) == ["prune", "distill", "refine"]
    assert summary["stages"]["distill"]["epochs"] == 4 and summary["stages"]["refine"]["epochs"] == 1
    assert summary["last_top1"] == summary["stages"]["refine"]["last_top1"]
    assert summary["best_top1"] >= summary["last_top1"] > 50.0  # % on the 360 real test digits
    model = checkpoint.load(full_run / "model.safetensors")
    macs, params = count(model, torch.zeros(1, 1, 8, 8))
    base_macs, base_params = count(build(MODEL), torch.zeros(1, 1, 8, 8))
    assert (macs, params) == (summary["macs"], summary["params"])
    assert macs <= 0.5 * base_macs and summary["macs_ratio"] == pytest.approx(macs / base_macs)
    assert params < base_params
    refined = load_file(str(full_run / "refine" / "model.safetensors"))
    assert all(torch.equal(refined[k], v) for k, v in model.state_dict().items())
    for stage, epochs in (("distill", 4), ("refine", 1)):
        lines = [json.loads(line) for line in (full_run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in lines] == list(range(1, epochs + 1))
        assert {"loss", "lr", "train_top1", "test_top1", "seconds"} <= set(lines[0])
    events = [json.loads(line)["stage"] for line in (full_run / "log.jsonl").read_text().splitlines()]
    assert events == ["prune", "distill", "refine"]


def test_rerun_skips_every_stage_and_rewrites_nothing(full_run, capsys):
    before = snapshot(full_run)
    capsys.readouterr()
    assert main(["run", str(full_run.parent / "config.yaml")]) == 0  # in this process: nothing to start up for
    assert "epoch" not in capsys.readouterr().err  # no training epoch ran
    assert snapshot(full_run) == before


def test_run_killed_in_distill_resumes_and_ends_bitwise_equal(full_run, tmp_path, teacher, capsys):
    config = tiny_config(tmp_path, teacher)
    run_dir = tmp_path / "run"
    metrics = run_dir / "distill" / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "curlprune.cli", "run", str(config)], env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert process.poll() is None and time.time() < deadline, "the run ended before distill's first epoch"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not (run_dir / "distill" / "done.json").exists(), "killed too late: distill had already finished"
    pruned = {k: v for k, v in snapshot(run_dir).items() if k.startswith("prune/")}
    assert pruned

    capsys.readouterr()
    assert main(["run", str(config)]) == 0  # the same command again, in this process (one thread, as the killed one)
    assert "distill: resuming after epoch" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(run_dir).items() if k.startswith("prune/")} == pruned  # prune not redone
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    resumed = load_file(str(run_dir / "model.safetensors"))
    uninterrupted = load_file(str(full_run / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


def test_single_stage_trains_a_given_student(full_run, teacher, tmp_path):
    student = full_run / "prune" / "model.safetensors"
    out = tmp_path / "ft"
    argv = ["finetune", "--model", MODEL, "--weights", str(teacher), "--data", "digits",
            "--train-per-class", "10", "--epochs", "1", "--student", str(student), "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs_ratio"] <= 0.5 and summary["stages"]["finetune"]["epochs"] == 1


# ----- several processes -----------------------------------------------------------------------
def torchrun(config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "curlprune.cli", "run", str(config)]
    return subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_runs_the_pipeline(tmp_path, teacher):
    """Rank 0 alone prunes and writes; both ranks train (gloo); the run ends like a one-process run."""
    config = tiny_config(tmp_path, teacher, train_per_class=10, distill={"epochs": 2, "batch_size": 32}, refine={"epochs": 1, "batch_size": 32})
    done = torchrun(config)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["prune", "distill", "refine"] and summary["macs_ratio"] <= 0.5
    events = [json.loads(line)["stage"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert events == ["prune", "distill", "refine"]  # one writer
    prune_events = [json.loads(line)["event"] for line in (run_dir / "prune" / "log.jsonl").read_text().splitlines()]
    assert prune_events.count("done") == 1  # pruned once, by rank 0
    for stage, epochs in (("distill", [1, 2]), ("refine", [1])):
        assert [json.loads(line)["epoch"] for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()] == epochs
    assert done.stdout.count("run summary") == 1  # printed by rank 0 only
    checkpoint.load(run_dir / "model.safetensors")


def on_main_worker(rank: int, port: int, results) -> None:
    """One of two gloo processes: rank 0's work succeeds once, then fails; both ranks report what they got."""
    import torch.distributed as torch_dist

    from curlprune.errors import CurlpruneError
    from curlprune.recover.dist import on_main
    from curlprune.recover.dist import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    ctx = init_distributed("cpu")
    ran = []

    def work(value):
        ran.append(value)
        if value == "fail":
            raise CurlpruneError("target not reachable")
        return {"checkpoint": f"written by rank {ctx.rank}"}

    got = [on_main(ctx, lambda: work("ok"))]
    try:
        on_main(ctx, lambda: work("fail"))
    except CurlpruneError as exc:
        got.append(str(exc))
    results.put((rank, got, ran))
    torch_dist.destroy_process_group()


def test_on_main_runs_work_on_rank_0_only_and_shares_its_result_or_error():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    workers = [spawn.Process(target=on_main_worker, args=(rank, port, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    reports = dict((rank, (got, ran)) for rank, got, ran in (results.get(timeout=120) for _ in workers))
    for worker in workers:
        worker.join(timeout=60)
    expected = [{"checkpoint": "written by rank 0"}, "target not reachable"]
    assert reports == {0: (expected, ["ok", "fail"]), 1: (expected, [])}


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        ({"model": MODEL, "epochs": 3}, "unknown key 'epochs'; valid keys:"),
        ({"model": MODEL, "stages": ["distill"], "distill": {"epoch": 3}}, "unknown key 'epoch' in section 'distill'; valid keys: alpha, amp, batch_size"),
        ({"model": MODEL, "stages": ["distill", "polish"]}, "unknown stage 'polish'"),
        ({"data": "digits", "stages": ["distill"]}, "'model' is missing"),
        ({"model": MODEL, "stages": ["distill", "prune"]}, "'prune' must be the first stage"),
        ("model: [unclosed\n", "is not valid YAML"),
        ({"model": MODEL, "data": "digits", "stages": ["prune"], "prune": {"target_macs": 0.5, "allocation": "greedy"}},
         "unknown allocation 'greedy': use one of cost-weighted, paper"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, content, message):
    config = tmp_path / "config.yaml"
    config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    assert message in one_line_error(capsys, ["run", str(config), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("command", ["run", "distill"])
def test_config_that_is_not_text_is_one_line_and_exit_2(tmp_path, capsys, command):
    # A binary or otherwise non-UTF-8 file given as the config ended in a UnicodeDecodeError traceback.
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe\xfa model: x\n" + bytes(range(128, 256)))
    argv = ["run", str(config)] if command == "run" else ["distill", "--config", str(config)]
    assert "is not a text file" in one_line_error(capsys, [*argv, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_folder_given_as_the_config_is_named_as_a_folder(tmp_path, capsys):
    # `curlprune run runs/r1` (a run folder, not its config) said "config runs/r1 does not exist".
    folder = tmp_path / "somewhere"
    folder.mkdir()
    line = one_line_error(capsys, ["run", str(folder), "--out", str(tmp_path / "run")])
    assert "is a folder" in line and "does not exist" not in line
    assert not (tmp_path / "run").exists()


def test_a_section_that_is_no_mapping_shows_an_example_of_its_own_keys(tmp_path, capsys):
    # `prune: 5` answered "e.g. prune: {epochs: 10}", and prune has no key 'epochs'.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "data": "digits", "stages": ["prune"], "prune": 5}))
    line = one_line_error(capsys, ["run", str(config), "--out", str(tmp_path / "run")])
    assert "prune: {target_macs: 0.5}" in line and "epochs" not in line
    config.write_text(yaml.safe_dump({"model": MODEL, "data": "digits", "stages": ["distill"], "distill": 5}))
    assert "distill: {epochs: 10}" in one_line_error(capsys, ["run", str(config), "--out", str(tmp_path / "run")])


def test_allocation_key_of_the_prune_section():
    """Unset, it stays out of config.json (folders from before the key resume) and means cost-weighted."""
    unset = parse_config({"model": MODEL, "data": "digits", "stages": ["prune"], "prune": {"target_macs": 0.5}})
    assert "allocation" not in config_to_dict(unset)["prune"]
    assert unset.sections["prune"].resolved_allocation() == "cost-weighted"
    paper = parse_config({"model": MODEL, "data": "digits", "stages": ["prune"], "prune": {"target_macs": 0.5, "allocation": "paper"}})
    assert config_to_dict(paper)["prune"]["allocation"] == "paper" and paper.sections["prune"].resolved_allocation() == "paper"


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, ["run", str(tmp_path / "missing.yaml")])


def test_teacher_with_other_classes_than_the_data_is_one_line(tmp_path, capsys):
    weights = tmp_path / "five.pt"
    torch.save(digits_resnet(num_classes=5).state_dict(), weights)
    config = write_config(tmp_path / "config.yaml", model=MODEL, weights=str(weights), num_classes=5, data="digits",
                          stages=["distill"], run_dir=str(tmp_path / "run"))
    line = one_line_error(capsys, ["run", str(config)])
    assert "teacher outputs 5 classes but the data has 10" in line
    assert not (tmp_path / "run" / "distill").exists()


def test_missing_student_checkpoint_is_one_line(tmp_path, capsys):
    line = one_line_error(capsys, ["distill", "--model", MODEL, "--student", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "run")])
    assert "nope.safetensors does not exist" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 1}, "holds a run with different settings: seed=0 (now 1)"),
        ({"stages": ["distill"]}, "not a prefix or extension"),
        ({"prune": {**TINY["prune"], "target_macs": 0.4}}, "holds a finished prune stage with other settings: target_macs=0.5 (now 0.4)"),
        ({"prune": {**TINY["prune"], "allocation": "paper"}}, "holds a finished prune stage with other settings: allocation=None (now 'paper')"),
        ({"distill": {**TINY["distill"], "epochs": 5}}, "written with different settings: epochs=4 (now 5)"),
    ],
)
def test_rerun_with_other_settings_in_the_same_run_dir_is_one_line_and_changes_nothing(full_run, capsys, change, message):
    before = snapshot(full_run)
    raw = yaml.safe_load((full_run.parent / "config.yaml").read_text())
    config = write_config(full_run.parent / "other.yaml", **{**raw, **change})
    assert message in one_line_error(capsys, ["run", str(config)])
    assert snapshot(full_run) == before
