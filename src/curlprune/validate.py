"""Config values checked against the types their dataclass fields declare, and every number
against its range, before anything runs.

YAML gives ``epochs: 2.5`` (a float), ``epochs: true`` (a bool) and, by YAML 1.1, ``lr: 1e-4`` (a
string: a float needs a dot there). Each would otherwise reach the training loop and fail late or
silently; :func:`check_types` turns them into one line that names the key, the value and the type.

A ``seed`` of -1 or 2**32 has the right type and still crashes deep inside numpy or scikit-learn:
:data:`RANGES` gives every numeric setting of every config dataclass its range, and
:func:`check_ranges` (called by the dataclasses themselves, so the command line, a YAML config and
Python are checked alike) turns a value outside it into one line. A numeric field without an entry
is an error too (``tests/test_settings.py`` checks every config dataclass), so a new setting cannot
skip the check.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from curlprune.errors import CurlpruneError


class _Mismatch(Exception):
    pass


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``low``..``high`` (each end open or closed), whole or not."""

    low: float
    high: float = math.inf
    whole: bool = False
    low_open: bool = False
    high_open: bool = False
    hint: str = ""  # what the number is, for the message ("images", "epochs")

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value) or (self.whole and not float(value).is_integer()):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high == math.inf:
            text = f"{kind} {low}"
        else:
            text = f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:.10g}{')' if self.high_open else ']'}"
        return f"{text}{' (' + self.hint + ')' if self.hint else ''}"


SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit
_COUNT = Range(1, whole=True)
_FRACTION = Range(0, 1, high_open=True)
_NONNEGATIVE = Range(0)
_POSITIVE = Range(0, low_open=True)
RANGES: dict[str, Range | None] = {
    # run (top level) and every stage
    "seed": Range(0, SEED_MAX, whole=True),
    "num_classes": _COUNT, "train_per_class": _COUNT, "val_per_class": _COUNT,
    "val_fraction": Range(0, 1, low_open=True, high_open=True), "input_size": Range(8, whole=True, hint="pixels"),
    "memory_budget_gb": _POSITIVE, "data_workers": Range(0, whole=True),
    # prune; the targets are parsed (and checked) by select.Target and latency.LatencyTarget
    "target_macs": None, "target_params": None, "target_latency": None,
    "latency_batch": _COUNT, "latency_threads": _COUNT, "calib": _COUNT, "floor": _FRACTION, "round_to": _COUNT,
    "eval_limit": Range(0, whole=True), "budget_mb": _POSITIVE, "approx_classes": _COUNT,
    "bn_recalibrate": Range(0, whole=True, hint="training images; 0 = off"), "max_ratio": None,  # max_ratio: select_limits
    "steps": Range(1, 100, whole=True, hint="pruning steps; 1 = one shot"),
    # training stages
    "epochs": _COUNT, "batch_size": _COUNT, "eval_batch_size": _COUNT, "num_workers": Range(0, whole=True),
    "lr": Range(0, 10.0, low_open=True),  # (0, curlprune.recover.guards.MAX_LR]
    "warmup_epochs": _NONNEGATIVE, "momentum": _FRACTION, "weight_decay": _FRACTION,
    "temperature": _POSITIVE, "alpha": Range(0, 1), "mixup_alpha": _NONNEGATIVE, "label_lr": _NONNEGATIVE,
    "label_reference_batch": _COUNT, "ce_weight": Range(0, 1), "feature_weight": _NONNEGATIVE, "body_lr_mult": _NONNEGATIVE, "head_epochs": _NONNEGATIVE,
}
"""Setting name -> its range (None: checked by its own parser). Shared by every config dataclass."""


def numeric_fields(cls: type) -> list[str]:
    """The fields of the dataclass ``cls`` whose declared type admits an int or a float."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _admits_number(hints.get(f.name, Any))]


def _admits_number(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_admits_number(a) for a in typing.get_args(hint))
    return hint in (int, float)


def check_value(name: str, value: Any, where: str = "") -> None:
    """Raise unless ``value`` (a number, or None for unset) lies in ``RANGES[name]``.

    Args:
        name: the setting; value: its value (bools, strings and None are not checked here).
        where: a prefix for the message (a file and section, "--out"), or "".
    Raises:
        CurlpruneError: "<where>: <name> must be <range> (got <value>)"; also for a setting with no
            entry in :data:`RANGES` (a programming error that a test catches first).
    """
    if name not in RANGES:
        raise CurlpruneError(f"{name} has no declared range: add it to curlprune.validate.RANGES")
    allowed = RANGES[name]
    if allowed is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value not in allowed:
        raise CurlpruneError(f"{where + ': ' if where else ''}{name} must be {allowed.describe()} (got {value!r})")


def check_ranges(config: Any, where: str = "") -> None:
    """Every numeric field of the dataclass instance ``config`` checked by :func:`check_value`.

    Args:
        config: a config dataclass instance (``PruneConfig``, a training config, ``RunConfig``).
        where: a prefix for the message, or "".
    A field with no entry in :data:`RANGES` is left to the config's own checks: the settings of a
    stage a user registers (``curlprune.recover.registry.register_stage``) declare no ranges here;
    every built-in field has one (``tests/test_settings.py`` checks it).

    Raises:
        CurlpruneError: the first setting outside its range, named with its range and value.
    """
    for name in numeric_fields(type(config)):
        if name in RANGES:
            check_value(name, getattr(config, name), where)


def check_types(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (keyword arguments of the dataclass ``cls``) checked against its field types.

    int fields take whole numbers only (not bools, not 2.5; 3.0 becomes 3); float fields take ints
    and numbers written as strings (``"1e-4"``); bool fields take only true/false; str fields take
    strings; ``X | None`` also takes null; list[X] takes a list of X. Other annotations pass as is.

    Args:
        cls: the config dataclass.
        values: its keyword arguments as read from YAML (unknown keys are left to the caller).
        where: the message's prefix (file and section).
    Returns:
        The values converted where that is exact (``"1e-4"`` -> 1e-4, 3.0 -> 3).
    Raises:
        CurlpruneError: "<where>: '<key>' must be <type> (got <value>)".
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    checked = dict(values)
    for key, value in values.items():
        if key not in fields:
            continue  # unknown keys are the caller's error to report
        try:
            checked[key] = _coerce(hints.get(key, Any), value)
        except _Mismatch:
            raise CurlpruneError(f"{where}: '{key}' must be {_describe(hints.get(key, Any))} (got {value!r})") from None
    return checked


def _coerce(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):  # exact matches first, so 3 stays an int in int | float
            if _exact(option, value):
                return value
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple, typing.List, typing.Tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(hint)
        if args and origin is list:
            return [_coerce(args[0], item) for item in value]
        return list(value) if origin is list or hint is list else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    return value  # an annotation this checker does not know: the dataclass decides


def _exact(hint: Any, value: Any) -> bool:
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (float, str):
        return type(value) is hint
    return False


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(options)
        return f"{text} or null" if type(None) in typing.get_args(hint) else text
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if origin is dict or hint is dict:
        return "a mapping"
    if origin is list:
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0]).removeprefix('a ')}s" if args else "a list"
    return getattr(hint, "__name__", str(hint))
