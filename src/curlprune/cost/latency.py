"""Measured latency on this machine, and a latency target for the selection.

Timing (:func:`time_interleaved`, :func:`compare_latency`): every candidate is timed against the
unpruned reference *in the same run*, alternating them round by round (reference first on even
rounds, candidate first on odd rounds), so slow drifts of a shared machine hit both alike. A round
times each runner once; one timing is ``number`` back-to-back calls, with ``number`` chosen from the
warm-up so that one timing lasts at least ``min_time_s`` (short models are not timed below the
clock's resolution). The reported ratio is the median over rounds of ``candidate / reference``,
not the quotient of two separately taken medians. Rounds continue from ``min_rounds`` until the
ratio's noise estimate (the inter-quartile range of the per-round ratios divided by ``sqrt(rounds)``,
relative to the median) is below half the stated ``tolerance``, or ``max_rounds`` is reached; the
estimate is reported with every result.

Models run as a deployment runs them (:func:`prepare`: BN folded into the convs, residual adds in
place, :mod:`curlprune.surgery.inference`), in eval mode under ``torch.inference_mode``, in ``channels_last``
memory format (4-D inputs), with ``threads`` intra-op threads (restored afterwards). The clock is any callable returning
seconds (default :func:`time.perf_counter`); tests inject a deterministic one.

Latency target (:func:`curlprune.select.latency_select.select_latency`): the global ranking of docs/method.md §3 is unchanged; only
the stopping point along it is found by measuring. It runs :func:`curlprune.select.search.select`'s
bisection over the number of ranked units with the measured relative latency of the sliced model
as its ``metric_fn`` (``fill=False``: measuring thousands of fill candidates is too slow and within the noise),
then re-measures the chosen plan with fresh timings and, when that misses the goal by more than the
tolerance on either side, searches again with the goal moved by the miss (at most ``retries`` times);
a target still missed is reported with by how much and why.
"""
from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.surgery import optimize_for_inference

Clock = Callable[[], float]
"""A clock: returns the current time in seconds (any origin); only differences are used."""

DEFAULT_TOLERANCE = 0.05
DEFAULT_MIN_ROUNDS = 7
DEFAULT_MAX_ROUNDS = 31
DEFAULT_WARMUP = 3
DEFAULT_MIN_TIME_S = 0.02

_UNITS_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


# ----------------------------------------------------------------------------------------------
# the target


@dataclass(frozen=True)
class LatencyTarget:
    """A latency target: a fraction of the unpruned model's measured latency, or an absolute time.

    Exactly one of ``fraction`` (0 < f <= 1) and ``ms`` (milliseconds per batch, > 0) is set.
    """

    fraction: float | None = None
    ms: float | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.ms is None):
            raise CurlpruneError("a latency target is either a fraction (0.5) or a duration (12ms), not both or neither")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise CurlpruneError(f"target latency fraction must be in (0, 1] (e.g. 0.5 = half the unpruned latency), got {self.fraction:g}")
        if self.ms is not None and not (math.isfinite(self.ms) and self.ms > 0.0):
            raise CurlpruneError(f"target latency must be a positive duration (e.g. 12ms), got {self.ms:g} ms")

    @classmethod
    def parse(cls, text: str | float | int) -> LatencyTarget:
        """``0.5`` / ``"0.5"`` (fraction of the unpruned latency), ``"12ms"``, ``"0.8s"``, ``"500us"``.

        A bare number is a fraction and must lie in (0, 1]; a number with a unit (s, ms, us, µs) is
        the time of one forward pass of one batch. Raises CurlpruneError (one line) for anything else.
        """
        if isinstance(text, bool):
            raise CurlpruneError(f"target latency {text!r} is not a number: write a fraction (0.5) or a duration (12ms, 0.8s, 500us)")
        if isinstance(text, (int, float)):
            return cls(fraction=float(text))
        s = str(text).strip()
        match = re.fullmatch(r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))\s*([a-zA-Zµ]*)", s, flags=re.IGNORECASE)
        if not match:
            raise CurlpruneError(f"target latency {text!r} is not a number: write a fraction (0.5) or a duration (12ms, 0.8s, 500us)")
        value, unit = float(match.group(1)), match.group(2).lower()
        if not unit:
            return cls(fraction=value)
        if unit not in _UNITS_MS:
            raise CurlpruneError(f"target latency {text!r} has unknown unit {match.group(2)!r}: use s, ms or us (e.g. 12ms)")
        return cls(ms=value * _UNITS_MS[unit])

    def goal_fraction(self, reference_ms: float) -> float:
        """The target as a fraction of the unpruned model's latency ``reference_ms`` (may exceed 1)."""
        return self.fraction if self.fraction is not None else self.ms / reference_ms

    def describe(self) -> str:
        return f"{self.fraction:g} of the unpruned latency" if self.fraction is not None else f"{self.ms:g} ms per batch"

    def as_dict(self) -> dict[str, float | None]:
        return {"fraction": self.fraction, "ms": self.ms}


