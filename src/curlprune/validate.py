"""Config values checked against the types their dataclass fields declare, before anything runs.

YAML gives ``epochs: 2.5`` (a float), ``epochs: true`` (a bool) and, by YAML 1.1, ``lr: 1e-4`` (a
string: a float needs a dot there). Each would otherwise reach the training loop and fail late or
silently; :func:`check_types` turns them into one line that names the key, the value and the type.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from curlprune.errors import CurlpruneError


class _Mismatch(Exception):
    pass


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
    if origin is list:
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0]).removeprefix('a ')}s" if args else "a list"
    return getattr(hint, "__name__", str(hint))
