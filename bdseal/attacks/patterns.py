"""Deterministic trigger patterns and per-sample randomness for the non-learned attacks.

No image is downloaded: the built-in patterns are drawn procedurally at any resolution, so the same
pattern exists at 32x32, 64x64 and 224x224 (and in grey for 1-channel data).

- ``kitty``: a Hello-Kitty-like cartoon (white cat head, ears, black eyes, yellow nose, red bow on a
  pink background) with anti-aliased edges — our stand-in for the ``hello_kitty`` image of Blend
  (Chen et al. 2017; BackdoorBench, the Adap-Blend toolbox and PGRL all blend that picture). It is
  smooth, colourful and covers the whole image like the original, but it is not the same picture.
- ``noise``: uniform random pixels drawn from the attack seed (Chen et al.'s random-noise pattern).
- any other string is read as an image path (PIL, resized bilinearly to the data's size).

``adaptive_patch_triggers`` draws the Adap-Patch triggers (see ``triggers/adaptive.py``).

``hash_uniform`` gives counter-based uniform numbers keyed by (seed, sample index, position): per-sample
randomness that is batched, device-agnostic and identical for a sample whatever batch it falls in.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

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


def pattern_label(attack_cfg: Any) -> str | None:
    """What a run's blend image is, for metrics and report rows: ``cartoon`` (the built-in ``kitty``
    stand-in for the papers' Hello Kitty photo), ``noise``, ``image:<file name>``; ``None`` for attacks
    without a ``pattern`` image (BadNets' ``pattern`` names a patch style, not an image)."""
    if attack_cfg is None or str(attack_cfg.get("name")) not in PATTERN_ATTACKS:
        return None
    params = attack_cfg.get("params") or {}
    spec = str(params.get("pattern", "kitty"))
    if spec == "kitty":
        return "cartoon"
    return spec if spec in BUILTIN_PATTERNS else f"image:{Path(spec).name}"


PATTERN_ATTACKS = ("blend", "adap_blend")


def check_pattern_spec(spec: str) -> None:
    """Fail early on a pattern that is neither built in nor an existing file."""
    if str(spec) not in BUILTIN_PATTERNS and not Path(str(spec)).expanduser().is_file():
        raise AttackConfigError(
            f"trigger pattern {str(spec)!r} is neither a built-in pattern {BUILTIN_PATTERNS} nor an image file"
        )


# ---------------------------------------------------------------------------------------------
# Adap-Patch's triggers (32x32 reference, nearest-upsampled)
# ---------------------------------------------------------------------------------------------

ADAPTIVE_PATCH_NAMES = ("phoenix_corner", "firefox_corner", "badnet_patch4", "trojan_square", "phoenix_corner2")

# Rows 1-13 of the firefox_corner_32 mask: (first, last) column of each row (REFERENCE.md: the shape and
# place of the toolbox's trigger, read from its mask; the logo's pixels are not reproduced).
_FIREFOX_SPANS = ((23, 27), (19, 29), (19, 29), (19, 30), (18, 30), (18, 30), (18, 30), (18, 30), (18, 30),
                  (19, 30), (20, 29), (21, 28), (22, 27))
_FIREFOX_TOP = 1


def _phoenix_mark() -> torch.Tensor:
    """(3, 5, 5) pale-blue flame-like mark: white at the centre, light blue at the rim."""
    yy, xx = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    t = (torch.sqrt((yy - 2) ** 2 + (xx - 2) ** 2) / 2.83).clamp(0, 1)
    white, blue = torch.tensor([0.97, 0.98, 1.0]), torch.tensor([0.55, 0.70, 0.94])
    return (white[:, None, None] * (1 - t) + blue[:, None, None] * t)


def _firefox_mark_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 32, 32) mark and (32, 32) mask: an orange fox ring around a blue globe in the toolbox's shape."""
    mask = torch.zeros(32, 32)
    for r, (c0, c1) in enumerate(_FIREFOX_SPANS):
        mask[_FIREFOX_TOP + r, c0 : c1 + 1] = 1
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r = torch.sqrt((yy - 7.0) ** 2 + (xx - 24.0) ** 2)
    globe = (r <= 3.5).float()
    ring = torch.stack([torch.full_like(r, 0.95), 0.35 + 0.04 * (r - 3.5).clamp(0, 5), torch.full_like(r, 0.12)])
    blue = torch.tensor([0.25, 0.35, 0.75])[:, None, None]
    mark = (ring * (1 - globe) + blue * globe) * mask
    return mark, mask


def _corners_mask(size: int = 3) -> torch.Tensor:
    m = torch.zeros(32, 32)
    for r0 in (0, 32 - size):
        for c0 in (0, 32 - size):
            m[r0 : r0 + size, c0 : c0 + size] = 1
    return m


def _reference_adaptive_triggers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(mark (3,32,32), mask (32,32)) of each Adap-Patch trigger at the backdoor-toolbox's place and shape
    (REFERENCE.md "Adap-Patch" [V]); the marks are our own drawings except the binary BadNet pattern:

    - ``phoenix_corner``: 5x5 square at the bottom-right (rows/cols 27-31), pale-blue flame mark;
    - ``phoenix_corner2`` (test): the same 5x5 mark at the bottom-right and, unflipped, the bottom-left;
    - ``firefox_corner``: the toolbox's 140-pixel round logo shape at rows 1-13, cols 18-30 (top-right);
    - ``badnet_patch4``: the 3x3 pattern [[0,0,1],[0,1,0],[1,0,1]] (bottom-right copy) in all four
      corners, the other copies mirrored about both axes (``four_corner_trigger(mirror="both")``);
    - ``trojan_square``: 8x8 square at rows/cols 21-28 filled with fixed random colours (seeded).
    """
    from bdseal.attacks.triggers.label_consistent import four_corner_trigger

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    mask = torch.zeros(32, 32)
    mark = torch.zeros(3, 32, 32)
    mask[27:32, 27:32] = 1
    mark[:, 27:32, 27:32] = _phoenix_mark()
    out["phoenix_corner"] = (mark, mask)
    mark2, mask2 = mark.clone(), mask.clone()
    mask2[27:32, 0:5] = 1
    mark2[:, 27:32, 0:5] = _phoenix_mark()
    out["phoenix_corner2"] = (mark2, mask2)
    out["firefox_corner"] = _firefox_mark_and_mask()
    m4, p4 = four_corner_trigger((3, 32, 32), 3, mirror="both")
    out["badnet_patch4"] = (p4, m4[0])
    mask = torch.zeros(32, 32)
    mark = torch.zeros(3, 32, 32)
    mask[21:29, 21:29] = 1
    mark[:, 21:29, 21:29] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(20230501))
    out["trojan_square"] = (mark, mask)
    return out


def adaptive_patch_triggers(channels: int, h: int, w: int, names: tuple[str, ...] = ADAPTIVE_PATCH_NAMES[:4]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, C, h, w) marks and (k, 1, h, w) masks of the named Adap-Patch triggers at the data's size."""
    ref = _reference_adaptive_triggers()
    unknown = [n for n in names if n not in ref]
    if unknown:
        raise AttackConfigError(f"unknown adap_patch trigger(s) {unknown}; choose from {ADAPTIVE_PATCH_NAMES}")
    marks = torch.stack([to_channels(ref[n][0], channels) for n in names])
    masks = torch.stack([ref[n][1][None] for n in names])
    marks = F.interpolate(marks, size=(h, w), mode="nearest")
    masks = F.interpolate(masks, size=(h, w), mode="nearest")
    return marks, masks
