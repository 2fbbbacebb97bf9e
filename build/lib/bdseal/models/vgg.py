"""VGG-16 with batch norm for 32x32 inputs (CIFAR layout: one linear classifier on a 512-d vector).

Stages ``block1`` .. ``block5``, each a run of conv3x3-BN-ReLU layers closed by a 2x2 max-pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from .base import StagedClassifier

VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGG(StagedClassifier):
    """VGG-BN from per-block channel lists; ``width_mult`` scales every width (1.0 = standard)."""

    def __init__(
        self,
        blocks: Sequence[Sequence[int]],
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = in_channels
        for i, widths in enumerate(blocks):
            layers: list[nn.Module] = []
            for w in widths:
                out_ch = max(1, round(w * width_mult))
                layers += [
                    nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                ]
                in_ch = out_ch
            # ceil_mode keeps inputs smaller than 32 px (down to 1x1 maps) valid.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            stages[f"block{i + 1}"] = nn.Sequential(*layers)
        super().__init__(
            stages,
            feature_dim=in_ch,
            num_classes=num_classes,
            mean=mean,
            std=std,
            in_channels=in_channels,
        )


def vgg16(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width_mult: float = 1.0,
) -> VGG:
    """VGG-16-BN; feature_dim 512 (at ``width_mult=1``), global average pool over the final map."""
    return VGG(VGG16_BLOCKS, num_classes, in_channels, width_mult, mean, std)
