"""What the command modules share."""
from __future__ import annotations

import argparse
import json
from typing import Any

from curlprune.data.streaming import DataSettings
from curlprune.errors import CurlpruneError
from curlprune.models.import_path import parse_input_shape

NO_DEFAULT = "%(default).0s"  # formats to nothing: stops the help formatter from adding "(default: None)"

MODEL_HELP = ("the model: a registry name (cifar:resnet20|32|44|56|110, torchvision:<name>, timm:<name>, "
              "small:resnet-digits) or your own by import path: mypkg.nets:MyNet (on PYTHONPATH) or "
              "path/to/file.py:build_fn, called with --model-kwargs; it then needs --input-shape")
INPUT_SHAPE_HELP = ("C,S,S: the input of a model named by import path, e.g. 3,32,32 (required for one; images are "
                    "resized to S x S; normalised with ImageNet's mean/std for 3 channels, 0.5/0.5 otherwise)")
MODEL_KWARGS_HELP = 'keyword arguments of an import-path model, as JSON, e.g. \'{"width": 32}\' (default: none)'


def model_kwargs_arg(text: str | None) -> dict[str, Any] | None:
    """The ``--model-kwargs`` JSON object.

    Raises:
        CurlpruneError: not JSON, or not an object.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CurlpruneError(f"--model-kwargs {text!r} is not JSON ({exc}): write an object, e.g. '{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise CurlpruneError(f"--model-kwargs {text!r} is not a JSON object of keyword arguments, e.g. '{{\"width\": 32}}'")
    return value


def input_shape_arg(text: str | None) -> list[int] | None:
    """The ``--input-shape C,S,S`` as ``[C, S, S]`` (None when not given).

    Raises:
        CurlpruneError: not three positive whole numbers.
    """
    return None if text is None else parse_input_shape(text)


def add_val_arguments(parser: argparse.ArgumentParser) -> None:
    """``--val-per-class`` / ``--val-fraction`` (at most one): the validation split held out of the
    training split (:mod:`curlprune.data.valsplit`), for the commands that take training data."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--val-per-class", type=int, default=None, metavar="N",
                       help="hold N training images of every class out as the validation split (seeded by --seed, "
                            "class-balanced; never trained on, the calibration set included)" + NO_DEFAULT)
    group.add_argument("--val-fraction", type=float, default=None, metavar="F",
                       help="or hold this share (0 < F < 1) of every class out; data with its own val/ split uses "
                            "that instead" + NO_DEFAULT)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--streaming`` / ``--memory-budget-gb`` / ``--data-workers``: whether a data folder or zip is
    decoded into memory or on the fly (:mod:`curlprune.data.streaming`), for the commands that take ``--data``."""
    parser.add_argument("--streaming", default=None, choices=("auto", "true", "false"),
                        help="auto: decode the data into memory unless its estimated decoded size is above --memory-budget-gb, "
                             "then decode it on the fly in DataLoader workers (the same batches either way); true / false: "
                             "always / never stream (default: auto)" + NO_DEFAULT)
    parser.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                        help="memory budget of --streaming auto, in GB (default: half of this machine's memory)" + NO_DEFAULT)
    parser.add_argument("--data-workers", type=int, default=None, metavar="N",
                        help="DataLoader worker processes that decode streamed images; 0 = in the main process "
                             "(default: min(4, CPUs))" + NO_DEFAULT)


def data_settings_arg(args: argparse.Namespace) -> DataSettings:
    """The :class:`~curlprune.data.streaming.DataSettings` of :func:`add_data_arguments`.

    Raises:
        CurlpruneError: a budget that is not positive, or negative workers.
    """
    return DataSettings.of(args.streaming, args.memory_budget_gb, args.data_workers, "command line")
