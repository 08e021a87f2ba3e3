"""Small-input residual networks: the CIFAR ResNets of He et al. (2016) and their relatives.

The CIFAR ResNets follow akamaster/pytorch_resnet_cifar10 exactly (module names, option-A
shortcuts), so its published checkpoints load strictly. The blocks are torchvision's own
``BasicBlock``; only the stride-2 shortcut differs between the two shortcut kinds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from curlprune.models.registry import Family, file_weights_builder, register_family
from curlprune.models.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channel axis, with no parameters.

    Channel ``j`` of the input continues as channel ``j + planes // 4`` of the output. Written as
    plain tensor ops with Python ints so that torch.fx traces it as ``getitem`` + ``pad``. The zero
    channels added in front and behind (``front``, ``back``; ``pad`` each when built) shrink with a
    plan (:meth:`shrink_channel_pad`), so a pruned copy keeps this class (:mod:`curlprune.surgery.keep_class`).
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4
        self.front = self.back = self.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.front, self.back), "constant", 0)

    def shrink_channel_pad(self, front: int, back: int) -> None:
        """Add ``front`` fewer zero channels before the input's and ``back`` fewer after them (a plan
        removed that many channels of each pad region; the protocol of :mod:`curlprune.surgery.keep_class`)."""
        self.front -= front
        self.back -= back

    def extra_repr(self) -> str:
        return f"pad={self.pad}" if self.front == self.back == self.pad else f"front={self.front}, back={self.back}"


def projection_shortcut(inplanes: int, planes: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: strided 1x1 conv + BN, as in torchvision's ResNets."""
    return nn.Sequential(
        nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(planes),
    )


class SmallResNet(nn.Module):
    """A ResNet for small images: 3x3 stem, stages of BasicBlocks, global pool, ``linear``.

    Stage ``k`` is ``layer{k}``; its first block has stride 2 for every stage after the first.
    ``shortcut`` chooses what a block uses where the shape changes: ``"zero_pad"`` (option A,
    parameter-free) or ``"projection"`` (option B, 1x1 conv + BN).
    """

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        shortcut: str = "zero_pad",
    ) -> None:
        super().__init__()
        if shortcut not in ("zero_pad", "projection"):
            raise ValueError(f"unknown shortcut kind {shortcut!r}; use 'zero_pad' or 'projection'")
        self.shortcut = shortcut
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        for stage, (planes, count) in enumerate(zip(widths, blocks), start=1):
            self.add_module(f"layer{stage}", self._make_layer(planes, count, stride=1 if stage == 1 else 2))
        self.linear = nn.Linear(widths[-1], num_classes)
        self.num_stages = len(widths)
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(count):
            block_stride = stride if i == 0 else 1
            downsample = None
            if block_stride != 1 or self.inplanes != planes:
                if self.shortcut == "zero_pad":
                    downsample = ZeroPadShortcut(planes)
                else:
                    downsample = projection_shortcut(self.inplanes, planes, block_stride)
            layers.append(BasicBlock(self.inplanes, planes, block_stride, downsample))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{stage}")(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def _kaiming_init(module: nn.Module) -> None:
    """He-normal init for conv and linear weights, as in the reference CIFAR ResNets."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


def cifar_resnet(depth: int, num_classes: int = 10) -> SmallResNet:
    """The CIFAR ResNet-``depth`` (6n+2 layers, 16/32/64 channels, option-A shortcuts)."""
    if depth not in CIFAR_DEPTHS:
        raise ValueError(f"CIFAR ResNet depth must be one of {CIFAR_DEPTHS}, got {depth}")
    n = (depth - 2) // 6
    return SmallResNet((16, 32, 64), (n, n, n), in_channels=3, num_classes=num_classes, shortcut="zero_pad")


def _cifar_spec(arch: str, weights: str | None, num_classes: int | None) -> InputSpec:
    return InputSpec(32, 3, IMAGENET_MEAN, IMAGENET_STD, None, num_classes or 10)


CIFAR_FAMILY = register_family(Family(
    name="cifar",
    archs=lambda: {f"resnet{d}" for d in CIFAR_DEPTHS},
    build=file_weights_builder("cifar", lambda arch, classes: cifar_resnet(int(arch.removeprefix("resnet")), classes)),
    input_spec=_cifar_spec,
    names=f"cifar:resnet{{{','.join(map(str, CIFAR_DEPTHS))}}}",
))
