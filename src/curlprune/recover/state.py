"""Pickle-free resumable training state: one safetensors file, JSON in its header.

A stage's ``state.safetensors`` holds the tensors (``model.*`` weights and buffers,
``optim.<param index>.<name>`` optimizer buffers, ``stage.*`` stage tensors such as the label
store) and, in the header entry ``curlprune_train_state``, one JSON document with everything
else: epoch, iteration, history, optimizer hyper-parameters and the random-number-generator
states (torch, CUDA, numpy, Python and the data-order generator), so nothing is ever unpickled.
"""
from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer

from curlprune.errors import CurlpruneError
from curlprune.store import save_safetensors

STATE_KEY = "curlprune_train_state"


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + JSON metadata to ``path`` atomically (temporary file, then ``os.replace``).

    The bytes are written by Python (:func:`curlprune.store.canonical.save_safetensors`), not by the
    safetensors library, so a full disk is an ``OSError`` naming ``path`` (one line), not the
    library's own error type (issue 18).
    """
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    save_safetensors(path, plain, {STATE_KEY: json.dumps(meta)})


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state`; a damaged file is a :class:`CurlpruneError`."""
    from safetensors import safe_open

    if not path.is_file():
        raise CurlpruneError(f"training state {path} does not exist: run the stage (it writes one per epoch)")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[STATE_KEY])
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    except Exception as exc:  # safetensors/json raise several types for damaged files
        raise CurlpruneError(
            f"training state {path} cannot be read ({type(exc).__name__}: {exc}): delete it to restart the stage from scratch"
        ) from None
    return tensors, meta


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix + name: tensor}``."""
    return {prefix + name: t for name, t in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix``, with the prefix removed."""
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}


def optimizer_state(optimizer: Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``<index>.<name>``) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def generator_state(generator: torch.Generator) -> str:
    """A torch.Generator's state as text."""
    return _encode(generator.get_state())


def set_generator_state(generator: torch.Generator, text: str) -> None:
    """Inverse of :func:`generator_state`."""
    generator.set_state(_decode(text))


def capture_rng() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, Python) as JSON."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": _encode(torch.get_rng_state()),
        "cuda": [_encode(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(_decode(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_everything(seed: int) -> None:
    """Seed the global RNGs the augmentations draw from (torch, CUDA, numpy, Python)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
