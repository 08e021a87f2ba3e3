"""Transfer to a small dataset of another domain: a new classifier for the data's classes, another
input size followed by the transforms, the fine-tuning recipe for a new head, and the whole protocol
(finetune -> prune -> distill -> refine, the fine-tuned model as the teacher) as one config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from PIL import Image

from curlprune.cli import main
from curlprune.cost.cost import count
from curlprune.data.data import load_digits_dataset
from curlprune.data.digits import train_digits_model
from curlprune.data.transforms import build_transform
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.models.transfer import at_input_size, find_classifier, replace_classifier, weights_classes
from curlprune.recover.finetune import FinetuneConfig, finetune
from curlprune.run.pipeline import Run
from curlprune.run.run_config import parse_config
from curlprune.store import checkpoint
from curlprune.store.rundir import file_digest

DIGITS = "small:resnet-digits"
QUIET = {"progress": False}


def example(name: str, size: int | None = None) -> torch.Tensor:
    spec = input_spec(name)
    side = size or spec.size
    return torch.zeros(1, spec.channels, side, side)


# ----- the classifier ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, classifier",
    [("cifar:resnet20", "linear"), (DIGITS, "linear"), ("torchvision:resnet18", "fc"), ("torchvision:mobilenet_v2", "classifier.1")],
)
def test_replace_classifier_finds_the_final_linear_and_keeps_the_body(name, classifier):
    model = build(name).eval()
    x = example(name, 64 if name.startswith("torchvision") else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old = model.get_submodule(classifier)
    assert find_classifier(model, x) == classifier
    assert replace_classifier(model, 7, x, seed=3) == classifier
    new = model.get_submodule(classifier)
    assert new is not old and new.out_features == 7 and new.in_features == old.in_features
    assert model(x).shape == (1, 7)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith(classifier + "."))
    again = build(name).eval()
    replace_classifier(again, 7, x, seed=3)  # the same seed gives the same new head
    assert torch.equal(again.get_submodule(classifier).weight, new.weight)


def test_replace_classifier_on_a_pruned_graph_module():
    import curlprune

    model = build(DIGITS).eval()
    x = example(DIGITS)
    groups = curlprune.trace(model, x)
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    small = curlprune.apply(model, groups, plan)
    name = replace_classifier(small, 4, x)
    assert small(x).shape == (1, 4)
    assert small.get_submodule(name).in_features < 32  # the pruned width is kept


def test_replace_classifier_without_a_final_linear_is_an_error():
    conv_head = nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(CurlpruneError, match="no nn.Linear whose output is the model's output"):
        replace_classifier(conv_head, 3, torch.zeros(1, 3, 8, 8))


def test_weights_classes_reads_the_classifier_width_of_a_file(tmp_path):
    path = tmp_path / "four.pt"
    torch.save(build(DIGITS, num_classes=4).state_dict(), path)
    assert weights_classes(DIGITS, str(path)) == 4
    assert weights_classes(DIGITS, None) == 10 and weights_classes(DIGITS, None, 6) == 6


# ----- another input size ---------------------------------------------------------------------
def test_input_size_spec_and_transforms_follow_it():
    spec = at_input_size(input_spec("cifar:resnet20"), 48)
    assert (spec.size, spec.resize, spec.crop_padding) == (48, 48, 6)
    tv = at_input_size(input_spec("torchvision:resnet18"), 160)
    assert (tv.size, tv.resize) == (160, 183)  # 256/224 of the size, like the 224 recipe
    photo = torch.randint(0, 256, (3, 150, 96), dtype=torch.uint8)  # a 96 px photo, portrait
    torch.manual_seed(0)
    for train in (False, True):
        assert build_transform(spec, train)(photo).shape == (3, 48, 48)
    # eval: short side resized to 48 (150x96 -> 75x48), then the centre 48x48
    from torchvision.transforms import v2

    expected = v2.CenterCrop(48)(v2.Resize(48, antialias=True)(photo))
    got = build_transform(spec, False)(photo)
    norm = build_transform(spec, False)(expected)
    assert torch.equal(got, norm)
    model = build("cifar:resnet20").eval()  # fully convolutional: runs at 48 px, 2.25x the MACs
    assert model(got.unsqueeze(0)).shape == (1, 10)
    assert count(model, torch.zeros(1, 3, 48, 48))[0] > 2 * count(model, torch.zeros(1, 3, 32, 32))[0]
    with pytest.raises(CurlpruneError, match="input_size must be"):
        at_input_size(spec, 4)


def test_default_transforms_are_unchanged_for_images_at_the_model_size():
    spec = input_spec("cifar:resnet20")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    normalised = build_transform(spec, False)(images)
    assert torch.equal(normalised, build_transform(spec, False).transforms[-1](images))


# ----- the transfer recipe --------------------------------------------------------------------
def digits_data():
    splits = load_digits_dataset(seed=0)
    from curlprune.data.data import class_balanced_subset

    return {"train": class_balanced_subset(splits["train"], 10, 0), "test": splits["test"].subset(range(60))}


@pytest.mark.parametrize("recipe, body_moves", [({"head_epochs": 2.0}, False), ({"body_lr_mult": 0.0}, False), ({"head_epochs": 0.0, "body_lr_mult": 0.1}, True)])
def test_new_head_recipe_controls_the_body(tmp_path, recipe, body_moves):
    torch.manual_seed(0)
    model = build(DIGITS).eval()
    name = replace_classifier(model, 10, example(DIGITS))
    body = {k: v.clone() for k, v in model.named_parameters() if not k.startswith(name + ".")}
    head = model.get_submodule(name).weight.clone()
    cfg = FinetuneConfig(epochs=2, batch_size=20, warmup_epochs=0.0, **QUIET, **recipe)
    result = finetune(model, digits_data(), input_spec(DIGITS), cfg, tmp_path, head=name)
    trained = dict(result.model.named_parameters())
    moved = [k for k, v in body.items() if not torch.equal(trained[k].detach().contiguous(), v.contiguous())]
    assert bool(moved) == body_moves
    assert not torch.equal(trained[name + ".weight"].detach(), head)  # the head always trains
    if body_moves:  # at 0.1 x lr the body moves much less than the head
        body_step = max((trained[k].detach() - body[k]).abs().max().item() for k in moved)
        assert body_step < (trained[name + ".weight"].detach() - head).abs().max().item()


def test_recipe_settings_are_checked():
    with pytest.raises(CurlpruneError, match="body_lr_mult must be"):
        FinetuneConfig(body_lr_mult=-1)
    assert FinetuneConfig().transfer_recipe() == FinetuneConfig(body_lr_mult=None, head_epochs=None).transfer_recipe()


# ----- configs --------------------------------------------------------------------------------
def test_config_takes_input_size_and_a_finetune_before_prune():
    cfg = parse_config({"model": DIGITS, "input_size": 12, "stages": ["finetune", "prune", "distill", "refine"],
                        "prune": {"target_macs": 0.5}})
    assert cfg.input_size == 12 and cfg.stages == ["finetune", "prune", "distill", "refine"]
    for bad, message in (({"input_size": 0}, "'input_size' must be a positive whole number"),
                         ({"stages": ["distill", "prune"]}, "'prune' must be the first stage, or follow only 'finetune'"),
                         ({"stages": ["finetune", "distill", "prune"]}, "'prune' must be the first stage")):
        with pytest.raises(CurlpruneError, match=message):
            parse_config({"model": DIGITS, "prune": {"target_macs": 0.5}, **bad})


# ----- a small dataset of its own: 4 classes of real digits as an image folder ------------------
@pytest.fixture(scope="module")
def four_classes(tmp_path_factory) -> Path:
    """An ImageFolder of the real digits 0-3 as 8x8 PNGs (RGB): 12 train and 6 test images per class."""
    root = tmp_path_factory.mktemp("four")
    splits = load_digits_dataset(seed=0)
    for split, per_class in (("train", 12), ("test", 6)):
        ds = splits[split]
        for label in range(4):
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True)
            for i, index in enumerate(torch.nonzero(ds.labels == label).flatten()[:per_class].tolist()):
                Image.fromarray(ds.images[index][0].numpy()).convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cifar_weights(tmp_path_factory) -> Path:
    """A 10-class CIFAR ResNet-20 state dict standing in for pretrained weights (the body is what is tested)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pre") / "r20.pt"
    torch.save(build("cifar:resnet20").state_dict(), path)
    return path


