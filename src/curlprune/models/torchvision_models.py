"""The ``torchvision:<name>`` family: any torchvision classification model, with its published
weights (enum names such as ``IMAGENET1K_V1``) or a state-dict file.

Default protection: for torchvision ResNets (and the wide and ResNeXt variants) the residual stream
that feeds the classifier, as CURL keeps ResNet-50's last stage (2048 channels) whole
(Source: docs/method.md §3).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights

from curlprune.channels import ChannelGroup
from curlprune.errors import CurlpruneError
from curlprune.models.registry import Family, classifier_input_groups, looks_like_path, register_family
from curlprune.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from curlprune.models.weights import load_weights_file

PROTECT_CLASSIFIER_INPUT = ("resnet", "wide_resnet", "resnext")
"""Architectures (name prefixes) whose classifier-feeding residual stream is protected by default."""


def _names() -> set[str]:
    return set(torchvision.models.list_models(module=torchvision.models))


def _weight_enum(name: str, arch: str, weights: str | None):
    """The torchvision weight enum member ``weights`` names (None: the model's first, original one)."""
    try:
        members = get_model_weights(arch)
    except (ValueError, KeyError):
        members = None
    if weights is None:
        return next(iter(members), None) if members is not None else None
    choices = list(members.__members__) if members is not None else []
    if weights not in choices:
        raise CurlpruneError(
            f"weights {weights!r} for {name} is neither a file nor a torchvision weight name: "
            f"pass a state-dict file or one of {choices or ['(none published)']}"
        )
    return members[weights]


def _build(arch: str, weights: str | None, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    name = f"torchvision:{arch}"
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    enum = None
    if weights is not None and not looks_like_path(weights):
        enum = _weight_enum(name, arch, weights)
    try:
        model = get_model(arch, weights=enum, **kwargs)
    except OSError as exc:  # urllib errors are OSErrors
        raise CurlpruneError(
            f"could not download torchvision weights {name} {weights} ({exc}): check the network, "
            "or download the file elsewhere and pass its path as weights"
        ) from None
    except (ValueError, TypeError) as exc:
        raise CurlpruneError(f"cannot build {name} with {kwargs or 'these options'}: {exc}") from None
    if weights is not None and enum is None:
        load_weights_file(model, weights, name)
    return model


def _input_spec(arch: str, weights: str | None, num_classes: int | None) -> InputSpec:
    enum = _weight_enum(f"torchvision:{arch}", arch, weights if weights and not looks_like_path(weights) else None)
    if enum is None:  # a model without published weights: the common ImageNet recipe
        return InputSpec(224, 3, IMAGENET_MEAN, IMAGENET_STD, 256, num_classes or 1000)
    preset = enum.transforms()
    return InputSpec(
        size=preset.crop_size[0],
        channels=3,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        resize=preset.resize_size[0],
        num_classes=num_classes or len(enum.meta["categories"]),
    )


def _protect(arch: str, model: nn.Module, groups: Sequence[ChannelGroup]) -> list[str]:
    """ResNets (wide, ResNeXt): the stream feeding the classifier; other architectures: nothing."""
    if not arch.startswith(PROTECT_CLASSIFIER_INPUT):
        return []
    return classifier_input_groups(model, groups)


TORCHVISION_FAMILY = register_family(Family(
    name="torchvision",
    archs=_names,
    build=_build,
    input_spec=_input_spec,
    names="torchvision:<classification model, e.g. resnet50>",
    protect=_protect,
))
