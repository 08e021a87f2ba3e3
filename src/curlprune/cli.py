"""The ``curlprune`` command.

The sub-commands live in :mod:`curlprune.commands`, one module per family, each with a
``register(subparsers, formatter)`` function; this module only builds the parser from them and
turns user mistakes (:class:`CurlpruneError`) into one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from curlprune import __version__
from curlprune.commands import demo, inspect, prune, report, run
from curlprune.errors import CurlpruneError
from curlprune.store import os_error_message

# Command families in the order their commands appear in --help.
COMMAND_FAMILIES = [demo, inspect, prune, run, report]

DESCRIPTION = """\
Make a trained CNN smaller and faster by removing whole channels (also those on residual
connections), ranked by how much the output distribution changes when each is removed (CURL's
KL criterion) per MAC its removal saves, then recover its accuracy, also from a small dataset.

typical use:
  curlprune groups --model cifar:resnet56                  see which channels go together
  curlprune prune --model cifar:resnet56 --weights W.th --data cifar10-jpeg.zip \\
                  --target-macs 0.5 --out runs/r56        score, select, slice, save
  curlprune prune ... --target-latency 0.5 --latency-batch 64 --out runs/r56-fast
                                                           stop where it runs twice as fast here
  curlprune run config.yaml                                prune -> distill (the default stages), resumable
  curlprune report runs/r56                                figures + index.md in runs/r56/report/
  curlprune export runs/r56/model.safetensors model.onnx   deploy
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows every option's default."""


def build_parser() -> argparse.ArgumentParser:
    """The ``curlprune`` parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="curlprune", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"curlprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for family in COMMAND_FAMILIES:
        family.register(subparsers, HelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CurlpruneError as exc:
        print(f"curlprune: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, always
        return 2
    except OSError as exc:  # disk full, read-only, permissions, a file where a folder should be
        message = os_error_message(exc)
        if message is None:
            raise
        print(f"curlprune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curlprune: interrupted; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
