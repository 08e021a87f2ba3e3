"""The ``timm:<name>`` model family: any architecture of ``timm.list_models()`` (optional dependency).

    build("resnet18")                      random weights (``pretrained=False``), nothing downloaded
    build("resnet18", weights="a1_in1k")   timm's published weights of that tag (needs the network)
    build("resnet18", weights="default")   timm's default published weights of the architecture
    build("resnet18", weights="w.pth")     a state-dict file (.pth/.pt/.th/.safetensors)
    input_spec("resnet18", weights=...)    input size, normalisation and eval resize from timm's
                                           pretrained config of those weights (or the default one)

``arch`` is the name without the ``timm:`` prefix. timm is an optional extra
(``pip install curlprune[timm]``); without it every entry point raises a one-line CurlpruneError
that says so.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.models.registry import Family, register_family
from curlprune.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from curlprune.models.weights import load_weights_file

PREFIX = "timm"
INSTALL_HINT = "pip install curlprune[timm]"
_DEFAULT_TAGS = ("default", "pretrained")


def _timm() -> Any:
    """The timm module, or a one-line error saying what to install."""
    try:
        import timm
    except ImportError:
        raise CurlpruneError(f"timm: models need the optional dependency timm, which is not installed: {INSTALL_HINT}") from None
    return timm


def names() -> list[str]:
    """Every architecture timm can build (``timm.list_models()``), sorted."""
    return list(_timm().list_models())


def check_name(arch: str) -> str:
    """``arch`` if timm knows it, else CurlpruneError naming close matches."""
    known = names()
    if arch in known:
        return arch
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f"did you mean {', '.join(f'timm:{c}' for c in close)}?" if close else "list them with timm.list_models()"
    raise CurlpruneError(f"unknown model 'timm:{arch}': timm has no architecture {arch!r}; {hint}")


def _is_path(weights: str) -> bool:
    return Path(weights).exists() or any(ch in weights for ch in "/\\") or weights.endswith(
        (".pth", ".pt", ".th", ".bin", ".safetensors")
    )


def _weight_tags(arch: str) -> list[str]:
    """Tags of timm's published weights for ``arch`` (``resnet18.a1_in1k`` -> ``a1_in1k``)."""
    return [n.partition(".")[2] for n in _timm().list_pretrained(f"{arch}.*")]


def _pretrained_name(arch: str, weights: str) -> str:
    """timm's ``arch.tag`` name for the weights ``weights`` names, checked against the published tags."""
    if weights in _DEFAULT_TAGS:
        return arch
    tags = _weight_tags(arch)
    if weights not in tags:
        raise CurlpruneError(
            f"weights {weights!r} for timm:{arch} is neither a file nor a timm weight tag: pass a state-dict file, "
            f"'default', or one of {tags[:8] or ['(none published)']}"
        )
    return f"{arch}.{weights}"


def build(arch: str, weights: str | None = None, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build ``timm:<arch>``; random weights unless ``weights`` names a file or a timm weight tag.

    Args:
        arch: a name from ``timm.list_models()`` (without the ``timm:`` prefix).
        weights: None (random), a state-dict file, ``"default"`` or a published tag such as ``"a1_in1k"``
            (downloaded by timm from the Hugging Face hub).
        num_classes: classifier outputs (timm's default, usually 1000, when None).
        kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Returns:
        The model (train mode, as timm builds it).

    Raises:
        CurlpruneError: timm missing, unknown architecture or tag, download failure, bad options.
    """
    timm = _timm()
    check_name(arch)
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    from_file = weights is not None and _is_path(weights)
    name = _pretrained_name(arch, weights) if weights is not None and not from_file else arch
    pretrained = weights is not None and not from_file
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise CurlpruneError(f"cannot build timm:{arch} with {kwargs or 'these options'}: {str(exc).splitlines()[0]}") from None
        raise CurlpruneError(
            f"could not download timm weights timm:{name} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
            "check the network, or download the file elsewhere and pass its path as weights"
        ) from None
    except (ValueError, TypeError, AssertionError) as exc:
        raise CurlpruneError(f"cannot build timm:{arch} with {kwargs or 'these options'}: {str(exc).splitlines()[0]}") from None
    if from_file:
        load_weights_file(model, weights, f"timm:{arch}")
    return model


def input_spec(arch: str, weights: str | None = None, num_classes: int | None = None) -> InputSpec:
    """Input recipe of ``timm:<arch>`` from timm's pretrained config (of tag ``weights`` if given).

    size = the config's ``input_size`` height, resize = ``round(size / crop_pct)`` (timm's eval
    recipe: resize the short side, then centre crop ``size``), mean/std as in the config.
    Architectures without a config get the ImageNet recipe (224, resize 256).
    """
    timm = _timm()
    check_name(arch)
    name = arch
    if weights is not None and not _is_path(weights):
        name = _pretrained_name(arch, weights)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return InputSpec(224, 3, IMAGENET_MEAN, IMAGENET_STD, 256, num_classes or 1000)
    channels, size = int(cfg.input_size[0]), int(cfg.input_size[1])
    crop_pct = cfg.crop_pct or 1.0
    return InputSpec(
        size=size,
        channels=channels,
        mean=tuple(float(m) for m in cfg.mean),
        std=tuple(float(s) for s in cfg.std),
        resize=round(size / crop_pct) if crop_pct < 1.0 else None,
        num_classes=num_classes or int(cfg.num_classes or 1000),
    )


TIMM_FAMILY = register_family(Family(
    name=PREFIX,
    archs=names,  # imports timm only when a timm: name is used
    build=lambda arch, weights, num_classes, kwargs: build(arch, weights, num_classes, **kwargs),
    input_spec=input_spec,
    names="timm:<any timm.list_models() name, e.g. resnet18>",
))
