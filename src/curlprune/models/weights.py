"""Weights: read a state-dict file, and the one strict loader every part of the package uses.

``read_state_dict`` reads ``.th/.pt/.pth`` files (``torch.load(weights_only=True)``, no pickled code)
and ``.safetensors`` files, unwrapping ``{"state_dict": ...}`` / ``{"model": ...}`` and a
DataParallel ``module.`` prefix. ``load_state_strict`` loads a state dict into a model strictly,
with one CurlpruneError line that says what does not fit and how to fix it. ``check_finite_weights``
refuses weights holding NaN or inf where they are read (weights files here, checkpoints in
:func:`curlprune.store.checkpoint.load`, stage folders in :mod:`curlprune.recover.stage`), naming the
tensor, so such weights never surface later as a failed criterion or a diverged training.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from curlprune.errors import CurlpruneError, exception_summary


def load_state_strict(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    what: str,
    fix: str,
    *,
    shape_fix: str | None = None,
    fill_batch_counters: bool = False,
) -> nn.Module:
    """Load a state dict into ``model`` strictly: every key present, none extra, every shape equal.

    Args:
        model: the module to load into (in place).
        tensors: parameter/buffer name -> tensor (not modified).
        what: the start of the error line, e.g. ``"weights file r20.pt does not match model cifar:resnet56"``.
        fix: the end of the error line for missing/unexpected keys: what the user should do.
        shape_fix: the end of the error line for wrong shapes (default: ``fix``).
        fill_batch_counters: take BN ``num_batches_tracked`` buffers the file lacks from ``model``
            (files saved before BN counted batches lack them).

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CurlpruneError: keys are missing or unexpected (``what: N missing keys, M unexpected keys
            (e.g. ...): fix``) or shapes differ (``what: N tensors differ in shape (e.g. k: file
            [..], model [..]): shape_fix``). Nothing is loaded then.
    """
    state = dict(tensors)
    own = model.state_dict()
    if fill_batch_counters:
        for key, value in own.items():
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        examples = ", ".join([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]])
        raise CurlpruneError(
            f"{what}: {len(missing)} missing keys, {len(unexpected)} unexpected keys (e.g. {examples}): {fix}"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise CurlpruneError(
            f"{what}: {len(wrong)} tensors differ in shape (e.g. {k}: file {list(state[k].shape)}, "
            f"model {list(own[k].shape)}): {shape_fix or fix}"
        )
    model.load_state_dict(state, strict=True)
    return model


def check_finite_weights(tensors: Mapping[str, torch.Tensor], source: str, fix: str) -> None:
    """Refuse weights that hold NaN or inf, naming the first such tensor (issue 18).

    Args:
        tensors: name -> tensor (integer tensors and non-tensors are not checked).
        source: the start of the error line, e.g. ``"weights file teacher.pt"``.
        fix: the end of the error line: what the user should do.
    Raises:
        CurlpruneError: ``source: tensor NAME holds NaN (k of its n values)[, and m more tensors]: fix``.
    """
    bad = [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    tensor = tensors[bad[0]]
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    kind = " and ".join(k for k, n in (("NaN", nan), ("inf", inf)) if n)
    more = f", and {len(bad) - 1} more tensors do too" if len(bad) > 1 else ""
    raise CurlpruneError(f"{source}: tensor {bad[0]} holds {kind} ({nan + inf} of its {tensor.numel()} values){more}: {fix}")


def load_weights_file(model: nn.Module, path: str | Path, model_name: str) -> nn.Module:
    """Read a state-dict file and load it into ``model`` with :func:`load_state_strict`.

    Args:
        model: a freshly built ``model_name`` (loaded in place).
        path: a ``.th/.pt/.pth`` or ``.safetensors`` state-dict file.
        model_name: the registry name, for the error message.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CurlpruneError: the file is missing, unreadable, holds no state dict, is a curlprune
            checkpoint, or does not fit the model (keys or shapes).
    """
    return load_state_strict(
        model,
        read_state_dict(path),
        f"weights file {path} does not match model {model_name}",
        f"pass weights saved from {model_name} or choose the model they were saved from",
        shape_fix=f"pass weights saved from {model_name} with the same number of classes, or set num_classes to match the file",
        fill_batch_counters=True,
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file, unwrapping ``{"state_dict": ...}`` and a ``module.`` prefix.

    Args:
        path: a ``.th/.pt/.pth`` file (read with ``torch.load(weights_only=True)``) or ``.safetensors``.

    Returns:
        Name -> tensor (on the CPU).

    Raises:
        CurlpruneError: the file is missing, empty, truncated, unreadable, holds no mapping of names to tensors,
            holds NaN or inf (:func:`check_finite_weights`), or is a curlprune checkpoint (architecture
            + plan + weights) rather than plain weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CurlpruneError(f"weights file {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise CurlpruneError(f"weights file {path} is empty (0 bytes): the download or copy did not finish; fetch or save it again")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for damaged or foreign files
            raise CurlpruneError(
                f"weights file {path} cannot be read ({exception_summary(exc)}): "
                "it is truncated, damaged or not a PyTorch state-dict file; download or save it again"
            ) from None
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CurlpruneError(
            f"weights file {path} holds no state dict (a mapping of names to tensors): "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    check_finite_weights(state, f"weights file {path}", "the file is damaged or was saved from a diverged training; "
                         "use other weights (or save them again from a model that works)")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("curlprune_format"):
                raise CurlpruneError(
                    f"{path} is a curlprune checkpoint (architecture + plan + weights), not plain weights: "
                    "load it with curlprune.load(path) or pass it as the checkpoint argument"
                )
            return {k: f.get_tensor(k) for k in f.keys()}
    except CurlpruneError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise CurlpruneError(
            f"weights file {path} cannot be read ({exception_summary(exc)}): it is truncated, damaged or not a safetensors file; save it again"
        ) from None