# ----------------------------------------------------------------------------------------------
# timing


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` intra-op threads (None: leave as is); restores the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise CurlpruneError(f"latency threads must be a positive number, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@dataclass
class Timing:
    """Interleaved timings of several runners: seconds per call, per round and runner."""

    names: list[str]
    seconds: dict[str, list[float]]  # per round, seconds of ONE call (a timing's total / number)
    number: dict[str, int]  # calls per timing

    def median_ms(self, name: str) -> float:
        return 1e3 * statistics.median(self.seconds[name])

    def ratios(self, name: str, reference: str) -> list[float]:
        return [a / b for a, b in zip(self.seconds[name], self.seconds[reference])]

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of ``name / reference`` (a ratio from one run)."""
        return statistics.median(self.ratios(name, reference))

    def noise(self, name: str, reference: str) -> float:
        """Relative uncertainty of :meth:`ratio`: IQR of the per-round ratios / sqrt(rounds) / median."""
        return _relative_noise(self.ratios(name, reference))


def _relative_noise(values: Sequence[float]) -> float:
    if len(values) < 4:
        return math.inf
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / math.sqrt(len(values)) / statistics.median(values)


def time_interleaved(
    runners: Mapping[str, Callable[[], Any]],
    *,
    reference: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_rounds: int = DEFAULT_MIN_ROUNDS,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    clock: Clock = time.perf_counter,
) -> Timing:
    """Time zero-argument callables round by round, in alternating order, on one clock.

    Args:
        runners: name -> callable doing one unit of work (e.g. one forward pass of one batch).
        reference: the runner the others are compared with; rounds stop once the noise of every
            ratio to it (see :meth:`Timing.noise`) is below ``tolerance / 2``. None: fixed
            ``min_rounds`` rounds.
        tolerance: relative tolerance the ratios should be known to (0.05 = 5%).
        min_rounds, max_rounds: bounds on the number of rounds.
        warmup: untimed calls of each runner before the first round (at least one, timed, is
            always made to choose ``number``).
        min_time_s: a timing lasts at least this long (``number`` calls back to back).
        clock: seconds; default :func:`time.perf_counter`.

    Returns:
        a :class:`Timing` with seconds per call of every runner in every round.
    """
    names = list(runners)
    if not names:
        raise CurlpruneError("nothing to time")
    if not 1 <= min_rounds <= max_rounds:
        raise CurlpruneError(f"latency rounds need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")
    if not tolerance > 0:
        raise CurlpruneError(f"latency tolerance must be positive, got {tolerance}")
    number: dict[str, int] = {}
    for name, run in runners.items():
        for _ in range(max(0, warmup)):
            run()
        start = clock()
        run()
        once = max(clock() - start, 1e-9)
        number[name] = max(1, math.ceil(min_time_s / once))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(max_rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            run, n = runners[name], number[name]
            start = clock()
            for _ in range(n):
                run()
            seconds[name].append((clock() - start) / n)
        if round_ + 1 < min_rounds:
            continue
        if reference is None:
            break
        others = [n for n in names if n != reference]
        if all(_relative_noise([a / b for a, b in zip(seconds[o], seconds[reference])]) < tolerance / 2 for o in others):
            break
    return Timing(names, seconds, number)


def prepare(model: nn.Module, optimize: bool = True) -> nn.Module:
    """The copy of ``model`` that is timed (the original is not changed).

    optimize=True (what the latency target measures): :func:`curlprune.surgery.inference.optimize_for_inference`,
    i.e. BN folded into the convs and residual adds in place, as a deployment runs both the
    unpruned and the pruned model. optimize=False: an eval-mode, channels_last copy as it is.
    """
    if optimize:
        return optimize_for_inference(model)
    clone = copy.deepcopy(model).eval()
    return clone.to(memory_format=torch.channels_last)


def example_batch(example_input: torch.Tensor, batch: int, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch shaped like ``example_input`` with ``batch`` rows, channels_last when 4-D."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CurlpruneError(f"latency batch must be a positive number of images, got {batch!r}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *example_input.shape[1:]), generator=gen, dtype=example_input.dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def forward_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """A callable running one inference-mode forward pass of ``x`` through ``model``."""

    def run() -> Any:
        with torch.inference_mode():
            out = model(x)
        if x.is_cuda:  # kernels run asynchronously: the pass is over when the device says so
            torch.cuda.synchronize(x.device)
        return out

    return run


@dataclass
class LatencyComparison:
    """A candidate timed against the reference in one interleaved run."""

    ratio: float  # median over rounds of candidate / reference
    candidate_ms: float  # median ms per batch
    reference_ms: float
    noise: float  # relative uncertainty of the ratio (Timing.noise)
    rounds: int
    batch: int
    threads: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def compare_latency(
    candidate: nn.Module,
    reference: nn.Module,
    example_input: torch.Tensor,
    *,
    batch: int = 1,
    threads: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_rounds: int = DEFAULT_MIN_ROUNDS,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    clock: Clock = time.perf_counter,
    prepared: bool = False,
    device: torch.device | None = None,
) -> LatencyComparison:
    """Latency of ``candidate`` relative to ``reference`` on this machine (interleaved, one run).

    Args:
        candidate, reference: models taking ``example_input``-shaped batches. Copied to eval mode
            and channels_last unless ``prepared`` (then used as given).
        example_input: one example ``[1, C, H, W]`` (only its shape and dtype are used).
        batch: images per forward pass; threads: intra-op threads (None: the current setting).
        tolerance, min_rounds, max_rounds, warmup, min_time_s, clock: see :func:`time_interleaved`.
        device: where both are timed (moved there; on CUDA every timed pass ends with a
            synchronisation); None = where they are.

    Returns:
        a :class:`LatencyComparison`: the median ratio, both median ms per batch, the ratio's noise.
    """
    x = example_batch(example_input, batch)
    cand = candidate if prepared else prepare(candidate)
    ref = reference if prepared else prepare(reference)
    if device is not None:
        x, cand, ref = x.to(device), cand.to(device), ref.to(device)
    with torch_threads(threads) as used:
        timing = time_interleaved(
            {"reference": forward_runner(ref, x), "candidate": forward_runner(cand, x)},
            reference="reference", tolerance=tolerance, min_rounds=min_rounds, max_rounds=max_rounds,
            warmup=warmup, min_time_s=min_time_s, clock=clock,
        )
    return LatencyComparison(
        ratio=timing.ratio("candidate", "reference"),
        candidate_ms=timing.median_ms("candidate"),
        reference_ms=timing.median_ms("reference"),
        noise=timing.noise("candidate", "reference"),
        rounds=len(timing.seconds["reference"]),
        batch=batch,
        threads=used,
    )


# ----------------------------------------------------------------------------------------------
# the measured cost function
