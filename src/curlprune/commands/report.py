"""The ``report`` command: figures and ``index.md`` of a run directory (:mod:`curlprune.report.figures`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from curlprune.errors import CurlpruneError
from curlprune.report import REPORT_DIR, console, write_report


def write_report_and_say(run_dir: str | Path) -> Path:
    """Write ``run_dir/report/`` (:func:`curlprune.report.figures.write_report`) and print its path and any notes.

    Args:
        run_dir: a pipeline run directory or a ``curlprune prune --out`` folder.
    Returns:
        The path of ``index.md``.
    Raises:
        CurlpruneError: ``run_dir`` is not a directory or holds no curlprune run (nothing is written).
    """
    if not Path(run_dir).is_dir():
        raise CurlpruneError(f"{run_dir} is not a directory: pass a run directory (curlprune run) or a prune --out folder")
    index = write_report(run_dir)
    pngs = sorted(p.name for p in (Path(run_dir) / REPORT_DIR).glob("*.png"))
    console.print(f"report: {index} ({len(pngs)} figure(s): {', '.join(pngs) or 'none'})")
    left_out = [line[2:] for line in index.read_text().splitlines() if line.startswith("- ")]
    for note in left_out:
        console.print(f"  note: {note}")
    return index


def cmd_report(args: argparse.Namespace) -> int:
    write_report_and_say(args.run_dir)
    return 0


def register(subparsers: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """Add ``report`` to the parser."""
    p = subparsers.add_parser(
        "report", help="draw a run's figures and write RUN_DIR/report/index.md", formatter_class=formatter,
        description="Read what a run wrote (nothing is recomputed) and write RUN_DIR/report/index.md with PNG figures: "
                    "kept width per group (inside vs outside groups), the score distribution per group with the cut, "
                    "training curves of every recovery stage, and the accuracy / MACs / latency summary. A missing or "
                    "damaged file leaves its figure out with a note. `curlprune run` and `curlprune prune` write it "
                    "at the end unless --no-report.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (curlprune run) or a prune --out folder, e.g. runs/demo")
    p.set_defaults(func=cmd_report)
