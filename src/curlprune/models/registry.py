"""The model registry: names -> architectures, weights and the input each model expects.

Names have a family prefix:

    cifar:resnet20|32|44|56|110|1202   CIFAR ResNets with option-A shortcuts (models/cifar.py)
    torchvision:<name>                 any torchvision classification model
    small:resnet-digits                a tiny ResNet for 8x8 digits (models/small.py)

``weights`` is a state-dict file (.th/.pt/.pth via ``torch.load(weights_only=True)``, or
.safetensors) or, for torchvision models, a weight enum name such as ``"IMAGENET1K_V1"``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curlprune.errors import CurlpruneError, exception_summary
from curlprune.models.cifar import CIFAR_DEPTHS, cifar_resnet
from curlprune.models.small import DIGITS_MEAN, DIGITS_STD, digits_resnet
from curlprune.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec

SMALL_MODELS = {"resnet-digits": digits_resnet}
KNOWN_NAMES = (
    f"cifar:resnet{{{','.join(map(str, CIFAR_DEPTHS))}}}, torchvision:<classification model, e.g. resnet50>, "
    + ", ".join(f"small:{name}" for name in SMALL_MODELS)
)


@dataclass(frozen=True)
class ModelRef:
    """An architecture reference: registry name + build keyword arguments (JSON-serialisable)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

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


def build_from_ref(ref: ModelRef) -> nn.Module:
    """Build the (unweighted) architecture a ModelRef names."""
    return build(ref.name, **ref.kwargs)


def build(name: str, weights: str | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the model called ``name``; load ``weights`` (file or torchvision enum name) if given."""
    family, arch = _split_name(name)
    if family == "torchvision":
        return _build_torchvision(name, arch, weights, num_classes, kwargs)
    if kwargs:
        raise CurlpruneError(f"model {name} takes no options {sorted(kwargs)}: only weights and num_classes")
    classes = num_classes or 10
    model = cifar_resnet(int(arch.removeprefix("resnet")), classes) if family == "cifar" else SMALL_MODELS[arch](classes)
    if weights is not None:
        if not _looks_like_path(weights):
            raise CurlpruneError(f"weights {weights!r} for {name} is not a file: pass the path to a state-dict file")
        load_weights(model, weights, name)
    return model


def input_spec(name: str, weights: str | None = None, num_classes: int | None = None) -> InputSpec:
    """The input the model ``name`` expects (size, normalisation, eval resize, classes)."""
    family, arch = _split_name(name)
    if family == "cifar":
        return InputSpec(32, 3, IMAGENET_MEAN, IMAGENET_STD, None, num_classes or 10)
    if family == "small":
        return InputSpec(8, 1, DIGITS_MEAN, DIGITS_STD, None, num_classes or 10, flip=False, crop_padding=1)
    enum = _torchvision_weight_enum(name, arch, weights if weights and not _looks_like_path(weights) else None)
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


def _split_name(name: str) -> tuple[str, str]:
    """Validate a registry name and split it into (family, architecture)."""
    family, _, arch = name.partition(":")
    valid = (
        (family == "cifar" and arch in {f"resnet{d}" for d in CIFAR_DEPTHS})
        or (family == "torchvision" and arch in _torchvision_names())
        or (family == "small" and arch in SMALL_MODELS)
    )
    if not valid:
        raise CurlpruneError(f"unknown model {name!r}: use one of {KNOWN_NAMES}")
    return family, arch


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def _torchvision_weight_enum(name: str, arch: str, weights: str | None):
    """The torchvision weight enum member ``weights`` names (None: the model's first, original one)."""
    from torchvision.models import get_model_weights

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


def _build_torchvision(name: str, arch: str, weights: str | None, num_classes: int | None, kwargs: dict) -> nn.Module:
    from torchvision.models import get_model

    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    enum = None
    if weights is not None and not _looks_like_path(weights):
        enum = _torchvision_weight_enum(name, arch, weights)
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
        load_weights(model, weights, name)
    return model


def _looks_like_path(weights: str) -> bool:
    """Weight enum names are identifiers; anything with a separator, suffix or on disk is a file."""
    return Path(weights).exists() or any(ch in weights for ch in "/\\.")


def load_weights(model: nn.Module, path: str | Path, model_name: str) -> nn.Module:
    """Load a state-dict file into ``model`` strictly, with errors that say what does not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    for key, value in own.items():  # files from before BN counted batches lack this buffer
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        examples = ", ".join([f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]])
        raise CurlpruneError(
            f"weights file {path} does not match model {model_name}: {len(missing)} missing keys, "
            f"{len(unexpected)} unexpected keys (e.g. {examples}): pass weights saved from {model_name} "
            "or choose the model they were saved from"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise CurlpruneError(
            f"weights file {path} does not match model {model_name}: {len(wrong)} tensors differ in shape "
            f"(e.g. {k}: file {list(state[k].shape)}, model {list(own[k].shape)}): pass weights saved from "
            f"{model_name} with the same number of classes, or set num_classes to match the file"
        )
    model.load_state_dict(state, strict=True)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a file, unwrapping ``{"state_dict": ...}`` and a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CurlpruneError(f"weights file {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise CurlpruneError(f"weights file {path} is empty (0 bytes): the download or copy did not finish; fetch or save it again")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for damaged or foreign files
            raise CurlpruneError(
                f"weights file {path} cannot be read ({exception_summary(exc)}): "
                "it is truncated, damaged or not a PyTorch state-dict file; download or save it again"
            ) from None
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CurlpruneError(
            f"weights file {path} holds no state dict (a mapping of names to tensors): "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("curlprune_format"):
                raise CurlpruneError(
                    f"{path} is a curlprune checkpoint (architecture + plan + weights), not plain weights: "
                    "load it with curlprune.load(path) or pass it as the checkpoint argument"
                )
            return {k: f.get_tensor(k) for k in f.keys()}
    except CurlpruneError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged headers
        raise CurlpruneError(
            f"weights file {path} cannot be read ({exception_summary(exc)}): it is truncated, damaged or not a safetensors file; save it again"
        ) from None
