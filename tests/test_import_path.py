"""Models by import path (issue 22 item 2): ``file.py:MyNet`` and ``pkg.mod:MyNet`` in the library,
the checkpoint (rebuilt in a fresh process, no pickle), ``curlprune prune`` and ``curlprune run``.

The model module is written by the test into tmp_path from the source of the classes in
tests/test_keep_class.py (bottleneck + squeeze-excitation residual blocks, not registered); the
data are sklearn's real digits written as an image folder.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import curlprune
from curlprune.store import checkpoint
from curlprune.cost.analysis import trace
from curlprune.data.data import load_digits_dataset
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.run.run_config import parse_config

import test_keep_class
from trust_support import assert_one_line_error, cli  # noqa: F401 (fixture)

HEADER = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"


def write_module(path: Path) -> Path:
    """A module file holding SqueezeExcite, Bottleneck and MyNet, and a build function."""
    classes = [test_keep_class.SqueezeExcite, test_keep_class.Bottleneck, test_keep_class.MyNet]
    body = "\n\n".join(inspect.getsource(c) for c in classes)
    body += "\n\ndef build_small(num_classes=10, width=8):\n    return MyNet(num_classes=num_classes, width=width)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + body)
    return path


def digits_folder(root: Path, per_class: int = 12) -> Path:
    """sklearn's digits as train/<class>/<i>.png and test/<class>/<i>.png (real 8x8 images)."""
    for split, part in load_digits_dataset(seed=0).items():
        for cls in range(10):
            folder = root / split / str(cls)
            folder.mkdir(parents=True)
            for j, i in enumerate(torch.nonzero(part.labels == cls).flatten()[:per_class].tolist()):
                Image.fromarray(part.images[i, 0].numpy()).save(folder / f"{j}.png")
    return root


