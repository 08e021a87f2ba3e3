"""`curlprune prune` end to end: real digits (and the published ResNet-20 on CIFAR-10 when
../shared is there); outputs, a loadable checkpoint equal to the sliced model, --resume reusing
scores, and one-line errors that leave --out untouched."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from curlprune.cli import main
from curlprune.cost.analysis import model_cost_fn, trace
from curlprune.cost.cost import count
from curlprune.data.data import load_digits_dataset
from curlprune.models import build, input_spec
from curlprune.recover.bn import recalibrate_bn
from curlprune.run.prune import PruneConfig, run_prune
from curlprune.run.prune_data import SplitImages
from curlprune.select.allocation import COST_WEIGHTED, allocate
from curlprune.select.search import Target, select
from curlprune.store import checkpoint
from curlprune.store.scores_io import read_scores

from conftest import SHARED  # noqa: E402
MODEL = "small:resnet-digits"


@pytest.fixture(scope="module")
def weights(tmp_path_factory, trained_digits) -> Path:
    """The digits ResNet trained on the real digits for a few seconds (once per session), as a state-dict file."""
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    torch.save(trained_digits(15).state_dict(), path)
    return path


def _prune(out: Path, weights: Path, *extra: str) -> int:
    return main(["prune", "--model", MODEL, "--weights", str(weights), "--data", "digits", "--target-macs", "0.5",
                 "--calib", "64", "--out", str(out), *extra])


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory, weights) -> Path:
    out = tmp_path_factory.mktemp("kl") / "run"
    assert _prune(out, weights, "--criterion", "kl") == 0
    return out


def test_kl_prune_writes_every_output_and_a_faithful_checkpoint(kl_run, weights, capsys):
    out = kl_run
    for name in ("scores.npz", "plan.json", "model.safetensors", "report.json", "log.jsonl", "done.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    sel = report["selection"]
    assert 0.99 * 0.5 <= sel["macs_ratio"] <= 0.5
    assert report["accuracy"]["test_images"] == 360
    assert report["accuracy"]["top1_before"] > 80.0  # the trained digits model on the real test digits
    assert report["accuracy"]["top1_after"] is not None
    plan = json.loads((out / "plan.json").read_text())
    assert checkpoint.read_metadata(out / "model.safetensors")["plan"] == plan
    # the saved model is the original sliced by the plan (apply() = mask()), its BN statistics then
    # re-estimated on the default number of training images (all 1,437 digits: fewer than 2,048)
    from curlprune.surgery.surgery import apply, mask

    model = build(MODEL, weights=str(weights)).eval()
    groups = trace(model, torch.zeros(1, 1, 8, 8))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loaded = checkpoint.load(out / "model.safetensors")
    assert report["accuracy"]["bn_images"] == 1437 and report["accuracy"]["top1_after_bn"] > report["accuracy"]["top1_after"]
    train = SplitImages(load_digits_dataset(seed=0)["train"], input_spec(MODEL))
    with torch.no_grad():
        sliced = apply(model, groups, plan)(x)
        with mask(model, groups, plan):
            assert torch.allclose(model(x), sliced, atol=1e-4)
        expected = recalibrate_bn(apply(model, groups, plan), train.draw(2048, 0 + 1)[0], 2048)(x)
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        assert not torch.allclose(loaded(x), sliced, atol=1e-3)
    scores, fingerprint = read_scores(out / "scores.npz")
    assert set(scores) == {g.name for g in groups if g.prunable}
    assert fingerprint["criterion"] == "kl" and fingerprint["calib"] == 64
    # the default allocation, recorded next to the criterion: the plan is allocate() on the stored scores
    assert report["criterion"] == "kl" and report["allocation"] == "cost-weighted"
    assert checkpoint.read_metadata(out / "model.safetensors")["extra"]["prune"]["allocation"] == "cost-weighted"
    cost_fn = model_cost_fn(model, torch.zeros(1, 1, 8, 8), groups)
    assert plan == allocate(groups, scores, cost_fn, Target("macs", 0.5), COST_WEIGHTED).plan
    assert [e["event"] for e in _events(out)] == ["scores", "selection", "eval", "done"]
    assert _events(out)[0]["source"] == "computed"


def test_resume_reuses_scores_and_a_finished_run_is_left_alone(kl_run, weights, tmp_path, capsys):
    out = tmp_path / "run"
    import shutil

    shutil.copytree(kl_run, out)
    before = _snapshot(out)
    assert _prune(out, weights, "--criterion", "kl", "--resume") == 0  # same settings: nothing to do
    assert "already holds this finished run" in " ".join(capsys.readouterr().out.split())
    assert _snapshot(out) == before
    # a new target reuses the scores (no recomputation: the file is untouched, the log says so)
    assert main(["prune", "--model", MODEL, "--weights", str(weights), "--data", "digits", "--target-macs", "0.7",
                 "--calib", "64", "--criterion", "kl", "--out", str(out), "--resume"]) == 0
    assert _snapshot(out)["scores.npz"] == before["scores.npz"]
    assert _events(out)[-4]["event"] == "scores" and _events(out)[-4]["source"] == "reused"
    assert 0.69 <= json.loads((out / "report.json").read_text())["selection"]["macs_ratio"] <= 0.7


def test_resume_with_other_settings_is_an_error(kl_run, weights, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(kl_run, out)
    assert _prune(out, weights, "--criterion", "kl", "--calib", "32", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calib" in err[0] and "delete it" in err[0]


def test_data_free_criterion_and_random_weights(tmp_path):
    out = tmp_path / "l1"
    assert main(["prune", "--model", MODEL, "--target-params", "0.6", "--criterion", "l1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["test_images"] == 0
    assert 0.99 * 0.6 <= report["selection"]["params_ratio"] <= 0.6
    kept = json.loads((out / "plan.json").read_text())
    assert all(len(v) >= 1 for v in kept.values())


def test_random_weights_are_the_same_model_in_every_run(tmp_path):
    # Without --weights the model is randomly initialised. Each command used to draw it from torch's
    # unseeded generator, so a rerun pruned another model and `--resume` after a kill mixed the kept
    # scores of one model with the new scores of another (and a run's teacher changed on resume).
    torch.manual_seed(1)
    assert main(["prune", "--model", MODEL, "--target-macs", "0.5", "--criterion", "l1", "--out", str(tmp_path / "a")]) == 0
    torch.manual_seed(2)  # whatever the caller's generator holds
    assert main(["prune", "--model", MODEL, "--target-macs", "0.5", "--criterion", "l1", "--out", str(tmp_path / "b")]) == 0
    (a, _), (b, _) = read_scores(tmp_path / "a" / "scores.npz"), read_scores(tmp_path / "b" / "scores.npz")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    before = torch.random.get_rng_state()
    assert main(["prune", "--model", MODEL, "--target-macs", "0.5", "--criterion", "l1", "--out", str(tmp_path / "c")]) == 0
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is left as it was


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target-macs", "0.01", "--criterion", "l1"], "smallest reachable macs is"),
        (["--target-macs", "0.5", "--criterion", "entropy"], "unknown criterion 'entropy'"),
        (["--target-macs", "0.5", "--criterion", "kl"], "needs data"),
        (["--target-macs", "half", "--criterion", "l1"], "is not a number"),
        (["--target-macs", "0.5", "--criterion", "l1", "--protect", "layer9*"], "matches no prunable group"),
        (["--target-macs", "0.5", "--criterion", "kl", "--data", "no/such/folder"], "does not exist"),
        (["--target-macs", "0.5", "--criterion", "l1", "--allocation", "greedy"], "unknown allocation 'greedy': use one of cost-weighted, paper"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["prune", "--model", MODEL, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("curlprune: error: ") and message in err[0], err
    assert not out.exists()


def test_existing_run_without_resume_is_an_error(kl_run, weights, capsys):
    before = _snapshot(kl_run)
    assert _prune(kl_run, weights, "--criterion", "l1") == 2
    assert "--resume" in capsys.readouterr().err
    assert _snapshot(kl_run) == before


def test_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--weights", "--data", "--target-macs", "--target-params", "--criterion", "--calib", "--seed",
                   "--floor", "--protect", "--round-to", "--eval-limit", "--out", "--resume", "--normalize", "--allocation"):
        assert option in text
    for default in ("(default: 256)", "(default: 0.3)", "(default: kl)", "(default: all)", "(default: random init)"):
        assert default in text
    joined = text.replace("cost- weighted", "cost-weighted").replace("kl- approx", "kl-approx")  # argparse may wrap at a hyphen
    assert "Default: cost-weighted for kl and kl-approx" in joined and "paper for l1" in joined
    assert "paper" in text and "cifar_resnet56.md" in text  # --allocation says what the default is measured against
    assert "None" not in text


def test_run_prune_api_for_the_pipeline(weights, tmp_path):
    """The pipeline's call: a config dataclass, loaded splits, resume=True; a rerun returns at once."""
    from curlprune.data.data import load_digits_dataset

    splits = load_digits_dataset(seed=0)
    config = PruneConfig(criterion="kl-approx", target_macs=0.5, calib=64)
    first = run_prune(config, tmp_path / "p", resume=True, model_name=MODEL, weights=str(weights), data=splits, show=False)
    assert first.checkpoint == tmp_path / "p" / "model.safetensors" and not first.already_done
    again = run_prune(config, tmp_path / "p", resume=True, model_name=MODEL, weights=str(weights), data=splits, show=False)
    assert again.already_done and again.plan == first.plan


