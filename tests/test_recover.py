"""Recovery stages on real digits: schedule, distillation loss, outputs, skipping, determinism, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from curlprune.data.data import batches, class_balanced_subset, evaluate, load_digits_dataset
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.recover import (
    DistillConfig,
    FinetuneConfig,
    distill,
    distill_loss,
    finetune,
    load_stage_model,
)
from curlprune.recover.distill import DistillStage
from curlprune.recover.schedule import warmup_cosine_lr

SPEC = input_spec("small:resnet-digits")


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(0)


@pytest.fixture(scope="module")
def tiny(digits):
    return {"train": class_balanced_subset(digits["train"], 10, seed=0), "test": class_balanced_subset(digits["test"], 5, seed=0)}


def model(seed: int, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("small:resnet-digits", num_classes=classes)


def quick(cls=FinetuneConfig, **overrides):
    return cls(**{"epochs": 1, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0.0, "progress": False, "device": "cpu", **overrides})


def test_schedule_is_linear_warmup_then_cosine():
    base, total, warm = 0.1, 100, 10
    assert warmup_cosine_lr(0, total, warm, base) == 0.0
    assert warmup_cosine_lr(5, total, warm, base) == pytest.approx(0.05)
    assert warmup_cosine_lr(10, total, warm, base) == pytest.approx(0.1)
    assert warmup_cosine_lr(55, total, warm, base) == pytest.approx(0.05)
    assert warmup_cosine_lr(70, total, warm, base) == pytest.approx(0.1 * (1 + math.cos(math.pi * 60 / 90)) / 2)
    assert warmup_cosine_lr(100, total, warm, base) == pytest.approx(0.0)
    assert warmup_cosine_lr(0, total, 0, base) == pytest.approx(0.1)  # no warm-up: cosine from the start


def test_distill_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(7, 4)) * 3, rng.normal(size=(7, 4)) * 3
    y, perm = np.array([0, 1, 2, 3, 0, 1, 2]), rng.permutation(7)
    lam, temperature = 0.3, 2.0

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    pt, ps = softmax(t / temperature), softmax(s / temperature)
    kl = sum(pt[i, c] * (math.log(pt[i, c]) - math.log(ps[i, c])) for i in range(7) for c in range(4)) / 7
    p1 = softmax(s)
    ce_y = -sum(math.log(p1[i, y[i]]) for i in range(7)) / 7
    ce_perm = -sum(math.log(p1[i, y[perm][i]]) for i in range(7)) / 7
    expected = 0.7 * temperature**2 * kl + 0.3 * (lam * ce_y + (1 - lam) * ce_perm)

    got = distill_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), torch.tensor(y[perm]), lam)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_teacher_and_student_see_the_same_mixed_batch(tiny):
    teacher, student = model(0).eval(), model(1).train()
    seen = {}
    teacher.register_forward_hook(lambda m, inputs, out: seen.update(teacher_in=inputs[0].clone(), teacher_out=out.clone()))
    student.register_forward_hook(lambda m, inputs, out: seen.update(student_in=inputs[0].clone()))
    stage = DistillStage(DistillConfig(channels_last=False), teacher)
    stage.seed(11)
    x = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    loss, logits = stage.loss(student, x, y, torch.arange(8))
    loss.backward()

    rng = np.random.default_rng(11)  # the same draws, made independently: lambda ~ Beta(1, 1), then the pairing
    lam, perm = rng.beta(1.0, 1.0), torch.from_numpy(rng.permutation(8))
    torch.testing.assert_close(seen["teacher_in"], lam * x + (1 - lam) * x[perm])
    assert torch.equal(seen["student_in"], seen["teacher_in"])
    torch.testing.assert_close(loss, distill_loss(logits, seen["teacher_out"], y, y[perm], lam, ce_weight=0.5))  # the default loss
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never learns
    assert all(p.grad is not None for p in student.parameters())


def test_finetune_learns_writes_outputs_and_is_skipped_when_done(tmp_path, digits):
    cfg = FinetuneConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=0.5, progress=False, device="cpu")
    start = evaluate(model(1), digits["test"], SPEC)
    result = finetune(model(1), digits, SPEC, cfg, tmp_path)
    stage_dir = tmp_path / "finetune"

    lines = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) == {"epoch", "loss", "lr", "train_top1", "test_top1", "seconds"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert lines[-1]["lr"] < 0.05 * 0.01  # cosine ends near 0
    assert result.last_top1 == lines[-1]["test_top1"] >= 75.0 > 100 * start + 40  # real learning on real digits
    assert result.best_top1 == max(r["test_top1"] for r in lines)
    done = json.loads((stage_dir / "done.json").read_text())
    assert done["epochs"] == 3 and done["last_top1"] == result.last_top1 and done["config"]["lr"] == 0.05
    assert done["seconds"] == pytest.approx(sum(r["seconds"] for r in lines))
    # The saved weights reproduce the reported accuracy (data.evaluate gives a fraction).
    reloaded = load_stage_model(model(7), tmp_path, "finetune")
    assert 100 * evaluate(reloaded, digits["test"], SPEC) == pytest.approx(result.last_top1)

    stamps = {p.name: p.stat().st_mtime_ns for p in stage_dir.iterdir()}
    again = finetune(model(7), digits, SPEC, cfg, tmp_path)  # done: skipped, weights loaded
    assert {p.name: p.stat().st_mtime_ns for p in stage_dir.iterdir()} == stamps
    assert again.last_top1 == result.last_top1
    assert all(torch.equal(a, b.cpu()) for a, b in zip(result.model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(CurlpruneError, match="epochs=3"):
        finetune(model(7), digits, SPEC, FinetuneConfig(**{**cfg.__dict__, "epochs": 4}), tmp_path)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = distill(model(1), model(0), tiny, SPEC, quick(DistillConfig, seed=seed), tmp_path / name)
        runs[name] = out.model.state_dict()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(runs["a"]["linear.weight"], runs["c"]["linear.weight"])


def test_bad_input_is_refused_with_a_clear_message(tmp_path, tiny):
    with pytest.raises(CurlpruneError, match="teacher outputs 100 classes but the data has 10"):
        distill(model(1), model(0, classes=100), tiny, SPEC, quick(DistillConfig), tmp_path)
    with pytest.raises(CurlpruneError, match="student outputs 7 classes but the data has 10"):
        finetune(model(1, classes=7), tiny, SPEC, quick(), tmp_path)
    with pytest.raises(CurlpruneError, match="no finished 'distill' stage"):
        load_stage_model(model(1), tmp_path, "distill")
    with pytest.raises(CurlpruneError, match="batch_size"):
        finetune(model(1), tiny, SPEC, quick(batch_size=0), tmp_path)
    with pytest.raises(CurlpruneError, match="'train' and 'test'"):
        finetune(model(1), {"train": tiny["train"]}, SPEC, quick(), tmp_path)

    damaged = tmp_path / "damaged" / "finetune" / "state.safetensors"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(CurlpruneError, match="cannot be read"):
        finetune(model(1), tiny, SPEC, quick(), tmp_path / "damaged")

    finetune(model(1), tiny, SPEC, quick(), tmp_path / "done")
    wider = build("small:resnet-digits")
    wider.linear = torch.nn.Linear(32, 10, bias=False)  # another architecture than the one trained
    with pytest.raises(CurlpruneError, match="do not fit the given model"):
        finetune(wider, tiny, SPEC, quick(), tmp_path / "done")


def test_pruned_graph_module_student_distills_and_reloads(tmp_path, tiny):
    """The intended flow: a pruned torch.fx student learns from its unpruned teacher; its stage
    weights load into the same pruned architecture rebuilt from the plan."""
    from curlprune import apply, trace

    teacher = model(0).eval()
    groups = trace(teacher, torch.zeros(1, 1, 8, 8))
    plan = {g.name: list(range(0, g.width, 2)) for g in groups if g.prunable}
    student = apply(teacher, groups, plan, keep_class=False)  # the GraphModule (the default keeps SmallResNet)
    assert isinstance(student, torch.fx.GraphModule)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill(student, teacher, tiny, SPEC, quick(DistillConfig, epochs=2), tmp_path)
    assert result.model is student and not torch.equal(before["linear.weight"], student.linear.weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in model(0).state_dict().items())  # teacher untouched

    rebuilt = load_stage_model(apply(model(0), groups, plan), tmp_path, "distill")
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), student.eval()(x))
    with pytest.raises(CurlpruneError, match="same module"):
        distill(teacher, teacher, tiny, SPEC, quick(DistillConfig), tmp_path / "self")


# ----- ce_weight (issue 19 item 3) ----------------------------------------------------------------
def distill_step(ce_weight, tiny, mixup_alpha=1.0):
    """One distill loss on 16 real digits (seeded mixup), with ``ce_weight`` (None: not given, the default);
    returns the loss and what it saw."""
    teacher, student = model(0).eval(), model(1).train()
    given = {} if ce_weight is None else {"ce_weight": ce_weight}
    stage = DistillStage(DistillConfig(channels_last=False, mixup_alpha=mixup_alpha, **given), teacher)
    stage.seed(5)
    x, y = next(iter(batches(tiny["train"], SPEC, 16)))
    loss, logits = stage.loss(student, x, y, torch.arange(16))
    rng = np.random.default_rng(5)
    lam = rng.beta(mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    perm = torch.from_numpy(rng.permutation(16))
    with torch.no_grad():
        teacher_logits = teacher(lam * x + (1 - lam) * x[perm])
    return loss, logits, teacher_logits, y, perm, lam


def test_ce_weight_zero_is_the_paper_loss_exactly(tiny):
    zero, logits, teacher_logits, y, perm, lam = distill_step(0.0, tiny)
    assert torch.equal(zero, distill_step(0, tiny)[0])
    assert DistillConfig(ce_weight=0).ce_weight == 0.0 and isinstance(DistillConfig(ce_weight=0).ce_weight, float)
    assert torch.equal(zero, distill_loss(logits, teacher_logits, y, y[perm], lam))  # bit for bit the paper's
    ce = lam * torch.nn.functional.cross_entropy(logits, y) + (1 - lam) * torch.nn.functional.cross_entropy(logits, y[perm])
    assert abs(zero.item() - ce.item()) > 1e-3  # the KD term is there: the two losses differ on this batch


def test_the_default_loss_is_half_the_paper_loss_half_mixed_cross_entropy(tiny):
    """Issue 19: the default ce_weight is 0.5 (chosen on val, benchmarks/results/small_data.md)."""
    assert DistillConfig().ce_weight == 0.5
    loss, logits, teacher_logits, y, perm, lam = distill_step(None, tiny)
    paper = distill_loss(logits, teacher_logits, y, y[perm], lam)
    ce = lam * torch.nn.functional.cross_entropy(logits, y) + (1 - lam) * torch.nn.functional.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, 0.5 * paper + 0.5 * ce)
    assert not torch.allclose(loss, paper)  # not the paper's loss
    with pytest.raises(CurlpruneError, match=r"ce_weight must be a number in \[0, 1\] \(got None\); 0 = the paper's loss"):
        DistillConfig(ce_weight=None)  # None no longer means 0: a default of 0.5 would make it ambiguous


def test_ce_weight_one_is_plain_mixed_cross_entropy(tiny):
    loss, logits, _, y, perm, lam = distill_step(1.0, tiny)
    expected = lam * torch.nn.functional.cross_entropy(logits, y) + (1 - lam) * torch.nn.functional.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, expected)
    plain, logits, _, y, _, _ = distill_step(1.0, tiny, mixup_alpha=0.0)  # no mixup: cross-entropy on the true labels
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits, y))


def test_ce_weight_between_mixes_the_two(tiny):
    loss, logits, teacher_logits, y, perm, lam = distill_step(0.25, tiny)
    paper = distill_loss(logits, teacher_logits, y, y[perm], lam)
    ce = lam * torch.nn.functional.cross_entropy(logits, y) + (1 - lam) * torch.nn.functional.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, 0.75 * paper + 0.25 * ce)
    with pytest.raises(CurlpruneError, match=r"ce_weight must be a finite number in \[0, 1\]"):
        DistillConfig(ce_weight=1.5)
