"""Pure helpers of the ResNet-56 benchmark (issue 21): the resumable rows file, sharding, the
Torch-Pruning stopping rule, and the statistics the claims rest on.

No torch here: tests/test_bench_stats.py checks every function on real numbers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

TOLERANCE = 0.01  # a row's achieved MACs must be within 1% of its target


# ---------------------------------------------------------------------------------- rows file


class RowsFile:
    """JSON lines, one finished row per line, keyed by ``row["id"]``; append-only.

    A row is written once, when it has finished; the first line of an id wins (a second writer of
    the same id, e.g. two shards started by mistake, never replaces it). Appends hold an exclusive
    lock and re-check the id under it, so two processes can share the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = self.path.with_name(self.path.name + ".lock")
        self.claims = self.path.with_name(self.path.name + ".claims")

    def read(self) -> dict[str, dict]:
        """id -> row of every finished row (first line of an id wins; a torn last line is ignored)."""
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed process: that row is simply not finished
            rows.setdefault(row["id"], row)
        return rows

    @contextlib.contextmanager
    def locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def append(self, row: Mapping) -> bool:
        """Append ``row`` (needs an ``id``) unless that id is already there; True when written."""
        with self.locked():
            if row["id"] in self.read():
                return False
            prefix = ""
            if self.path.is_file() and self.path.stat().st_size:
                with open(self.path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    prefix = "" if fh.read(1) == b"\n" else "\n"  # after a line cut by a killed process
            with open(self.path, "a") as fh:
                fh.write(prefix + json.dumps(row, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return True


    def _read_claims(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads(self.claims.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}  # no file yet, or one cut by a killed process: no live claims

    def claim(self, row_id: str, pid: int | None = None) -> bool:
        """Mark ``row_id`` as being computed by process ``pid`` (default: this one), so that other
        processes sharing the file leave it alone. False when the row is finished or another live
        process holds it; a claim by a process that no longer runs (killed) is taken over."""
        pid = os.getpid() if pid is None else pid
        with self.locked():
            if row_id in self.read():
                return False
            claims = self._read_claims()
            holder = claims.get(row_id)
            if holder is not None and holder != pid and _alive(holder):
                return False
            claims = {k: v for k, v in claims.items() if _alive(v)}
            claims[row_id] = pid
            self._write_claims(claims)
            return True

    def release(self, row_id: str) -> None:
        """Drop this process's claim on ``row_id`` (after it finished, or could not run yet)."""
        with self.locked():
            claims = self._read_claims()
            if claims.get(row_id) == os.getpid():
                del claims[row_id]
                self._write_claims(claims)

    def _write_claims(self, claims: dict[str, int]) -> None:
        """Replace the claims file with ``claims`` in one step (the caller holds the lock)."""
        tmp = self.claims.with_name(self.claims.name + ".tmp")
        tmp.write_text(json.dumps(claims, sort_keys=True))
        os.replace(tmp, self.claims)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


def pending(planned: Sequence[str], done: Iterable[str]) -> list[str]:
    """The planned ids not yet finished, in plan order."""
    finished = set(done)
    return [row for row in planned if row not in finished]


def shard(items: Sequence, spec: str | None) -> list:
    """Items of shard ``"i/n"`` (every n-th item from the i-th, by plan position); None = all.

    Interleaving keeps both shards on the rows that decide the claim first.
    """
    if not spec:
        return list(items)
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard {spec!r}: give i/n, e.g. 0/2") from None
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard {spec!r}: need 0 <= i < n")
    return [item for position, item in enumerate(items) if position % count == index]


def run_pending(ids: Sequence[str], store: RowsFile, compute: Callable[[str, dict], dict | None],
                report: Callable[[], None], wait: bool = True, poll_seconds: float = 60.0,
                log: Callable[[str], None] = print, summary: Callable[[dict], str] | None = None) -> list[str]:
    """Compute the unfinished rows of ``ids`` in plan order and append each to ``store`` as it finishes.

    ``compute(row_id, done)`` returns the row (a JSON-able dict with ``id``), or None while the row
    cannot run yet (it waits for rows another shard computes); such a row is retried after every
    finished row. With nothing runnable: wait ``poll_seconds`` and look again (``wait``), or stop.
    A row found finished in the file (e.g. written by another process) is never computed, and a
    row another live process has claimed (:meth:`RowsFile.claim`) is left to it: processes sharing
    ``store`` split the plan dynamically, each taking the next row that is free and can run.
    ``summary(row)``: what the log line of a finished row says after its id ("finished" when None).

    Returns:
        The ids left unfinished (empty unless ``wait`` is False).
    """
    todo = pending(ids, store.read())
    waiting_since = None
    while todo:
        progressed = False
        for row_id in list(todo):
            done = store.read()
            if row_id in done:
                todo.remove(row_id)
                continue
            if not store.claim(row_id):
                continue  # finished meanwhile, or another process computes it
            try:
                record = compute(row_id, done)
                if record is not None:
                    store.append(record)
            finally:
                store.release(row_id)
            if record is None:
                continue
            todo.remove(row_id)
            progressed, waiting_since = True, None
            report()
            log(f"{row_id}: {summary(record) if summary else 'finished'}")
            break  # from the top again: earlier rows may have become runnable
        if todo and not progressed:
            if not wait:
                log(f"stopping: {len(todo)} row(s) wait for rows not finished (another shard?): {', '.join(todo[:3])}")
                return todo
            waiting_since = waiting_since or time.time()
            log(f"waiting for the rows {todo[0]} needs ({time.time() - waiting_since:.0f} s)")
            time.sleep(poll_seconds)
    return []


# ---------------------------------------------------------------------------------- devices


def run_on(row: Mapping) -> str:
    """Where a row was computed: its ``device`` ("cpu" | "cuda") and, when not off, its ``amp``
    ("cuda, bf16"). Rows recorded before the fields existed ran on the CPU in float32: "cpu"."""
    device, amp = row.get("device") or "cpu", row.get("amp") or "off"
    return device if amp == "off" else f"{device}, {amp}"


def mixed_devices(rows: Iterable[Mapping]) -> list[str]:
    """The sorted :func:`run_on` labels of ``rows`` when there are two or more (their numbers come
    from kernels that round differently: a mean or a difference over them is flagged), else []."""
    labels = sorted({run_on(row) for row in rows})
    return labels if len(labels) > 1 else []


# ---------------------------------------------------------------------------------- stopping rule


def nearest_step(history: Sequence[float], target: float) -> int:
    """Index of the step whose MACs are nearest ``target`` (ties: the earlier step).

    ``history[k]``: the MACs after k steps (history[0] = unpruned).
    """
    return min(range(len(history)), key=lambda k: (abs(history[k] - target), k))


def within(achieved: float, target: float, tolerance: float = TOLERANCE) -> bool:
    """|achieved / target - 1| <= tolerance."""
    return abs(achieved / target - 1.0) <= tolerance


# ---------------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std None for one value."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict | None:
    """Paired difference a - b over the seeds both have.

    Returns ``{"mean", "se", "n", "seeds"}``: mean of d_s = a_s - b_s and its standard error
    std(d, n - 1) / sqrt(n) (None with one seed); None when no seed is shared.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    se = None if std is None else std / math.sqrt(len(diffs))
    return {"mean": mean, "se": se, "n": len(diffs), "seeds": seeds}


def verdict(diff: Mapping | None) -> str:
    """"ahead" / "behind" only beyond two standard errors, else "on par"; one seed: "one seed"."""
    if diff is None:
        return "-"
    if diff["se"] is None:
        return "one seed, no SE"
    if diff["mean"] > 2 * diff["se"]:
        return "ahead"
    if diff["mean"] < -2 * diff["se"]:
        return "behind"
    return "on par"


def fmt_mean_std(values: Sequence[float]) -> str:
    """"91.52 ± 0.11 (3)" (n in brackets); one value: "91.52 (1)"; values all identical (e.g. a
    number of the model before training, the same for every seed): "85.93 (all 3 identical)", no
    spread shown for what is one number."""
    if not values:
        return "-"
    if len(values) > 1 and len(set(values)) == 1:
        return f"{values[0]:.2f} (all {len(values)} identical)"
    mean, std = mean_std(values)
    return f"{mean:.2f} ({len(values)})" if std is None else f"{mean:.2f} ± {std:.2f} ({len(values)})"
