"""Runs of tests/recover_job.py (a tiny real finetune -> distill -> refine on digits) that the recovery
tests share: each finished run made once per session (the ``recover_runs`` fixture of conftest.py),
several at a time on a machine with several cores, and a run SIGKILLed in the middle of an epoch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from curlprune.recover.state import STATE_KEY

JOB = Path(__file__).with_name("recover_job.py")
STAGES = ("finetune", "distill", "refine")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMEOUT = 300  # seconds a run may take


def run_job(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python tests/recover_job.py RUN_DIR ARGS`` to its end (one intra-op thread)."""
    return subprocess.run([sys.executable, str(JOB), str(run_dir), *args], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def start_tripped(run_dir: Path, *args: str) -> subprocess.Popen:
    """Start ``recover_job.py RUN_DIR ARGS`` (ARGS hold ``--trip STAGE``): it writes RUN_DIR/tripped and
    waits in the middle of the tripped epoch (:func:`kill_when_tripped`)."""
    return subprocess.Popen([sys.executable, str(JOB), str(run_dir), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_when_tripped(process: subprocess.Popen, run_dir: Path, deadline_s: float = 240) -> None:
    """SIGKILL a job of :func:`start_tripped` once it has written RUN_DIR/tripped; fails when it ends or hangs first."""
    deadline = time.monotonic() + deadline_s
    try:
        while not (run_dir / "tripped").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job never reached the epoch to kill"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.communicate()
        assert process.returncode == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def kill_mid_epoch(run_dir: Path, *args: str) -> None:
    """Run ``recover_job.py RUN_DIR ARGS`` (ARGS hold ``--trip STAGE``) and SIGKILL it in the middle of the tripped epoch."""
    kill_when_tripped(start_tripped(run_dir, *args), run_dir)


def state_of(run_dir: Path, stage: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a stage's resumable state file."""
    path = run_dir / stage / "state.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[STATE_KEY])
    return load_file(str(path)), meta


def history(run_dir: Path, stage: str) -> list[dict]:
    """A stage's metrics.jsonl without the wall-clock seconds."""
    lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


class RecoverRuns:
    """Finished runs of recover_job.py, one per argument list, each made once.

    :meth:`start` queues runs; up to one per core (at most 4) run at the same time, in processes of
    one thread each, while the tests go on; :meth:`get` waits for one (starting it first if needed).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.width = max(1, min(4, len(os.sched_getaffinity(0))))
        self.done: dict[tuple[str, ...], Path] = {}
        self.queued: list[tuple[str, ...]] = []
        self.running: dict[tuple[str, ...], tuple[subprocess.Popen, Path, Path, float]] = {}
        self.count = 0

    def start(self, *arg_lists: tuple[str, ...]) -> None:
        """Queue these runs (those not made nor queued yet) and start as many as there are free cores."""
        for args in map(tuple, arg_lists):
            if args not in self.done and args not in self.running and args not in self.queued:
                self.queued.append(args)
        self._fill()

    def get(self, *args: str) -> Path:
        """The run directory of the finished run of ``recover_job.py RUN_DIR ARGS``."""
        if args not in self.done and args not in self.running:
            if args in self.queued:
                self.queued.remove(args)
            self.queued.insert(0, args)  # wanted now: first
            self._fill()
        while args not in self.done:
            self._reap()
            time.sleep(0.05)
        return self.done[args]

    def close(self) -> None:
        """Kill runs still going (the session ends, e.g. after a failure)."""
        self.queued.clear()
        for process, *_ in self.running.values():
            process.kill()
            process.wait()
        self.running.clear()

    def _fill(self) -> None:
        while self.queued and len(self.running) < self.width:
            args = self.queued.pop(0)
            self.count += 1
            run_dir = self.root / f"run{self.count}"
            run_dir.mkdir()
            log = self.root / f"{run_dir.name}.log"
            with log.open("w") as out:
                process = subprocess.Popen([sys.executable, str(JOB), str(run_dir), *args], env=ENV, stdout=out, stderr=subprocess.STDOUT)
            self.running[args] = (process, run_dir, log, time.monotonic())

    def _reap(self) -> None:
        for args, (process, run_dir, log, started) in list(self.running.items()):
            if process.poll() is None and time.monotonic() - started > TIMEOUT:
                process.kill()
                process.wait()
            if process.poll() is not None:
                del self.running[args]
                assert process.returncode == 0, f"recover_job.py {' '.join(args)}: {log.read_text()[-3000:]}"
                self.done[args] = run_dir
        self._fill()
