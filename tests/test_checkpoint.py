"""Pickle-free checkpoints and ONNX export of pruned models."""
from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch

import curlprune
from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.store.checkpoint import export_onnx, load, read_metadata, save
from curlprune.surgery.surgery import random_plan


@pytest.fixture(scope="module")
def pruned_resnet20():
    torch.manual_seed(0)
    model = build("cifar:resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    groups = curlprune.trace(model, x)
    plan = random_plan(groups, random.Random(1))
    small = curlprune.apply(model, groups, plan).eval()
    return model, small, plan, x


def test_save_load_roundtrip_reproduces_outputs(tmp_path, pruned_resnet20):
    _, small, plan, x = pruned_resnet20
    path = tmp_path / "model.safetensors"
    save(path, {"name": "cifar:resnet20", "kwargs": {}}, plan, small.state_dict(), extra={"note": "test"})
    meta = read_metadata(path)
    assert meta["plan"] == plan and meta["model_ref"]["name"] == "cifar:resnet20"
    assert meta["input_shape"] == [1, 3, 32, 32] and meta["extra"] == {"note": "test"}
    loaded = load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    # the file holds no pickle: its header is JSON and the rest raw tensor bytes
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    json.loads(raw[8 : 8 + header_len])
    assert b"\x80\x04" not in raw[: 8 + header_len]


def test_save_is_atomic_and_load_rejects_bad_files(tmp_path, pruned_resnet20):
    _, small, plan, _ = pruned_resnet20
    with pytest.raises(CurlpruneError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CurlpruneError, match="not a readable safetensors"):
        load(junk)
    # a tensor that cannot be saved leaves no file and no temporary behind
    target = tmp_path / "out" / "model.safetensors"
    bad_state = dict(small.state_dict())
    bad_state["shared_a"] = bad_state["shared_b"] = torch.zeros(3)  # safetensors refuses shared memory
    with pytest.raises(Exception):
        save(target, "cifar:resnet20", plan, bad_state)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_load_detects_weights_that_do_not_fit(tmp_path, pruned_resnet20):
    _, small, plan, _ = pruned_resnet20
    path = tmp_path / "edited.safetensors"
    state = dict(small.state_dict())
    state.pop("linear.weight")
    save(path, "cifar:resnet20", plan, state)
    with pytest.raises(CurlpruneError, match="do not fit"):
        load(path)


def test_onnx_export_matches_pytorch(tmp_path, pruned_resnet20):
    ort = pytest.importorskip("onnxruntime")
    _, small, _, _ = pruned_resnet20
    path = export_onnx(small, torch.zeros(1, 3, 32, 32), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path))
    x = torch.randn(5, 3, 32, 32)  # another batch size than exported with
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch_out = small(x).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-4)
