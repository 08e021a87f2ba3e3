"""Deterministic safetensors files and a digest of what they hold.

The safetensors library writes its header's metadata in hash-map order, which changes from one
process to the next: the same tensors and metadata saved twice give different bytes. Here the
header is rewritten with sorted keys, so the same model saved twice is byte-identical, and
:func:`content_digest` hashes the tensors (name, dtype, shape, bytes) and the metadata in a fixed
order, so identity checks compare what a file holds, not how it happened to be laid out.
:func:`check_finite_state` refuses weights with NaN or inf before any model file is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

from curlprune.errors import CurlpruneError
from curlprune.store.rundir import atomic_write

_HEADER_SIZE = struct.Struct("<Q")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


def canonical_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``tensors`` + ``metadata`` with a sorted, compact header.

    The data section is the library's own (ordered by dtype alignment, then name, so already
    deterministic); only the JSON header is re-written, padded with spaces to a multiple of 8 bytes
    as the format asks.

    Args:
        tensors: name -> tensor (copied to the CPU, made contiguous).
        metadata: string -> string header metadata.
    Returns:
        The file's bytes; equal for equal tensors and metadata, in any process.
    Raises:
        Errors of ``safetensors.torch.save`` (e.g. tensors sharing memory).
    """
    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    (length,) = _HEADER_SIZE.unpack_from(raw)
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return _HEADER_SIZE.pack(len(text)) + text + raw[8 + length :]


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` + ``metadata`` to ``path`` atomically as canonical (deterministic) bytes.

    The bytes are built inside the atomic write, so a refused tensor set leaves ``path`` as before.

    Args:
        path: the ``.safetensors`` file.
        tensors, metadata: as for :func:`canonical_bytes`.
    Raises:
        OSError: the file cannot be written (named, see :func:`curlprune.store.rundir.atomic_write`).
    """
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(canonical_bytes(tensors, metadata)))


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 over a safetensors file's metadata (sorted) and tensors (sorted by name: name,
    dtype, shape, bytes); equal for files that hold the same model however their header is laid out.

    Args:
        path: a safetensors file.
    Returns:
        The hex digest.
    Raises:
        CurlpruneError: the file is empty, truncated or not safetensors (named in the message).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8:
        raise CurlpruneError(f"{path} is empty or truncated ({len(data)} bytes): re-create it")
    (length,) = _HEADER_SIZE.unpack_from(data)
    if length > min(_MAX_HEADER, len(data) - 8):
        raise CurlpruneError(f"{path} is truncated or not a safetensors file (header of {length} bytes in a {len(data)}-byte file): re-create it")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError:
        raise CurlpruneError(f"{path} is not a safetensors file (its header is not JSON): re-create it") from None
    body = memoryview(data)[8 + length :]
    digest = hashlib.sha256()
    digest.update(json.dumps(header.pop("__metadata__", {}) or {}, sort_keys=True).encode())
    for name in sorted(header):
        info = header[name]
        begin, end = info["data_offsets"]
        if end > len(body):
            raise CurlpruneError(f"{path} is truncated (tensor {name} ends past the end of the file): re-create it")
        digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
        digest.update(body[begin:end])
    return digest.hexdigest()


def check_finite_state(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights that hold NaN or inf, so a diverged model is never written as a model file.

    Args:
        state: name -> tensor (non-tensors and integer tensors are not checked).
        what: the file that would have been written (named in the message).
    Raises:
        CurlpruneError: one line naming ``what``, how many tensors are not finite and the first.
    """
    bad = [name for name, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CurlpruneError(
            f"refusing to write {what}: {len(bad)} of {len(state)} tensors hold NaN or inf (e.g. {bad[0]}); "
            "the training diverged: lower the learning rate and run the stage again"
        )
