"""Pickle-free checkpoints (architecture reference + Plan + weights) and ONNX export.

A checkpoint is ONE safetensors file. Its header metadata holds JSON strings:

    curlprune_format   "1"
    model_ref          {"name": "cifar:resnet56", "kwargs": {...}}
    plan               {"layer1.0.conv1": [0, 2, 5, ...], ...}
    input_shape        [1, 3, 32, 32]   (the example input used to trace the model)
    extra              free-form JSON (scores summary, accuracies, ...)

Loading rebuilds the architecture by name, traces it, applies the Plan and loads the weights
strictly, so no Python code is ever unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from curlprune.cost import trace
from curlprune.errors import CurlpruneError, exception_summary
from curlprune.models import ModelRef, build, input_spec
from curlprune.models.weights import check_finite_weights, load_state_strict
from curlprune.store.canonical import check_finite_state, save_safetensors
from curlprune.store.checkpoint_header import header_field, parse_header
from curlprune.store.rundir import atomic_write
from curlprune.surgery import apply

__all__ = [
    "FORMAT_VERSION",
    "build_pruned",
    "default_input_shape",
    "export_onnx",
    "load",
    "read_metadata",
    "save",
]

FORMAT_VERSION = "1"


def default_input_shape(model_name: str) -> list[int]:
    """The example input shape ``[1, C, S, S]`` a model of this registry name is traced with.

    Args:
        model_name: a registry name.

    Returns:
        ``[1, channels, size, size]`` of the model's InputSpec.

    Raises:
        CurlpruneError: unknown model name.
    """
    spec = input_spec(model_name)
    return [1, spec.channels, spec.size, spec.size]


def save(
    path: str | os.PathLike,
    model_ref: str | dict[str, Any] | ModelRef,
    plan: dict[str, list[int]],
    state_dict: dict[str, torch.Tensor],
    *,
    input_shape: list[int] | None = None,
    extra: dict | None = None,
) -> None:
    """Save a (pruned) model as architecture reference + Plan + weights, atomically.

    The bytes are canonical (the same model saved twice gives the same file,
    :func:`curlprune.store.canonical.canonical_bytes`), and weights holding NaN or inf are refused, so a
    diverged model is never saved (issue 12).

    Args:
        path: the ``.safetensors`` file to write.
        model_ref: the unpruned architecture: a registry name, ``{"name", "kwargs"}`` or a ModelRef.
        plan: group name -> kept channel indices (``{}``: unpruned).
        state_dict: the pruned model's weights (copied to the CPU).
        input_shape: the example input the plan was traced with (default: the model's
            ``[1, C, S, S]`` from the registry).
        extra: free-form JSON-serialisable metadata.

    Raises:
        CurlpruneError: ``input_shape`` is not given and the model name is unknown, or a
            floating-point tensor holds NaN or inf (nothing is written then).
        OSError: the file cannot be written (its ``filename`` is ``path``).
    """
    ref = ModelRef.of(model_ref)
    shape = list(input_shape) if input_shape is not None else default_input_shape(ref.name)
    metadata = {
        "curlprune_format": FORMAT_VERSION,
        "model_ref": json.dumps(ref.as_dict()),
        "plan": json.dumps({k: [int(i) for i in v] for k, v in plan.items()}),
        "input_shape": json.dumps(shape),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    check_finite_state(tensors, str(path))
    save_safetensors(path, tensors, metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded header of a curlprune checkpoint.

    Args:
        path: the checkpoint file.

    Returns:
        ``{"model_ref": {...}, "plan": {...}, "input_shape": [...], "extra": {...}}``.

    Raises:
        CurlpruneError: the file is missing, empty, truncated, unreadable or not a curlprune
            checkpoint, or a header field is missing, not JSON or not of its form
            (:func:`curlprune.store.checkpoint_header.parse_header`, naming the field).
    """
    path = Path(path)
    if not path.is_file():
        raise CurlpruneError(f"checkpoint {path} does not exist: check the path (a run writes it as <out>/model.safetensors)")
    if path.stat().st_size == 0:
        raise CurlpruneError(f"checkpoint {path} is empty (0 bytes): the copy or the run that wrote it did not finish; re-create it")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise CurlpruneError(f"checkpoint {path} is not a readable safetensors file, truncated or damaged ({exception_summary(exc)}): re-create it with `curlprune prune` or curlprune.save") from None
    if meta.get("curlprune_format") != FORMAT_VERSION:
        raise CurlpruneError(f"{path} is not a curlprune checkpoint (no curlprune_format header): save it with curlprune.save")
    return parse_header(path, meta)  # every field checked, one line naming it (issue 18)