def test_finetune_command_transfers_to_the_data_classes_at_another_input_size(tmp_path, four_classes, cifar_weights):
    out = tmp_path / "ft"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"finetune": {"body_lr_mult": 0.0, "batch_size": 16, "warmup_epochs": 0.0, "progress": False}}))
    assert main(["finetune", "--config", str(config), "--model", "cifar:resnet20", "--weights", str(cifar_weights),
                 "--data", str(four_classes), "--input-size", "16", "--epochs", "2", "--out", str(out)]) == 0
    model = checkpoint.load(out / "model.safetensors")
    meta = checkpoint.read_metadata(out / "model.safetensors")
    assert meta["input_shape"] == [1, 3, 16, 16] and meta["model_ref"]["kwargs"] == {"num_classes": 4}
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 4)
    pretrained = torch.load(cifar_weights, weights_only=True)
    trained = dict(model.named_parameters())
    body = [k for k in trained if not k.startswith("linear.")]
    assert body and all(torch.equal(trained[k].detach().contiguous(), pretrained[k]) for k in body)  # loaded, body_lr_mult 0
    assert trained["linear.weight"].shape == (4, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["macs"] == count(build("cifar:resnet20", num_classes=4), torch.zeros(1, 3, 16, 16))[0]


def test_num_classes_other_than_the_data_is_one_line(tmp_path, four_classes, cifar_weights, capsys):
    assert main(["finetune", "--model", "cifar:resnet20", "--weights", str(cifar_weights), "--data", str(four_classes),
                 "--num-classes", "6", "--epochs", "1", "--out", str(tmp_path / "ft")]) == 2
    assert "outputs 6 classes but the data has 4" in capsys.readouterr().err


def test_new_head_option_replaces_a_classifier_of_as_many_classes(tmp_path):
    weights = tmp_path / "digits.pt"
    trained = train_digits_model(seed=0, epochs=2)
    torch.save(trained.state_dict(), weights)
    out = tmp_path / "ft"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"finetune": {"head_epochs": 1.0, "warmup_epochs": 0.0, "progress": False}}))
    assert main(["finetune", "--config", str(config), "--model", DIGITS, "--weights", str(weights), "--data", "digits",
                 "--train-per-class", "10", "--epochs", "1", "--new-head", "--out", str(out)]) == 0
    tuned = dict(checkpoint.load(out / "model.safetensors").named_parameters())
    assert not torch.equal(tuned["linear.weight"].detach(), trained.linear.weight)  # a new head (10 -> 10 classes) ...
    assert torch.equal(tuned["conv1.weight"].detach().contiguous(), trained.conv1.weight)  # ... on the frozen body (head_epochs 1)


