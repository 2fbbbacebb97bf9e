"""Patch triggers: BadNets (Gu et al. 2017).

Defaults follow issue 3 / BackdoorBench (PGBD's setting): a 3x3 checkerboard in the bottom-right
corner of a 32x32 image; the patch is scaled with the image by nearest upsampling (REFERENCE.md).
Presets: GSSD/VIBE use a 2x2 random-colour patch at rows/cols 4-5; PGRL's "Pattern" is a 6x6
checkerboard of 2x2 cells at rows/cols 22-27.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdseal.attacks.base import Attack, register_attack
from bdseal.attacks.plan import AttackConfigError


def checkerboard(size: int, cell: int = 1) -> torch.Tensor:
    """(size, size) 0/1 checkerboard with ``cell``-pixel cells, 1 at the top-left."""
    ij = torch.arange(size) // cell
    return ((ij[:, None] + ij[None, :]) % 2 == 0).float()


@register_attack
class BadNets(Attack):
    """Stamp a fixed patch. ``pattern``: ``checkerboard`` | ``white`` | ``random`` (random colours,
    fixed by ``seed``). ``size``/``cell`` are in pixels of a 32x32 reference image; ``position`` is
    ``bottom_right`` | ``top_left`` or explicit ``[row, col]`` (reference pixels)."""

    name = "badnets"

    def __init__(
        self,
        seed: int = 0,
        size: int = 3,
        cell: int = 1,
        pattern: str = "checkerboard",
        position: str | list[int] = "bottom_right",
        margin: int = 0,
        reference_size: int = 32,
    ) -> None:
        super().__init__(seed, size=size, cell=cell, pattern=pattern, position=position, margin=margin)
        if size < 1:
            raise AttackConfigError(f"badnets patch size must be >= 1, got {size}")
        if pattern not in ("checkerboard", "white", "random"):
            raise AttackConfigError(f"unknown badnets pattern {pattern!r}")
        self.size, self.cell, self.pattern, self.position, self.margin = size, cell, pattern, position, margin
        self.reference_size = reference_size

    def _patch(self, channels: int) -> torch.Tensor:
        """(C, s, s) patch in [0, 1] at the reference scale."""
        if self.pattern == "checkerboard":
            return checkerboard(self.size, self.cell).expand(channels, -1, -1).clone()
        if self.pattern == "white":
            return torch.ones(channels, self.size, self.size)
        g = torch.Generator().manual_seed(self.seed + 7919)
        return torch.rand(channels, self.size, self.size, generator=g)

    def _geometry(self, h: int, w: int) -> tuple[int, int, int]:
        scale = max(1, round(min(h, w) / self.reference_size))
        s = self.size * scale
        if isinstance(self.position, str):
            if self.position == "bottom_right":
                r = c = None
            elif self.position == "top_left":
                r = c = self.margin * scale
            else:
                raise AttackConfigError(f"unknown badnets position {self.position!r}")
            if r is None:
                r, c = h - s - self.margin * scale, w - s - self.margin * scale
        else:
            r, c = int(self.position[0]) * scale, int(self.position[1]) * scale
        return r, c, s

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        _, h, w = image_shape
        r, c, s = self._geometry(h, w)
        if r < 0 or c < 0 or r + s > h or c + s > w:
            raise AttackConfigError(f"badnets patch of {s}px at ({r},{c}) does not fit a {h}x{w} image")

    def mask_and_pattern(self, image_shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H, W) 0/1 mask and (C, H, W) pattern such that x' = (1 − m)·x + m·p."""
        self.check_image(image_shape)
        ch, h, w = image_shape
        r, c, s = self._geometry(h, w)
        patch = F.interpolate(self._patch(ch)[None], size=(s, s), mode="nearest")[0]
        mask = torch.zeros(1, h, w)
        pattern = torch.zeros(ch, h, w)
        mask[:, r : r + s, c : c + s] = 1
        pattern[:, r : r + s, c : c + s] = patch
        return mask.to(device), pattern.to(device)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        mask, pattern = self.mask_and_pattern(tuple(x.shape[1:]), x.device)
        return x * (1 - mask) + pattern * mask
