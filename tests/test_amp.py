"""Mixed precision of the training stages (issue 20 item 5): ``amp: off`` is the float32 run bit for
bit, ``bf16`` and ``fp16`` (CPU autocast; fp16 with a loss scaler) train real digits models to
float32's accuracy and resume bit-exactly after a SIGKILL, and bad values are one line."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from curlprune.data.data import load_digits_dataset
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.recover import DistillConfig, distill, load_label_store
from curlprune.recover.amp import Precision, canonical_amp, check_amp
from curlprune.recover.dist import init_distributed
from curlprune.recover.stage import check_config
from curlprune.run.run_config import config_to_dict, load_config

import recover_job
from recover_support import STAGES, history, kill_mid_epoch, run_job, state_of
from trust_support import MODEL, assert_one_line_error, cli, one_line  # noqa: F401 (cli is a fixture)

AMP = {"unset": (), "off": ("--amp", "off"), "bf16": ("--amp", "bf16"), "fp16": ("--amp", "fp16")}


@pytest.fixture(scope="module")
def runs(recover_runs):
    """finetune -> distill -> refine on real digits (tests/recover_job.py), once per amp setting
    ("unset": no amp key at all; the session's float32 run that tests/test_resume.py compares with too),
    all started at once and made in the background, one per core."""
    recover_runs.start(*AMP.values())
    return lambda mode: recover_runs.get(*AMP[mode])


# ----- amp: off is today's float32 run ------------------------------------------------------------
def test_amp_off_gives_the_weights_of_a_run_without_the_key_bit_for_bit(runs):
    unset, off = runs("unset"), runs("off")
    for stage in STAGES:
        ours, theirs = state_of(off, stage), state_of(unset, stage)
        assert ours[0].keys() == theirs[0].keys()  # weights, momentum buffers, refine's label store
        different = [k for k in ours[0] if not torch.equal(ours[0][k], theirs[0][k])]
        assert not different, f"{stage}: {different[:5]}"
        assert "amp_scaler" not in ours[1] and ours[1]["config"]["amp"] is None  # off is stored as unset
        assert history(off, stage) == history(unset, stage)
        final = load_file(str(off / stage / "model.safetensors"))
        assert all(torch.equal(final[k], theirs[0]["model." + k]) for k in final)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_trains_finite_float32_weights_that_differ_from_float32_training(runs, mode):
    unset, mixed = runs("unset"), runs(mode)
    for stage in STAGES:
        tensors, meta = state_of(mixed, stage)
        assert meta["config"]["amp"] == mode
        assert all(torch.isfinite(r["loss"] * torch.ones(())) for r in history(mixed, stage))
        weights = {k: v for k, v in tensors.items() if k.startswith("model.") and v.is_floating_point()}
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())  # float32 master weights
        reference = state_of(unset, stage)[0]
        assert any(not torch.equal(v, reference[k]) for k, v in weights.items()), f"{stage}: autocast changed nothing"
        assert ("amp_scaler" in meta) == (mode == "fp16")


def test_fp16_label_steps_are_unscaled(runs):
    """Refine's label store moves by the true gradient under fp16's loss scaling (65536 at the start):
    it stays next to the float32 run's store (a row moves by at most 0.022 per visit here; a scaled
    step would move rows by hundreds). Measured: mean |difference| 0.002, largest 0.57 (the teacher's
    fp16 logits that initialise the store)."""
    fp16, reference = load_label_store(runs("fp16")), load_label_store(runs("unset"))
    assert fp16.shape == reference.shape and fp16.dtype == torch.float32
    difference = (fp16 - reference).abs()
    assert float(difference.mean()) < 0.01 and float(difference.max()) < 2.0
    scaler = state_of(runs("fp16"), "refine")[1]["amp_scaler"]
    assert scaler["scale"] >= 1.0 and scaler["_growth_tracker"] >= 0


def test_bf16_distill_on_digits_reaches_float32_top1(tmp_path, trained_digits):
    """Mixup-KD of a random student from a trained digits teacher, 4 epochs on the full digits train
    split: bf16 (CPU autocast) ends within 3 points of float32 (measured: 94.4% vs 93.3%)."""
    data, spec = load_digits_dataset(0), input_spec(MODEL)
    teacher = trained_digits(12)  # train_digits_model(0), trained once per session
    top1 = {}
    for amp in ("off", "bf16"):
        torch.manual_seed(2)
        student = build(MODEL)
        cfg = DistillConfig(epochs=4, lr=0.05, warmup_epochs=0.5, batch_size=64, seed=3, progress=False, device="cpu", amp=amp)
        result = distill(student, teacher, data, spec, cfg, tmp_path / amp)
        top1[amp] = result.last_top1
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())
        assert all(math.isfinite(r["loss"]) for r in history(tmp_path / amp, "distill"))
    assert top1["off"] > 85, top1
    assert abs(top1["bf16"] - top1["off"]) <= 3.0, top1


# ----- kill and resume --------------------------------------------------------------------------
def test_sigkill_mid_epoch_of_fp16_refine_then_resume_matches_uninterrupted_run(tmp_path, runs):
    """As tests/test_resume.py (which kills each stage in float32), under amp: the resumed run ends bit
    for bit where the uninterrupted one did, the fp16 loss scaler's state (scale, growth tracker) and
    the label store included. fp16 in refine is the combination with the most state (scaler, label
    store, teacher logits under autocast); bf16 resumes through the same code without a scaler. The
    run starts from the uninterrupted run's finished finetune and distill folders (finished stages are
    skipped, tests/test_resume.py), so only refine is trained again."""
    reference = runs("fp16")
    for stage in STAGES[:2]:
        shutil.copytree(reference / stage, tmp_path / stage)
    kill_mid_epoch(tmp_path, "--amp", "fp16", "--trip", "refine")  # in the middle of refine's second epoch
    assert not (tmp_path / "refine" / "done.json").exists()
    assert [r["epoch"] for r in history(tmp_path, "refine")] == [1]
    assert state_of(tmp_path, "refine")[1]["amp_scaler"]["_growth_tracker"] > 0  # the scaler's state after epoch 1

    done = run_job(tmp_path, "--amp", "fp16")  # the same command again
    assert done.returncode == 0, done.stderr[-3000:]

    assert history(tmp_path, "refine") == history(reference, "refine")
    (ours, our_meta), (theirs, their_meta) = state_of(tmp_path, "refine"), state_of(reference, "refine")
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert ours.keys() == theirs.keys() and not different, f"{different[:5]} differ from the uninterrupted run"
    assert our_meta.get("amp_scaler") == their_meta.get("amp_scaler")
    assert torch.equal(load_label_store(tmp_path), load_label_store(reference))


def test_a_stage_does_not_resume_with_another_amp(tmp_path, runs, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(runs("bf16"), copy)
    monkeypatch.setattr(sys, "argv", ["recover_job.py", str(copy), "--amp", "off"])  # the job, in this process
    with pytest.raises(CurlpruneError) as exc:
        recover_job.main()
    one_line(exc, "amp='bf16' (now None)")


# ----- settings and devices -----------------------------------------------------------------------
def write_config(tmp_path: Path, section: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "data": "digits", "run_dir": str(tmp_path / "run"), "stages": ["finetune"],
                                    "finetune": {"epochs": 1, **section}}))
    return path


@pytest.mark.parametrize("text, stored", [("off", None), ("'off'", None), ("bf16", "bf16"), ("fp16", "fp16")])
def test_the_config_key_is_read_and_off_is_stored_as_unset(tmp_path, text, stored):
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {MODEL}\nstages: [finetune, distill]\nfinetune: {{amp: {text}}}\ndistill: {{amp: {text}}}\n")
    cfg = load_config(path)
    assert cfg.sections["finetune"].amp == stored and cfg.sections["distill"].amp == stored
    as_json = config_to_dict(cfg)
    assert as_json["finetune"].get("amp") == stored and (stored is not None or "amp" not in as_json["finetune"])


@pytest.mark.parametrize("value", ["fp32", "float16", True, 16])
def test_a_bad_amp_value_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, value):
    proc = cli("run", write_config(tmp_path, {"amp": value}), "--no-report")
    assert_one_line_error(proc, "amp")
    assert not (tmp_path / "run").exists()
    with pytest.raises(CurlpruneError) as exc:
        canonical_amp(value)
    one_line(exc, "amp must be one of off, bf16, fp16")


def test_the_stage_commands_take_amp(cli, tmp_path):
    out = tmp_path / "ft"
    proc = cli("finetune", "--model", MODEL, "--data", "digits", "--epochs", "1", "--amp", "bf16", "--out", out, "--no-report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["finetune"]["amp"] == "bf16"
    assert state_of(out, "finetune")[1]["config"]["amp"] == "bf16"
    with pytest.raises(SystemExit) as exc:  # argparse: not one of the choices
        cli("finetune", "--amp", "fp32", "--out", tmp_path / "bad")
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()


def test_amp_is_checked_against_the_device():
    for amp in (None, "bf16", "fp16"):  # torch's CPU autocast has both 16-bit types
        check_amp(amp, torch.device("cpu"))
    with pytest.raises(CurlpruneError) as exc:  # a device without autocast
        check_amp("fp16", torch.device("meta"))
    one_line(exc, "amp: fp16", "meta", "use amp: off")
    if not torch.cuda.is_available():  # checked before anything runs (the pipeline's preflight calls check_config)
        with pytest.raises(CurlpruneError) as exc:
            check_config(DistillConfig(device="cuda", amp="bf16"), init_distributed("cpu"))
        one_line(exc, "CUDA is not available")


def test_the_loss_scaler_state_round_trips_and_is_checked():
    precision = Precision("fp16", torch.device("cpu"))
    state = {**precision.state(), "scale": 1024.0, "_growth_tracker": 7}
    other = Precision("fp16", torch.device("cpu"))
    other.load_state(state, "state.safetensors")
    assert other.grad_scale() == 1024.0 and other.state() == state
    for bad in (None, {"scale": 1.0}, {**state, "scale": "big"}, {**state, "scale": 0.0}, {**state, "scale": float("inf")}):
        with pytest.raises(CurlpruneError) as exc:
            Precision("fp16", torch.device("cpu")).load_state(bad, "state.safetensors")
        one_line(exc, "state.safetensors", "amp_scaler", "delete it")
    Precision(None, torch.device("cpu")).load_state(None, "state.safetensors")  # off: nothing to restore
    assert Precision("bf16", torch.device("cpu")).grad_scale() == 1.0
