"""Transfer a pretrained model to a dataset of another domain: a new classifier, another input size.

``replace_classifier`` finds a model's final ``nn.Linear`` generically (the Linear whose output
is the model's output: ``linear`` of the CIFAR ResNets and the digits model, ``fc`` of torchvision
ResNets, ``classifier.1`` of MobileNetV2, ...) and puts a freshly initialised one with the new
number of outputs in its place. ``at_input_size`` gives a model's :class:`InputSpec` at another
input side (the CIFAR ResNets and the digits model pool globally, so they run at any size).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from curlprune.errors import CurlpruneError
from curlprune.models.registry import build, build_reproducible, by_import_path, input_spec, looks_like_path
from curlprune.models.spec import InputSpec
from curlprune.models.weights import read_state_dict


def find_classifier(model: nn.Module, example: torch.Tensor) -> str:
    """The qualified name of the ``nn.Linear`` that produces ``model``'s output.

    Args:
        model: any module (also a pruned ``torch.fx.GraphModule``).
        example: one input batch, e.g. ``torch.zeros(1, C, S, S)``; the model runs once on it in
            eval mode (restored after).
    Returns:
        The name (``model.get_submodule(name)`` is the Linear).
    Raises:
        CurlpruneError: no Linear's output is the model's output (e.g. a convolutional classifier
            such as SqueezeNet's).

    Source: docs/method.md §4 (transfer to a new dataset).
    """
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            result = model(example.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    for name, out in outputs.items():
        if out is result:
            return name
    raise CurlpruneError(
        f"found no nn.Linear whose output is the model's output ({len(outputs)} Linear layers ran): "
        "the classifier cannot be replaced automatically; give the model a final nn.Linear"
    )


def replace_classifier(model: nn.Module, num_classes: int, example: torch.Tensor, *, seed: int = 0) -> str:
    """Replace the final Linear of ``model`` (in place) by a new one with ``num_classes`` outputs.

    Args:
        model: the pretrained model; every other parameter is kept as it is.
        num_classes: outputs of the new classifier (the target data's classes).
        example: one input batch ``[1, C, S, S]`` used to find the classifier (:func:`find_classifier`).
        seed: the new layer is initialised like a fresh ``nn.Linear`` (uniform, PyTorch's
            default) from this seed, without touching the global random state.
    Returns:
        The classifier's qualified name (its parameters are ``<name>.weight`` / ``<name>.bias``).
    Raises:
        CurlpruneError: ``num_classes < 1`` or a model without a final Linear.

    Source: docs/method.md §4 (transfer to a new dataset).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CurlpruneError(f"num_classes must be a positive whole number (got {num_classes!r})")
    name = find_classifier(model, example)
    old = model.get_submodule(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return name


def at_input_size(spec: InputSpec, size: int | None) -> InputSpec:
    """``spec`` for square inputs of side ``size`` (None: ``spec`` unchanged).

    The eval resize (short side before the centre crop) and the zero padding of the small-input
    random crop scale with the size (ResNet-50's 256 -> 224 becomes 183 -> 160 at 160 px; CIFAR's
    4 px padding at 32 px becomes 8 px at 64 px). Small-input models without an eval resize get
    ``resize = size``, so images of any size (e.g. 96 px photos) have their short side resized to
    the input size (see ``curlprune.data.transforms.build_transform``).

    Args:
        spec: the model's input recipe at its default size.
        size: the new square input side in pixels, or None.
    Returns:
        The :class:`InputSpec` at ``size``.
    Raises:
        CurlpruneError: a size below 8 or not a whole number.

    Source: docs/method.md §4 (transforms).
    """
    if size is None:
        return spec
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise CurlpruneError(f"input_size must be a whole number of pixels, at least 8 (got {size!r})")
    scale = size / spec.size
    resize = round(spec.resize * scale) if spec.resize else size
    return dataclasses.replace(spec, size=size, resize=resize, crop_padding=max(1, round(spec.crop_padding * scale)))


def weights_classes(name: str, weights: str | None, num_classes: int | None = None, *,
                    input_shape: list[int] | None = None, model_kwargs: dict | None = None) -> int:
    """Number of classes the pretrained ``weights`` of model ``name`` hold (their classifier's width).

    The model is built once without weights to find the classifier's name; the width is read
    from the file's ``<classifier>.weight``.

    Args:
        name: registry name, e.g. ``cifar:resnet56``.
        weights: a state-dict file, a torchvision weight name, or None (an untrained model).
        num_classes: the classes of an untrained model (None: the model's default).
        input_shape, model_kwargs: an import-path model's input ``[C, S, S]`` (required for one) and
            keyword arguments.
    Returns:
        The number of classes; a file without that key gives the model's default (loading it
        then fails with the loader's own message).
    Raises:
        CurlpruneError: an unknown model name or an unreadable weights file.
    """
    kwargs = dict(model_kwargs or {})
    if weights is None:
        return num_classes or input_spec(name, input_shape=input_shape, model_kwargs=kwargs).num_classes
    own = by_import_path(name)  # its spec's classes come from its output with the weights loaded: not asked for here
    spec = input_spec(name, None if own else weights, 1 if own else None, input_shape=input_shape, model_kwargs=kwargs)
    if not own and not looks_like_path(weights):  # a torchvision weight name: its published categories
        return spec.num_classes
    model = build(name, **kwargs)
    key = find_classifier(model, torch.zeros(1, spec.channels, spec.size, spec.size)) + ".weight"
    state = read_state_dict(weights)
    if key in state:
        return int(state[key].shape[0])
    return input_spec(name, input_shape=input_shape, model_kwargs=kwargs).num_classes if own else spec.num_classes


def build_with_new_head(name: str, weights: str | None, num_classes: int, example: torch.Tensor, *, seed: int = 0,
                        input_shape: list[int] | None = None, model_kwargs: dict | None = None) -> tuple[nn.Module, str]:
    """The pretrained model ``name`` + ``weights`` with a new classifier of ``num_classes`` outputs.

    The model is built with the classes its weights hold (:func:`weights_classes`), loaded
    strictly, and its final Linear replaced (:func:`replace_classifier`, seeded by ``seed``).

    Args:
        name: registry name; weights: its pretrained weights (file or torchvision weight name).
        num_classes: outputs of the new classifier; example: one input batch ``[1, C, S, S]``.
        seed: seed of the new classifier's initialisation.
        input_shape, model_kwargs: an import-path model's input ``[C, S, S]`` and keyword arguments.
    Returns:
        ``(model in eval mode, the classifier's qualified name)``.
    Raises:
        CurlpruneError: see :func:`weights_classes` and :func:`replace_classifier`.

    Source: docs/method.md §4 (transfer to a new dataset).
    """
    source = weights_classes(name, weights, input_shape=input_shape, model_kwargs=model_kwargs)
    model = build_reproducible(name, weights=weights, num_classes=source, **(model_kwargs or {})).eval()
    return model, replace_classifier(model, num_classes, example, seed=seed)
