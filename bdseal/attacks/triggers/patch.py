"""Patch triggers: BadNets (Gu et al. 2017).

Defaults follow BackdoorBench (PGBD's setting): a 3x3 checkerboard in the bottom-right
corner of a 32x32 image; the patch is scaled with the image by nearest upsampling (REFERENCE.md).
Presets: GSSD/VIBE use a 2x2 patch at rows/cols 4-5 whose four colours are those of VIBE's trigger
file ``resources/cifar_1.png`` (``pattern: colors``, the 0..255 values written in the preset; REFERENCE.md);
PGRL's "Pattern" is a 6x6 checkerboard of 2x2 cells at rows/cols 22-27.
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


def _check_colors(colors: list, size: int) -> torch.Tensor:
    """(C, size, size) patch in [0, 1] from a size x size x C nested list of 0..255 values."""
    try:
        t = torch.tensor(colors, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise AttackConfigError(f"badnets colors must be a size x size x C list of numbers: {e}") from e
    if t.dim() != 3 or t.shape[0] != size or t.shape[1] != size or t.shape[2] not in (1, 3):
        raise AttackConfigError(f"badnets colors must have shape [{size}, {size}, C] (C = 1 or 3), got {list(t.shape)}")
    if t.min() < 0 or t.max() > 255:
        raise AttackConfigError("badnets colors must be 0..255 values")
    return t.permute(2, 0, 1).div(255)


@register_attack
class BadNets(Attack):
    """Stamp a fixed patch. ``pattern``: ``checkerboard`` | ``white`` | ``random`` (random colours,
    fixed by ``seed``) | ``colors`` (``colors``: size x size x C nested list of 0..255 values, row-major).
    ``size``/``cell`` are in pixels of a 32x32 reference image; ``position`` is ``bottom_right`` |
    ``top_left`` or explicit ``[row, col]`` (reference pixels)."""

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
        colors: list | None = None,
    ) -> None:
        params = {"colors": colors} if colors is not None else {}
        super().__init__(seed, size=size, cell=cell, pattern=pattern, position=position, margin=margin, **params)
        if size < 1:
            raise AttackConfigError(f"badnets patch size must be >= 1, got {size}")
        if pattern not in ("checkerboard", "white", "random", "colors"):
            raise AttackConfigError(f"unknown badnets pattern {pattern!r}; choose checkerboard | white | random | colors")
        self.colors = None if colors is None else _check_colors(colors, size)
        if pattern == "colors" and self.colors is None:
            raise AttackConfigError("badnets pattern 'colors' needs attack.params.colors (size x size x C values 0..255)")
        self.size, self.cell, self.pattern, self.position, self.margin = size, cell, pattern, position, margin
        self.reference_size = reference_size

    def _patch(self, channels: int) -> torch.Tensor:
        """(C, s, s) patch in [0, 1] at the reference scale."""
        if self.pattern == "checkerboard":
            return checkerboard(self.size, self.cell).expand(channels, -1, -1).clone()
        if self.pattern == "white":
            return torch.ones(channels, self.size, self.size)
        if self.pattern == "colors":
            assert self.colors is not None
            if self.colors.shape[0] != channels:
                raise AttackConfigError(f"badnets colors have {self.colors.shape[0]} channels, the images {channels}")
            return self.colors.clone()
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
