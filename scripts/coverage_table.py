"""Coverage sweep: which models curlprune (and, side by side, Torch-Pruning) can prune, measured;
docs/coverage.md from the results.

    python scripts/coverage_table.py [--models GLOBS] [--tool curl|tp|both] [--shard i/n] [--redo GLOBS] [--retry]
    python scripts/coverage_table.py --report                 (docs/coverage.md from the rows file alone)
    python scripts/coverage_table.py --list [--models GLOBS] [--shard i/n]   (what would be measured)

Models (scripts/coverage_measure.py): every classification model of torchvision, a member of every
timm family (``TIMM_MODELS``; timm is the optional extra ``curlprune[timm]``), torchvision's
segmentation models whole and its detectors' backbones with their FPN. Each (model, tool) runs in its
own forked process with a time limit, so a crash, a hang or an out-of-memory kill of one never stops the
sweep. Tools: ``curl`` (curlprune: trace, masked == sliced for a random plan pruning every prunable
group, plan_cost == count; coverage_measure.measure) and ``tp`` (Torch-Pruning 1.6.1's group L2-norm
pruner at 50% per layer, optional extra ``curlprune[bench]``; coverage_tp.measure_tp).

Resumable: each finished (model, tool) is appended as one JSON line, id ``<tool>:<model>``, to the
rows file (docs/coverage.jsonl, committed); a rerun never measures a finished one again, unless its
model matches ``--redo`` (its line is then replaced atomically) or, with ``--retry``, it timed out
or was killed. ``--shard i/n`` takes every n-th model of the list, so two processes share the work
(appends hold a lock). ``--models``: comma-separated shell globs over the names (``timm:*``,
``torchvision:resnet*,segmentation:*``; a glob without ``:`` matches any source).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torchvision

import coverage_report
from coverage_measure import all_names, family_of, first_line, measure, source_of, status_of
from coverage_rows import RowsFile, matching, shard, todo
from coverage_tp import measure_tp, tp, tp_version
import curlprune
from curlprune.errors import CurlpruneError

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "docs" / "coverage.jsonl"
DOC = ROOT / "docs" / "coverage.md"
TOOLS = ("curl", "tp")
RETRY = ("timeout", "killed")
FORK = multiprocessing.get_context("fork")


def git_commit() -> str:
    """The measured code's commit (COVERAGE_COMMIT when the sweep runs from an exported snapshot)."""
    if os.environ.get("COVERAGE_COMMIT"):
        return os.environ["COVERAGE_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def timm_version() -> str | None:
    try:
        return version("timm")
    except PackageNotFoundError:
        return None


def child(name: str, tool: str, out: Path) -> int:
    """Measure ``name`` with ``tool`` in this process and write its row to ``out`` (also on failure)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    begin = time.perf_counter()
    row: dict = {"name": name, "tool": tool}
    try:
        (measure if tool == "curl" else measure_tp)(name, row)
    except Exception as exc:  # noqa: BLE001 - a row per model, whatever happens
        row["error"] = f"{type(exc).__name__}: {first_line(exc)}"
        row["error_one_line"] = "\n" not in str(exc).strip()
        row["kind_of_error"] = "error" if isinstance(exc, CurlpruneError) else "crash"
        row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        row["stage_failed"] = row.get("stage", "?")
        if tool == "tp":  # building the model or its input failed before Torch-Pruning ran
            row["tp"] = f"{type(exc).__name__} in {row['stage_failed']}"
    row["seconds"] = round(time.perf_counter() - begin, 1)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(row, sort_keys=True))
    tmp.replace(out)
    return 0


def finish(row: dict, commit: str) -> dict:
    """Add the id, source, family, status and versions to a measured row."""
    row["id"] = f"{row['tool']}:{row['name']}"
    row["source"] = source_of(row["name"])
    row["family"], row["kind"] = family_of(row["name"])
    if row["tool"] == "curl":
        row["status"] = status_of(row)
    else:
        row["status"] = row.get("tp") or row.get("kind_of_error", "crash")
    row["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm_version(),
                       "torch_pruning": tp_version(), "python": platform.python_version(), "curlprune_commit": commit}
    row["measured_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return row


def run_one(name: str, tool: str, timeout: float, commit: str, folder: Path) -> dict:
    """One (model, tool) in a forked child process with a time limit; its finished row.

    Forked from this process, which has torch, torchvision, timm, Torch-Pruning and curlprune imported
    already (importing them takes 10-20 s on a busy 2-core machine, more than most models take), and
    which never runs a torch op itself, so the child starts with no thread pool to inherit."""
    out = folder / f"{tool}-{name.replace(':', '__').replace('/', '_')}.json"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = FORK.Process(target=child, args=(name, tool, out), daemon=True)
    proc.start()
    try:
        proc.join(timeout)
    finally:  # the time limit, or this process stopped (SIGTERM, Ctrl-C): the model's process goes too
        timed_out = proc.is_alive()
        if timed_out:
            proc.kill()
            proc.join()
    rc = None if timed_out else proc.exitcode
    wall = round(time.perf_counter() - start, 1)
    row = json.loads(out.read_text()) if rc == 0 and out.is_file() else None
    if row is None or row.get("name") != name:
        row = {"name": name, "tool": tool, "seconds": wall}
        if rc is None:
            row.update(error=f"no result within {timeout:.0f} s", kind_of_error="timeout", tp="timeout")
        else:
            row.update(error=f"the process died (exit {rc}; out of memory?)", kind_of_error="killed", tp="killed")
        if tool == "curl":
            row.pop("tp")
    row["wall_s"] = wall
    return finish(row, commit)


def sweep(store: RowsFile, names: list[str], tools: list[str], timeout: float, redo: list[str], retry: bool) -> int:
    """Measure every (model, tool) of ``names`` x ``tools`` without a finished row (see the module doc)."""
    rows = store.read()
    again = set(redo) | ({i for i, r in rows.items() if r.get("status") in RETRY} if retry else set())
    pairs = todo(names, tools, rows, again)
    commit = git_commit()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # `kill PID` stops cleanly
    print(f"pid {os.getpid()} (stop: kill {os.getpid()}; a rerun resumes)", flush=True)
    print(f"{len(pairs)} to measure ({len(names)} models x {len(tools)} tools; the rest finished) in {store.path}; "
          f"curlprune from {Path(curlprune.__file__).parent} at {commit}", flush=True)
    with tempfile.TemporaryDirectory(prefix="coverage-") as folder:
        for k, (name, tool) in enumerate(pairs, 1):
            row = run_one(name, tool, timeout, commit, Path(folder))
            if name in again or f"{tool}:{name}" in again:
                store.replace(row)
                written = True
            else:
                written = store.append(row)
            note = "" if written else " (another process finished it first; kept its row)"
            print(f"[{k}/{len(pairs)}] {tool} {name}: {row['status']} ({row['wall_s']} s) {row.get('error', '')}{note}",
                  flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated globs over the model names (default: all)")
    parser.add_argument("--tool", choices=("curl", "tp", "both"), default="both")
    parser.add_argument("--shard", default=None, help="i/n: every n-th model from the i-th (two processes: 0/2 and 1/2)")
    parser.add_argument("--redo", default="", help="globs of models to measure again (their rows are replaced)")
    parser.add_argument("--retry", action="store_true", help="measure again the rows that timed out or were killed")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per model and tool (default 900)")
    parser.add_argument("--rows", default=str(ROWS), help=f"the rows file (default {ROWS.relative_to(ROOT)})")
    parser.add_argument("--report", action="store_true", help="write docs/coverage.md from the rows file, measure nothing")
    parser.add_argument("--out", default=str(DOC), help="the report's file (- for stdout)")
    parser.add_argument("--list", action="store_true", help="print the selected models and exit")
    parser.add_argument("--child", nargs=3, metavar=("NAME", "TOOL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], Path(args.child[2]))
    store = RowsFile(args.rows)
    if args.report:
        text = coverage_report.render(store.read())
        if args.out == "-":
            sys.stdout.write(text)
        else:
            coverage_report.write_atomic(Path(args.out), text)
            print(f"wrote {args.out} from {store.path}")
        return 0
    everything = all_names()
    names = matching(everything, args.models)
    redo = matching(everything, args.redo) if args.redo else []
    try:
        names = shard(names, args.shard)
    except ValueError as exc:
        parser.error(str(exc))
    if not names:
        parser.error(f"--models {args.models!r} matches no model (see --list)")
    if args.list:
        print("\n".join(names))
        return 0
    tools = list(TOOLS) if args.tool == "both" else [args.tool]
    if any(n.startswith("timm:") for n in names) and timm_version() is None:
        parser.error("the timm models need timm: pip install curlprune[timm] (or --models without timm:*)")
    if "tp" in tools and tp is None:  # no rows for it, so that installing it later measures them
        if args.tool == "tp":
            parser.error("Torch-Pruning is not installed: pip install curlprune[bench]")
        print("Torch-Pruning is not installed (pip install curlprune[bench]): curlprune's rows only", flush=True)
        tools.remove("tp")
    return sweep(store, names, tools, args.timeout, [n for n in redo if n in names], args.retry)


if __name__ == "__main__":
    sys.exit(main())
