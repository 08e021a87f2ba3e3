"""Model registry: ``build("cifar:resnet56", weights=...)``, ``input_spec(name)``, ``ModelRef``.

Families: ``cifar:resnet20|32|44|56|110|1202`` (option-A CIFAR ResNets), ``torchvision:<name>``
(any torchvision classification model) ``small:resnet-digits`` (a tiny ResNet for 8x8 digits) and ``timm:<name>`` (any
``timm.list_models()`` name; optional dependency, imported only when a timm: name is used).
Each family registers itself when its module is imported (below, in the order of the error
messages); :func:`register_family` adds more.
"""
from curlprune.models.cifar import SmallResNet, ZeroPadShortcut, cifar_resnet
from curlprune.models.registry import (
    Family,
    ModelRef,
    build,
    build_from_ref,
    build_reproducible,
    by_import_path,
    check_rebuildable,
    classifier_input_groups,
    default_protect,
    input_spec,
    register_family,
)
from curlprune.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from curlprune.models.torchvision_models import TORCHVISION_FAMILY
from curlprune.models.small import digits_resnet  # noqa: I001 (after torchvision: registration order)
from curlprune.models.timm_family import TIMM_FAMILY  # noqa: I001 (last: registration order)
from curlprune.models.weights import load_state_strict, load_weights_file, read_state_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Family",
    "InputSpec",
    "ModelRef",
    "SmallResNet",
    "TIMM_FAMILY",
    "TORCHVISION_FAMILY",
    "ZeroPadShortcut",
    "build",
    "build_from_ref",
    "build_reproducible",
    "by_import_path",
    "check_rebuildable",
    "cifar_resnet",
    "classifier_input_groups",
    "default_protect",
    "digits_resnet",
    "input_spec",
    "load_state_strict",
    "load_weights_file",
    "read_state_dict",
    "register_family",
]
