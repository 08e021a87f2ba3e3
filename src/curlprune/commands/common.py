"""What the command modules share."""
from __future__ import annotations

import argparse

NO_DEFAULT = "%(default).0s"  # formats to nothing: stops the help formatter from adding "(default: None)"


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
