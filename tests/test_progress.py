"""Progress in logs (issue 22 item 6): off a terminal, long steps write a plain line at most every
30 s with done/total and an ETA (a fake clock drives the throttle), and a real ``curlprune prune``
piped to a file writes its progress lines."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import curlprune
from curlprune.progress import INTERVAL, progress

SRC = Path(curlprune.__file__).resolve().parents[1]


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_most_every_30_seconds_with_done_total_and_eta():
    clock, stream = FakeClock(), io.StringIO()
    stamps = []
    with progress("scoring (kl, 64 images)", 100, unit="units", stream=stream, clock=clock) as bar:
        for _ in range(100):  # one unit every 1.7 s: 170 s in all
            clock.now += 1.7
            before = stream.getvalue().count("\n")
            bar.advance(1)
            if stream.getvalue().count("\n") > before:
                stamps.append(clock.now)
    lines = stream.getvalue().splitlines()
    assert INTERVAL == 30.0
    assert len(lines) == len(stamps) + 1 == 6  # at 30.6, 61.2, 91.8, 122.4, 153 s, and the final line
    gaps = [b - a for a, b in zip([1000.0] + stamps, stamps)]
    assert all(gap >= 30.0 for gap in gaps) and all(gap < 32.0 for gap in gaps)
    first = lines[0]
    assert first.startswith("scoring (kl, 64 images): 18/100 units (18%)"), first
    assert "0:31 elapsed" in first and "ETA 2:19" in first  # 30.6 s for 18 units: 82 more take 139 s
    assert re.fullmatch(r"scoring \(kl, 64 images\): 100/100 units, done in 2:50", lines[-1])


def test_fields_disabled_and_no_final_line():
    clock, stream = FakeClock(), io.StringIO()
    with progress("distill 1/3", 10, unit="batches", stream=stream, clock=clock, fields_format="loss {loss:.2f}",
                  fields={"loss": float("nan")}, final_line=False) as bar:
        clock.now += 45
        bar.update(5, loss=1.25)
        clock.now += 10
        bar.update(6, loss=1.0)  # 10 s after the last line: none
    assert stream.getvalue().splitlines() == ["distill 1/3: 5/10 batches (50%), loss 1.25, 0:45 elapsed, ETA 0:45"]
    quiet = io.StringIO()
    with progress("x", 10, stream=quiet, clock=clock, enabled=False) as bar:
        clock.now += 100
        bar.advance(10)
    assert quiet.getvalue() == ""


def test_prune_piped_to_a_file_writes_progress_lines(tmp_path):
    log = tmp_path / "prune.log"
    code = "import sys; from curlprune.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["prune", "--model", "small:resnet-digits", "--data", "digits", "--target-macs", "0.5", "--calib", "32",
            "--out", str(tmp_path / "run"), "--no-report"]
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-c", code, *argv], stdout=out, stderr=subprocess.STDOUT, timeout=600,
                              env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert re.search(r"^scoring \(kl, 32 images, cpu\): (\d+)/\1 units, done in \d+:\d\d$", text, re.M), text[-2000:]
    assert "\x1b[" not in text  # no terminal escapes in a log file
