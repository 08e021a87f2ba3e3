"""The model registry: names -> architectures, weights, the input each model expects and which
channel groups its family protects by default.

Names have a family prefix (``family:arch``). Each family registers itself with
:func:`register_family` in its own module (the pattern of torchvision's and timm's
``register_model``), so this module knows no family:

    cifar:resnet20|32|44|56|110|1202   CIFAR ResNets with option-A shortcuts (models/cifar.py)
    torchvision:<name>                 any torchvision classification model (models/torchvision_models.py)
    small:resnet-digits                a tiny ResNet for 8x8 digits (models/small.py)
    timm:<name>                        any timm.list_models() name, optional extra (models/timm_family.py)

Any other ``MODULE:ATTRIBUTE`` is a model of your own named by import path (``mypkg.nets:MyNet``,
``path/to/file.py:build_fn``; :mod:`curlprune.models.import_path`): it is built by calling it, and
its input shape is given (``input_shape``), not looked up.

``weights`` is a state-dict file (.th/.pt/.pth via ``torch.load(weights_only=True)``, or
.safetensors) or, for torchvision models, a weight enum name such as ``"IMAGENET1K_V1"``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curlprune.channels import ChannelGroup
from curlprune.errors import CurlpruneError
from curlprune.models.import_path import (
    check_input_shape,
    import_build,
    import_input_spec,
    is_import_path,
    reference_to,
    resolve,
)
from curlprune.models.spec import InputSpec
from curlprune.models.weights import load_weights_file

Protect = Callable[[str, nn.Module, Sequence[ChannelGroup]], list[str]]
"""``(arch, model, groups) -> names of the groups protected by default``."""


def no_protection(arch: str, model: nn.Module, groups: Sequence[ChannelGroup]) -> list[str]:
    """The default policy: no group is protected."""
    return []


def classifier_input_groups(model: nn.Module, groups: Sequence[ChannelGroup]) -> list[str]:
    """The prunable groups that feed the model's last ``nn.Linear`` (its classifier).

    Args:
        model: the traced model.
        groups: its channel groups.

    Returns:
        Names of the prunable groups with an ``"in"`` member on the last linear; empty without one.

    Source: docs/method.md §3 (protected groups).
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        return []
    classifier = linears[-1]
    return [g.name for g in groups if g.prunable and any(m.module == classifier and m.role == "in" for m in g.members)]


@dataclass(frozen=True)
class Family:
    """A registered model family: how to list, build and feed its architectures.

    name:        the prefix of its registry names (``"cifar"``).
    archs:       () -> the valid architecture names (may be computed lazily).
    build:       (arch, weights, num_classes, kwargs) -> the model, weights loaded.
    input_spec:  (arch, weights, num_classes) -> the InputSpec.
    protect:     (arch, model, groups) -> groups protected by default (Source: docs/method.md §3).
    names:       how the family's names are written in error messages.
    """

    name: str
    archs: Callable[[], Collection[str]]
    build: Callable[[str, str | None, int | None, dict[str, Any]], nn.Module]
    input_spec: Callable[[str, str | None, int | None], InputSpec]
    names: str
    protect: Protect = no_protection


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (its module calls this when imported).

    Args:
        family: the family; its name must not be registered yet.

    Returns:
        ``family``.

    Raises:
        ValueError: a family of that name is already registered (a programming error).
    """
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def known_names() -> str:
    """Every family's names, for error messages."""
    return ", ".join(f.names for f in _FAMILIES.values()) + ", or a model of your own by import path (mypkg.nets:MyNet, path/to/file.py:build_fn)"


def by_import_path(name: str) -> bool:
    """Whether ``name`` names a model by import path (``MODULE:ATTRIBUTE`` whose prefix is no family)."""
    return is_import_path(name, tuple(_FAMILIES))


