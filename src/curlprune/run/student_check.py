"""A ``--student`` checkpoint must fit the run before the run writes anything (issue 18).

A training stage given a student of another architecture (other input channels, another number
of classes) used to fail at its first forward pass with a long traceback, after the run folder was
claimed. :func:`check_student_fits` runs the student once on the run's example input and compares
its outputs with the teacher's, so such a student is one line naming the file, before any byte is
written.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from curlprune.errors import CurlpruneError, exception_summary
from curlprune.models import ModelRef

__all__ = ["check_student_fits"]


def _outputs(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """The model's output on ``example`` in eval mode, without gradients (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example)
    finally:
        model.train(was_training)


def check_student_fits(student: nn.Module, source: str | os.PathLike, student_ref: ModelRef | dict, student_shape: list[int],
                       teacher: nn.Module, example: torch.Tensor, model_name: str) -> None:
    """Check that a student loaded from a checkpoint takes the run's input and gives the teacher's outputs.

    Args:
        student: the loaded student (its weights are not changed).
        source: the checkpoint file (named in the message).
        student_ref: its ``model_ref`` (a ModelRef or ``{"name", "kwargs"}``) and ``student_shape`` its ``input_shape``,
            named in the message.
        teacher: the run's unpruned model (the teacher of its stages).
        example: one input batch of the run (``[1, C, S, S]``).
        model_name: the run's model.
    Raises:
        CurlpruneError: the student fails on the run's input, or its output width differs from the
            teacher's (one line naming the file, both models and what to do).
    """
    what = f"student checkpoint {source} ({ModelRef.of(student_ref).name}, input {list(student_shape)})"
    fix = f"pass a student pruned from {model_name} (e.g. <run_dir>/prune/model.safetensors) or choose the run's model and data to match it"
    device = next(student.parameters(), torch.empty(0)).device
    try:
        produced = _outputs(student, example.to(device))
    except Exception as exc:  # the forward of a model that does not fit: any torch error
        raise CurlpruneError(f"{what} cannot take this run's input {list(example.shape)} of {model_name} ({exception_summary(exc)}): {fix}") from None
    expected = _outputs(teacher, example.to(next(teacher.parameters()).device))
    if produced.shape[1:] != expected.shape[1:]:
        raise CurlpruneError(f"{what} outputs {produced.shape[-1]} classes but this run's {model_name} outputs {expected.shape[-1]}: {fix}")
