"""Pickle-free checkpoints (architecture reference + Plan + weights) and ONNX export.

A checkpoint is ONE safetensors file. Its header metadata holds JSON strings:

    curlprune_format   "1"
    model_ref          {"name": "cifar:resnet56", "kwargs": {...}}
    plan               {"layer1.0.conv1": [0, 2, 5, ...], ...}
    input_shape        [1, 3, 32, 32]   (the example input used to trace the model)
    extra              free-form JSON (scores summary, accuracies, ...)

Loading rebuilds the architecture by name (a registry name, or an import path such as
``mypkg.nets:MyNet`` that is imported and called again), traces it, applies the Plan and loads the
weights strictly, so no Python code is ever unpickled. The model comes back as its own class where
its forward allows it (:mod:`curlprune.surgery.keep_class`), as ``prune`` gave it; ``extra["model_class"]``
records which it was.
"""
from __future__ import annotations

import copy
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
from curlprune.surgery.keep_class import slice_model
from curlprune.models import ModelRef, build, by_import_path, check_rebuildable, input_spec
from curlprune.models.import_path import canonical
from curlprune.models.weights import check_finite_weights, load_state_strict
from curlprune.store.canonical import check_finite_state, save_safetensors
from curlprune.store.checkpoint_header import header_field, parse_header
from curlprune.store.rundir import atomic_write

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
        CurlpruneError: unknown model name, or a model named by import path (its input is not known:
            pass ``input_shape``).
    """
    if by_import_path(model_name):
        raise CurlpruneError(f"model {model_name!r} is named by import path, so its input shape is not known: "
                             "pass input_shape=[1, C, S, S] (the example input the plan was traced with)")
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
        model_ref: the unpruned architecture: a registry name or import path (``mypkg.nets:MyNet``,
            ``path/to/file.py:build_fn``), ``{"name", "kwargs"}``, a ModelRef, or the model's class or
            build function (stored as its import path).
        plan: group name -> kept channel indices (``{}``: unpruned).
        state_dict: the pruned model's weights (copied to the CPU).
        input_shape: the example input the plan was traced with (default: the model's
            ``[1, C, S, S]`` from the registry).
        extra: free-form JSON-serialisable metadata.

    Raises:
        CurlpruneError: a reference :func:`load` could not rebuild in a fresh process (an unknown
            registry name, a module that cannot be imported or lacks the attribute, a class defined in
            ``__main__`` or inside a function), no ``input_shape`` for a model without a known input,
            or a floating-point tensor holding NaN or inf (nothing is written then).
        OSError: the file cannot be written (its ``filename`` is ``path``).
    """
    try:
        ref = ModelRef.of(model_ref)
        if by_import_path(ref.name):
            ref = ModelRef(canonical(ref.name), ref.kwargs)  # a .py file by its absolute path: loads from any folder
        check_rebuildable(ref)  # before anything is written: never a file that load refuses
    except CurlpruneError as exc:
        raise CurlpruneError(f"not saving {path}: curlprune.load could not rebuild the model ({exc})") from None
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
                 source: str | os.PathLike | None = None, model: nn.Module | None = None,
                 keep_class: bool = True) -> nn.Module:
    """Rebuild the pruned architecture (random weights, or ``model``'s) from its reference and Plan.

    Args:
        model_ref: the unpruned architecture (registry name or import path, dict or ModelRef).
        plan: group name -> kept channel indices.
        input_shape: the example input shape the plan was traced with.
        source: the checkpoint these come from: a failure then names it and the header field
            (:func:`curlprune.store.checkpoint_header.header_field`), and the model must also run at
            ``input_shape`` when the plan is empty.
        model: the unpruned model to apply the plan to, built by the caller (``model_ref`` is then
            not built); it is not changed.
        keep_class: give the model's own class where its forward allows (:mod:`curlprune.surgery.keep_class`);
            False: the torch.fx GraphModule.

    Returns:
        The unpruned model when ``plan`` is empty, else the model sliced by ``plan``.

    Raises:
        CurlpruneError: unknown model, a module that cannot be imported, an input the model does not
            take, or a plan that does not fit its groups.
    """
    if model is not None:
        if not isinstance(model, nn.Module):
            raise CurlpruneError(f"model= must be the unpruned torch.nn.Module, got {type(model).__name__}")
        model = copy.deepcopy(model).eval()
    else:
        with header_field(source, "model_ref"):
            ref = ModelRef.of(model_ref)
        if by_import_path(ref.name):  # the user's code, not the file, is missing: say so, not "damaged"
            try:
                check_rebuildable(ref)
            except CurlpruneError as exc:
                where = f"checkpoint {source} needs" if source is not None else "cannot build"
                raise CurlpruneError(f"{where} a model of your own that cannot be found: {exc}; "
                                     "or build it yourself: curlprune.load(path, model=MyNet(...))") from None
        with header_field(source, "model_ref"):
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
        return slice_model(model, groups, plan, keep_class=keep_class, example_input=example).model


def load(path: str | os.PathLike, *, model: nn.Module | None = None, keep_class: bool | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save` into a ready-to-use module.

    Args:
        path: a curlprune checkpoint (``.safetensors`` with the curlprune header).
        model: the unpruned model, built by you (``MyNet(...)``): the checkpoint's plan is applied
            to it and its weights loaded, instead of rebuilding ``model_ref``. Not changed.
        keep_class: True: the model's own class where its forward allows it; False: the torch.fx
            GraphModule; None: as the checkpoint records (``extra["model_class"]["kept"]``, written
            by ``curlprune prune``), else True.

    Returns:
        The pruned model (its own class, or a GraphModule where the class cannot be kept, see
        :mod:`curlprune.surgery.keep_class`), weights loaded, eval mode.

    Raises:
        CurlpruneError: the file is missing, unreadable, not a curlprune checkpoint, names an
            unknown model, a module that cannot be imported or an attribute it lacks (one line naming
            it), or a plan that does not fit it, or its weights do not fit or hold NaN or inf (the
            tensor is named).
    """
    meta = read_metadata(path)
    if keep_class is None:
        recorded = meta["extra"].get("model_class")
        keep_class = not (isinstance(recorded, dict) and recorded.get("kept") is False)
    model = build_pruned(meta["model_ref"], meta["plan"], meta["input_shape"], source=path, model=model, keep_class=keep_class)
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
