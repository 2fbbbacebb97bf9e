"""Base class of every classifier: normalise -> named stages -> pool -> features -> head.

Every model takes float images in [0, 1] of shape (B, C, H, W) and normalises them itself, so attacks,
trigger inversion (Neural Cleanse) and PGD all work in pixel space. Named stages give activation-space
defenses (PGBD, NAD) intermediate activations without forward hooks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class StagedClassifier(nn.Module):
    """``stages`` (ordered, named) map images to a feature map or vector; ``pool`` flattens it to the
    penultimate embedding of size ``feature_dim``; ``head`` is the linear classifier."""

    def __init__(
        self,
        stages: "OrderedDict[str, nn.Module]",
        feature_dim: int,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pool: nn.Module | None = None,
        in_channels: int = 3,
    ) -> None:
        """``mean``/``std`` default to 0.5 / 0.25 per channel ([0, 1] -> [-2, 2])."""
        super().__init__()
        self.normalize = Normalize(mean if mean is not None else (0.5,) * in_channels,
                                   std if std is not None else (0.25,) * in_channels)
        self.stages = nn.ModuleDict(stages)
        self.pool = pool if pool is not None else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def layer_names(self) -> list[str]:
        return list(self.stages.keys())

    def forward_with(
        self, x: torch.Tensor, layers: Sequence[str] = ()
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the outputs of the named layers.

        A name is a stage (``"layer4"``) or the dotted path of any submodule (``"stages.layer4.1.conv2"``,
        as in ``named_modules()``); submodule outputs are captured with temporary forward hooks, so they
        stay in the autograd graph (PGBD differentiates through the raw last-conv output, REFERENCE)."""
        stage_names = set(self.stages.keys())
        modules = {n: self._submodule(n) for n in layers if n not in stage_names}  # path lookups, no full walk
        unknown = [n for n, m in modules.items() if m is None]
        if unknown:
            raise KeyError(f"unknown layer(s) {sorted(unknown)}; this model has stages {self.layer_names} "
                           f"or submodules such as {self.last_conv_name()!r}")
        acts: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_hook(self._capture(acts, n)) for n, m in modules.items()]
        try:
            h = self.normalize(x)
            for name, stage in self.stages.items():
                h = stage(h)
                if name in layers:
                    acts[name] = h
            logits = self.head(self.pool(h))
        finally:
            for handle in handles:
                handle.remove()
        return logits, acts

    @staticmethod
    def _capture(store: dict[str, torch.Tensor], name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            store[name] = output
        return hook

    def _submodule(self, name: str) -> nn.Module | None:
        """The submodule at dotted path ``name`` (as in ``named_modules()``), or None."""
        if not name:
            return None
        try:
            return self.get_submodule(name)
        except AttributeError:
            return None

    def last_conv_name(self) -> str:
        """Dotted path of the last ``nn.Conv2d`` inside the stages (PGBD's layer: REFERENCE "last conv of
        the last block", PreAct-RN18 ``layer4.1.conv2``)."""
        convs = [n for n, m in self.named_modules() if n.startswith("stages.") and isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"{type(self).__name__} has no Conv2d in its stages")
        return convs[-1]

    def forward_from(self, h: torch.Tensor, layer: str) -> torch.Tensor:
        """Logits from the output ``h`` of stage ``layer`` (runs the remaining stages, pool and head)."""
        names = self.layer_names
        if layer not in names:
            raise KeyError(f"unknown layer {layer!r}; this model has {names}")
        for name in names[names.index(layer) + 1 :]:
            h = self.stages[name](h)
        return self.head(self.pool(h))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (B, feature_dim)."""
        h = self.normalize(x)
        for stage in self.stages.values():
            h = stage(h)
        return self.pool(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
