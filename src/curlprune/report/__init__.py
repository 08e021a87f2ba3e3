"""What a run shows: the terminal's tables, and ``RUN_DIR/report/`` (index.md + PNG figures).

    report.py    tables for the terminal (rich) and the numbers behind them
    figures.py   the figures of a run directory and write_report
    group_figures.py  the per-group figures (widths, scores): columns or rows by group count, legend below
"""
from curlprune.report.figures import REPORT_DIR, write_report
from curlprune.report.report import console, groups_table, groups_text, human, print_prune_summary, print_summary

__all__ = ["REPORT_DIR", "console", "groups_table", "groups_text", "human", "print_prune_summary", "print_summary", "write_report"]
