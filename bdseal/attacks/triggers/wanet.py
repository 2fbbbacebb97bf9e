"""WaNet (Nguyen & Tran 2021, "WaNet — imperceptible warping-based backdoor attack", ICLR).

Trigger: a fixed smooth warp. A k×k control grid of random displacements in [−1, 1] is normalised
by its mean absolute value and upsampled (bicubic, align_corners) to the image size, giving the
noise field P; the sampling grid is clamp((identity + s·P / size)·grid_rescale, −1, 1) and
x' = grid_sample(x, grid, bilinear, align_corners=True). Defaults (WaNet paper,
BackdoorBench): k = 4, s = 0.5, grid_rescale = 1. The control grid is drawn **once** from the attack
seed, so the training and test triggers are the same warp (REFERENCE.md: the official code redraws
it per dataset copy; we do not). The x displacement is divided by W and the y displacement by H (the
official code divides both by the height; identical for square images).

"Noise mode" (WaNet's cross samples, ``noise: true``): cover samples are warped with the same grid
plus a per-sample random grid uniform in [−1, 1]/size and keep their labels. The cross ratio of the
paper (ρ_n = 2·ρ_a) is the ``cross_ratio`` parameter (default 2): when the config's ``cover_rate`` is
null, ``default_cover_rate(rate)`` = ``cross_ratio`` × rate (0 without noise mode), so changing
``attack.rate`` keeps the ratio; an explicit ``cover_rate`` wins (PGRL preset: ``cross_ratio`` 1,
covers = poison count, REFERENCE.md "Attacks"). Covers come from any class by default;
``cover_pool: source`` draws them from the non-target classes, as PGRL's code does (``pgrl/wanet``). The cross noise is drawn from (seed, sample index), so it is the same
for a sample whatever batch it is in. The original attack redraws poison and cross samples each
batch because the attacker trains the model; here the poisoned set is fixed (data poisoning).
Rate: fraction of the **whole training set**, victims from non-target classes (poisoned-label).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdseal.attacks.base import Attack, register_attack
from bdseal.attacks.patterns import hash_uniform
from bdseal.attacks.plan import AttackConfigError

_NOISE_CHUNK = 1 << 22  # values of cross noise generated at once


@register_attack
class WaNet(Attack):
    """Warping trigger: ``k`` (control grid size, 4), ``s`` (strength, 0.5), ``grid_rescale`` (1),
    ``noise`` (noise-mode cover samples, true), ``cross_ratio`` (cover rate / poison rate when
    ``cover_rate`` is null, 2), ``cover_pool`` (``any``; PGRL: ``source`` = non-target classes)."""

    name = "wanet"

    def __init__(self, seed: int = 0, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, noise: bool = True,
                 cross_ratio: float = 2.0, cover_pool: str = "any") -> None:
        super().__init__(seed, k=k, s=s, grid_rescale=grid_rescale, noise=noise, cross_ratio=cross_ratio)
        self.set_cover_pool(cover_pool)
        if float(cross_ratio) < 0:
            raise AttackConfigError(f"wanet cross_ratio must be >= 0, got {cross_ratio}")
        self.cross_ratio = float(cross_ratio)
        if int(k) < 2:
            raise AttackConfigError(f"wanet k must be >= 2 (control grid k x k), got {k}")
        if float(s) < 0:
            raise AttackConfigError(f"wanet s must be >= 0, got {s}")
        if float(grid_rescale) <= 0:
            raise AttackConfigError(f"wanet grid_rescale must be > 0, got {grid_rescale}")
        self.k, self.s, self.grid_rescale, self.noise = int(k), float(s), float(grid_rescale), bool(noise)
        g = torch.Generator().manual_seed(int(seed) + 4099)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        self.control = ins / ins.abs().mean()  # (1, 2, k, k), drawn once from the seed
        self._cache: dict = {}

    def default_cover_rate(self, rate: float) -> float | None:
        """Noise mode: ``cross_ratio`` × rate cross samples (WaNet paper ρ_n = 2·ρ_a); none without it."""
        return self.cross_ratio * rate if self.noise else None

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        _, h, w = image_shape
        if h < 2 or w < 2:
            raise AttackConfigError(f"wanet needs images of at least 2x2 pixels, got {h}x{w}")

    def noise_field(self, h: int, w: int) -> torch.Tensor:
        """(1, H, W, 2) upsampled control grid P (x, y order as grid_sample expects)."""
        return F.interpolate(self.control, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)

    @staticmethod
    def identity_grid(h: int, w: int) -> torch.Tensor:
        """(1, H, W, 2) grid that makes grid_sample(align_corners=True) the identity."""
        ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([xx, yy], dim=-1)[None]

    def warp_grid(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, H, W, 2) sampling grid of the trigger."""
        key = (h, w, str(device))
        if key not in self._cache:
            scale = torch.tensor([w, h], dtype=torch.float32)
            grid = (self.identity_grid(h, w) + self.s * self.noise_field(h, w) / scale) * self.grid_rescale
            self._cache[key] = grid.clamp(-1, 1).to(device)
        return self._cache[key]

    def cross_noise(self, index: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, H, W, 2) per-sample cross noise, uniform in [−1, 1) / size, keyed by (seed, index)."""
        scale = torch.tensor([w, h], dtype=torch.float32, device=index.device)
        per = max(1, _NOISE_CHUNK // (h * w * 2))
        parts = [hash_uniform(self.seed + 1, index[i : i + per], h * w * 2) for i in range(0, len(index), per)]
        u = torch.cat(parts).view(len(index), h, w, 2)
        return (u * 2 - 1) / scale

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        grid = self.warp_grid(h, w, x.device).to(x.dtype).expand(b, -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply_cover(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Noise mode: the trigger warp plus per-sample random noise (labels kept)."""
        if not self.noise:
            return self.apply(x, phase="train", index=index)
        if index is None:
            raise AttackConfigError("wanet noise-mode cover samples need their training indices")
        b, _, h, w = x.shape
        grid = self.warp_grid(h, w, x.device).to(x.dtype) + self.cross_noise(index.to(x.device), h, w).to(x.dtype)
        return F.grid_sample(x, grid.clamp(-1, 1), mode="bilinear", padding_mode="zeros", align_corners=True)
