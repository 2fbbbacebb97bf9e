"""A fast airbench-style CNN for CPU runs.

``stem`` (conv3x3-BN-act) then three blocks ``block1`` .. ``block3``, each
conv3x3 -> max-pool 2x2 -> BN -> act -> conv3x3 -> BN -> act. Pooling right after the first conv (as in
airbench) makes the second conv four times cheaper than pooling at the end. Every pool uses
``ceil_mode`` so any input size >= 1 works (>= 8 keeps every map at least 1x1 without padding effects).
The final feature map is pooled globally (max by default, as in airbench) to a ``widths[-1]`` vector.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from bdseal.errors import ConfigError

from .base import StagedClassifier

Activation = Literal["gelu", "relu"]


def _act(name: Activation) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ConfigError(f"unknown activation {name!r}; use 'gelu' or 'relu'")


def conv_bn_act(in_ch: int, out_ch: int, act: Activation) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), _act(act)]


class SmallBlock(nn.Sequential):
    """conv -> max-pool -> BN -> act -> conv -> BN -> act (halves the spatial size)."""

    def __init__(self, in_ch: int, out_ch: int, act: Activation = "gelu") -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.BatchNorm2d(out_ch),
            _act(act),
            *conv_bn_act(out_ch, out_ch, act),
        )


class SmallCNN(StagedClassifier):
    """Stem + three :class:`SmallBlock` stages; feature_dim = ``widths[-1]``.

    ``stem_width`` defaults to ``widths[0] // 2``; ``global_pool`` is ``"max"`` or ``"avg"``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        stem_width: int | None = None,
        act: Activation = "gelu",
        global_pool: Literal["max", "avg"] = "max",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if len(widths) != 3:
            raise ValueError(f"SmallCNN needs three block widths, got {tuple(widths)}")
        stem_ch = stem_width if stem_width is not None else max(8, widths[0] // 2)
        stages: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Sequential(*conv_bn_act(in_channels, stem_ch, act))
        )
        in_ch = stem_ch
        for i, w in enumerate(widths):
            stages[f"block{i + 1}"] = SmallBlock(in_ch, w, act)
            in_ch = w
        if global_pool == "max":
            pool: nn.Module = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        elif global_pool == "avg":
            pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            raise ConfigError(f"unknown global_pool {global_pool!r}; use 'max' or 'avg'")
        super().__init__(
            stages,
            feature_dim=in_ch,
            num_classes=num_classes,
            mean=mean,
            std=std,
            in_channels=in_channels,
            pool=pool,
        )


def small(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> SmallCNN:
    """Widths (64, 256, 256) unless ``widths`` is given; feature_dim 256."""
    kwargs.setdefault("widths", (64, 256, 256))
    return SmallCNN(num_classes, in_channels, mean=mean, std=std, **kwargs)


def small_half(
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> SmallCNN:
    """Half-width variant, widths (32, 128, 128); feature_dim 128."""
    kwargs.setdefault("widths", (32, 128, 128))
    return SmallCNN(num_classes, in_channels, mean=mean, std=std, **kwargs)
