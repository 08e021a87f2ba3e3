"""Settings in one form and every number in range (issue 18, item 7).

* A target in (1, 1000) is ambiguous (1.5: a fraction above 1, or 1.5 MACs?) and refused.
* The command line's ``--target-macs 0.5`` (the string "0.5") and a config's ``0.5`` (a number) are
  one setting: stored and compared in one canonical form, so a run started one way resumes the other.
* Every numeric setting of every config dataclass has a range, checked when the config is made: a
  seed of -1 or 2**32 is one line and exit 2, not a traceback from deep inside numpy.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from curlprune.errors import CurlpruneError
from curlprune.recover.distill import DistillConfig
from curlprune.recover.finetune import FinetuneConfig
from curlprune.recover.refine import RefineConfig
from curlprune.run.prune_config import PruneConfig, canonical_settings
from curlprune.run.run_config import RunConfig, parse_config
from curlprune.select.search import Target
from curlprune.validate import RANGES, numeric_fields

from trust_support import MODEL, assert_one_line_error, cli  # noqa: F401 (cli: a fixture)

# ------------------------------------------------------------------------------------------------
# ambiguous targets


@pytest.mark.parametrize("text", ["1.5", 1.5, "2", "999", "0.5k", 42])
def test_a_target_between_one_and_a_thousand_is_ambiguous(text):
    with pytest.raises(CurlpruneError) as info:
        Target.parse("macs", text)
    assert "ambiguous" in str(info.value) and "at most 1" in str(info.value) and "62.5M" in str(info.value)


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1", 1.0), (1, 1.0), ("1.5k", 1500.0), ("62.5M", 62.5e6), (6e7, 6e7), ("1000", 1000.0)])
def test_fractions_and_counts_still_parse(text, value):
    assert Target.parse("macs", text).value == value


def test_the_command_refuses_an_ambiguous_target_before_writing(cli, tmp_path):
    """Was: read as 1.5 MACs and refused as "target 2 macs (2) is not reachable"."""
    out = tmp_path / "p"
    assert_one_line_error(cli("prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "1.5", "--out", out), "ambiguous", "1.5")
    assert not out.exists()
    with pytest.raises(CurlpruneError, match="ambiguous"):
        parse_config({"model": MODEL, "stages": ["prune"], "prune": {"target_params": 3}})


# ------------------------------------------------------------------------------------------------
# one canonical form


@pytest.mark.parametrize("forms", [
    [{"target_macs": "0.5"}, {"target_macs": 0.5}, {"target_macs": " 0.50"}, {"target_macs": "5e-1"}],
    [{"target_macs": "62.5M"}, {"target_macs": 62.5e6}, {"target_macs": "62500000"}, {"target_macs": 62500000}],
    [{"target_latency": "12ms"}, {"target_latency": "12 ms"}, {"target_latency": "0.012s"}, {"target_latency": "12000us"}],
    [{"target_latency": "0.5"}, {"target_latency": 0.5}],
    [{"target_params": 0.3, "protect": "none"}, {"target_params": 0.3, "protect": []}, {"target_params": 0.3, "protect": ["none"]}],
])
def test_equal_settings_are_stored_in_one_form(forms):
    stored = [json.dumps(dataclasses.asdict(PruneConfig(criterion="l1", **form)), sort_keys=True) for form in forms]
    assert len(set(stored)) == 1, stored
    # a folder written before (the setting as typed) compares equal to the canonical form
    for form in forms:
        old = {**dataclasses.asdict(PruneConfig(criterion="l1", **forms[-1])), **form}
        assert canonical_settings(old) == json.loads(stored[0])


def _write_config(path, **prune) -> None:
    path.write_text(yaml.safe_dump({"model": MODEL, "data": "digits", "seed": 0, "stages": ["prune"],
                                    "prune": {"criterion": "l1", "eval_limit": 0, **prune}}))


def test_a_prune_run_started_by_the_command_resumes_from_an_equivalent_config(cli, tmp_path):
    """Was: "holds a finished prune stage with other settings: target_macs='0.5' (now 0.5)"."""
    run_dir = tmp_path / "run"
    proc = cli("prune", "--model", MODEL, "--data", "digits", "--criterion", "l1", "--target-macs", "0.5", "--eval-limit", "0",
               "--out", run_dir / "prune", "--no-report")
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "run.yaml"
    _write_config(config, target_macs=0.5)
    proc = cli("run", config, "--out", run_dir, "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "prune" / "done.json").read_text())["settings"]["config"]["target_macs"] == 0.5


def test_a_config_run_resumes_from_the_same_target_written_otherwise(cli, tmp_path):
    """``target_macs: 5e-1`` is a string in YAML 1.1 and 0.5 a number: the same run, a finished one (nothing rewritten)."""
    run_dir, config = tmp_path / "run", tmp_path / "run.yaml"
    _write_config(config, target_macs=0.5)
    assert cli("run", config, "--out", run_dir, "--no-report").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    config.write_text(config.read_text().replace("target_macs: 0.5", "target_macs: 5e-1"))
    assert isinstance(yaml.safe_load(config.read_text())["prune"]["target_macs"], str)
    proc = cli("run", config, "--out", run_dir, "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_the_command_resumes_a_finished_run_given_the_target_in_another_form(cli, tmp_path):
    out = tmp_path / "p"
    args = ("prune", "--model", MODEL, "--criterion", "l1", "--out", out, "--no-report", "--resume")
    assert cli(*args, "--target-macs", "0.5").returncode == 0
    proc = cli(*args, "--target-macs", "0.50")
    assert proc.returncode == 0 and "nothing to do" in proc.stdout


# ------------------------------------------------------------------------------------------------
# ranges


CONFIGS = [RunConfig, PruneConfig, FinetuneConfig, DistillConfig, RefineConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_setting_has_a_range(cls):
    missing = [name for name in numeric_fields(cls) if name not in RANGES]
    assert not missing, f"{cls.__name__}: add a range to curlprune.validate.RANGES for {missing}"


@pytest.mark.parametrize("where, key, value, words", [
    (None, "seed", -1, "[0, 4294967295]"),
    (None, "seed", 2**32, "[0, 4294967295]"),
    (None, "input_size", 4, ">= 8"),
    ("prune", "seed", -1, "[0, 4294967295]"),
    ("prune", "budget_mb", 0, "> 0"),
    ("prune", "floor", 1.0, "[0, 1)"),
    ("distill", "seed", 2**32, "[0, 4294967295]"),
    ("distill", "warmup_epochs", -1, "non-negative"),
    ("refine", "alpha", 1.5, "[0, 1]"),
    ("refine", "label_reference_batch", 0, ">= 1"),
    ("finetune", "head_epochs", -1, ">= 0"),
    ("finetune", "body_lr_mult", -0.5, ">= 0"),
    ("prune", "approx_classes", 0, "positive"),
    ("prune", "budget_mb", float("nan"), "> 0"),
    ("distill", "ce_weight", -1, "[0, 1]"),
    ("distill", "ce_weight", 1.5, "[0, 1]"),
    ("distill", "lr", -1, "non-negative"),
])
def test_out_of_range_settings_are_one_line_errors(where, key, value, words):
    raw = {"model": MODEL, "stages": ["prune", "distill", "refine"], "prune": {"target_macs": 0.5}}
    if where is None:
        raw[key] = value
    else:
        raw.setdefault(where, {})[key] = value
        if where == "finetune":
            raw["stages"] = ["finetune"]
    with pytest.raises(CurlpruneError) as info:
        parse_config(raw, "c.yaml")
    message = str(info.value)
    assert key in message and words in message and str(value) in message and "\n" not in message
    # it says where: the file, and the section of a stage's setting (was: "ce_weight must be ... (got -1.0)" alone)
    assert message.startswith("c.yaml: ") and (where is None or f"section '{where}'" in message), message


@pytest.mark.parametrize("argv", [
    ["prune", "--model", MODEL, "--data", "digits", "--criterion", "l1", "--target-macs", "0.5", "--seed", "-1"],
    ["prune", "--model", MODEL, "--criterion", "random", "--target-macs", "0.5", "--seed", str(2**32)],
    ["prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "0.5", "--num-classes", "0"],
    ["distill", "--model", MODEL, "--data", "digits", "--epochs", "1", "--seed", "-1"],
])
def test_out_of_range_options_stop_before_anything_is_written(cli, tmp_path, argv):
    """Was: a scikit-learn traceback ("random_state ... must be an int in the range [0, 4294967295]") after loading."""
    out = tmp_path / "out"
    proc = cli(*argv, "--out", out, "--no-report")
    assert_one_line_error(proc, "must be")
    assert "Traceback" not in proc.stderr and not out.exists()
