"""The criteria registry drives its callers: each entry declares what its function takes, the scores
fingerprint records every option that changes the scores (in the form earlier versions wrote), the
default allocation and the progress follow the entry, and a user's own criterion registers and
prunes through the command."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json

import numpy as np
import pytest
import torch

from curlprune.cli import main
from curlprune.cost.analysis import trace
from curlprune.criteria import CRITERIA, Criterion, Option, compute_scores, get, register_criterion, work_items
from curlprune.criteria.base import prunable, unit_broadcast
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.run.prune_config import PruneConfig, scores_fingerprint

BUILT_IN = ("kl", "kl-approx", "l1", "bn", "taylor", "random")
SETTINGS = {"model": "small:resnet-digits", "weights": "w.pt", "weights_sha256": "ab" * 32, "num_classes": None}


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = build("small:resnet-digits").eval()
    return model, trace(model, torch.zeros(1, 1, 8, 8))


def _other(value):
    """A different value of the same type."""
    return not value if isinstance(value, bool) else value + 1 if isinstance(value, int) else value * 2 + 1


def test_the_built_in_criteria_are_registered_in_order():
    assert tuple(CRITERIA)[: len(BUILT_IN)] == BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_criterion_declares_what_its_function_takes(name):
    """compute_scores passes exactly what the entry declares, so the declaration must match the signature."""
    c = get(name)
    params = dict(list(inspect.signature(c.function).parameters.items())[2:])
    assert ("images" in params) == c.needs_data
    assert ("labels" in params) == c.needs_labels
    assert ("progress" in params) == c.reports_progress
    for option in c.options:
        assert params[option.argument].default == option.default  # the table's default is the function's
    declared = {"images", "labels", "progress", *(o.argument for o in c.options)}
    assert all(p.default is not inspect.Parameter.empty for k, p in params.items() if k not in declared)
    # the prune stage has a setting for every built-in option, with the same default
    fields = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    assert all(fields[o.name] == o.default for o in c.options)
    assert bool(c.summary) and "\n" not in c.summary


def test_the_prune_command_offers_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse may wrap at a hyphen
    for c in CRITERIA.values():
        assert f"{c.name}: {c.summary}" in text
        for option in c.options:
            if not option.shared:  # seed: the stage's own --seed
                assert f"--{option.name.replace('_', '-')}" in text and option.help in text


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("with_images", [False, True])
def test_the_fingerprint_records_every_option_that_changes_the_scores(name, with_images):
    images = torch.ones(4, 1, 8, 8) if with_images else None
    base = PruneConfig(criterion=name, target_macs=0.5)
    reference = scores_fingerprint(base, SETTINGS, images)
    assert reference["criterion"] == name
    for option in get(name).options:
        changed = dataclasses.replace(base, **{option.name: _other(getattr(base, option.name))})
        fingerprint = scores_fingerprint(changed, SETTINGS, images)
        if option.changes_scores:
            assert fingerprint[option.name] == getattr(changed, option.name) and fingerprint != reference
        else:
            assert fingerprint == reference  # a resource limit: stored scores stay valid
    # another criterion's option does not change this one's fingerprint
    own = {o.name for o in get(name).options} | ({"seed"} if with_images else set())
    for other in {o.name for c in CRITERIA.values() for o in c.options} - own:
        assert scores_fingerprint(dataclasses.replace(base, **{other: _other(getattr(base, other))}), SETTINGS, images) == reference


def _fingerprint_v0(config: PruneConfig, settings: dict, images: torch.Tensor | None) -> dict:
    """The fingerprint as earlier versions computed it (name tests and all), the form of their scores files."""
    fingerprint = {
        "model": settings["model"],
        "weights": settings["weights_sha256"] or settings["weights"],
        "num_classes": settings["num_classes"],
        "criterion": config.criterion,
        "seed": config.seed if config.criterion == "random" else None,
    }
    if images is not None:
        fingerprint.update(calib=len(images), seed=config.seed,
                           calib_sha256=hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest())
    if config.criterion == "kl-approx":
        fingerprint["approx_classes"] = config.approx_classes
    return fingerprint


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("values", [{}, {"seed": 3, "approx_classes": 2, "budget_mb": 64.0}])
def test_the_fingerprint_is_the_form_earlier_versions_wrote(name, values):
    """Scores files of earlier versions keep matching: same keys, same values, same JSON."""
    config = PruneConfig(criterion=name, target_macs=0.5, **values)
    for images in (None, torch.arange(8.0).reshape(2, 1, 2, 2)):
        new, old = scores_fingerprint(config, SETTINGS, images), _fingerprint_v0(config, SETTINGS, images)
        assert json.dumps(new, sort_keys=True) == json.dumps(old, sort_keys=True)


@pytest.mark.parametrize("name", BUILT_IN)
def test_the_default_allocation_and_the_progress_follow_the_entry(name, digits):
    _, groups = digits
    c = get(name)
    assert PruneConfig(criterion=name, target_macs=0.5).resolved_allocation() == ("cost-weighted" if c.one_scale else "paper")
    units = sum(g.width // g.unit for g in prunable(groups))
    assert work_items(name, groups) == (units if c.reports_progress else 0)


def test_compute_scores_passes_the_declared_options(digits):
    model, groups = digits
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert all(np.array_equal(a, b) for a, b in zip(compute_scores("random", model, groups, seed=5).values(),
                                                      compute_scores("random", model, groups, **{"seed": 5}).values()))
    done = []
    two = compute_scores("kl-approx", model, groups, images=images, approx_classes=2, progress=done.append)
    default = compute_scores("kl-approx", model, groups, images=images)
    assert any(not np.allclose(two[k], default[k]) for k in two)  # approx_classes reaches the function's `classes`
    assert sum(done) == pytest.approx(work_items("kl-approx", groups))


# ----------------------------------------------------------------------------- users' criteria


def _channel_index(model, groups, *, scale: float = 1.0):
    """A user's criterion: later channels first to go, scaled (an option the prune stage has no field for)."""
    return {g.name: unit_broadcast(scale * np.arange(g.width // g.unit, 0, -1, dtype=np.float64), g.unit) for g in prunable(groups)}


@pytest.fixture
def registered():
    added = register_criterion(Criterion("index", _channel_index, "later channels first (a test criterion)",
                                         options=(Option("scale", 1.0, "multiplies every score"),), one_scale=True))
    try:
        yield added
    finally:
        CRITERIA.pop("index", None)


def test_a_registered_criterion_scores_configures_and_prunes(registered, digits, tmp_path, capsys):
    model, groups = digits
    scaled = compute_scores("index", model, groups, scale=2.0)
    assert all(np.array_equal(scaled[k], 2 * v) for k, v in compute_scores("index", model, groups).items())
    config = PruneConfig(criterion="index", target_macs=0.5)
    assert config.resolved_allocation() == "cost-weighted"  # one_scale
    assert config.criterion_options() == {"scale": 1.0} and scores_fingerprint(config, SETTINGS, None)["scale"] == 1.0
    out = tmp_path / "index"
    assert main(["prune", "--model", "small:resnet-digits", "--target-params", "0.6", "--criterion", "index",
                 "--out", str(out), "--no-report"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == "index" and report["allocation"] == "cost-weighted"
    kept = json.loads((out / "plan.json").read_text())
    assert kept and all(v == list(range(len(v))) for v in kept.values())  # the later channels went first
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "index: later channels first" in " ".join(capsys.readouterr().out.split())


def test_register_criterion_checks_the_entry(registered):
    with pytest.raises(CurlpruneError, match="already registered"):
        register_criterion(registered)
    assert register_criterion(registered, replace=True) is registered
    with pytest.raises(CurlpruneError, match="needs \\['images'\\]"):  # takes images but does not say it needs data
        register_criterion(Criterion("bad", lambda model, groups, images: {}, "x"))
    with pytest.raises(CurlpruneError, match="lacks the keyword"):  # declares an option its function does not take
        register_criterion(Criterion("bad", lambda model, groups: {}, "x", options=(Option("scale", 1.0, "s"),)))
    with pytest.raises(CurlpruneError, match="defaults to 2.0"):
        register_criterion(Criterion("bad", lambda model, groups, gain=1.0: {}, "x", options=(Option("gain", 2.0, "g"),)))
    with pytest.raises(CurlpruneError, match="one setting, one default"):  # budget_mb is 512 for kl and kl-approx
        register_criterion(Criterion("bad", lambda model, groups, budget_mb=1.0: {}, "x", options=(Option("budget_mb", 1.0, "b"),)))
    assert "bad" not in CRITERIA
