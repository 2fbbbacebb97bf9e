"""DenseNet-121, CIFAR variant (3x3 stem, no initial downsampling), growth rate 32, blocks [6, 12, 24, 16].

Stages: ``stem``, ``dense1`` .. ``dense4``. ``dense1``-``dense3`` end with a transition (BN-ReLU-1x1 conv
halving channels, 2x2 average pool); ``dense4`` ends with BN + ReLU so ``features`` are post-ReLU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .base import StagedClassifier


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (to ``bn_size * growth``) then BN-ReLU-conv3x3 (to ``growth``); output is the
    input concatenated with the ``growth`` new channels."""

    def __init__(self, in_ch: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        mid = bn_size * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def transition(in_ch: int, out_ch: int) -> nn.Sequential:
    """BN-ReLU-conv1x1 channel compression followed by 2x2 average pooling."""
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.AvgPool2d(2, ceil_mode=True),
    )


class DenseNet(StagedClassifier):
    """CIFAR DenseNet-BC: ``stem`` conv to ``2 * growth`` channels, then dense blocks with transitions
    (compression ``reduction``)."""

    def __init__(
        self,
        block_sizes: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        growth: int = 32,
        reduction: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        ch = 2 * growth
        stages: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        )
        for i, n_layers in enumerate(block_sizes):
            layers: list[nn.Module] = []
            for _ in range(n_layers):
                layers.append(DenseLayer(ch, growth))
                ch += growth
            if i < len(block_sizes) - 1:
                out_ch = int(ch * reduction)
                layers.append(transition(ch, out_ch))
                ch = out_ch
            else:
                layers += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            stages[f"dense{i + 1}"] = nn.Sequential(*layers)
        super().__init__(
            stages,
            feature_dim=ch,
            num_classes=num_classes,
            mean=mean,
            std=std,
            in_channels=in_channels,
        )


def densenet121(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    growth: int = 32,
) -> DenseNet:
    """DenseNet-121 (CIFAR stem); feature_dim 1024 at growth 32."""
    return DenseNet((6, 12, 24, 16), num_classes, in_channels, growth, 0.5, mean, std)