@dataclass(frozen=True)
class ModelRef:
    """An architecture reference: registry name + build keyword arguments (JSON-serialisable).

    name:   a registry name, e.g. ``"cifar:resnet56"``, or an import path (``"mypkg.nets:MyNet"``,
            ``"/abs/path/file.py:build_fn"``; :mod:`curlprune.models.import_path`).
    kwargs: keyword arguments of :func:`build` (e.g. ``{"num_classes": 4}``; for an import path,
            the model's own keyword arguments too).

    It is what a curlprune checkpoint's header holds (``model_ref``) and what the pipeline passes
    from one stage to the next with the plan.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: str | Mapping[str, Any] | ModelRef | type | Callable) -> ModelRef:
        """The reference ``value`` names.

        Args:
            value: a registry name or import path, a mapping ``{"name": ..., "kwargs": {...}}`` (kwargs
                optional; the form of a checkpoint header), a ModelRef, or the model's class or build
                function itself (its import path, :func:`curlprune.models.import_path.reference_to`).
        Returns:
            The ModelRef (its ``kwargs`` a copy).
        Raises:
            KeyError: a mapping without ``"name"``.
            CurlpruneError: a class or function no other process could import (``__main__``, local).
        """
        if isinstance(value, str):
            return cls(value, {})
        if isinstance(value, type) or (callable(value) and not isinstance(value, (ModelRef, nn.Module, Mapping))):
            return cls(reference_to(value), {})
        if isinstance(value, Mapping):
            return cls(value["name"], dict(value.get("kwargs", {})))
        return cls(value.name, dict(value.kwargs))

    def as_dict(self) -> dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}`` in that key order: the checkpoint header's form
        (its JSON must stay byte-stable, so the order is fixed here)."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "kwargs": self.kwargs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelRef:
        try:
            data = json.loads(text)
            return cls(name=str(data["name"]), kwargs=dict(data.get("kwargs", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise CurlpruneError(
                f"model reference {text[:80]!r} is not valid ({exc}): expected JSON like "
                '{"name": "cifar:resnet56", "kwargs": {}}'
            ) from None


def check_rebuildable(ref: ModelRef) -> None:
    """Check that ``build(ref.name, **ref.kwargs)`` could find the architecture in a fresh process:
    a known registry name, or an import path whose module imports and has the attribute.

    Raises:
        CurlpruneError: one line naming the unknown name, the module that cannot be imported or the
            missing attribute.
    """
    if by_import_path(ref.name):
        resolve(ref.name)
    else:
        _split_name(ref.name)


def build_from_ref(ref: ModelRef) -> nn.Module:
    """Build the (unweighted) architecture a ModelRef names."""
    return build(ref.name, **ref.kwargs)


def build(name: str, weights: str | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the model called ``name``; load ``weights`` (file or torchvision enum name) if given.

    Args:
        name: a registry name, e.g. ``"cifar:resnet56"`` or ``"torchvision:resnet50"``.
        weights: a state-dict file, or a torchvision weight enum name (``"IMAGENET1K_V1"``).
        num_classes: classifier outputs (default: the family's, 10 for cifar/small, 1000 or the
            weights' categories for torchvision).
        **kwargs: further build options (torchvision models only).

    Returns:
        The model, in train mode (as ``nn.Module`` builds it), with the weights loaded.

    Raises:
        CurlpruneError: unknown name, options the family does not take, weights that are neither a
            file nor a known enum name, unreadable weights or weights that do not fit.
    """
    if by_import_path(name):
        return import_build(name, weights, num_classes, kwargs)
    family, arch = _split_name(name)
    return family.build(arch, weights, num_classes, kwargs)


RANDOM_INIT_SEED = 0
"""The seed of a model built without weights by the commands and the run (:func:`build_reproducible`)."""


