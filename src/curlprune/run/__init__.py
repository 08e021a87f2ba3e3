"""The prune stage and the whole run as libraries, with their configs (the commands call these).

    prune_config.py    the prune stage's settings (PruneConfig), defaults and scores fingerprint
    prune.py           the prune stage: score, select, slice, save; resumable (run_prune)
    strict_yaml.py     YAML with duplicate keys refused
    run_config.py      the YAML run config (RunConfig): parsing and checks
    student_check.py   a --student checked against the run's input and the teacher's classes
    pipeline.py        the resumable run: prune -> distill (-> refine) (Run)
    run_data.py        the splits a run uses (train, test, validation; the training subset)
"""
from curlprune.run.pipeline import Run
from curlprune.run.prune import run_prune
from curlprune.run.prune_config import DEFAULT_CALIB, PruneConfig
from curlprune.run.run_config import RunConfig, load_config, parse_config, read_config_file

__all__ = ["DEFAULT_CALIB", "PruneConfig", "Run", "RunConfig", "load_config", "parse_config", "read_config_file", "run_prune"]
