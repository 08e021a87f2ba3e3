"""Issue 19: the measured defaults (distill ``ce_weight`` 0.5, stages ``[prune, distill]``) on real digit
runs, ``ce_weight: 0`` (the paper's loss) kept expressible, and run folders written before the change
(no ``ce_weight``: the paper's loss) refused under the new default and resumed with ``ce_weight: 0``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from curlprune.errors import CurlpruneError
from curlprune.recover import DistillConfig
from curlprune.recover.stage import check_same_settings
from curlprune.run.pipeline import Run
from curlprune.run.run_config import DEFAULT_STAGES, parse_config
from curlprune.commands.demo import demo_config

BASE = {  # real digits, 20 training images per class, l1 pruning, one distill epoch: seconds
    "model": "small:resnet-digits", "data": "digits", "train_per_class": 20, "seed": 0,
    "prune": {"criterion": "l1", "target_macs": 0.5, "calib": 32},
    "distill": {"epochs": 1, "batch_size": 32, "progress": False, "device": "cpu"},
}
OLD_DEFAULT = r"ce_weight=0\.0 \(now 0\.5\); to continue it set ce_weight: 0 in section 'distill' \(ce_weight=0 in Python\)"


def config(teacher: Path, run_dir: Path, **distill) -> dict:
    return {**BASE, "weights": str(teacher), "run_dir": str(run_dir), "distill": {**BASE["distill"], **distill}}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_config_without_stages_runs_prune_then_distill_with_the_default_loss(tmp_path, teacher):
    assert DEFAULT_STAGES == ["prune", "distill"]
    cfg = parse_config(config(teacher, tmp_path / "run"))
    assert cfg.stages == ["prune", "distill"] and "refine" not in cfg.sections
    summary = Run(cfg).run()
    assert list(summary["stages"]) == ["prune", "distill"] and summary["stages"]["distill"]["last_top1"] > 10.0
    assert (tmp_path / "run" / "distill" / "done.json").is_file() and not (tmp_path / "run" / "refine").exists()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["stages"] == ["prune", "distill"] and saved["distill"]["ce_weight"] == 0.5
    assert json.loads((tmp_path / "run" / "distill" / "done.json").read_text())["config"]["ce_weight"] == 0.5

    # a folder that ran refine when it was a default stage is not cut back to today's default unasked
    saved["stages"] = ["prune", "distill", "refine"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    before = files(tmp_path / "run")
    with pytest.raises(CurlpruneError, match=r"holds a run with stages \[prune, distill, refine\], and this config lists no "
                                             r"stages: the default is now \[prune, distill\].*add stages: \[prune, distill, refine\] "
                                             r"to continue it, or stages: \[prune, distill\] to end it after distill"):
        Run(parse_config(config(teacher, tmp_path / "run"))).run()
    assert files(tmp_path / "run") == before
    Run(parse_config({**config(teacher, tmp_path / "run"), "stages": ["prune", "distill"]})).run()  # listed: it may shrink
    assert json.loads((tmp_path / "run" / "config.json").read_text())["stages"] == ["prune", "distill"]


def test_a_refine_section_without_stages_is_an_error_not_a_silent_skip():
    """A config written when refine ran by default would silently lose its refine stage."""
    with pytest.raises(CurlpruneError, match=r"c.yaml: section 'refine' is given but the config lists no stages.*"
                                             r"add stages: \[prune, distill, refine\] to run it, or remove the section"):
        parse_config({**BASE, "refine": {"epochs": 2}}, "c.yaml")
    assert parse_config({**BASE, "stages": ["prune", "distill", "refine"], "refine": {"epochs": 2}}).stages[-1] == "refine"


def test_a_section_left_out_by_a_recipe_or_a_transfer_stage_is_named_as_it_is():
    """The stage list a config without ``stages`` gets from ``recipe: paper`` is the recipe's, not "the
    default stages"; a ``finetune`` section is offered the orders the docs use (a transfer first, or
    prune + CE fine-tuning), not fine-tuning squeezed between prune and distill."""
    with pytest.raises(CurlpruneError, match=r"the stages of recipe 'paper' \[prune, distill, refine\] leave it out"):
        parse_config({**BASE, "recipe": "paper", "finetune": {"epochs": 1}}, "c.yaml")
    for raw, first in (({**BASE, "finetune": {"epochs": 1}}, "[finetune, prune, distill]"),
                       ({**BASE, "recipe": "paper", "finetune": {"epochs": 1}}, "[finetune, prune, distill, refine]")):
        with pytest.raises(CurlpruneError) as err:
            parse_config(raw, "c.yaml")
        message = str(err.value)
        assert f"add stages: {first} (fine-tune before pruning: a transfer) or [prune, finetune] (fine-tune the pruned model)" \
            in message and "[prune, finetune, distill" not in message, message
        assert len(message.splitlines()) == 1
        for suggested in (first, "[prune, finetune]"):  # each suggestion is a config that parses
            stages = suggested.strip("[]").split(", ")
            assert parse_config({**raw, "stages": stages}, "c.yaml").stages == stages


def test_ce_weight_zero_round_trips_and_a_folder_from_before_resumes_only_with_it(tmp_path, teacher):
    run_dir = tmp_path / "run"
    Run(parse_config(config(teacher, run_dir, ce_weight=0))).run()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["distill"]["ce_weight"] == 0.0  # stored, not left out: 0 is not the default
    assert json.loads((run_dir / "distill" / "done.json").read_text())["config"]["ce_weight"] == 0.0
    again = parse_config(saved, "config.json")  # config.json read back as a config: the paper's loss
    assert again.sections["distill"].ce_weight == 0.0
    before = files(run_dir / "distill")
    Run(again).run()  # a resume with the stored settings: the finished distill stage is skipped
    assert files(run_dir / "distill") == before
    with pytest.raises(CurlpruneError, match=OLD_DEFAULT):  # today's default is another run
        Run(parse_config(config(teacher, run_dir))).run()

    # the folder as an earlier version wrote it: no ce_weight anywhere (it meant the paper's loss)
    for path, section in ((run_dir / "config.json", "distill"), (run_dir / "distill" / "done.json", "config")):
        record = json.loads(path.read_text())
        del record[section]["ce_weight"]
        path.write_text(json.dumps(record, indent=2) + "\n")
    old = files(run_dir)
    with pytest.raises(CurlpruneError, match=OLD_DEFAULT):
        Run(parse_config(config(teacher, run_dir))).run()
    assert files(run_dir) == old  # refused before anything was written
    Run(parse_config(config(teacher, run_dir, ce_weight=0))).run()  # resumes: distill skipped, not retrained
    assert files(run_dir / "distill") == {k[len("distill/"):]: v for k, v in old.items() if k.startswith("distill/")}


def test_saved_settings_without_ce_weight_or_with_null_mean_the_paper_loss():
    """The check every resume goes through (done.json and the training state's header): missing or
    null compares as 0, a stored 0.5 as 0.5."""
    where = Path("run") / "distill" / "done.json"
    paper, default = DistillConfig(ce_weight=0), DistillConfig()
    for saved in ({}, {"ce_weight": None}, {"ce_weight": 0.0}):
        record = {k: v for k, v in vars(paper).items() if k != "ce_weight"} | saved
        check_same_settings(paper, record, where)
        with pytest.raises(CurlpruneError, match=OLD_DEFAULT):
            check_same_settings(default, record, where)
    check_same_settings(default, dict(vars(default)), where)
    with pytest.raises(CurlpruneError, match=r"ce_weight=0\.5 \(now 0\.0\); to continue it set ce_weight: 0.5"):
        check_same_settings(paper, dict(vars(default)), where)


def test_the_demo_shows_the_default_recipe(tmp_path):
    """`curlprune demo` lists no stages and no loss: it runs what a user's config gets by default."""
    for cifar in (False, True):
        raw = demo_config(tmp_path, cifar)
        assert "stages" not in raw and "ce_weight" not in raw["distill"]
        cfg = parse_config(raw, "demo")
        assert cfg.stages == DEFAULT_STAGES and cfg.sections["distill"].ce_weight == 0.5
