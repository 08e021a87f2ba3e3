"""Mixed precision for the training stages: the ``amp`` setting (issue 20 item 5; docs/method.md §11).

``amp: off`` (the default) trains in float32 exactly as before: no autocast, no loss scaling, the
same operations in the same order, so the weights are bit for bit those of a run without the
setting. ``amp: bf16`` / ``amp: fp16`` run the student's forward pass, the teacher's forward pass
(under ``torch.inference_mode``) and the loss under :func:`torch.autocast` with that dtype:
convolutions and matrix products compute in 16 bits, everything else stays float32:

* the weights, their gradients and the SGD momentum buffers (the "master weights": float32);
* BatchNorm statistics (autocast runs batch norm in float32);
* the losses: the stages cast the logits to float32 and turn autocast off around softmax, KL,
  cross-entropy and the feature loss (:func:`full_precision`);
* evaluation (test and validation top-1) and the refine stage's label store.

``fp16`` has 5 exponent bits: small gradients underflow to 0, so its loss is multiplied by a
scale before the backward pass and the gradients divided by it before the step
(:class:`torch.amp.GradScaler`; a step whose gradients hold inf or NaN is skipped and the scale
halved). The scaler's state is part of the stage's resumable state, so a mid-epoch resume stays
exact. ``bf16`` has float32's exponent range and needs no scaling. Why the default is ``off``:
on the CPU and on small CIFAR-sized models mixed precision is rarely faster (the models are
bound by memory traffic and kernel launches, not arithmetic), and 16-bit rounding changes the
result; on GPUs with tensor cores (and 224x224 models) ``bf16`` is the setting to use.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from curlprune.errors import CurlpruneError

__all__ = ["AMP_MODES", "Precision", "autocast", "canonical_amp", "check_amp", "full_precision"]

AMP_MODES = ("off", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_OTHER = {"bf16": "fp16", "fp16": "bf16"}


def canonical_amp(value: Any) -> str | None:
    """The ``amp`` setting as stored: None for off (unset, ``off``, or YAML's ``off`` read as false), else ``bf16`` / ``fp16``.

    Off is stored as None so that run folders written before the setting existed resume and
    compare equal (:data:`curlprune.store.LATER`).

    Raises:
        CurlpruneError: any other value (one line, listing the valid ones).
    """
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, str) and value in DTYPES:
        return value
    raise CurlpruneError(f"amp must be one of {', '.join(AMP_MODES)} (got {value!r}): "
                         "off trains in float32 (default), bf16 or fp16 run the forward passes in mixed precision")


def check_amp(amp: str | None, device: torch.device) -> None:
    """Whether ``device`` can train with ``amp``: autocast exists for its type and gives the dtype asked for.

    Probed with one small matrix product under autocast on the device (a GPU without native
    bfloat16, compute capability below 8.0, is refused for ``bf16`` outright).

    Args:
        amp: the canonical setting (:func:`canonical_amp`); None (off) always passes.
        device: the training device.
    Raises:
        CurlpruneError: one line naming the device and what to use instead.
    """
    if amp is None:
        return
    dtype, other = DTYPES[amp], _OTHER[amp]
    if not torch.amp.is_autocast_available(device.type):
        raise CurlpruneError(f"amp: {amp} needs autocast, which PyTorch does not have for device {device}: use amp: off there")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise CurlpruneError(f"amp: bf16 needs a GPU with bfloat16 (compute capability 8.0 or newer) but {device} "
                             f"({torch.cuda.get_device_name(device)}) has none: use amp: fp16 (with loss scaling) or amp: off")
    try:
        with warnings.catch_warnings():  # an unsupported dtype is a warning and a disabled autocast
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                probe = F.linear(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
        works = probe.dtype == dtype
    except RuntimeError:
        works = False
    if not works:
        raise CurlpruneError(f"amp: {amp} is not supported on device {device} by this PyTorch ({torch.__version__}): "
                             f"use amp: {other} or amp: off")


def autocast(amp: str | None, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context of a forward pass under ``amp`` on ``device``: :func:`torch.autocast` to its dtype,
    or nothing at all when off (None)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[amp])


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off for ``device``'s type inside the block (the losses: softmax, KL, cross-entropy in
    float32); nothing at all when autocast is not on, so ``amp: off`` runs exactly as before."""
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


class Precision:
    """The training loop's mixed-precision state for one stage: autocast and, for fp16, the loss scaler.

    Args:
        amp: the canonical setting (None: off).
        device: the training device (checked with :func:`check_amp`).
    Raises:
        CurlpruneError: ``device`` cannot train with ``amp``.
    """

    def __init__(self, amp: str | None, device: torch.device) -> None:
        check_amp(amp, device)
        self.amp = amp
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a forward pass and its loss: autocast to the dtype, or nothing when off."""
        return autocast(self.amp, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def grad_scale(self) -> float:
        """The factor the gradients of the last backward pass carry (1 unless fp16 scales the loss)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step: plain, or under fp16 unscaled, skipped when a gradient is inf/NaN, then the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict[str, Any] | None:
        """The loss scaler's state as JSON (scale, growth tracker, factors), None without one."""
        return dict(self.scaler.state_dict()) if self.scaler is not None else None

    def load_state(self, state: Any, where: str) -> None:
        """Restore :meth:`state` (a resumed stage continues with the scale it had).

        Raises:
            CurlpruneError: an fp16 stage whose state file holds no scaler state (``where`` names the file).
        """
        if self.scaler is None:
            return
        keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
        numbers = isinstance(state, dict) and set(state) == keys and all(
            isinstance(state[k], (int, float)) and not isinstance(state[k], bool) and math.isfinite(state[k]) for k in keys)
        if not numbers or state["scale"] <= 0:
            raise CurlpruneError(f"training state {where} does not fit this stage: 'amp_scaler' does not hold the fp16 loss "
                                 "scaler's state; it was edited, damaged or written by another run: delete it to restart the stage from scratch")
        self.scaler.load_state_dict(dict(state))
