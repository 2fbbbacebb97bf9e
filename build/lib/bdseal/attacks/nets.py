"""Building blocks shared by the generator-based attacks (ISSBA, IAB, COMBAT).

- :class:`UNet`: a small size-agnostic U-Net (conv blocks, stride-2 down-sampling, bilinear
  up-sampling with skip connections). ISSBA's StegaStamp encoder, IAB's pattern/mask generators and
  COMBAT's noise generator are all instances (the authors used U-Net / encoder-decoder generators;
  the widths here are configurable and small by default for CPU runs).
- :class:`SecretDecoder`: conv encoder + linear head recovering ISSBA's secret bits.
- :func:`dct_low_pass`: keep the top-left ``ratio`` block of the orthonormal 2-D DCT-II (COMBAT's
  low-pass filter of the generated noise), batched as two matrix products.
- :func:`gaussian_blur`: batched depthwise Gaussian blur (COMBAT's post-transform).
- :func:`gradient_loss`: MSE between the finite-difference image gradients of two batches (the
  edge-preserving "perceptual" term we use for ISSBA since LPIPS weights are not available offline).
- :func:`index_batches`: deterministic mini-batch indices (fresh permutation every pass).
- :func:`cached_state`: ``ctx.cache.get_or_compute`` when a cache is given, else just compute.

No per-sample Python loops: everything works on whole batches on the batch's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU, twice."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """``depth`` down-sampling levels of width ``width * 2**level``; output ``out_ch`` maps at the input
    size (any H, W: up-sampled maps are resized to their skip's size). Raw output (no activation)."""

    def __init__(self, in_ch: int, out_ch: int, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"UNet needs width >= 1 and depth >= 1, got width={width} depth={depth}")
        chs = [width * 2**i for i in range(depth + 1)]
        self.inc = _block(in_ch, chs[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chs[i], chs[i], 3, stride=2, padding=1, bias=False), _block(chs[i], chs[i + 1]))
            for i in range(depth)
        )
        self.up = nn.ModuleList(_block(chs[i + 1] + chs[i], chs[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(chs[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for d in self.down:
            skips.append(d(skips[-1]))
        h = skips.pop()
        for u in self.up:
            s = skips.pop()
            h = F.interpolate(h, size=s.shape[-2:], mode="bilinear", align_corners=False)
            h = u(torch.cat([h, s], dim=1))
        return self.out(h)


class SecretDecoder(nn.Module):
    """Image -> ``bits`` logits: strided conv blocks, global average pool, two linear layers."""

    def __init__(self, in_ch: int, bits: int, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1), nn.ReLU(inplace=True)]
            ch = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(ch * 4, 256), nn.ReLU(inplace=True), nn.Linear(256, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) orthonormal DCT-II matrix D, so that ``D @ v`` is the DCT of v and ``D.T`` inverts it."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def dct_low_pass(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the DCT coefficients of ``x`` (B, C, H, W) with row < ratio·H and column < ratio·W
    (COMBAT's frequency mask), zero the rest, transform back. ``ratio >= 1`` is the identity."""
    if not 0.0 < ratio:
        raise ValueError(f"low-pass ratio must be > 0, got {ratio}")
    if ratio >= 1.0:
        return x
    h, w = x.shape[-2:]
    dh, dw = dct_matrix(h, x.device, x.dtype), dct_matrix(w, x.device, x.dtype)
    coef = dh @ x @ dw.T
    mask = torch.zeros(h, w, device=x.device, dtype=x.dtype)
    mask[: max(1, int(h * ratio)), : max(1, int(w * ratio))] = 1
    return dh.T @ (coef * mask) @ dw


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(r**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = 3) -> torch.Tensor:
    """Separable depthwise Gaussian blur of (B, C, H, W) with reflect padding; ``sigma <= 0`` = identity."""
    if sigma <= 0:
        return x
    c = x.shape[1]
    k = gaussian_kernel(sigma, kernel_size).to(device=x.device, dtype=x.dtype)
    p = kernel_size // 2
    x = F.pad(x, (p, p, p, p), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def gradient_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE between horizontal and vertical finite differences of ``a`` and ``b``."""
    return F.mse_loss(a.diff(dim=-1), b.diff(dim=-1)) + F.mse_loss(a.diff(dim=-2), b.diff(dim=-2))


def index_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of indices into ``range(n)``: consecutive slices of fresh permutations."""
    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + bs]
        pos += bs


def cached_state(ctx: Any, kind: str, parts: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fitted weights from ``ctx.cache`` (keyed by ``parts``) or freshly computed when no cache."""
    cache = getattr(ctx, "cache", None)
    return cache.get_or_compute(kind, parts, compute) if cache is not None else compute()


def to_cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def init_module(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with parameters initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@torch.no_grad()
def batched_eval(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks (bounds memory for large images)."""
    return torch.cat([fn(x[s : s + chunk]) for s in range(0, len(x), chunk)]) if len(x) else x.clone()


def uint8_to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device).float().div_(255)