def build_pruned(model_ref: str | dict[str, Any] | ModelRef, plan: dict[str, list[int]], input_shape: list[int], *,
                 source: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the pruned architecture (random weights) from its reference and Plan.

    Args:
        model_ref: the unpruned architecture (registry name, dict or ModelRef).
        plan: group name -> kept channel indices.
        input_shape: the example input shape the plan was traced with.
        source: the checkpoint these come from: a failure then names it and the header field
            (:func:`curlprune.store.checkpoint_header.header_field`), and the model must also run at
            ``input_shape`` when the plan is empty.

    Returns:
        The unpruned model when ``plan`` is empty, else ``apply(model, trace(model, x), plan)``.

    Raises:
        CurlpruneError: unknown model, an input the model does not take, or a plan that does not fit its groups.
    """
    with header_field(source, "model_ref"):
        ref = ModelRef.of(model_ref)
        model = build(ref.name, **ref.kwargs).eval()
    if not plan:
        if source is not None:  # count and export feed this shape: it must fit (issue 18)
            with header_field(source, "input_shape"), torch.no_grad():
                model(torch.zeros(input_shape))
        return model
    example = torch.zeros(input_shape)
    with header_field(source, "input_shape"):
        groups = trace(model, example)
    with header_field(source, "plan"):
        return apply(model, groups, plan)


def load(path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint written by :func:`save` into a ready-to-use module.

    Args:
        path: a curlprune checkpoint (``.safetensors`` with the curlprune header).

    Returns:
        The pruned model (a GraphModule when the plan prunes anything), weights loaded, eval mode.

    Raises:
        CurlpruneError: the file is missing, unreadable, not a curlprune checkpoint, names an
            unknown model or a plan that does not fit it, or its weights do not fit or hold NaN or
            inf (the tensor is named).
    """
    meta = read_metadata(path)
    model = build_pruned(meta["model_ref"], meta["plan"], meta["input_shape"], source=path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for a damaged data section
        raise CurlpruneError(f"checkpoint {path} cannot be read ({exception_summary(exc)}): it is truncated or damaged; re-create it") from None
    check_finite_weights(tensors, f"checkpoint {path}", "it is damaged or holds a diverged model; re-create it "
                         "(curlprune.save refuses such weights)")  # issue 18: never exported or trained silently
    load_state_strict(model, tensors, f"weights in {path} do not fit its architecture",
                      "the file is damaged or was edited; re-create it")
    return model.eval()


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, opset: int = 18) -> Path:
    """Export ``model`` to ONNX with a dynamic batch dimension; written atomically.

    Args:
        model: the model (switched to eval mode).
        example_input: one batch ``[N, C, H, W]`` (a batch of 1 is widened to 2 for tracing).
        path: the ``.onnx`` file to write.
        opset: the ONNX opset.

    Returns:
        ``path`` as a Path.

    Raises:
        Errors of ``torch.onnx.export`` for models it cannot export; ``path`` is not written then.
    """
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    if example_input.shape[0] == 1:  # a batch of 1 would be specialised as a constant by torch.export
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()

    def write(tmp: str) -> None:
        program = torch.onnx.export(
            model,
            (example_input,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            verbose=False,
        )
        program.save(tmp)

    atomic_write(path, write)
    return Path(path)