# ----- the whole protocol as one config -------------------------------------------------------
FOUR_STAGES = {
    "model": DIGITS, "data": "digits", "train_per_class": 30, "seed": 0,
    "stages": ["finetune", "prune", "distill", "refine"],
    "finetune": {"epochs": 2, "batch_size": 32, "new_head": True, "progress": False},
    "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
    "distill": {"epochs": 2, "warmup_epochs": 0.5, "batch_size": 32, "progress": False},
    "refine": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "progress": False},
}


def test_four_stage_config_prunes_and_distills_from_the_finetuned_model(tmp_path):
    weights = tmp_path / "teacher.pt"
    torch.save(train_digits_model(seed=0, epochs=4).state_dict(), weights)
    cfg = parse_config({**FOUR_STAGES, "weights": str(weights), "run_dir": str(tmp_path / "run")})
    runner = Run(cfg)
    summary = runner.run()
    run_dir = tmp_path / "run"
    assert list(summary["stages"]) == ["finetune", "prune", "distill", "refine"]
    tuned_file = run_dir / "finetune" / "model.safetensors"
    tuned = load_file(str(tuned_file))
    original = torch.load(weights, weights_only=True)
    assert not torch.equal(tuned["linear.weight"], original["linear.weight"])  # the classifier was re-initialised + trained
    # prune started from the fine-tuned weights ...
    settings = json.loads((run_dir / "prune" / "done.json").read_text())["settings"]
    assert settings["weights"] == str(tuned_file) and settings["weights_sha256"] == file_digest(tuned_file)
    assert summary["unpruned_top1"] == pytest.approx(summary["stages"]["finetune"]["last_top1"], abs=1e-3)  # same test set
    # ... and the fine-tuned model is the teacher of distill and refine
    teacher = runner.teacher.state_dict()
    assert all(torch.equal(teacher[k].cpu().contiguous(), v) for k, v in tuned.items())
    assert summary["macs_ratio"] <= 0.5
    final = checkpoint.load(run_dir / "model.safetensors")
    assert final(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    again = Run(parse_config({**FOUR_STAGES, "weights": str(weights), "run_dir": str(run_dir)})).run()  # a rerun skips all
    assert again["last_top1"] == summary["last_top1"]


def _readme_small_dataset_config() -> dict:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Small dataset of your own", 1)[1]
    return yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_readme_small_dataset_config_is_the_default_recipe_and_runs(tmp_path, trained_digits):
    raw = _readme_small_dataset_config()
    cfg = parse_config(raw, "README")
    assert cfg.stages == ["finetune", "prune", "distill"] and cfg.input_size == 32 and cfg.val_per_class == 20
    assert cfg.sections["finetune"].new_head is True and cfg.sections["finetune"].early_stop["patience"] == 8
    assert cfg.sections["distill"].ce_weight == 0.5 and cfg.sections["distill"].feature_weight is None  # the defaults
    # the same config on the digits, smaller: the model, data and sizes swapped, every other key as written
    weights = tmp_path / "teacher.pt"
    torch.save(trained_digits(4).state_dict(), weights)
    small = {**{k: v for k, v in raw.items() if k != "input_size"}, "model": DIGITS, "weights": str(weights), "data": "digits",
             "train_per_class": 40, "val_per_class": 10, "run_dir": str(tmp_path / "run"),
             "finetune": {**raw["finetune"], "epochs": 4, "batch_size": 32, "early_stop": {"patience": 1}, "progress": False},
             "prune": {**raw["prune"], "target_macs": 0.5, "calib": 64},
             "distill": {**raw["distill"], "epochs": 2, "batch_size": 32, "progress": False}}
    summary = Run(parse_config(small)).run()
    assert list(summary["stages"]) == ["finetune", "prune", "distill"] and summary["macs_ratio"] <= 0.5
    finetune = json.loads((tmp_path / "run" / "finetune" / "done.json").read_text())
    assert finetune["best_epoch"] is not None and 1 <= finetune["best_epoch"] <= 4
    distill = json.loads((tmp_path / "run" / "distill" / "done.json").read_text())
    assert distill["config"]["ce_weight"] == 0.5 and summary["stages"]["distill"]["val_top1"] is not None
