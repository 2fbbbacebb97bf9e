"""Freq — the frequency-domain trigger of CTRL (Li et al. 2023, "An embarrassingly simple backdoor
attack on self-supervised learning", ICCV), called "Freq" in the PGRL paper.

Trigger (CTRL's ``PoisonFre`` and PGRL's ``freq_img``, REFERENCE.md): scale the image to 0..255,
convert RGB → YUV (BT.601 analogue: Y = .299R + .587G + .114B, U = −.147R − .289G + .436B,
V = .615R − .515G − .100B, kornia's ``rgb_to_yuv``), take the orthonormal 2-D DCT-II of every
``window``×``window`` block (32), add ``magnitude`` to the coefficients at ``positions`` (15, 15) and
(31, 31) of the U and V channels (``channels`` = [1, 2]), invert the DCT, go back to RGB, divide by
255 and clip to [0, 1]. Images larger than the window are processed block by block exactly as CTRL
does (so 64x64 and 224x224 images get the perturbation in every 32x32 block); a border narrower than
one window (sizes that are not multiples of it) is left untouched. Differences: the DCT is done with
a batched matrix product instead of per-block loops, and YUV → RGB uses the exact inverse matrix
(kornia's inverse uses rounded coefficients), so a zero magnitude is an exact round trip.

Defaults: magnitude 500 on the 0..255 scale (PGRL's ``freq_meg_500``; CTRL's own CIFAR-10 runs use
100–200), clean-label (``default_mode = clean_label``), rate = fraction of the **whole training
set** drawn from the target class (PGRL and CTRL both count ``poison_ratio × N``). For grey images
set ``yuv: false`` and ``channels: [0]``.
"""

from __future__ import annotations


import torch

from bdseal.attacks.base import Attack, register_attack
from bdseal.attacks.nets import dct_matrix
from bdseal.attacks.plan import AttackConfigError

RGB_TO_YUV = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]], dtype=torch.float64
)


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H', W') region made of whole windows -> (B, C, H'/n, n, W'/n, n)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // n, n, w // n, n)


def block_dct(x: torch.Tensor, n: int) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of every n×n block; H and W must be multiples of n."""
    d = dct_matrix(n, device=x.device, dtype=x.dtype)
    return torch.einsum("ki,bcpiqj,lj->bcpkql", d, _blocks(x, n), d).reshape(x.shape)


def block_idct(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``block_dct``."""
    d = dct_matrix(n, device=x.device, dtype=x.dtype)
    return torch.einsum("ki,bcpkql,lj->bcpiqj", d, _blocks(x, n), d).reshape(x.shape)


def rgb_to_yuv(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", RGB_TO_YUV.to(x.dtype).to(x.device), x)


def yuv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    inv = torch.linalg.inv(RGB_TO_YUV)
    return torch.einsum("oc,bchw->bohw", inv.to(x.dtype).to(x.device), x)


@register_attack
class Freq(Attack):
    """CTRL frequency trigger: ``magnitude`` (0..255 scale, default 500), ``window`` (32),
    ``positions`` ([[15, 15], [31, 31]]), ``channels`` ([1, 2] = U, V), ``yuv`` (true)."""

    name = "freq"
    default_mode = "clean_label"
    default_rate_of = "dataset"

    def __init__(
        self,
        seed: int = 0,
        magnitude: float = 500.0,
        window: int = 32,
        positions: list[list[int]] | None = None,
        channels: list[int] | None = None,
        yuv: bool = True,
    ) -> None:
        positions = [[15, 15], [31, 31]] if positions is None else [list(map(int, p)) for p in positions]
        channels = [1, 2] if channels is None else [int(c) for c in channels]
        super().__init__(seed, magnitude=magnitude, window=window, positions=positions, channels=channels, yuv=yuv)
        if int(window) < 1:
            raise AttackConfigError(f"freq window must be >= 1, got {window}")
        for p in positions:
            if len(p) != 2 or not all(0 <= v < int(window) for v in p):
                raise AttackConfigError(f"freq position {p} is outside a {window}x{window} DCT window")
        if not channels:
            raise AttackConfigError("freq needs at least one channel to perturb")
        self.magnitude, self.window = float(magnitude), int(window)
        self.positions, self.channels, self.yuv = positions, channels, bool(yuv)

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        c, h, w = image_shape
        if h < self.window or w < self.window:
            raise AttackConfigError(f"freq window {self.window} does not fit a {h}x{w} image")
        if self.yuv and c != 3:
            raise AttackConfigError(f"freq with yuv=true needs RGB images, got {c} channel(s); use yuv=false channels=[0]")
        if any(not 0 <= ch < c for ch in self.channels):
            raise AttackConfigError(f"freq channels {self.channels} outside the image's {c} channel(s)")

    def coefficient_mask(self, c: int, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(C, H', W') 0/1 map of the DCT coefficients the trigger changes (H', W' = whole windows)."""
        n = self.window
        m = torch.zeros(c, n, n, device=device)
        for ch in self.channels:
            for u, v in self.positions:
                m[ch, u, v] = 1.0
        return m.repeat(1, h // n, w // n)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        self.check_image(tuple(x.shape[1:]))
        b, c, h, w = x.shape
        n = self.window
        hc, wc = h // n * n, w // n * n
        z = x * 255.0
        if self.yuv:
            z = rgb_to_yuv(z)
        region = block_dct(z[:, :, :hc, :wc].contiguous(), n)
        region = region + self.magnitude * self.coefficient_mask(c, hc, wc, x.device).to(x.dtype)
        z = z.clone()
        z[:, :, :hc, :wc] = block_idct(region, n)
        if self.yuv:
            z = yuv_to_rgb(z)
        return (z / 255.0).clamp(0, 1)
