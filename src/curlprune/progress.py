"""Progress of long steps (data loading, scoring, epochs, evaluation): a rich bar on a terminal, plain
throttled lines otherwise, so that a job whose output goes to a file is never silent for minutes.

    with progress("scoring (kl, 256 images)", total, unit="units") as bar:
        ...
        bar.advance(n)                      # or bar.update(done, loss=..., lr=...)

Off a terminal a line such as ``scoring (kl, 256 images): 40/144 units (28%), 0:30 elapsed, ETA 1:18``
is written to the stream at most every :data:`INTERVAL` seconds (30) while the step runs, and one
line when it ends (unless ``final_line`` is False: the trainer prints its own epoch line). A leaf
module: it imports nothing of the package, so every stage may use it.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

INTERVAL = 30.0
"""Seconds between two plain progress lines of one step (issue 22: never silent for minutes)."""


class PlainProgress:
    """Progress as plain lines on ``stream``: at most one every ``interval`` seconds of ``clock``.

    Args:
        description: what runs ("scoring (kl, 256 images)", "distill 3/30").
        total: the amount of work (units, batches, images).
        stream: where the lines go (a file object).
        unit: the work's unit, in the line ("units", "batches").
        clock: seconds, monotonic (``time.monotonic``; a test passes its own).
        interval: the least time between two lines while the step runs.
        fields_format: a ``str.format`` template of extra fields ("loss {loss:.4f}"), shown when set.
        fields: their first values.
    """

    def __init__(self, description: str, total: float, stream: TextIO, *, unit: str = "", clock: Callable[[], float] = time.monotonic,
                 interval: float = INTERVAL, fields_format: str = "", fields: dict[str, Any] | None = None) -> None:
        self.description, self.total, self.stream, self.unit = description, float(total), stream, unit
        self.clock, self.interval, self.fields_format, self.fields = clock, interval, fields_format, dict(fields or {})
        self.started = self.last = clock()
        self.done = 0.0

    def advance(self, amount: float = 1.0) -> None:
        """``amount`` more work done."""
        self.update(self.done + amount)

    def update(self, done: float, **fields: Any) -> None:
        """``done`` of the total finished (and the extra fields' values); a line when ``interval`` has passed since the last."""
        self.done = float(done)
        self.fields.update(fields)
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def finish(self) -> None:
        """The last line: the work done and the time it took."""
        self._write(self.clock(), final=True)

    def line(self, now: float, final: bool = False) -> str:
        """The progress line at time ``now``: done/total, percent, elapsed and the ETA (linear in the work done)."""
        elapsed = now - self.started
        unit = f" {self.unit}" if self.unit else ""
        share = f" ({100.0 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        extra = f", {self.fields_format.format(**self.fields)}" if self.fields_format else ""
        if final:
            return f"{self.description}: {self.done:g}/{self.total:g}{unit}{extra}, done in {_clock(elapsed)}"
        eta = _clock(elapsed * (self.total - self.done) / self.done) if self.done > 0 else "?"
        return f"{self.description}: {self.done:g}/{self.total:g}{unit}{share}{extra}, {_clock(elapsed)} elapsed, ETA {eta}"

    def _write(self, now: float, final: bool = False) -> None:
        self.stream.write(self.line(now, final) + "\n")
        self.stream.flush()


class _RichSteps:
    """The rich bar behind the same two calls as :class:`PlainProgress`."""

    def __init__(self, bar: Progress, task: Any) -> None:
        self.bar, self.task = bar, task

    def advance(self, amount: float = 1.0) -> None:
        self.bar.advance(self.task, amount)

    def update(self, done: float, **fields: Any) -> None:
        self.bar.update(self.task, completed=done, **fields)


class _Silent:
    def advance(self, amount: float = 1.0) -> None:
        pass

    def update(self, done: float, **fields: Any) -> None:
        pass


@contextmanager
def progress(description: str, total: float, *, unit: str = "", enabled: bool = True, stream: TextIO | None = None,
             clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL, fields_format: str = "",
             fields: dict[str, Any] | None = None, final_line: bool = True, transient: bool = False,
             plain_only: bool = False) -> Iterator[Any]:
    """Show the progress of one long step: a rich bar on a terminal, plain throttled lines otherwise.

    Args:
        description: what runs.
        total: the amount of work (> 0 for a percentage and an ETA).
        unit: the work's unit ("units", "batches", "images").
        enabled: False = nothing is shown (the calls still work).
        stream: where it goes; None = standard error (where rich bars go), looked up at the call.
        clock: seconds, monotonic, for the plain lines (a test passes a fake one).
        interval: least seconds between two plain lines (:data:`INTERVAL`).
        fields_format, fields: extra fields (``"loss {loss:.4f}"``, ``{"loss": nan}``), updated by ``update(done, loss=...)``.
        final_line: write a plain line when the step ends.
        transient: remove the rich bar when the step ends.
        plain_only: no bar on a terminal (steps that may run inside another bar: evaluation, data
            loading; rich shows one live bar at a time); the plain lines off a terminal.
    Yields:
        An object with ``advance(amount)`` and ``update(done, **fields)``.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        yield _Silent()
        return
    console = Console(file=stream)
    if console.is_terminal and plain_only:
        yield _Silent()
        return
    if not console.is_terminal:
        plain = PlainProgress(description, total, stream, unit=unit, clock=clock, interval=interval,
                              fields_format=fields_format, fields=fields)
        yield plain
        if final_line:
            plain.finish()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(unit)] if unit else []
    columns += [TextColumn(_rich_fields(fields_format))] if fields_format else []
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=transient) as bar:
        task = bar.add_task(description, total=total, **(fields or {}))
        yield _RichSteps(bar, task)


def _rich_fields(fields_format: str) -> str:
    """``"loss {loss:.4f}"`` -> ``"loss {task.fields[loss]:.4f}"`` (rich's column template)."""
    out, i = [], 0
    while i < len(fields_format):
        if fields_format[i] == "{":
            end = fields_format.index("}", i)
            name, _, spec = fields_format[i + 1:end].partition(":")
            out.append("{task.fields[" + name + "]" + (":" + spec if spec else "") + "}")
            i = end + 1
        else:
            out.append(fields_format[i])
            i += 1
    return "".join(out)


def _clock(seconds: float) -> str:
    """``h:mm:ss`` or ``m:ss``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
