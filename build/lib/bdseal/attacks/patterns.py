"""Deterministic trigger patterns and per-sample randomness for the non-learned attacks.

No image is downloaded: the built-in patterns are drawn procedurally at any resolution, so the same
pattern exists at 32x32, 64x64 and 224x224 (and in grey for 1-channel data).

- ``kitty``: a Hello-Kitty-like cartoon (white cat head, ears, black eyes, yellow nose, red bow on a
  pink background) with anti-aliased edges — our stand-in for the ``hello_kitty`` image of Blend
  (Chen et al. 2017; BackdoorBench, the Adap-Blend toolbox and PGRL all blend that picture). It is
  smooth, colourful and covers the whole image like the original, but it is not the same picture.
- ``noise``: uniform random pixels drawn from the attack seed (Chen et al.'s random-noise pattern).
- any other string is read as an image path (PIL, resized bilinearly to the data's size).

``adaptive_patch_triggers`` draws the four Adap-Patch training triggers (see ``triggers/adaptive.py``).

``hash_uniform`` gives counter-based uniform numbers keyed by (seed, sample index, position): per-sample
randomness that is batched, device-agnostic and identical for a sample whatever batch it falls in.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from bdseal.attacks.plan import AttackConfigError

BUILTIN_PATTERNS = ("kitty", "noise")
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# counter-based hashing: per-sample deterministic randomness without Python loops
# ---------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding 32-bit values, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xor-shift / multiply rounds) on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(seed: int, index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float32 uniforms in [0, 1) that depend only on (seed, index[b], j): the numbers of a
    sample do not depend on the batch it is in, the device, or the other samples."""
    index = index.to(torch.int64)
    s = _mix32(torch.tensor(int(seed) & _MASK32, dtype=torch.int64, device=index.device))
    i = _mix32(_mix32(index ^ s) + 0x2545F491)
    j = torch.arange(1, n + 1, dtype=torch.int64, device=index.device)
    h = _mix32(i[:, None] ^ _mul32(j, 0x9E3779B9)[None, :])
    h = _mix32(h ^ s)
    return (h >> 8).to(torch.float32) / float(1 << 24)


# ---------------------------------------------------------------------------------------------
# the Hello-Kitty-like cartoon
# ---------------------------------------------------------------------------------------------


def _soft(d: torch.Tensor, px: float) -> torch.Tensor:
    """Anti-aliased inside indicator of a signed distance ``d`` (< 0 inside), one pixel wide."""
    return torch.sigmoid(-d / (0.5 * px))


def _ellipse(u: torch.Tensor, v: torch.Tensor, cu: float, cv: float, ru: float, rv: float) -> torch.Tensor:
    """Approximate signed distance to an axis-aligned ellipse (normalised coordinates)."""
    r = torch.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
    return (r - 1.0) * min(ru, rv)


def _over(img: torch.Tensor, colour: tuple[float, float, float], alpha: torch.Tensor) -> torch.Tensor:
    c = torch.tensor(colour, dtype=img.dtype)[:, None, None]
    return img * (1 - alpha) + c * alpha


def kitty(h: int, w: int) -> torch.Tensor:
    """(3, h, w) Hello-Kitty-like cartoon in [0, 1], identical (up to sampling) at every resolution."""
    v, u = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    px = 1.0 / min(h, w)
    img = torch.stack([0.98 - 0.10 * v, 0.70 + 0.12 * u, 0.82 + 0.08 * (1 - u)])  # pink gradient
    outline = (0.15, 0.12, 0.12)
    line = 0.03
    for cu in (0.24, 0.76):  # ears behind the head
        d = _ellipse(u, v, cu, 0.28, 0.13, 0.15)
        img = _over(img, outline, _soft(d - line, px))
        img = _over(img, (1.0, 1.0, 1.0), _soft(d, px))
    head = _ellipse(u, v, 0.5, 0.56, 0.38, 0.30)
    img = _over(img, outline, _soft(head - line, px))
    img = _over(img, (1.0, 1.0, 1.0), _soft(head, px))
    for cu in (0.37, 0.63):  # eyes
        img = _over(img, (0.05, 0.05, 0.05), _soft(_ellipse(u, v, cu, 0.57, 0.035, 0.055), px))
    img = _over(img, (0.98, 0.80, 0.10), _soft(_ellipse(u, v, 0.5, 0.66, 0.04, 0.028), px))  # nose
    for side in (-1.0, 1.0):  # whiskers: thin slanted bars on both cheeks
        for k, slope in enumerate((-0.25, 0.0, 0.25)):
            cu = 0.5 + side * 0.26
            cv = 0.66 + 0.05 * (k - 1)
            dist = ((v - cv) - side * slope * (u - cu)).abs() / math.sqrt(1 + slope**2) - 0.006
            span = (u - cu).abs() - 0.09
            img = _over(img, outline, _soft(torch.maximum(dist, span), px))
    for cu, cv in ((0.70, 0.24), (0.86, 0.33)):  # red bow by the right ear
        img = _over(img, (0.85, 0.08, 0.15), _soft(_ellipse(u, v, cu, cv, 0.09, 0.07), px))
    img = _over(img, (0.98, 0.80, 0.10), _soft(_ellipse(u, v, 0.78, 0.285, 0.035, 0.035), px))
    return img.clamp_(0, 1)


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """(3, H, W) RGB -> (channels, H, W); grey uses ITU-R BT.601 luma weights."""
    if channels == img.shape[0]:
        return img
    if channels == 1 and img.shape[0] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype)
        return (img * w[:, None, None]).sum(0, keepdim=True)
    if channels == 3 and img.shape[0] == 1:
        return img.expand(3, -1, -1).clone()
    raise AttackConfigError(f"cannot turn a {img.shape[0]}-channel pattern into {channels} channels")


