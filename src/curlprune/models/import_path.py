"""Models named by import path: ``mypkg.nets:MyNet`` or ``path/to/file.py:build_fn``.

A model of your own needs no registration: name the class or function that builds it, as
``MODULE:ATTRIBUTE`` where MODULE is an importable module (``mypkg.nets``, found on ``sys.path`` /
``PYTHONPATH``) or a ``.py`` file (relative to the working directory; stored as an absolute path),
and ATTRIBUTE a class or function in it (dots reach nested attributes). It is called with the
model's keyword arguments (``model_kwargs``; ``num_classes`` too when given) and must return an
``nn.Module``. A name whose prefix is a registry family (``cifar:``, ``torchvision:``, ``small:``,
``timm:``) is a registry name, never an import path.

Such a model has no input recipe of its own, so its input is given: ``input_shape: [C, S, S]`` in
a run config, ``--input-shape C,S,S`` on the command line (square inputs). Its normalisation is
ImageNet's mean and std for 3 channels, mean 0.5 and std 0.5 per channel otherwise; its number of
classes is ``num_classes`` when given, else the width of its output on a zero input.

A ``.py`` file your script has already imported by name (``import mymodel``) is that module, so
the model is an instance of your own classes; any other file is imported once, under a private
module name.

Nothing here is unpickled: a checkpoint stores the reference and the build keywords, and
:func:`curlprune.store.checkpoint.load` imports and calls it again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from curlprune.errors import CurlpruneError, exception_summary
from curlprune.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec, is_logits
from curlprune.models.weights import load_weights_file

__all__ = ["canonical", "import_build", "import_input_spec", "is_import_path", "output_classes", "reference_to", "resolve", "split"]

_FORM = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
HOW = ("name a model by import path as MODULE:ATTRIBUTE, e.g. mypkg.nets:MyNet (importable, on PYTHONPATH) "
       "or path/to/file.py:build_fn")


def is_import_path(name: str, families: Sequence[str]) -> bool:
    """Whether ``name`` is an import path (not a registry name: its prefix is no family in ``families``)."""
    match = _FORM.match(name) if isinstance(name, str) else None
    if match is None or match["module"] in families:
        return False
    module = match["module"]
    return module.endswith(".py") or bool(_MODULE.match(module))


def split(name: str) -> tuple[str, str]:
    """``(module or file, attribute)`` of an import path.

    Raises:
        CurlpruneError: ``name`` is not of the form MODULE:ATTRIBUTE.
    """
    match = _FORM.match(name)
    if match is None:
        raise CurlpruneError(f"model {name!r} is not an import path: {HOW}")
    return match["module"], match["attr"]


def canonical(name: str) -> str:
    """The import path as stored in a checkpoint: a ``.py`` file as an absolute path, a module as is."""
    module, attr = split(name)
    if module.endswith(".py"):
        return f"{Path(module).expanduser().resolve()}:{attr}"
    return name


def _file_module(path: str, name: str) -> Any:
    """The module of a ``.py`` file, imported once per absolute path (kept in ``sys.modules``)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise CurlpruneError(f"model {name!r}: the file {path} does not exist (relative paths start at {Path.cwd()}): {HOW}")
    key = f"curlprune_user_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:10]}"
    if key in sys.modules:
        return sys.modules[key]
    imported = _imported_as(file)
    if imported is not None:  # the caller's own `import mymodel`: the same classes, so isinstance() holds
        return imported
    spec = importlib.util.spec_from_file_location(key, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before running it: classes defined there find their module (deepcopy, dataclasses)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[key]
        raise CurlpruneError(f"model {name!r}: importing {file} fails ({exception_summary(exc)}): fix the file") from None
    return module


def _imported_as(file: Path) -> Any:
    """The module already imported from ``file`` (an absolute, resolved path) under its own name, or None."""
    target = str(file)
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and path.endswith(file.name) and os.path.realpath(path) == target:
            return module
    return None


def resolve(name: str) -> Callable[..., nn.Module]:
    """The class or function an import path names, imported.

    Raises:
        CurlpruneError: one line naming the module that cannot be imported (and why) or the
            attribute it lacks.
    """
    module_name, attr = split(name)
    if module_name.endswith(".py"):
        module = _file_module(module_name, name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise CurlpruneError(f"model {name!r}: module {module_name!r} cannot be imported ({exc}): put its folder on "
                                 "PYTHONPATH (or run from it), or name a .py file: path/to/file.py:ATTRIBUTE") from None
        except Exception as exc:
            raise CurlpruneError(f"model {name!r}: importing module {module_name!r} fails ({exception_summary(exc)})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CurlpruneError(f"model {name!r}: module {module_name!r} has no attribute {attr!r}: check the name after the ':'")
        target = getattr(target, part)
    if not callable(target):
        raise CurlpruneError(f"model {name!r}: {attr} is a {type(target).__name__}, not a class or function that builds the model")
    return target


def import_build(name: str, weights: str | None, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """Build the model an import path names: ``ATTRIBUTE(**kwargs, num_classes=...)``, weights loaded.

    Args:
        name: the import path; weights: a state-dict file or None (random init).
        num_classes: passed as the keyword ``num_classes`` when given.
        kwargs: the model's keyword arguments (``model_kwargs``).
    Returns:
        The model (train mode, as built).
    Raises:
        CurlpruneError: see :func:`resolve`; the call fails or returns no ``nn.Module``; weights
            that are no file or do not fit.
    """
    factory = resolve(name)
    call = dict(kwargs)
    if num_classes is not None:
        call["num_classes"] = num_classes
    try:
        model = factory(**call)
    except Exception as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in call.items()) or "no arguments"
        raise CurlpruneError(f"model {name!r}: building it with {given} fails ({exception_summary(exc)}): "
                             "check model_kwargs / --model-kwargs and num_classes") from None
    if not isinstance(model, nn.Module):
        raise CurlpruneError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise CurlpruneError(f"weights {weights!r} for model {name!r} is not a file: pass the path to a state-dict file")
        load_weights_file(model, weights, name)
    return model


_CLASSES: dict[tuple, int] = {}


def import_input_spec(name: str, weights: str | None, num_classes: int | None, input_shape: Sequence[int] | None,
                      kwargs: dict[str, Any] | None = None) -> InputSpec:
    """The input recipe of an import-path model: given shape, default normalisation, classes.

    Args:
        name: the import path; weights: its weights (for the classes when ``num_classes`` is None).
        num_classes: classes, or None: the width of the model's output on a zero input.
        input_shape: ``[C, S, S]`` (or ``[1, C, S, S]``); required.
        kwargs: the model's keyword arguments.
    Returns:
        The :class:`InputSpec`.
    Raises:
        CurlpruneError: no or a bad input shape (says how to give it), or the model cannot be built.
    """
    shape = check_input_shape(input_shape, name)
    channels, size = shape[0], shape[1]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    classes = num_classes
    if classes is None:
        classes = output_classes(name, weights, shape, kwargs)
        if classes < 1:
            raise CurlpruneError(f"model {name!r} does not return [batch, classes] logits: give num_classes")
    return InputSpec(size, channels, mean, std, None, classes, flip=True, crop_padding=max(1, size // 8))


def output_classes(name: str, weights: str | None, input_shape: Sequence[int], kwargs: dict[str, Any] | None = None) -> int:
    """The width of an import-path model's output on a zero input (built once per model, weights and shape).

    Args:
        name: the import path; weights: its weights or None; input_shape: ``[C, S, S]``; kwargs: its keyword arguments.
    Returns:
        The number of classes; 0 when the output is not one ``[N, classes]`` tensor (several or dense outputs).
    Raises:
        CurlpruneError: the model cannot be built, or fails on that input (says to check the input shape).
    """
    shape = check_input_shape(input_shape, name)
    key = (canonical(name), repr(sorted((kwargs or {}).items())), weights, tuple(shape))
    if key not in _CLASSES:
        model = import_build(name, weights, None, dict(kwargs or {})).eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, *shape))
        except Exception as exc:
            raise CurlpruneError(f"model {name!r} fails on an input of shape [1, {', '.join(map(str, shape))}] "
                                 f"({exception_summary(exc)}): check input_shape / --input-shape") from None
        _CLASSES[key] = int(out.shape[-1]) if is_logits(out) else 0
    return _CLASSES[key]


def check_input_shape(input_shape: Sequence[int] | None, name: str) -> list[int]:
    """``[C, S, S]`` from an input shape given as ``[C, S, S]``, ``[1, C, S, S]`` or ``"C,S,S"``.

    Raises:
        CurlpruneError: missing (an import-path model needs one), not whole numbers, or not square.
    """
    if input_shape is None:
        raise CurlpruneError(f"model {name!r} is named by import path, so its input shape is not known: give "
                             "input_shape: [C, S, S] in the config or --input-shape C,S,S (e.g. 3,32,32)")
    shape = parse_input_shape(input_shape)
    if shape[1] != shape[2]:
        raise CurlpruneError(f"input_shape {shape} is not square: give [C, S, S] (images are resized to S x S)")
    return shape


def parse_input_shape(value: Any) -> list[int]:
    """``[C, H, W]`` from ``"3,32,32"``, ``[3, 32, 32]`` or ``[1, 3, 32, 32]``.

    Raises:
        CurlpruneError: any other form.
    """
    items = value.replace("x", ",").split(",") if isinstance(value, str) else value
    try:
        shape = [int(str(v).strip()) for v in items]
        whole = all(not isinstance(v, (bool, float)) for v in items)
    except (TypeError, ValueError):
        shape, whole = [], False
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if not whole or len(shape) != 3 or min(shape) < 1:
        raise CurlpruneError(f"input shape {value!r} is not [C, S, S] of positive whole numbers (e.g. [3, 32, 32] or 3,32,32)")
    return shape


def reference_to(obj: Any) -> str:
    """The import path of a class or function, such that :func:`resolve` finds it in a fresh process.

    Args:
        obj: a model class or a function that builds one (not an instance).
    Returns:
        ``module:qualname``, or ``/abs/file.py:qualname`` for a module loaded from a file by path.
    Raises:
        CurlpruneError: it is defined in ``__main__`` (a script or notebook) or inside a function,
            so no other process can import it; says to move it into a module.
    """
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname:
        raise CurlpruneError(f"{obj!r} has no module and name to import it by: pass a class or function")
    if module == "__main__" or "<locals>" in qualname:
        where = "in __main__ (a script or notebook)" if module == "__main__" else "inside a function"
        raise CurlpruneError(f"{qualname} is defined {where}, so curlprune.load could not import it in another process: "
                             "move it into a module (mypkg/nets.py) and import it from there, or save with a registry name")
    loaded = sys.modules.get(module)
    file = getattr(loaded, "__file__", None)
    if module.startswith("curlprune_user_") and file:
        return f"{file}:{qualname}"
    return f"{module}:{qualname}"
