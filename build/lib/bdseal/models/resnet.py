"""ResNet-18 (CIFAR stem) and ResNet-50 (stem chosen by image size) as :class:`StagedClassifier`.

Stages: ``stem``, ``layer1`` .. ``layer4``; ``layer4`` is the last conv block (post-ReLU feature map).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .base import StagedClassifier


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when shapes agree, else a strided 1x1 conv + BN projection."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def make_cifar_stem(in_channels: int, width: int) -> nn.Sequential:
    """3x3 stride-1 conv, no downsampling (for images < 64 px)."""
    return nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


def make_imagenet_stem(in_channels: int, width: int) -> nn.Sequential:
    """7x7 stride-2 conv + 3x3 stride-2 max-pool (4x downsampling)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


class ResNet(StagedClassifier):
    """Generic ResNet: ``stem`` then four residual stages ``layer1`` .. ``layer4``.

    ``width`` is the number of channels of ``layer1`` (64 for the standard nets); later stages double
    it. ``imagenet_stem`` picks the 7x7/stride-2 + max-pool stem instead of the CIFAR 3x3 stem.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        imagenet_stem: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        make_stem = make_imagenet_stem if imagenet_stem else make_cifar_stem
        stem = make_stem(in_channels, width)
        stages: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        in_ch = width
        for i, depth in enumerate(depths):
            planes = width * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, planes, stride))
                in_ch = planes * block.expansion
            stages[f"layer{i + 1}"] = nn.Sequential(*blocks)
        super().__init__(
            stages,
            feature_dim=in_ch,
            num_classes=num_classes,
            mean=mean,
            std=std,
            in_channels=in_channels,
        )


def resnet18(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 64,
) -> ResNet:
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool); feature_dim = 8 * width (512 by default)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width, False, mean, std)


def resnet50(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 64,
) -> ResNet:
    """ResNet-50; ImageNet stem for images >= 64 px, else CIFAR stem. feature_dim = 32 * width (2048)."""
    return ResNet(
        Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width, image_size >= 64, mean, std
    )
