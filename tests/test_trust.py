"""Trust under bad input and bad luck (issue 12): every expected failure is one line and exit 2,
nothing is written before the input is valid, a diverging run never reports success, and a run
directory is used by one run at a time and survives being written twice.

Real inputs throughout: PNGs written with Pillow into a real zip, real empty and truncated files,
a real full and a real read-only filesystem (tmpfs in a private mount namespace, skipped where
``unshare`` is not allowed), real concurrent processes. CLI cases run ``curlprune.cli.main`` in
this process (what the command runs, minus the interpreter start-up) unless they need a process of
their own (a private mount namespace, concurrency).
"""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

import pytest
import torch
import yaml

from curlprune.errors import CurlpruneError
from curlprune.models import build
from curlprune.store import checkpoint

from trust_support import MODEL, ONE_THREAD, assert_one_line_error, cli, files_under  # noqa: F401 (cli: a fixture; teacher comes from conftest)

TINY = {  # real digits, 50 training images per class; runs in seconds
    "model": MODEL,
    "data": "digits",
    "train_per_class": 50,
    "seed": 0,
    "stages": ["prune", "distill"],
    "prune": {"criterion": "kl", "target_macs": 0.5, "calib": 64},
    "distill": {"epochs": 2, "batch_size": 32, "progress": False},
}
PRUNE_L1 = ["prune", "--model", MODEL, "--criterion", "l1", "--target-macs", "0.5"]


def curlprune(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curlprune.cli", *map(str, args)], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def tiny_config(directory: Path, teacher: Path, run_dir: Path | None = None, **changes) -> Path:
    content = {**TINY, "weights": str(teacher), "run_dir": str(run_dir or directory / "run"), **changes}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in content.items() if v is not None}))
    return path


