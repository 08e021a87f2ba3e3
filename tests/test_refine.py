"""Label refinement: the loss, the exact label step (spec §5 and note 9), the teacher-initialised store."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from curlprune.data.data import class_balanced_subset, load_digits_dataset
from curlprune.data.transforms import build_transform
from curlprune.errors import CurlpruneError
from curlprune.models import build, input_spec
from curlprune.recover import ExpandedDataset, RefineConfig, refine, refine_loss
from curlprune.recover.dist import DistContext
from curlprune.recover.refine import RefineStage

SPEC = input_spec("small:resnet-digits")
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny():
    data = load_digits_dataset(0)
    return {"train": class_balanced_subset(data["train"], 10, seed=0), "test": class_balanced_subset(data["test"], 5, seed=0)}


def model(seed: int, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("small:resnet-digits", num_classes=classes)


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_refine_loss_value_and_label_gradient():
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2
    z = (torch.randn(6, 5, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = refine_loss(s, z, y)
    loss.backward()
    p, q = softmax(s.numpy()), softmax(z.detach().numpy())
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # KL(student || label), per-sample mean
    ce = np.mean(-np.log(p[np.arange(6), y.numpy()]))
    assert loss.item() == pytest.approx(0.7 * kl + 0.3 * ce, rel=1e-12)
    np.testing.assert_allclose(z.grad.numpy(), (0.7 / 6) * (q - p), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("batch,label_lr", [(8, 1.0), (32, 1.0), (12, 0.5)])
def test_one_label_step_moves_exactly_the_batch_rows(tiny, batch, label_lr):
    stage = RefineStage(RefineConfig(label_lr=label_lr, channels_last=False), teacher=model(0))
    generator = torch.Generator().manual_seed(batch)
    store = torch.randn(60, 10, generator=generator) * 3
    stage.labels = store.clone()
    index = torch.randperm(60, generator=generator)[:batch]
    images = torch.stack([build_transform(SPEC, train=False)(tiny["train"][int(i)][0]) for i in index])
    labels = torch.tensor([tiny["train"][int(i)][1] for i in index])
    student = model(1).train()

    loss, logits = stage.loss(student, images, labels, index)
    loss.backward()
    stage.after_backward(CPU)

    others = torch.ones(60, dtype=torch.bool)
    others[index] = False
    assert torch.equal(stage.labels[others], store[others])  # bit-identical
    p = softmax(logits.detach().double().numpy())
    q = softmax(store[index].double().numpy())
    gradient = (0.7 / batch) * (q - p)  # dL/dz of the batch-mean loss (spec §5)
    step = label_lr * batch / 32  # docs/method.md §7
    moved = (stage.labels[index] - store[index]).double().numpy()
    # float32 store: the difference of two values up to ~10 carries rounding of about 1e-6
    np.testing.assert_allclose(moved, -step * gradient, rtol=1e-3, atol=2e-6)
    np.testing.assert_allclose(moved, label_lr * 0.7 / 32 * (p - q), rtol=1e-3, atol=2e-6)  # same at any batch
    assert (moved * gradient).sum() < 0  # against the gradient
    assert np.abs(moved.sum(1)).max() < 1e-5  # softmax differences sum to zero per row


def test_store_starts_at_teacher_logits_and_moves_gently(tmp_path, tiny):
    teacher = model(0)
    common = dict(epochs=2, batch_size=16, lr=0.01, seed=5, progress=False, device="cpu")
    frozen = refine(model(1), teacher, tiny, SPEC, RefineConfig(label_lr=0.0, **common), tmp_path / "frozen")
    moving = refine(model(1), teacher, tiny, SPEC, RefineConfig(**common), tmp_path / "moving")

    expanded = ExpandedDataset(tiny["train"], seed=5)
    initial = frozen.tensors["labels"]
    assert initial.shape == (len(expanded), 10) == (600, 10)
    eval_transform = build_transform(SPEC, train=False)
    teacher.eval()
    with torch.no_grad():
        for k in (0, 99, 100, 250, 420, 599):  # every version
            expected = teacher(eval_transform(expanded[k][0])[None].contiguous(memory_format=torch.channels_last))[0]
            torch.testing.assert_close(initial[k], expected, rtol=1e-4, atol=1e-5)

    change = moving.tensors["labels"] - initial
    assert (change.abs().sum(1) > 0).all()  # every row was visited and refined
    assert change.abs().max() <= 2 * 0.7 / 32 + 1e-6  # at most 0.7/32 * |p - q| <= 0.7/32 per visit, 2 visits
    assert change.sum(1).abs().max() < 1e-5
    # A student trained against moving labels differs from one trained against fixed teacher logits.
    assert not torch.equal(frozen.model.linear.weight, moving.model.linear.weight)


def test_teacher_with_wrong_classes_is_refused(tmp_path, tiny):
    with pytest.raises(CurlpruneError, match="teacher outputs 100 classes but the data has 10"):
        refine(model(1), model(0, classes=100), tiny, SPEC, RefineConfig(epochs=1, progress=False), tmp_path)
    assert not (tmp_path / "refine" / "state.safetensors").exists()


def bn_stats(m: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d) for t in (mod.running_mean, mod.running_var)]


def test_bn_frozen_by_default_keeps_the_students_statistics_and_update_moves_them(tmp_path, tiny):
    teacher = model(0)
    common = dict(epochs=1, batch_size=16, lr=0.01, seed=3, progress=False, device="cpu")
    start = bn_stats(model(1))
    frozen = refine(model(1), teacher, tiny, SPEC, RefineConfig(**common), tmp_path / "frozen")
    update = refine(model(1), teacher, tiny, SPEC, RefineConfig(bn="update", **common), tmp_path / "update")
    assert all(torch.equal(a, b) for a, b in zip(bn_stats(frozen.model), start))  # the running statistics are kept
    assert not all(torch.equal(a, b) for a, b in zip(bn_stats(update.model), start))  # train mode moves them
    assert not torch.equal(frozen.model.linear.weight, model(1).linear.weight)  # the weights still train
    first_bn = lambda m: next(mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d))  # noqa: E731
    assert not torch.equal(first_bn(frozen.model).weight, first_bn(model(1)).weight)  # and BN's scale and shift


def test_bad_bn_mode_is_one_line():
    with pytest.raises(CurlpruneError, match="bn must be one of frozen, update"):
        RefineConfig(bn="sometimes")