def build_reproducible(name: str, weights: str | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """:func:`build`, its random initialisation drawn from a generator seeded with
    :data:`RANDOM_INIT_SEED`: a model without ``weights`` is the same in every process (a rerun, a
    resumed run, a teacher rebuilt after a kill, every torchrun rank). Torch's global generator is
    left as it was.

    Args and Returns: as :func:`build`.

    Raises:
        CurlpruneError: as :func:`build`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build(name, weights, num_classes, **kwargs)


def input_spec(name: str, weights: str | None = None, num_classes: int | None = None, *,
               input_shape: Sequence[int] | None = None, model_kwargs: Mapping[str, Any] | None = None) -> InputSpec:
    """The input the model ``name`` expects (size, normalisation, eval resize, classes).

    Args:
        name: a registry name or an import path.
        weights: as for :func:`build` (torchvision: the enum's preset decides size and normalisation).
        num_classes: overrides the family's number of classes.
        input_shape: ``[C, S, S]``: required for an import path (whose input is not known
            otherwise); a registry model's must equal its own (change the side with ``input_size``).
        model_kwargs: an import-path model's keyword arguments (to find its classes from its output).

    Returns:
        The model's :class:`InputSpec`.

    Raises:
        CurlpruneError: unknown name or unknown torchvision weight name; an import path without an
            input shape; a registry model given another input shape.
    """
    if by_import_path(name):
        return import_input_spec(name, weights, num_classes, input_shape, dict(model_kwargs or {}))
    family, arch = _split_name(name)
    spec = family.input_spec(arch, weights, num_classes)
    if input_shape is not None and check_input_shape(input_shape, name) != [spec.channels, spec.size, spec.size]:
        raise CurlpruneError(f"model {name} takes input [{spec.channels}, {spec.size}, {spec.size}], not {list(input_shape)}: "
                             "input_shape is for models named by import path; change a registry model's side with input_size")
    return spec


def default_protect(name: str, model: nn.Module, groups: Sequence[ChannelGroup]) -> list[str]:
    """The groups the family of ``name`` protects by default (e.g. torchvision ResNets: the
    residual stream feeding the classifier, as CURL keeps ResNet-50's last stage whole).

    Args:
        name: the registry name the model was built from.
        model: the model.
        groups: its channel groups.

    Returns:
        Names of prunable groups to protect (empty for most families).

    Raises:
        CurlpruneError: unknown name.

    Source: docs/method.md §3 (protected groups).
    """
    if by_import_path(name):
        return []
    family, arch = _split_name(name)
    return family.protect(arch, model, groups)


def _split_name(name: str) -> tuple[Family, str]:
    """Validate a registry name and split it into (family, architecture)."""
    prefix, _, arch = name.partition(":")
    family = _FAMILIES.get(prefix)
    if family is None or arch not in family.archs():
        raise CurlpruneError(f"unknown model {name!r}: use one of {known_names()}")
    return family, arch


def looks_like_path(weights: str) -> bool:
    """Weight enum names are identifiers; anything with a separator, suffix or on disk is a file."""
    return Path(weights).exists() or any(ch in weights for ch in "/\\.")


def file_weights_builder(name: str, factory: Callable[[str, int], nn.Module], default_classes: int = 10):
    """A family ``build`` for architectures whose weights are state-dict files only.

    Args:
        name: the family name (for messages).
        factory: ``(arch, num_classes) -> model`` with random weights.
        default_classes: classes when ``num_classes`` is not given.

    Returns:
        ``(arch, weights, num_classes, kwargs) -> model`` that rejects other options and loads
        ``weights`` (a file) strictly.
    """

    def build_model(arch: str, weights: str | None, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
        full = f"{name}:{arch}"
        if kwargs:
            raise CurlpruneError(f"model {full} takes no options {sorted(kwargs)}: only weights and num_classes")
        model = factory(arch, num_classes or default_classes)
        if weights is not None:
            if not looks_like_path(weights):
                raise CurlpruneError(f"weights {weights!r} for {full} is not a file: pass the path to a state-dict file")
            load_weights_file(model, weights, full)
        return model

    return build_model