def load_image(path: str | Path, channels: int, h: int, w: int) -> torch.Tensor:
    """A user's trigger image as (channels, h, w) in [0, 1], resized bilinearly (PIL)."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise AttackConfigError(
            f"trigger pattern {str(path)!r} is neither a built-in pattern {BUILTIN_PATTERNS} nor an image file"
        )
    with Image.open(p) as im:
        im = im.convert("RGB" if channels == 3 else "L").resize((w, h), Image.BILINEAR)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return t.view(h, w, channels).permute(2, 0, 1).float().div_(255)


@lru_cache(maxsize=32)
def _pattern_cpu(spec: str, channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    if spec == "kitty":
        return to_channels(kitty(h, w), channels)
    if spec == "noise":
        g = torch.Generator().manual_seed(int(seed) + 104729)
        return torch.rand(channels, h, w, generator=g)
    return load_image(spec, channels, h, w)


def get_pattern(spec: str, channels: int, h: int, w: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(channels, h, w) pattern in [0, 1]: ``kitty`` | ``noise`` (from ``seed``) | an image path."""
    return _pattern_cpu(str(spec), int(channels), int(h), int(w), int(seed)).clone().to(device)


def check_pattern_spec(spec: str) -> None:
    """Fail early on a pattern that is neither built in nor an existing file."""
    if str(spec) not in BUILTIN_PATTERNS and not Path(str(spec)).expanduser().is_file():
        raise AttackConfigError(
            f"trigger pattern {str(spec)!r} is neither a built-in pattern {BUILTIN_PATTERNS} nor an image file"
        )


# ---------------------------------------------------------------------------------------------
# Adap-Patch's four training triggers (32x32 reference, nearest-upsampled)
# ---------------------------------------------------------------------------------------------

ADAPTIVE_PATCH_NAMES = ("phoenix_like", "firefox_like", "badnet_patch4", "trojan_square")


def _reference_adaptive_triggers() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four (mark (3,32,32), mask (32,32)) corner triggers, each in its own corner:

    0 ``phoenix_like``: flame-coloured radial disc (radius 5) at the top-left;
    1 ``firefox_like``: orange ring around a blue disc (radius 5) at the bottom-right;
    2 ``badnet_patch4``: 4x4 black/white checkerboard at rows 26-29, cols 2-5 (bottom-left);
    3 ``trojan_square``: 6x6 hollow magenta-green square outline at rows 1-6, cols 25-30 (top-right).
    """
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    out = []
    r = torch.sqrt((yy - 5.5) ** 2 + (xx - 5.5) ** 2)
    mask = (r <= 5.0).float()
    t = (r / 5.0).clamp(0, 1)
    mark = torch.stack([torch.ones_like(t), 0.85 - 0.65 * t, 0.25 * (1 - t)]) * mask
    out.append((mark, mask))
    r = torch.sqrt((yy - 25.5) ** 2 + (xx - 25.5) ** 2)
    mask = (r <= 5.0).float()
    ring = (r > 2.5).float()
    mark = (torch.tensor([1.0, 0.55, 0.05])[:, None, None] * ring + torch.tensor([0.15, 0.3, 0.85])[:, None, None] * (1 - ring)) * mask
    out.append((mark, mask))
    mask = torch.zeros(32, 32)
    mask[26:30, 2:6] = 1
    board = ((yy.long() + xx.long()) % 2 == 0).float()
    out.append((board.expand(3, -1, -1) * mask, mask))
    mask = torch.zeros(32, 32)
    mask[1:7, 25:31] = 1
    mask[2:6, 26:30] = 0
    colour = torch.where(((yy + xx).long() % 2 == 0), 1.0, 0.0)
    mark = torch.stack([colour, 1 - colour, colour]) * mask
    out.append((mark, mask))
    return out


def adaptive_patch_triggers(channels: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, C, h, w) marks and (4, 1, h, w) masks of the Adap-Patch triggers at the data's size."""
    ref = _reference_adaptive_triggers()
    marks = torch.stack([to_channels(m, channels) for m, _ in ref])
    masks = torch.stack([k[None] for _, k in ref])
    marks = F.interpolate(marks, size=(h, w), mode="nearest")
    masks = F.interpolate(masks, size=(h, w), mode="nearest")
    return marks, masks