def test_allocation_default_and_paper_on_a_cifar_resnet(tmp_path):
    """cifar:resnet20 at 16 px (seeded init, l1 scores: data-free) through the CLI, with each allocation."""
    torch.manual_seed(0)
    model = build("cifar:resnet20").eval()
    for m in model.modules():  # BN scales away from 1, so that the l1 ranking is not a tie of equal inits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
    weights = tmp_path / "r20.pt"
    torch.save(model.state_dict(), weights)
    base = ["prune", "--model", "cifar:resnet20", "--weights", str(weights), "--input-size", "16", "--criterion", "l1",
            "--target-macs", "0.4", "--no-report"]
    assert main([*base, "--allocation", "cost-weighted", "--out", str(tmp_path / "cost")]) == 0
    assert main([*base, "--out", str(tmp_path / "paper")]) == 0  # l1's default allocation is the paper's
    x = torch.zeros(1, 3, 16, 16)
    groups = trace(model, x)
    cost_fn = model_cost_fn(model, x, groups)
    full = cost_fn({})[0]
    plans = {}
    for name, allocation in (("cost", "cost-weighted"), ("paper", "paper")):
        out = tmp_path / name
        report = json.loads((out / "report.json").read_text())
        assert report["allocation"] == allocation and report["criterion"] == "l1"
        assert 0.99 * 0.4 * full <= report["selection"]["macs"] <= 0.4 * full  # the target within 1%
        settings = json.loads((out / "done.json").read_text())["settings"]["config"]
        assert settings["allocation"] == (None if name == "paper" else "cost-weighted")  # unset = the criterion's default
        plans[name] = json.loads((out / "plan.json").read_text())
        assert count(checkpoint.load(out / "model.safetensors"), x)[0] == report["selection"]["macs"]  # the saved model's own MACs
    scores, _ = read_scores(tmp_path / "paper" / "scores.npz")
    assert plans["paper"] == select(groups, scores, cost_fn, Target("macs", 0.4)).plan  # the paper: select on raw scores
    assert plans["cost"] == allocate(groups, scores, cost_fn, Target("macs", 0.4), COST_WEIGHTED).plan
    assert plans["cost"] != plans["paper"]
    # weighed by what they cost, the residual-stream channels go too (raw l1 sums a stream's producers: never);
    # why l1's default is the paper's ranking (docs/method.md §3)
    outside = {g.name for g in groups if g.kind == "outside"}
    assert outside & set(plans["cost"]) and not outside & set(plans["paper"])