# ---------------------------------------------------------------- private tmpfs (full / read-only)
def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=64k tmpfs \"$0\"", "/tmp"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -rm` (user + mount namespaces) to mount a private tmpfs")


def in_tmpfs(mount_point: Path, options: str, *args: str, setup: str = "") -> subprocess.CompletedProcess:
    """Run ``curlprune args`` in a private mount namespace where ``mount_point`` is a fresh tmpfs
    mounted with ``options`` (``setup`` runs first, with the tmpfs still writable)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    command = " ".join(["exec", sys.executable, "-m", "curlprune.cli", *(f"'{a}'" for a in args)])
    script = f"mount -t tmpfs -o size=4m tmpfs '{mount_point}' && {setup} mount -o remount,{options} '{mount_point}' && {command}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ONE_THREAD, capture_output=True, text=True, timeout=300)


# ================================================================ 1. write failures
def test_out_naming_an_existing_file_is_one_line_before_any_work(cli, tmp_path, teacher):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    config = tiny_config(tmp_path, teacher)
    started = time.perf_counter()
    proc = cli("run", config, "--out", target)
    assert_one_line_error(proc, str(target), "file")
    assert target.read_text() == "not a folder"
    assert time.perf_counter() - started < 60


@pytest.mark.parametrize("command", ["run", "prune"])
def test_out_under_a_file_is_one_line(cli, tmp_path, teacher, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "sub" / "run"
    if command == "run":
        proc = cli("run", tiny_config(tmp_path, teacher), "--out", out)
    else:
        proc = cli(*PRUNE_L1, "--weights", teacher, "--out", out)
    assert_one_line_error(proc, str(blocker))


@pytest.mark.parametrize("command", ["run", "prune", "run_dir"])
def test_empty_out_is_one_line_and_writes_nothing_into_the_working_folder(cli, tmp_path, teacher, command, monkeypatch):
    # `--out "$OUT"` with OUT unset: an empty --out (or run_dir: "") was taken as the current folder
    # and the run's files were written there ("wrote model.safetensors ... in ").
    work = tmp_path / "work"
    work.mkdir()
    config = tiny_config(tmp_path, teacher, run_dir=Path("x"))
    if command == "run_dir":
        config.write_text(config.read_text().replace("run_dir: x", "run_dir: ''"))
    monkeypatch.chdir(work)
    if command == "run":
        proc = cli("run", config, "--out", "")
    elif command == "prune":
        proc = cli(*PRUNE_L1, "--weights", teacher, "--out", "")
    else:
        proc = cli("run", config)
    assert_one_line_error(proc, "empty")
    assert files_under(work) == []


def test_check_writable_dir_accepts_new_folders_and_leaves_nothing(tmp_path):
    from curlprune.store.runlock import check_writable_dir

    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert files_under(tmp_path) == []  # the probe is removed, no folder is created
    (tmp_path / "f").write_text("x")
    with pytest.raises(CurlpruneError, match="existing file"):
        check_writable_dir(tmp_path / "f")
    with pytest.raises(CurlpruneError, match="which is a file"):
        check_writable_dir(tmp_path / "f" / "g")



@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_check_writable_dir_names_a_virtual_filesystem():
    """procfs refuses new files with ENOENT although the folder exists; the message used to be the
    misleading "No such file or directory"."""
    from curlprune.store.runlock import check_writable_dir

    with pytest.raises(CurlpruneError, match="virtual filesystem") as info:
        check_writable_dir("/proc/curlprune-out")
    assert "No such file" not in str(info.value)

@needs_mount
def test_read_only_filesystem_is_one_line_for_prune_and_export(tmp_path, teacher):
    mount = tmp_path / "ro"
    proc = in_tmpfs(mount, "ro", *PRUNE_L1, "--weights", teacher, "--out", mount / "p")
    assert_one_line_error(proc, str(mount / "p"), "read-only")

    ckpt = tmp_path / "model.safetensors"
    model = build(MODEL)
    checkpoint.save(ckpt, MODEL, {}, model.state_dict())
    proc = in_tmpfs(mount, "ro", "export", ckpt, mount / "model.onnx")
    assert_one_line_error(proc, "model.onnx", "read-only")


@needs_mount
def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, teacher):
    mount = tmp_path / "full"
    # fill the 4 MiB tmpfs to all but 8 KiB, then prune into it: the model file cannot fit
    setup = f"head -c 4186112 /dev/zero > '{mount}/filler' 2>/dev/null;"
    script_args = [*PRUNE_L1, "--weights", teacher, "--out", mount / "p"]
    mount.mkdir(parents=True, exist_ok=True)
    command = " ".join(["exec", sys.executable, "-m", "curlprune.cli", *(f"'{a}'" for a in script_args)])
    listing = f"; rc=$?; ls -a '{mount}/p' 1>&2 2>/dev/null; exit $rc"
    script = f"mount -t tmpfs -o size=4m tmpfs '{mount}' && {setup} ( {command.removeprefix('exec ')} ) {listing}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    error, *listing_lines = proc.stderr.strip().splitlines()
    proc_error = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, error + "\n")
    assert_one_line_error(proc_error, str(mount / "p"), "disk is full")
    assert not any(name.endswith(".tmp") or name == "model.safetensors" for name in listing_lines), listing_lines


def test_os_error_message_names_the_path_and_what_to_do():
    import errno

    from curlprune.store.runlock import os_error_message

    message = os_error_message(OSError(errno.ENOSPC, "No space left on device", "/data/run/model.safetensors"))
    assert message == "cannot write /data/run/model.safetensors: the disk is full: free some space or choose another --out"
    assert os_error_message(OSError(errno.ECONNRESET, "reset")) is None  # not an output problem: stays loud


# ================================================================ 2. empty and truncated files
def test_empty_weights_file_is_named_as_empty(cli, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    proc = cli(*PRUNE_L1, "--weights", empty, "--out", tmp_path / "p")
    assert_one_line_error(proc, str(empty), "empty")
    assert not (tmp_path / "p").exists()


def test_truncated_weights_files_are_one_line(cli, tmp_path, teacher):
    whole = teacher.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])
    assert_one_line_error(cli(*PRUNE_L1, "--weights", cut, "--out", tmp_path / "p"), str(cut), "cannot be read")
    assert not (tmp_path / "p").exists()
    from safetensors.torch import save_file

    from curlprune.models.weights import read_state_dict

    st = tmp_path / "w.safetensors"
    save_file(torch.load(teacher, weights_only=True), st)
    data = st.read_bytes()
    for size, message in ((0, "is empty"), (5, "truncated"), (len(data) // 2, "truncated")):
        st.write_bytes(data[:size])
        with pytest.raises(CurlpruneError, match=message):
            read_state_dict(st)


def test_empty_checkpoint_is_one_line_for_export(cli, tmp_path):
    empty = tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    proc = cli("export", empty, tmp_path / "m.onnx")
    assert_one_line_error(proc, str(empty), "empty")


def test_error_message_survives_an_exception_without_text(tmp_path):
    from curlprune.models.weights import read_state_dict

    empty = tmp_path / "w.pth"
    empty.write_bytes(b"")
    with pytest.raises(CurlpruneError, match="is empty"):
        read_state_dict(empty)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80")  # a pickle opcode and nothing else: torch.load fails with a bare exception
    with pytest.raises(CurlpruneError, match="cannot be read"):
        read_state_dict(junk)


# ================================================================ 3. image decoding
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mixed_16_and_8_bit_pngs_decode_to_uint8_rgb(tmp_path):
    from curlprune.data.data import load_image_folder

    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, size=(8, 8), dtype=np.uint16)
    rgb8 = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "test"):
            zf.writestr(f"{split}/a/deep.png", _png(gray16))
            zf.writestr(f"{split}/b/plain.png", _png(rgb8))
    splits = load_image_folder(archive)
    images = splits["train"].images
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    # 16-bit values keep their brightness: v / 65535 * 255, rounded (the top byte within 1)
    expected16 = torch.from_numpy((gray16.astype(np.int64) * 255 + 32767) // 65535)
    assert (images[0].long() - expected16).abs().max() <= 1
    assert torch.equal(images[1], torch.from_numpy(rgb8).permute(2, 0, 1))


def test_image_that_cannot_become_8_bit_rgb_is_named(tmp_path):
    from PIL import Image

    from curlprune.data.data import load_image_folder

    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), dtype=np.float32) + 3.5).save(folder / "a" / "float.tiff")
    with pytest.raises(CurlpruneError, match=r"float\.tiff"):
        load_image_folder(folder)


def test_image_size_reads_png_jpeg_and_other_headers_like_pillow():
    from PIL import Image

    from curlprune.data.decode import image_size

    for fmt, mode, size in (("PNG", "RGB", (37, 21)), ("JPEG", "RGB", (45, 19)), ("JPEG", "L", (8, 300)),
                            ("BMP", "RGB", (5, 7)), ("PNG", "I;16", (3, 9))):
        buffer = io.BytesIO()
        Image.new(mode, size).save(buffer, format=fmt, **({"progressive": True} if mode == "L" else {}))
        assert image_size(buffer.getvalue()) == size, (fmt, mode)
    assert image_size(b"not an image") is None


def test_decompression_bomb_is_refused_with_its_limit(tmp_path):
    from PIL import Image

    from curlprune.data.data import load_image_folder
    from curlprune.data.decode import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    folder = tmp_path / "data"
    (folder / "a").mkdir(parents=True)
    Image.new("1", (side, side)).save(folder / "a" / "bomb.png")  # a few KiB on disk
    assert (folder / "a" / "bomb.png").stat().st_size < 1 << 20
    with pytest.raises(CurlpruneError, match=r"bomb\.png.*pixels") as info:
        load_image_folder(folder)
    assert f"{MAX_IMAGE_PIXELS:,}" in str(info.value)


# ================================================================ 4. divergence
def test_infinite_lr_is_refused_before_anything_runs(cli, tmp_path, teacher):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {MODEL}\nweights: {teacher}\nrun_dir: {tmp_path / 'run'}\nstages: [finetune]\nfinetune: {{lr: .inf}}\n")
    assert_one_line_error(cli("run", config), "lr", "finite")
    assert not (tmp_path / "run").exists()


def test_diverging_run_stops_with_one_line_and_writes_no_final_model(cli, tmp_path, teacher):
    # a temperature of 1e-38 makes the distillation loss NaN at the first step: a real divergence
    config = tmp_path / "c.yaml"
    out = tmp_path / "run"
    config.write_text(f"model: {MODEL}\nweights: {teacher}\nrun_dir: {out}\ntrain_per_class: 20\nstages: [distill]\n"
                      "distill: {epochs: 2, warmup_epochs: 0, temperature: 1.0e-38, progress: false}\n")
    line = assert_one_line_error(cli("run", config), "epoch 1, step 1", "nan", "learning rate")
    assert "diverged" in line
    assert not (out / "distill" / "model.safetensors").exists() and not (out / "distill" / "done.json").exists()
    assert not (out / "distill" / "state.safetensors").exists()
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def test_finite_loss_guard_names_epoch_and_step():
    from curlprune.recover.guards import check_finite_loss

    check_finite_loss(torch.tensor(2.5), 0, 0)
    with pytest.raises(CurlpruneError, match=r"inf in epoch 3, step 8 \(learning rate 0.5\)"):
        check_finite_loss(torch.tensor(float("inf")), 2, 7, 0.5)


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path):
    state = build(MODEL).state_dict()
    state[next(k for k, v in state.items() if v.is_floating_point())][0] = float("nan")
    with pytest.raises(CurlpruneError, match="NaN or inf"):
        checkpoint.save(tmp_path / "m.safetensors", MODEL, {}, state)
    assert files_under(tmp_path) == []


def test_hyperparameters_are_checked_for_range():
    from curlprune.recover.distill import DistillConfig

    for bad in ({"lr": float("nan")}, {"lr": 0.0}, {"lr": 1e6}, {"momentum": 1.5}, {"epochs": 2.5}, {"epochs": True}):
        with pytest.raises(CurlpruneError):
            DistillConfig(**bad)
    DistillConfig(lr=0.1, epochs=3, warmup_epochs=1.0)  # fine


# ================================================================ 5. config types
def test_config_value_of_the_wrong_type_is_one_line_before_anything_runs(cli, tmp_path, teacher):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {MODEL}\nweights: {teacher}\nrun_dir: {tmp_path / 'run'}\nstages: [finetune]\nfinetune: {{epochs: 2.5}}\n")
    assert_one_line_error(cli("run", config), "section 'finetune'", "'epochs'", "2.5", "whole number")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, fragments", [
    ("epochs: 2.5", ("'epochs'", "2.5", "whole number")),
    ("epochs: true", ("'epochs'", "True", "whole number")),
    ("lr: fast", ("'lr'", "'fast'", "a number")),
    ("progress: 'yes'", ("'progress'", "'yes'", "true or false")),
    ("batch_size: [32]", ("'batch_size'", "[32]", "whole number")),
])
def test_config_values_are_type_checked(tmp_path, text, fragments):
    from curlprune.run.run_config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {MODEL}\nstages: [distill]\ndistill: {{{text}}}\n")
    with pytest.raises(CurlpruneError) as info:
        load_config(config)
    assert "section 'distill'" in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_numbers_written_like_1e_4_are_numbers(tmp_path):
    from curlprune.run.run_config import load_config

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {MODEL}\nstages: [refine]\nrefine: {{lr: 1e-4, epochs: 3.0, warmup_epochs: 1}}\n")
    assert yaml.safe_load(config.read_text())["refine"]["lr"] == "1e-4"  # YAML 1.1 reads a string
    section = load_config(config).sections["refine"]
    assert section.lr == 1e-4 and type(section.lr) is float
    assert section.epochs == 3 and type(section.epochs) is int
    assert type(section.warmup_epochs) is float


def test_check_types_handles_optional_and_lists():
    from curlprune.run.prune import PruneConfig
    from curlprune.validate import check_types

    assert check_types(PruneConfig, {"round_to": None, "protect": ["a"], "target_macs": "50M"}, "x") == \
        {"round_to": None, "protect": ["a"], "target_macs": "50M"}
    with pytest.raises(CurlpruneError, match="'round_to' must be a whole number or null"):
        check_types(PruneConfig, {"round_to": 2.5}, "x")
    with pytest.raises(CurlpruneError, match="'calib'"):
        check_types(PruneConfig, {"calib": True}, "x")


# ================================================================ 6. one run per directory; stable bytes
def test_same_model_saved_twice_gives_the_same_bytes(tmp_path):
    model = build(MODEL)
    for name in ("a", "b", "c"):
        checkpoint.save(tmp_path / f"{name}.safetensors", MODEL, {}, model.state_dict(), extra={"x": 1, "y": 2})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    code = (f"import torch; from curlprune.store import checkpoint; from curlprune.models import build\n"
            f"m = build({MODEL!r}); m.load_state_dict(checkpoint.load({str(tmp_path / 'a.safetensors')!r}).state_dict())\n"
            f"checkpoint.save({str(tmp_path / 'd.safetensors')!r}, {MODEL!r}, {{}}, m.state_dict(), extra={{'x': 1, 'y': 2}})")
    subprocess.run([sys.executable, "-c", code], env=ONE_THREAD, check=True, timeout=120)
    assert (tmp_path / "d.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert checkpoint.load(tmp_path / "a.safetensors") is not None


def test_content_digest_ignores_header_order_but_not_content(tmp_path):
    from curlprune.store.canonical import canonical_bytes, content_digest

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    meta = {f"k{i}": str(i) for i in range(8)}
    (tmp_path / "a.safetensors").write_bytes(canonical_bytes(tensors, meta))
    (tmp_path / "b.safetensors").write_bytes(_reversed_header(canonical_bytes(tensors, meta)))
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()
    assert content_digest(tmp_path / "a.safetensors") == content_digest(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(canonical_bytes({**tensors, "b": torch.zeros(2)}, meta))
    assert content_digest(tmp_path / "c.safetensors") != content_digest(tmp_path / "a.safetensors")


def _reversed_header(data: bytes) -> bytes:
    """The same file with its header's keys (and metadata keys) in reverse order."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(dict(reversed(list(header.items())))).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def test_rerun_accepts_a_student_resaved_with_another_header_order(cli, tmp_path, teacher):
    student = tmp_path / "student.safetensors"
    checkpoint.save(student, MODEL, {}, torch.load(teacher, weights_only=True))
    out = tmp_path / "run"
    args = ["distill", "--model", MODEL, "--weights", teacher, "--train-per-class", "20", "--epochs", "1",
            "--student", student, "--out", out]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    student.write_bytes(_reversed_header(student.read_bytes()))  # same model, other bytes
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]


def test_two_runs_into_the_same_folder_one_is_refused_naming_the_holder(tmp_path, teacher):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, teacher, run_dir=out)
    command = [sys.executable, "-m", "curlprune.cli", "run", str(config)]
    runs = [subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [(p.pid, p.returncode, *p.communicate(timeout=300)) for p in runs]
        results = [(pid, p.returncode, out_text, err) for p, (pid, _, out_text, err) in zip(runs, results)]
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(code for _, code, _, _ in results)
    assert codes == [0, 2], [(code, err[-1500:]) for _, code, _, err in results]
    winner = next(pid for pid, code, _, _ in results if code == 0)
    refused = next(subprocess.CompletedProcess(command, code, o, e) for _, code, o, e in results if code == 2)
    assert_one_line_error(refused, str(out), "in use", f"pid {winner}")
    assert not (out / ".lock").exists()  # released at the end
    rerun = curlprune("run", config)  # the finished run is intact: a rerun skips every stage
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already holds" not in rerun.stderr and "another student" not in rerun.stderr


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    from curlprune.store.runlock import RunLock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from curlprune.store.runlock import RunLock; "
                               f"RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=ONE_THREAD, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CurlpruneError, match=f"pid {holder.pid}"):
        RunLock(run_dir).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run_dir / ".lock").exists()  # left behind by the killed process...
    with RunLock(run_dir) as lock:  # ...and no obstacle
        assert lock.held
    assert not (run_dir / ".lock").exists()


def test_lock_created_folder_is_removed_when_the_run_wrote_nothing(tmp_path):
    from curlprune.store.runlock import RunLock

    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new" / ".lock").is_file()
    assert not (tmp_path / "new").exists()


def test_run_prune_from_python_takes_the_lock_too(tmp_path):
    """The library path (curlprune.run.prune.run_prune) locks its folder as the CLI does: a folder in
    use is refused before anything is loaded or written, and a free one is left unlocked after."""
    from curlprune.run.prune import PruneConfig, run_prune
    from curlprune.store.runlock import RunLock

    out = tmp_path / "prune"
    config = PruneConfig(criterion="l1", target_macs=0.7, eval_limit=0)
    with RunLock(out):  # another "process": flock locks of separate opens conflict in one process too
        with pytest.raises(CurlpruneError, match="in use by another run"):
            run_prune(config, out, model_name="small:resnet-digits", show=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    result = run_prune(config, out, model_name="small:resnet-digits", show=False)
    assert result.checkpoint.is_file() and not (out / ".lock").exists()
