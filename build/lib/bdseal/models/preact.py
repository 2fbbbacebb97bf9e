"""PreAct-ResNet-18 (He et al. 2016, identity mappings) in the CIFAR layout used by BackdoorBench.

Stages: ``stem`` (a bare 3x3 conv), ``layer1`` .. ``layer4``. The final BN + ReLU, which a pre-activation
net applies before pooling, is the tail of ``layer4``, so ``layer4`` activations and ``features`` are
post-ReLU like those of an ordinary ResNet.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .base import StagedClassifier


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the shortcut projection (when needed) reads the pre-activated input."""

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != planes:
            self.shortcut = nn.Conv2d(in_ch, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class PreActResNet(StagedClassifier):
    """Pre-activation ResNet with :class:`PreActBlock`; ``width`` = channels of ``layer1``."""

    def __init__(
        self,
        depths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        stages: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        )
        in_ch = width
        for i, depth in enumerate(depths):
            planes = width * 2**i
            blocks: list[nn.Module] = []
            for j in range(depth):
                blocks.append(PreActBlock(in_ch, planes, 2 if (i > 0 and j == 0) else 1))
                in_ch = planes
            if i == len(depths) - 1:
                blocks += [nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)]
            stages[f"layer{i + 1}"] = nn.Sequential(*blocks)
        super().__init__(
            stages,
            feature_dim=in_ch,
            num_classes=num_classes,
            mean=mean,
            std=std,
            in_channels=in_channels,
        )


def preact_resnet18(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 64,
) -> PreActResNet:
    """PreAct-ResNet-18, blocks [2, 2, 2, 2]; feature_dim = 8 * width (512 by default)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, width, mean, std)