def test_file_and_module_paths_build_the_class_and_give_an_input_spec(tmp_path, monkeypatch):
    file = write_module(tmp_path / "nets_file.py")
    write_module(tmp_path / "userpkg1" / "nets.py")
    (tmp_path / "userpkg1" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (f"{file}:MyNet", "userpkg1.nets:MyNet"):
        model = build(name, num_classes=4, width=8)
        assert type(model).__name__ == "MyNet" and model.head.out_features == 4 and model.stem[0].out_channels == 8
        spec = input_spec(name, input_shape=[3, 16, 16], model_kwargs={"width": 8})
        assert (spec.channels, spec.size, spec.num_classes) == (3, 16, 10)  # classes from its output
    assert build(f"{file}:build_small", num_classes=3).head.in_features == 32
    with pytest.raises(CurlpruneError, match="input shape is not known: give input_shape: \\[C, S, S\\]"):
        input_spec(f"{file}:MyNet")
    with pytest.raises(CurlpruneError, match="module 'no_such_pkg_q' cannot be imported"):
        build("no_such_pkg_q:MyNet")
    with pytest.raises(CurlpruneError, match="has no attribute 'Missing'"):
        build(f"{file}:Missing")
    with pytest.raises(CurlpruneError, match="does not exist"):
        build("nowhere/nets.py:MyNet")



def test_a_file_the_caller_imported_is_the_same_module(tmp_path, monkeypatch):
    """`import mynets` in the user's script, then the model named as ``mynets.py:MyNet``: the built
    model is an instance of the user's class (a second copy of the module used to break isinstance)."""
    file = write_module(tmp_path / "mynets_q7.py")
    other = write_module(tmp_path / "other" / "mynets_q7.py")  # same name, another file: not confused with it
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets_q7", raising=False)
    import mynets_q7

    model = build(f"{file}:MyNet", num_classes=4, width=8)
    assert isinstance(model, mynets_q7.MyNet)
    groups = curlprune.trace(model.eval(), torch.zeros(1, 3, 16, 16))
    pruned = curlprune.apply(model, groups, {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable})
    assert isinstance(pruned, mynets_q7.MyNet)  # the pruned model keeps the user's class too
    separate = build(f"{other}:MyNet", num_classes=4, width=8)
    assert not isinstance(separate, mynets_q7.MyNet) and type(separate).__name__ == "MyNet"
    monkeypatch.delitem(sys.modules, "mynets_q7")

LOAD_SCRIPT = """
import sys, torch, curlprune
model = curlprune.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(model(x), sys.argv[3])
print(type(model).__name__, type(model).__module__)
"""


@pytest.mark.parametrize("form", ["file", "module"])
def test_save_then_load_in_a_fresh_process_gives_identical_outputs(tmp_path, form):
    file = write_module(tmp_path / "nets_file.py")
    write_module(tmp_path / "userpkg2" / "nets.py")
    (tmp_path / "userpkg2" / "__init__.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        name = f"{file.relative_to(Path.cwd()) if file.is_relative_to(Path.cwd()) else file}:MyNet" if form == "file" else "userpkg2.nets:MyNet"
        model = test_keep_class.randomised(build(name, num_classes=5))
        x = torch.randn(3, 3, 16, 16)
        groups = trace(model, x[:1])
        plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
        small = curlprune.apply(model, groups, plan)
        assert type(small) is type(model)
        path = tmp_path / "small.safetensors"
        checkpoint.save(path, {"name": name, "kwargs": {"num_classes": 5}}, plan, small.state_dict(), input_shape=[1, 3, 16, 16])
    finally:
        sys.path.remove(str(tmp_path))
    ref = checkpoint.read_metadata(path)["model_ref"]
    assert ref["name"] == (f"{file.resolve()}:MyNet" if form == "file" else "userpkg2.nets:MyNet")
    torch.save(x, tmp_path / "x.pt")
    inherited = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # this checkout's source
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *inherited])}
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, path, tmp_path / "x.pt", tmp_path / "y.pt"], cwd="/",
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "MyNet"  # the user's class, rebuilt from the reference
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), small(x))
    # a module the fresh process cannot import: one line naming it
    env["PYTHONPATH"] = os.pathsep.join(inherited)
    (tmp_path / "userpkg2" / "nets.py").rename(tmp_path / "userpkg2" / "gone.py")
    file.rename(tmp_path / "gone_file.py")
    proc = subprocess.run([sys.executable, "-m", "curlprune.cli", "count", path], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "needs a model of your own that cannot be found" in proc.stderr and "damaged" not in proc.stderr
    assert ("cannot be imported" in proc.stderr and "userpkg2" in proc.stderr) if form == "module" else "nets_file.py does not exist" in proc.stderr


def test_prune_command_on_real_digits_with_a_model_by_file_path(cli, tmp_path):
    file = write_module(tmp_path / "nets_file.py")
    data = digits_folder(tmp_path / "digits")
    out = tmp_path / "p"
    proc = cli("prune", "--model", f"{file}:MyNet", "--model-kwargs", '{"width": 8}', "--input-shape", "3,8,8", "--data", data,
               "--criterion", "kl", "--target-macs", "0.5", "--calib", "32", "--out", out, "--no-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == f"{file}:MyNet" and 0.495 <= report["selection"]["macs_ratio"] <= 0.5
    assert report["model_class"] == {"class": "MyNet", "kept": True, "reason": ""}
    assert report["accuracy"]["test_images"] > 0
    small = curlprune.load(out / "model.safetensors")
    assert type(small).__name__ == "MyNet" and sum(small.widths()) < sum(build(f"{file}:MyNet", width=8).widths())
    meta = checkpoint.read_metadata(out / "model.safetensors")
    assert meta["model_ref"] == {"name": f"{file.resolve()}:MyNet", "kwargs": {"width": 8}} and meta["input_shape"] == [1, 3, 8, 8]
    proc = cli("prune", "--model", f"{file}:MyNet", "--model-kwargs", '{"width": 16}', "--input-shape", "3,8,8", "--data", data,
               "--criterion", "kl", "--target-macs", "0.5", "--calib", "32", "--out", out, "--no-report", "--resume")
    assert proc.returncode == 2 and "computed with other settings (model_kwargs: {'width': 8} (now {'width': 16}))" in proc.stderr
    proc = cli("prune", "--model", f"{file}:MyNet", "--data", data, "--target-macs", "0.5", "--out", tmp_path / "q")
    assert proc.returncode == 2 and "--input-shape C,S,S" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q" / "model.safetensors").exists()
    proc = cli("groups", "--model", f"{file}:MyNet", "--input-shape", "3,8,8", "--model-kwargs", '{"width": 8}')
    assert proc.returncode == 0 and "blocks.0.conv1" in proc.stdout


def test_groups_and_count_of_a_model_with_several_outputs(cli, tmp_path):
    # A model of your own that returns logits and features (or a detector's maps) has no class count
    # to read from its output; groups and count need none, but were refused with "give num_classes",
    # an option neither command has.
    file = tmp_path / "two_out.py"
    file.write_text(HEADER + (
        "class TwoOut(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)\n"
        "        self.head = nn.Linear(8, 10)\n"
        "    def forward(self, x):\n"
        "        f = F.relu(self.stem(x))\n"
        "        f = F.relu(f + self.conv(f))\n"
        "        return self.head(f.mean((2, 3))), f\n"))
    proc = cli("groups", "--model", f"{file}:TwoOut", "--input-shape", "3,8,8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stem" in proc.stdout
    proc = cli("count", "--model", f"{file}:TwoOut", "--input-shape", "3,8,8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    macs = 8 * 3 * 9 * 64 + 8 * 8 * 9 * 64 + 8 * 10  # the two convs at 8x8 and the linear
    assert f"({macs:,} /" in proc.stdout
    proc = cli("groups", "--model", f"{file}:TwoOut", "--input-shape", "1,8,8")  # a shape it cannot take: still one line
    assert_one_line_error(proc, "--input-shape")


@pytest.mark.parametrize("classes", [10, 4])
def test_finetune_command_on_a_model_by_file_path_with_weights(cli, tmp_path, classes):
    # README: `curlprune groups --model path/to/nets.py:MyNet --input-shape 3,32,32   # also count, finetune, ...`.
    # finetune with --weights looked up the weights' classes without the input shape and the model's
    # keyword arguments: "its input shape is not known: give ... --input-shape" although it was given.
    # With weights of 4 classes and the digits' 10 it is a transfer: a new classifier.
    file = write_module(tmp_path / "nets_file.py")
    data = digits_folder(tmp_path / "digits", per_class=4)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(build(f"{file}:MyNet", num_classes=classes, width=8).state_dict(), weights)
    out = tmp_path / "ft"
    proc = cli("finetune", "--model", f"{file}:MyNet", "--model-kwargs", '{"width": 8}', "--input-shape", "3,8,8",
               "--weights", weights, "--data", data, "--epochs", "1", "--batch-size", "16", "--out", out, "--no-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = curlprune.load(out / "model.safetensors")
    assert type(final).__name__ == "MyNet" and final.head.out_features == 10 and final.head.in_features == 32
    meta = checkpoint.read_metadata(out / "model.safetensors")
    assert meta["model_ref"]["kwargs"]["width"] == 8


def test_run_config_by_import_path_runs_prune_distill_refine(cli, tmp_path):
    file = write_module(tmp_path / "nets_file.py")
    data = digits_folder(tmp_path / "digits", per_class=8)
    config = {
        "model": f"{file}:MyNet", "model_kwargs": {"width": 8}, "input_shape": [3, 8, 8], "data": str(data),
        "run_dir": str(tmp_path / "run"), "seed": 0, "stages": ["prune", "distill", "refine"],
        "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 32},
        "distill": {"epochs": 1, "batch_size": 32, "progress": False},
        "refine": {"epochs": 1, "batch_size": 32, "progress": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = cli("run", path, "--no-report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.49 <= summary["macs_ratio"] <= 0.5
    final = curlprune.load(tmp_path / "run" / "model.safetensors")
    assert type(final).__name__ == "MyNet"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["input_shape"] == [3, 8, 8]
    proc = cli("run", path, "--no-report")  # a rerun of the finished run trains nothing
    assert proc.returncode == 0, proc.stderr[-2000:]
    del config["input_shape"]
    with pytest.raises(CurlpruneError, match="add input_shape: \\[C, S, S\\]"):
        parse_config(config, "run.yaml")
