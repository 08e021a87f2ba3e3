"""A tiny residual CNN for the 8x8 scikit-learn digits: the demo model and test subject.

Stem conv 1->16, stage 1: two 16-channel BasicBlocks, stage 2: two 32-channel BasicBlocks
(stride 2, 1x1 conv + BN projection shortcut), global average pool, ``linear`` 32->10. It has
both kinds of residual streams a pruner must follow (identity and projection) and trains in
seconds on a CPU.
"""
from __future__ import annotations

from curlprune.models.cifar import SmallResNet
from curlprune.models.registry import Family, file_weights_builder, register_family
from curlprune.models.spec import InputSpec

# Mean and std of all pixels of sklearn's digits scaled to [0, 1].
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3759,)


def digits_resnet(num_classes: int = 10) -> SmallResNet:
    """The ``small:resnet-digits`` architecture (random weights)."""
    return SmallResNet((16, 32), (2, 2), in_channels=1, num_classes=num_classes, shortcut="projection")


SMALL_MODELS = {"resnet-digits": digits_resnet}


def _small_spec(arch: str, weights: str | None, num_classes: int | None) -> InputSpec:
    return InputSpec(8, 1, DIGITS_MEAN, DIGITS_STD, None, num_classes or 10, flip=False, crop_padding=1)


SMALL_FAMILY = register_family(Family(
    name="small",
    archs=lambda: SMALL_MODELS,
    build=file_weights_builder("small", lambda arch, classes: SMALL_MODELS[arch](classes)),
    input_spec=_small_spec,
    names=", ".join(f"small:{name}" for name in SMALL_MODELS),
))
