"""Model registry: ``build("cifar:resnet56", weights=...)``, ``input_spec(name)``, ``ModelRef``.

Families: ``cifar:resnet20|32|44|56|110|1202`` (option-A CIFAR ResNets), ``torchvision:<name>``
(any torchvision classification model) and ``small:resnet-digits`` (a tiny ResNet for 8x8 digits).
"""
from curlprune.models.cifar import SmallResNet, ZeroPadShortcut, cifar_resnet
from curlprune.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    ModelRef,
    build,
    build_from_ref,
    input_spec,
    load_weights,
    read_state_dict,
)
from curlprune.models.small import digits_resnet, train_digits_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputSpec",
    "ModelRef",
    "SmallResNet",
    "ZeroPadShortcut",
    "build",
    "build_from_ref",
    "cifar_resnet",
    "digits_resnet",
    "input_spec",
    "load_weights",
    "read_state_dict",
    "train_digits_model",
]