@pytest.mark.skipif(not (SHARED / "models" / "resnet20-12fca82f.th").exists(), reason="needs ../shared (CIFAR-10 JPEG zip, published ResNet-20)")
def test_published_resnet20_on_cifar10(tmp_path, capsys):
    out = tmp_path / "r20"
    argv = ["prune", "--model", "cifar:resnet20", "--weights", str(SHARED / "models" / "resnet20-12fca82f.th"),
            "--data", str(SHARED / "data" / "cifar10-jpeg.zip"), "--target-macs", "0.5", "--criterion", "kl",
            "--calib", "64", "--eval-limit", "500", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.495 <= report["selection"]["macs_ratio"] <= 0.5
    assert 70.0 < report["accuracy"]["top1_before"] < 90.0  # published 81.03% on the JPEG test split
    assert report["accuracy"]["top1_after"] < report["accuracy"]["top1_before"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "layer3.0.conv2" in printed and "test top-1 on 500 images" in printed
    loaded = checkpoint.load(out / "model.safetensors")
    scores, _ = read_scores(out / "scores.npz")
    assert sum(len(v) for v in scores.values()) == 400
    assert np.all(np.concatenate(list(scores.values())) >= 0)
    assert sum(p.numel() for p in loaded.parameters()) == report["selection"]["params"]
