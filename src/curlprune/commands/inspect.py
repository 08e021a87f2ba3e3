"""The inspection commands: ``groups`` (channel groups), ``count`` (MACs/params) and ``export`` (ONNX)."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torch import nn

from curlprune.commands.common import INPUT_SHAPE_HELP, MODEL_HELP, MODEL_KWARGS_HELP, NO_DEFAULT, input_shape_arg, model_kwargs_arg
from curlprune.cost import count, trace
from curlprune.cost.analysis import analyse
from curlprune.graph.capture import SpecialisedTraceWarning
from curlprune.errors import CurlpruneError
from curlprune.models import build, by_import_path, input_spec
from curlprune.models.import_path import output_classes
from curlprune.report import console, groups_table, groups_text, human
from curlprune.store import check_writable_file, export_onnx
from curlprune.store import checkpoint as ckpt


def example_input_for(model_name: str, input_size: int | None = None, batch: int = 1, weights: str | None = None,
                      input_shape: list[int] | None = None, model_kwargs: dict | None = None) -> torch.Tensor:
    """A zero tensor shaped like one input batch of the named model.

    Args:
        model_name: registry name.
        input_size: side in pixels; None = the model's own (torchvision weights may set it, e.g.
            vit_b_16's SWAG weights take 384x384).
        batch: batch size.
        weights: the weights the model will get (they may fix the input size).
        input_shape, model_kwargs: an import-path model's input ``[C, S, S]`` and keyword arguments.
    Returns:
        float32 zeros ``[batch, C, size, size]``.
    """
    own = by_import_path(model_name)
    if own:  # it must run on its input, but its classes do not matter here (a model with several outputs has none)
        output_classes(model_name, weights, input_shape, model_kwargs)
    spec = input_spec(model_name, weights, 1 if own else None, input_shape=input_shape, model_kwargs=model_kwargs)
    size = input_size or spec.size
    return torch.zeros(batch, spec.channels, size, size)


def load_model_arg(model: str | None, weights: str | None, checkpoint: str | None = None, input_shape: list[int] | None = None,
                   model_kwargs: dict | None = None) -> tuple[nn.Module, str, list[int]]:
    """The model a command works on, from ``--model``/``--weights`` or a curlprune checkpoint.

    Args:
        model: registry name (e.g. ``cifar:resnet56``) or import path; used when ``checkpoint`` is None.
        input_shape, model_kwargs: an import-path model's input ``[C, S, S]`` and keyword arguments.
        weights: weights for ``model`` (file or torchvision weight name), or None.
        checkpoint: a curlprune checkpoint (``.safetensors``); wins over ``model``.
    Returns:
        ``(module in eval mode, model name, input shape [1, C, H, W])``.
    Raises:
        CurlpruneError: neither a model nor a checkpoint is given, or they cannot be loaded.
    """
    if checkpoint:
        meta = ckpt.read_metadata(checkpoint)
        return ckpt.load(checkpoint), meta["model_ref"]["name"], meta["input_shape"]
    if not model:
        raise CurlpruneError("no model given: pass --model NAME (e.g. cifar:resnet56) or a checkpoint file")
    shape = list(example_input_for(model, weights=weights, input_shape=input_shape, model_kwargs=model_kwargs).shape)
    return build(model, weights=weights, **(model_kwargs or {})).eval(), model, shape


def cmd_groups(args: argparse.Namespace) -> int:
    kwargs, shape = model_kwargs_arg(args.model_kwargs), input_shape_arg(args.input_shape)
    model, name, _ = load_model_arg(args.model, args.weights, None, shape, kwargs)
    x = example_input_for(name, args.input_size, weights=args.weights, input_shape=shape, model_kwargs=kwargs)
    with warnings.catch_warnings():  # said below, as a line of the listing
        warnings.simplefilter("ignore", SpecialisedTraceWarning)
        groups = trace(model, x)
    title = f"channel groups of {name}"
    if console.is_terminal:
        console.print(groups_table(groups, title=title))
    else:  # piped: plain text, names whole (rich would shorten them to the 80 columns it assumes)
        print(groups_text(groups, title=title))
    prunable = [g for g in groups if g.prunable]
    console.print(f"{len(groups)} groups, {len(prunable)} prunable, {sum(g.width for g in prunable)} prunable channels")
    how = analyse(model, x).capture
    if how.specialised:
        print(f"{name} was {how.summary()}")  # one line, also on a terminal
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    if args.checkpoint and (args.model or args.weights or args.model_kwargs):
        raise CurlpruneError("give a checkpoint or --model/--weights/--model-kwargs, not both: a curlprune checkpoint "
                             "carries its own model; drop the model options to count the checkpoint")
    model, name, shape = load_model_arg(args.model, args.weights, args.checkpoint, input_shape_arg(args.input_shape),
                                        model_kwargs_arg(args.model_kwargs))
    if args.input_size:
        shape = [1, shape[1], args.input_size, args.input_size]
    macs, params = count(model, torch.zeros(shape))
    console.print(f"{name} at {shape[2]}x{shape[3]}: {human(macs)} MACs, {human(params)} params ({macs:,} / {params:,})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_writable_file(args.output, "output")  # before loading anything (issue 12)
    model, _, shape = load_model_arg(None, None, args.checkpoint)
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise CurlpruneError(f"output {out} should end in .onnx")
    export_onnx(model, torch.zeros(shape), out)
    console.print(f"wrote {out} (input 'input' [batch, {shape[1]}, {shape[2]}, {shape[3]}], output 'logits')")
    return 0


def register(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``groups``, ``count`` and ``export`` to the parser."""
    p = subparsers.add_parser("groups", help="list the channel groups of a model (what is pruned together)", formatter_class=formatter,
                              description="Trace a model and print its channel groups: channels that must be removed together "
                                          "(inside a block, or along a residual stream), with width and MACs per channel.")
    p.add_argument("--model", required=True, help=MODEL_HELP + NO_DEFAULT)
    p.add_argument("--model-kwargs", default=None, metavar="JSON", help=MODEL_KWARGS_HELP + NO_DEFAULT)
    p.add_argument("--input-shape", default=None, metavar="C,S,S", help=INPUT_SHAPE_HELP + NO_DEFAULT)
    p.add_argument("--weights", default=None, help="weights file or torchvision weight name (not needed to see the groups)" + NO_DEFAULT)
    p.add_argument("--input-size", type=int, default=None, help="input resolution used for tracing (default: the model's own)" + NO_DEFAULT)
    p.set_defaults(func=cmd_groups)

    p = subparsers.add_parser("count", help="count MACs and parameters (paper convention)", formatter_class=formatter,
                              description="MACs: conv and linear multiply-accumulates for one image; params: conv, linear and norm layers.")
    p.add_argument("checkpoint", nargs="?", default=None, help="a curlprune checkpoint (.safetensors); or use --model" + NO_DEFAULT)
    p.add_argument("--model", default=None, help=MODEL_HELP + NO_DEFAULT)
    p.add_argument("--model-kwargs", default=None, metavar="JSON", help=MODEL_KWARGS_HELP + NO_DEFAULT)
    p.add_argument("--input-shape", default=None, metavar="C,S,S", help=INPUT_SHAPE_HELP + NO_DEFAULT)
    p.add_argument("--weights", default=None, help="weights for --model (optional: counting needs no weights)" + NO_DEFAULT)
    p.add_argument("--input-size", type=int, default=None, help="input resolution (default: the model's own)" + NO_DEFAULT)
    p.set_defaults(func=cmd_count)

    p = subparsers.add_parser("export", help="export a checkpoint to ONNX", formatter_class=formatter,
                              description="Export a curlprune checkpoint to ONNX (dynamic batch). Check it with onnxruntime.")
    p.add_argument("checkpoint", help="a curlprune checkpoint (.safetensors), e.g. runs/r56/model.safetensors")
    p.add_argument("output", help="the .onnx file to write (written atomically)")
    p.set_defaults(func=cmd_export)
