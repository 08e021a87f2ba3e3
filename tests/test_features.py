"""Feature distillation aligned by the plan (issue 19 item 2): the channel map, the loss, the stage."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from curlprune.cost.analysis import trace
from curlprune.data.data import batches, class_balanced_subset, load_digits_dataset
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.models.cifar import cifar_resnet
from curlprune.recover import DistillConfig, distill
from curlprune.recover.distill import DistillStage
from curlprune.recover.features import FeatureMap, FeatureTap, feature_loss, feature_maps
from curlprune.recover.loop import train_stage
from curlprune.store import STAGE_CHECKPOINT_FILE, checkpoint
from curlprune.surgery.keep_class import apply as apply_kept
from curlprune.surgery.surgery import apply, mask

SPEC = input_spec("small:resnet-digits")
X32 = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny():
    digits = load_digits_dataset(0)
    return {"train": class_balanced_subset(digits["train"], 10, seed=0), "test": class_balanced_subset(digits["test"], 5, seed=0)}


def resnet20(seed: int = 0) -> torch.nn.Module:
    """A CIFAR ResNet-20 (option-A shortcuts: the residual stream of stage 2 holds stage 1's channels
    between two zero-pad groups) with random BN statistics, so every channel differs."""
    torch.manual_seed(seed)
    net = cifar_resnet(20, 10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def features_of(net, modules, x):
    tap = FeatureTap(net, modules)
    with torch.no_grad():
        net(x)
    out = tap.take()
    tap.remove()
    return out


def odd_plan(groups):
    """Keep channels 1, 3, 5, ... of every prunable group (never position j = channel j)."""
    return {g.name: list(range(1, g.width, 2)) for g in groups if g.prunable}


def test_auto_names_the_output_of_every_residual_stage():
    net = resnet20()
    maps = feature_maps(net, X32, {}, "auto")
    assert [(m.module, m.hook, len(m.kept)) for m in maps] == [
        ("layer1", "layer1.2.relu", 16), ("layer2", "layer2.2.relu", 32), ("layer3", "layer3.2.relu", 64)]
    assert all(m.kept == tuple(range(len(m.kept))) for m in maps)  # no plan: identity maps


def test_feature_loss_is_zero_for_the_teacher_sliced_by_a_plan_that_removes_nothing():
    teacher = resnet20()
    groups = trace(teacher, X32)
    plan = {g.name: list(range(g.width)) for g in groups if g.prunable}
    student = apply(teacher, groups, plan).eval()
    maps = feature_maps(teacher, X32, plan, ["conv1", "layer1", "layer2.0.conv1", "layer2", "layer3"])
    x = torch.randn(4, 3, 32, 32)
    hooks = [m.hook for m in maps]
    loss = feature_loss(features_of(student, hooks, x), features_of(teacher, hooks, x), maps)
    assert loss.item() == 0.0


@pytest.mark.parametrize("keep_class", [False, True])
def test_the_plans_channel_map_is_used_not_positions(keep_class):
    """A plan keeping channels 1, 3, 5, ... of every group: the sliced student's features equal the
    teacher's (masked by the plan) at the kept channels, through the option-A pads of the residual
    stream; compared by position they do not."""
    teacher = resnet20()
    groups = trace(teacher, X32)
    plan = odd_plan(groups)
    student = apply_kept(teacher, groups, plan, keep_class=keep_class).eval()
    assert isinstance(student, torch.fx.GraphModule) != keep_class
    maps = feature_maps(teacher, X32, plan, ["conv1", "layer1", "layer2", "layer3"])
    assert maps[0].kept == tuple(range(1, 16, 2))
    assert maps[1].kept != tuple(range(len(maps[1].kept)))
    hooks = [m.hook for m in maps]
    x = torch.randn(4, 3, 32, 32)
    with mask(teacher, groups, plan):
        masked = features_of(teacher, hooks, x)
    got = features_of(student, hooks, x)
    for m in maps:  # each feature alone
        assert feature_loss(got, masked, [m]).item() < 1e-10, m.module
        by_position = FeatureMap(m.module, m.hook, m.dim, tuple(range(len(m.kept))))
        assert feature_loss(got, masked, [by_position]).item() > 0.01, m.module
    # the first layer after the input does not depend on the mask: the unmasked teacher's gathered features
    plain = features_of(teacher, hooks, x)
    torch.testing.assert_close(got["conv1"], plain["conv1"][:, list(range(1, 16, 2))], rtol=0, atol=1e-6)
    with pytest.raises(CurlpruneError, match="give the plan the student was sliced by"):
        feature_loss(got, plain, [FeatureMap("conv1", "conv1", 1, tuple(range(16)))])


def test_bad_feature_settings_are_one_line():
    with pytest.raises(CurlpruneError, match="not a module of the model"):
        feature_maps(resnet20(), X32, {}, ["layer9"])
    with pytest.raises(CurlpruneError, match="the plan names channel group 'nope'"):
        feature_maps(resnet20(), X32, {"nope": [0]}, "auto")
    with pytest.raises(CurlpruneError, match="features must be 'auto' or a non-empty list"):
        DistillConfig(feature_weight=1.0, features=[])
    with pytest.raises(CurlpruneError, match="feature_weight must be a finite number >= 0"):
        DistillConfig(feature_weight=-1.0)


def test_feature_weight_zero_is_todays_loss_exactly(tiny):
    """Off (unset or 0) is one stored setting, installs no hook and gives the same loss bit for bit;
    on, with a student that is the teacher, the feature term adds exactly 0."""
    assert DistillConfig(feature_weight=0.0, features=["layer1"]).features is None
    assert DistillConfig(feature_weight=0.0).feature_weight is None
    assert DistillConfig(feature_weight=0.5).features == "auto"
    x, y = next(iter(batches(tiny["train"], SPEC, 16)))
    losses = []
    for weight in (None, 0.0, 2.0):
        torch.manual_seed(0)
        teacher = build("small:resnet-digits").eval()
        student = build("small:resnet-digits").eval()
        student.load_state_dict(teacher.state_dict())
        stage = DistillStage(DistillConfig(channels_last=False, feature_weight=weight, device="cpu"), teacher)
        stage.use_plan({})
        if weight:
            stage.maps = feature_maps(teacher, torch.zeros(1, 1, 8, 8), {}, "auto")
            stage.taps = (FeatureTap(teacher, [m.hook for m in stage.maps]), FeatureTap(student, [m.hook for m in stage.maps]))
        stage.seed(3)
        losses.append(stage.loss(student, x, y, torch.arange(16))[0])
        assert (stage.taps is not None) == bool(weight)
        stage.release()
        assert not student._forward_hooks and all(not m._forward_hooks for m in student.modules())
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])


class Interrupted(Exception):
    pass


class StopAt(DistillStage):
    """The distill stage, stopped by an exception at step ``at`` (a kill mid-epoch)."""

    def __init__(self, cfg, teacher, at):
        super().__init__(cfg, teacher)
        self.at, self.steps = at, 0

    def loss(self, model, x, y, index):
        self.steps += 1
        if self.steps == self.at:
            raise Interrupted
        return super().loss(model, x, y, index)


def test_distill_with_features_trains_and_resumes(tmp_path, tiny):
    """A real pruned student (keeping odd channels) distilled with features on: it trains (the
    features move the weights elsewhere than without), and a run stopped mid-epoch 2 resumes and ends
    bit-identical to the uninterrupted one; the settings are in done.json; the hooks are gone."""
    torch.manual_seed(0)
    teacher = build("small:resnet-digits").eval()
    groups = trace(teacher, torch.zeros(1, 1, 8, 8))
    plan = odd_plan(groups)
    cfg = DistillConfig(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.0, progress=False, device="cpu",
                        feature_weight=1.0)
    student = apply(teacher, groups, plan)
    distill(student, teacher, tiny, SPEC, cfg, tmp_path / "whole", plan=plan)
    done = json.loads((tmp_path / "whole" / "distill" / "done.json").read_text())
    assert done["config"]["feature_weight"] == 1.0 and done["config"]["features"] == "auto"
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))

    plain = apply(teacher, groups, plan)
    distill(plain, teacher, tiny, SPEC, DistillConfig(**{**cfg.__dict__, "feature_weight": 0.0}), tmp_path / "plain")
    assert not torch.equal(plain.state_dict()["linear.weight"], student.state_dict()["linear.weight"])

    resumed = apply(teacher, groups, plan)
    stopped = StopAt(cfg, teacher, at=9)  # 7 steps per epoch: inside epoch 2
    stopped.use_plan(plan)
    with pytest.raises(Interrupted):
        train_stage(stopped, resumed, tiny, SPEC, tmp_path / "killed", folder="distill")
    assert all(not m._forward_hooks for m in resumed.modules())  # released on the way out
    resumed = apply(teacher, groups, plan)
    distill(resumed, teacher, tiny, SPEC, cfg, tmp_path / "killed", plan=plan)
    whole = load_file(str(tmp_path / "whole" / "distill" / "model.safetensors"))
    again = load_file(str(tmp_path / "killed" / "distill" / "model.safetensors"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    with pytest.raises(CurlpruneError, match="different settings"):
        distill(apply(teacher, groups, plan), teacher, tiny, SPEC, DistillConfig(**{**cfg.__dict__, "feature_weight": 0.5}),
                tmp_path / "killed", plan=plan)


def test_a_folder_from_before_features_resumes(tmp_path, tiny):
    """done.json written without the feature settings (an earlier version) matches features off."""
    torch.manual_seed(0)
    teacher = build("small:resnet-digits").eval()
    cfg = DistillConfig(epochs=1, batch_size=16, lr=0.05, warmup_epochs=0.0, progress=False, device="cpu")
    distill(build("small:resnet-digits"), teacher, tiny, SPEC, cfg, tmp_path)
    path = tmp_path / "distill" / "done.json"
    record = json.loads(path.read_text())
    for key in ("features", "feature_weight"):
        record["config"].pop(key, None)
    path.write_text(json.dumps(record))
    distill(build("small:resnet-digits"), teacher, tiny, SPEC, DistillConfig(**{**cfg.__dict__, "feature_weight": 0}), tmp_path)


# ----- recipe: paper (issue 19 item 3) ----------------------------------------------------------------
def test_recipe_paper_is_the_authors_constants_and_sections_override_it():
    from curlprune.run.run_config import config_to_dict, parse_config

    base = {"model": "small:resnet-digits", "stages": ["prune", "distill", "refine"], "prune": {"target_macs": 0.5}}
    paper = parse_config({**base, "recipe": "paper", "distill": {"epochs": 30}, "refine": {"lr": 2e-4}})
    distill_cfg, refine_cfg = paper.sections["distill"], paper.sections["refine"]
    assert (distill_cfg.epochs, distill_cfg.batch_size, distill_cfg.lr, distill_cfg.warmup_epochs) == (30, 32, 0.01, 5.0)
    assert (distill_cfg.temperature, distill_cfg.alpha, distill_cfg.mixup_alpha, distill_cfg.ce_weight, distill_cfg.feature_weight) \
        == (2.0, 0.7, 1.0, 0.0, None)  # the paper's loss: no CE term, whatever the default (0.5)
    assert config_to_dict(paper)["distill"]["ce_weight"] == 0.0 and paper.stages == ["prune", "distill", "refine"]
    assert parse_config({k: v for k, v in base.items() if k != "stages"} | {"recipe": "paper"}).stages == ["prune", "distill", "refine"]
    assert (refine_cfg.epochs, refine_cfg.lr, refine_cfg.warmup_epochs, refine_cfg.temperature, refine_cfg.label_lr,
            refine_cfg.expand, refine_cfg.bn) == (16, 2e-4, 0.0, 1.0, 1.0, True, "update")
    assert config_to_dict(paper)["recipe"] == "paper"
    plain = parse_config(base)
    assert plain.recipe is None and "recipe" not in config_to_dict(plain)  # old run folders compare unchanged
    assert plain.sections["distill"].ce_weight == 0.5  # without the preset: the measured default
    assert plain.sections["refine"].bn is None  # refine's own defaults are untouched without the preset
    with pytest.raises(CurlpruneError, match="unknown recipe 'fast': use one of paper"):
        parse_config({**base, "recipe": "fast"})


def test_the_pipeline_gives_distill_the_students_plan(tmp_path, trained_digits):
    """prune -> distill with features on a real run: the pruned student's features are compared through
    the plan the prune stage made (without it the shapes would not match: one line, no result)."""
    from curlprune.run.pipeline import Run
    from curlprune.run.run_config import parse_config

    FEATURES = ["layer1.0.conv1", "layer1.1.relu", "layer1", "layer2"]
    weights = tmp_path / "teacher.pt"
    torch.save(trained_digits(12).state_dict(), weights)  # train_digits_model(seed=0), trained once per session
    cfg = parse_config({"model": "small:resnet-digits", "weights": str(weights), "data": "digits", "train_per_class": 20,
                        "run_dir": str(tmp_path / "run"), "stages": ["prune", "distill"],
                        "prune": {"criterion": "l1", "target_macs": 0.5, "calib": 32},
                        "distill": {"epochs": 1, "batch_size": 32, "progress": False, "device": "cpu",
                                    "features": FEATURES, "feature_weight": 1.0}})
    summary = Run(cfg).run()
    plan = checkpoint.read_metadata(tmp_path / "run" / "distill" / STAGE_CHECKPOINT_FILE)["plan"]
    assert all(len(plan[name]) < width for name, width in (("layer1.0.conv1", 16), ("layer1.1.conv1", 16)))
    assert summary["stages"]["distill"]["last_top1"] > 10.0
    done = json.loads((tmp_path / "run" / "distill" / "done.json").read_text())
    assert done["config"]["features"] == FEATURES and done["config"]["feature_weight"] == 1.0


def test_library_distill_takes_the_plan(tiny):
    """curlprune.distill(pruned.model, teacher, ..., plan=pruned.plan, feature_weight=...) on a real
    pruned model; without the plan the pruned features do not match (one line)."""
    import curlprune

    torch.manual_seed(0)
    teacher = build("small:resnet-digits").eval()
    pruned = curlprune.prune(teacher, torch.zeros(1, 1, 8, 8), data=tiny["train"], target_macs=0.5, criterion="l1", calib=32,
                             bn_recalibrate=0)
    assert len(pruned.plan["layer1.0.conv1"]) < 16
    settings = {"input_spec": SPEC, "epochs": 1, "batch_size": 16, "feature_weight": 1.0, "features": ["layer1.0.conv1"]}
    student = curlprune.distill(pruned.model, teacher, tiny, plan=pruned.plan, **settings)
    assert student is pruned.model
    with pytest.raises(CurlpruneError, match="give the plan the student was sliced by"):
        curlprune.distill(pruned.model, teacher, tiny, **settings)
