"""Rows of the ResNet-56 benchmark (issue 21) whose pruned model is identical to a finished row's.

The recovery of a row is a deterministic function of its pruned model (BN re-estimation, the
seeded distill stage), its epochs and seed, and where it runs (device, amp, GPU, DataLoader
workers); the data, teacher and recovery settings are the same for every row of one rows file.
So a row whose pruned model is bit-identical to that of a finished row with the same target,
epochs, seed and device is not evaluated or trained again: it is recorded with ``same_as`` (the
finished row's id), its own prune facts and the finished row's metrics, as the small-data
benchmark records its aliases (benchmarks/small_data.py). Two Torch-Pruning variants whose width
cap never binds prune the same model, for example.

"Identical" is exact: :func:`pruned_digest`, a sha256 over the widths and the state_dict bytes.
Aliasing stays within one pruning kind (Torch-Pruning rows with Torch-Pruning rows; curlprune and
allocation-study rows among themselves): the two kinds' pruned models are rebuilt by different
code (tp_equivalent.load_gather_model with gather shortcuts, curlprune.load with curlprune's own
shortcut modules), so equal state_dicts and widths would not prove an equal forward pass.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

import torch
from torch import nn

WIDTHS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
          "num_features", "in_features", "out_features")
COPIED = ("val_raw", "test_raw", "val_bn", "test_bn", "val_top1", "test_top1", "monitor_val_top1_last",
          "train_images", "config")  # the metrics an alias row takes from the row it is the same as
RUN_FIELDS = (("device", "cpu"), ("amp", "off"), ("gpu", None), ("workers", None))  # absent: the CPU, float32


def pruned_digest(model: nn.Module) -> str:
    """sha256 (hex) of a pruned model: its structure (every module's widths: channels, kernel,
    stride, padding, dilation, groups, features, by module name) and every state_dict tensor (name,
    shape, dtype, raw bytes, in name order). Equal digests: the same pruned model, bit for bit."""
    digest = hashlib.sha256()
    widths = {name: {a: getattr(m, a) for a in WIDTHS if hasattr(m, a)} for name, m in model.named_modules()}
    structure = json.dumps({k: v for k, v in widths.items() if v}, sort_keys=True, default=lambda t: t.tolist())  # a tensor: a buffer
    digest.update(structure.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prune_kind(kind: str) -> str:
    """The aliasing class of a row kind: "tp" (Torch-Pruning) or "curlprune" (curl, alloc)."""
    return "tp" if kind == "tp" else "curlprune"


def find_same(row_id: str, kind: str, key: tuple, digest: str, run_fields: Mapping, done: Mapping[str, dict],
              digest_of: Callable[[dict], str | None]) -> str | None:
    """The id of the first finished row (file order) this row can be recorded as ``same_as``.

    Args:
        row_id, kind: the row's id and kind (bench_plan.Row).
        key: (target, epochs, seed) of the row; a candidate must have the same.
        digest: :func:`pruned_digest` of the row's pruned model.
        run_fields: the row's device fields (Bench.device_fields); a candidate must match
            (:data:`RUN_FIELDS`, with their defaults for rows that predate them).
        done: id -> finished row. Alias rows are skipped: the row they name is a candidate itself.
        digest_of: a finished row -> its pruned model's digest (its ``pruned_sha256``, or computed
            from its cached pruned model), None when unknown (the row is then no candidate).

    Returns:
        The finished row's id, or None (the row is computed).
    """
    for other in done.values():
        if other.get("same_as") or other.get("kind") in (None, "timing") or other["id"] == row_id:
            continue
        if (other["target"], other["epochs"], other["seed"]) != tuple(key) or prune_kind(other["kind"]) != prune_kind(kind):
            continue
        if any(other.get(k, d) != run_fields.get(k, d) for k, d in RUN_FIELDS):
            continue
        if digest_of(other) == digest:
            return other["id"]
    return None


def alias_record(record: dict, same: dict) -> dict:
    """``record`` (the row's own prune facts) completed as an alias of the finished row ``same``."""
    return {**record, "same_as": same["id"], **{k: same[k] for k in COPIED if k in same}}
