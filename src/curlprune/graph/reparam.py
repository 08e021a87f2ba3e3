"""Reparametrised weights: a layer whose ``weight`` is computed from other tensors at each call.

``torch.nn.utils.weight_norm`` / ``spectral_norm`` (a forward pre-hook that recomputes ``weight``
from ``weight_g``/``weight_v`` or ``weight_orig`` and its ``u``/``v`` vectors) and
``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``,
user parametrizations: ``module.weight`` is a new tensor at each access, computed from
``module.parametrizations.weight.original*``).

Slicing such a layer must slice what is stored, not the computed ``weight``:

* weight norm (``w = g * v / ||v||``, both forms, any ``dim``): removing channels and computing the
  sliced ``w`` from ``g, v`` is the same as slicing the computed ``w``; the pruned layer stores that
  sliced ``w`` reparametrised again by torch's own ``weight_norm`` (``g = ||w||``, ``v = w``), so it
  computes exactly the kept channels of the original and still trains as a weight-normalised layer;
* spectral norm (``w / sigma(w)``): sigma is the largest singular value of the whole weight, which
  changes when channels are removed, so the kept channels would change: unprunable;
* orthogonal and any other parametrization: a slice of the computed weight is in general not a
  value of the parametrization: unprunable.

Source: docs/method.md §1 (members and what slicing keeps).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from curlprune.graph.op_cost import CostTerm

_WEIGHT_NORM_PARAMETRIZATION = "_WeightNorm"


def _hooks(mod: nn.Module) -> list[WeightNorm | SpectralNorm]:
    return [h for h in mod._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]


def reparametrised(mod: nn.Module) -> dict[str, str]:
    """Name of each reparametrised tensor of ``mod`` -> what computes it (``"weight_norm"``,
    ``"spectral_norm"`` or the parametrization classes' names joined by ``+``); empty for a plain module."""
    found = {h.name: "weight_norm" if isinstance(h, WeightNorm) else "spectral_norm" for h in _hooks(mod)}
    if parametrize.is_parametrized(mod):
        for name, plist in mod.parametrizations.items():
            kinds = [type(p).__name__ for p in plist]
            found[name] = "weight_norm" if kinds == [_WEIGHT_NORM_PARAMETRIZATION] else "+".join(kinds)
    return found


def reparam_problem(mod: nn.Module, name: str) -> str:
    """Why the channels of ``mod`` (called ``name``) cannot be sliced because of a reparametrisation,
    or "" (none, or weight norms only)."""
    for tensor, kind in reparametrised(mod).items():
        if kind == "weight_norm":
            continue
        if kind == "spectral_norm" or kind == "_SpectralNorm":
            why = "is divided by its largest singular value, which changes when channels are removed"
        else:
            why = f"is computed by the parametrization {kind}, of which a slice is in general no value"
        return f"{name}.{tensor} {why}"
    return ""


def stored(mod: nn.Module, tensor: str) -> list[torch.Tensor]:
    """The tensors that hold ``mod.<tensor>`` when it is reparametrised (``[]`` when it is not):
    weight norm's ``g`` then ``v``, spectral norm's original weight, a parametrization's originals."""
    for h in _hooks(mod):
        if h.name == tensor:
            suffixes = ("_g", "_v") if isinstance(h, WeightNorm) else ("_orig",)
            return [getattr(mod, tensor + s) for s in suffixes]
    if parametrize.is_parametrized(mod, tensor):
        plist = mod.parametrizations[tensor]
        return [plist.original] if plist.is_tensor else [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    return []


def owned(mod: nn.Module) -> list[torch.Tensor]:
    """``mod``'s own parameters, with the stored tensors of its parametrizations."""
    own = list(mod.parameters(recurse=False))
    if parametrize.is_parametrized(mod):
        own += list(mod.parametrizations.parameters())
    return own


@contextlib.contextmanager
def stable(mod: nn.Module) -> Iterator[None]:
    """While inside, ``mod.<tensor>`` of a parametrized module is one tensor at every access (cached)."""
    with parametrize.cached() if parametrize.is_parametrized(mod) else contextlib.nullcontext():
        yield


def map_param_terms(mod: nn.Module, terms: Mapping[int, CostTerm]) -> dict[int, CostTerm]:
    """A layer rule's parameter terms (keyed by ``id`` of ``mod.<tensor>``) moved onto the stored tensors.

    Call inside :func:`stable` (the ids must be those of the tensors the rule read). A stored tensor of
    the computed tensor's shape (weight norm's ``v``, an original weight) gets its term; weight norm's
    ``g`` (the computed tensor's size along its ``dim``, 1 elsewhere) gets that dim's factor, when the
    term's sizes are the leading dims in order (the built-in rules'), else a constant.
    """
    out = dict(terms)
    for tensor in reparametrised(mod):
        w = getattr(mod, tensor)
        term = out.pop(id(w), None)
        for t in stored(mod, tensor):
            if term is not None and t.shape == w.shape:
                out[id(t)] = term
            elif term is not None and t.dim() == w.dim() and t.numel() > 1:
                d = next(i for i, s in enumerate(t.shape) if s > 1)
                sizes = term.sizes
                ok = d < len(sizes) and sizes[d][0] == w.shape[d]
                out[id(t)] = CostTerm(False, 1, (sizes[d],)) if ok else CostTerm(False, t.numel(), ())
            else:
                out[id(t)] = CostTerm(False, t.numel(), ())
    return out


@contextlib.contextmanager
def unwrapped(mod: nn.Module) -> Iterator[None]:
    """While inside, ``mod``'s hook-based weight-normalised tensors are plain Parameters holding their
    current values (what a rule slices); on exit each is weight-normalised again over the same ``dim``.

    A parametrized weight needs nothing: a rule's ``setattr`` of the sliced weight goes through the
    parametrization's ``right_inverse`` (weight norm's: ``g = ||w||, v = w``), in place on the stored
    tensors (removing the parametrization would change the class that a deep copy shares with the
    original). Only for modules without a :func:`reparam_problem` (the channel pass keeps the others whole).
    """
    undo: list[tuple[str, int]] = []
    for h in _hooks(mod):
        if isinstance(h, WeightNorm):
            undo.append((h.name, h.dim))
            nn.utils.remove_weight_norm(mod, h.name)
    try:
        yield
    finally:
        for tensor, dim in undo:
            nn.utils.weight_norm(mod, tensor, dim)
