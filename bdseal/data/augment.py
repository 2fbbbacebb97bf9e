"""Batched, on-device image augmentation for float images ``(B, C, H, W)`` in [0, 1].

Everything is vectorised over the batch (index arithmetic, ``grid_sample`` with per-sample affine
grids, masked sub-batches); nothing loops over samples. Every function takes an optional
``torch.Generator``: random numbers are drawn on the generator's device (CPU by default) and moved
to the batch's device, so a CPU generator gives the same augmentations on any device. uint8 input
is converted with :func:`to_float`; outputs always stay in [0, 1].
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .dataset import DataError

__all__ = [
    "AUGMENTS",
    "Augment",
    "build_augment",
    "list_augments",
    "rand_augment",
    "random_crop_flip",
    "simclr_augment",
    "to_float",
    "RANDAUGMENT_OPS",
]

Tensor = torch.Tensor


def to_float(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; float input is returned unchanged."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise DataError(f"expected uint8 or float images, got {x.dtype}")
    return x


def _check(x: Tensor) -> Tensor:
    x = to_float(x)
    if x.ndim != 4:
        raise DataError(f"augmentations need a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    return x


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=dev).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=dev).to(device)


def _uniform(lo: float, hi: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return lo + (hi - lo) * _rand((n,), generator, device)


# ---------------------------------------------------------------------------------------------
# crop + flip
# ---------------------------------------------------------------------------------------------


def random_crop_flip(
    x: Tensor,
    pad: int = 4,
    flip: bool = True,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> Tensor:
    """CIFAR-style augmentation: pad by ``pad`` (zeros by default, or ``"reflect"``), take a random
    ``H x W`` crop, flip horizontally with p=0.5. One batched ``gather``; no per-sample loop."""
    x = _check(x)
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        mode = {"zeros": "constant", "constant": "constant", "reflect": "reflect", "replicate": "replicate"}
        if padding_mode not in mode:
            raise DataError(f"padding_mode must be one of {sorted(mode)}, got {padding_mode!r}")
        xp = F.pad(x, (pad, pad, pad, pad), mode=mode[padding_mode])
    else:
        xp = x
    hp, wp = xp.shape[-2:]
    oy = _randint(2 * pad + 1, (b,), generator, dev)
    ox = _randint(2 * pad + 1, (b,), generator, dev)
    flips = (_rand((b,), generator, dev) < 0.5) if flip else torch.zeros(b, dtype=torch.bool, device=dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h  # (B, H)
    cols = ox[:, None] + torch.where(flips[:, None], (w - 1) - ar_w, ar_w)  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, flat).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# colour helpers
# ---------------------------------------------------------------------------------------------


def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma (ITU-R 601, as PIL/torchvision)."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``b + factor * (a - b)`` with per-sample ``factor`` (B,), clamped to [0, 1]."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x).expand_as(x), f)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV -> RGB in closed form: channel ``n`` (R=5, G=3, B=1) is ``v - v s clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6h) mod 6`` (the same piecewise map as torchvision's, without the 18-plane stack)."""
    h, s, v = x.unbind(1)
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1 (no host copy)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def _sharp_degenerate(x: Tensor) -> Tensor:
    """PIL's SMOOTH-filtered image for ImageEnhance.Sharpness; borders keep the original pixels."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return degenerate


def _enhance(x: Tensor, kind: Tensor, f: Tensor, sharpness: bool = False) -> Tensor:
    """One blend ``deg + f (x - deg)`` per sample, its degenerate image chosen by ``kind`` (B,):
    0 brightness (black), 1 contrast (mean luma), 2 saturation (luma), 3 sharpness (smoothed; only
    computed when ``sharpness``). Same results as the separate PIL-style ops, in one pass."""
    kind = kind.view(-1, 1, 1, 1)
    gray = _gray(x)
    deg = torch.where(kind == 0, torch.zeros_like(gray), gray.mean(dim=(1, 2, 3), keepdim=True))
    deg = torch.where(kind == 2, gray, deg).expand_as(x)
    if sharpness:
        deg = torch.where(kind == 3, _sharp_degenerate(x), deg)
    return (deg + f.view(-1, 1, 1, 1) * (x - deg)).clamp_(0, 1)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (B,) in turns, via RGB<->HSV (matches torchvision's adjust_hue)."""
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1)).clamp_(0, 1)


SYNC_FREE: bool | None = None
"""How per-sample op choices are applied. ``None`` (default): sync-free on accelerators, masked
sub-batches on the CPU. ``True``: every op runs on the whole batch and ``torch.where`` keeps each
sample's own result (no host read-back, fixed shapes). ``False``: each op runs on the sub-batch that
drew it (fewest FLOPs, but ``mask.any()`` and boolean indexing read back to the host once per op).
Both give the same images for the same random draws."""


def _sync_free(x: Tensor) -> bool:
    return x.device.type != "cpu" if SYNC_FREE is None else bool(SYNC_FREE)


def _apply_masked_(x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> None:
    """In place: sample ``i`` becomes ``fn(x, *args)[i]`` where ``mask[i]`` (args are per-sample
    (B,) tensors). Sync-free mode computes ``fn`` on the whole batch and selects with ``torch.where``;
    masked mode runs ``fn`` on the selected sub-batch only (see :data:`SYNC_FREE`)."""
    if _sync_free(x):
        torch.where(mask.view(-1, 1, 1, 1), fn(x, *args), x, out=x)
    elif bool(mask.any()):
        x[mask] = fn(x[mask], *(a[mask] for a in args))


def color_jitter(
    x: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision-style ColorJitter applied with probability ``p`` per sample; each sample gets its
    own factors and its own random order of the four operations."""
    x = _check(x).clone()
    b, dev = x.shape[0], x.device
    if not 0 <= hue <= 0.5:
        raise DataError(f"hue jitter must be in [0, 0.5], got {hue}")
    factors = [
        _uniform(max(0.0, 1 - brightness), 1 + brightness, b, generator, dev),
        _uniform(max(0.0, 1 - contrast), 1 + contrast, b, generator, dev),
        _uniform(max(0.0, 1 - saturation), 1 + saturation, b, generator, dev),
        _uniform(-hue, hue, b, generator, dev),
    ]
    order = _rand((b, 4), generator, dev).argsort(dim=1)  # per-sample permutation of the 4 ops
    apply = _rand((b,), generator, dev) < p
    unused = [j for j, s in enumerate((brightness, contrast, saturation, hue)) if s <= 0]
    fac = torch.stack(factors[:3], dim=1)  # (B, 3) blend factors
    for k in range(4):
        op = order[:, k]
        on = apply
        for j in unused:
            on = on & (op != j)
        blend = on & (op < 3)
        f = fac.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1)
        _apply_masked_(x, blend, _enhance, op.clamp(max=2), f)
        if hue > 0:
            _apply_masked_(x, on & (op == 3), _hue, factors[3])
    return x


def random_grayscale(x: Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample by its luma (replicated over channels) with probability ``p``."""
    x = _check(x)
    mask = _rand((x.shape[0],), generator, x.device) < p
    if x.shape[1] == 1:
        return x
    return torch.where(mask.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


# ---------------------------------------------------------------------------------------------
# SimCLR
# ---------------------------------------------------------------------------------------------


def _resized_crop_params(
    b: int,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
    attempts: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample crop (fraction of width, fraction of height, left, top) as torchvision's
    RandomResizedCrop: ``attempts`` vectorised tries, first valid one wins, else the whole image."""
    area = _uniform(scale[0], scale[1], b * attempts, generator, device).view(b, attempts)
    logr = _uniform(math.log(ratio[0]), math.log(ratio[1]), b * attempts, generator, device).view(b, attempts)
    r = torch.exp(logr)
    cw = torch.sqrt(area * h * w * r).round()  # pixels
    ch = torch.sqrt(area * h * w / r).round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1, device=device))
    sel = first.clamp_min(0).unsqueeze(1)
    cw = torch.where(first >= 0, cw.gather(1, sel).squeeze(1), torch.full((b,), float(w), device=device))
    ch = torch.where(first >= 0, ch.gather(1, sel).squeeze(1), torch.full((b,), float(h), device=device))
    u = _rand((b, 2), generator, device)
    left = torch.floor(u[:, 0] * (w - cw + 1))
    top = torch.floor(u[:, 1] * (h - ch + 1))
    return cw / w, ch / h, left / w, top / h


def random_resized_crop(
    x: Tensor,
    size: int | tuple[int, int] | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandomResizedCrop (+ horizontal flip p=0.5) via one ``grid_sample`` with per-sample affine grids."""
    x = _check(x)
    b, c, h, w = x.shape
    dev = x.device
    oh, ow = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    fw, fh, left, top = _resized_crop_params(b, h, w, scale, ratio, generator, dev)
    sign = torch.ones(b, device=dev)
    if flip:
        sign = torch.where(_rand((b,), generator, dev) < 0.5, -sign, sign)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = fw * sign
    theta[:, 0, 2] = 2 * (left + fw / 2) - 1
    theta[:, 1, 1] = fh
    theta[:, 1, 2] = 2 * (top + fh / 2) - 1
    grid = F.affine_grid(theta, [b, c, oh, ow], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp_(0, 1)


def simclr_augment(
    x: Tensor,
    size: int | tuple[int, int] | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SimCLR view: random resized crop (to ``size``, default input size) + flip, colour jitter
    (brightness, contrast, saturation, hue strengths ``jitter``) with prob ``p_jitter``, grayscale
    with prob ``p_gray``. GSSD uses ``jitter=(0.8, 0.8, 0.8, 0.2)``."""
    x = random_resized_crop(x, size=size, scale=scale, generator=generator)
    x = color_jitter(x, *jitter, p=p_jitter, generator=generator)
    return random_grayscale(x, p=p_gray, generator=generator)


# ---------------------------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------------------------


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Warp with per-sample ``theta`` (B, 2, 3) in normalised coords, nearest, zero fill."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _eye(n: int, device: torch.device) -> Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def _theta_rotate(v: Tensor, h: int, w: int) -> Tensor:
    """Rotation by ``v`` degrees (counter-clockwise, as PIL) in normalised coords (aspect-correct)."""
    a = torch.deg2rad(v)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(v)
    return torch.stack((torch.stack((cos, -sin * h / w, zero), 1), torch.stack((sin * w / h, cos, zero), 1)), 1)


def _theta_shear_x(v: Tensor, h: int, w: int) -> Tensor:
    """Horizontal shear by factor ``v``."""
    theta = _eye(len(v), v.device)
    theta[:, 0, 1] = v * h / w
    return theta


def _theta_shear_y(v: Tensor, h: int, w: int) -> Tensor:
    """Vertical shear by factor ``v``."""
    theta = _eye(len(v), v.device)
    theta[:, 1, 0] = v * w / h
    return theta


def _theta_translate_x(v: Tensor, h: int, w: int) -> Tensor:
    """Shift by ``v`` times the width."""
    theta = _eye(len(v), v.device)
    theta[:, 0, 2] = 2 * v
    return theta


def _theta_translate_y(v: Tensor, h: int, w: int) -> Tensor:
    """Shift by ``v`` times the height."""
    theta = _eye(len(v), v.device)
    theta[:, 1, 2] = 2 * v
    return theta


_THETAS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "shear_x": _theta_shear_x,
    "shear_y": _theta_shear_y,
    "translate_x": _theta_translate_x,
    "translate_y": _theta_translate_y,
    "rotate": _theta_rotate,
}


def _geometric(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    def op(x: Tensor, v: Tensor) -> Tensor:
        return _affine(x, _THETAS[name](v, *x.shape[-2:]))

    op.__name__ = f"_op_{name}"
    op.__doc__ = _THETAS[name].__doc__
    return op


_op_rotate = _geometric("rotate")
_op_shear_x = _geometric("shear_x")
_op_shear_y = _geometric("shear_y")
_op_translate_x = _geometric("translate_x")
_op_translate_y = _geometric("translate_y")


def _op_identity(x: Tensor, v: Tensor) -> Tensor:
    return x


def _op_brightness(x: Tensor, v: Tensor) -> Tensor:
    """PIL ImageEnhance.Brightness with factor ``v`` (0 = black, 1 = unchanged)."""
    return _brightness(x, v)


def _op_color(x: Tensor, v: Tensor) -> Tensor:
    """PIL ImageEnhance.Color (saturation) with factor ``v``."""
    return _saturation(x, v)


def _op_contrast(x: Tensor, v: Tensor) -> Tensor:
    """PIL ImageEnhance.Contrast with factor ``v``."""
    return _contrast(x, v)


def _op_sharpness(x: Tensor, v: Tensor) -> Tensor:
    """PIL ImageEnhance.Sharpness with factor ``v`` (blend with the 3x3 smoothed image)."""
    return _blend(x, _sharp_degenerate(x), v)


def _op_posterize(x: Tensor, v: Tensor) -> Tensor:
    """Keep the ``round(v)`` most significant bits (clamped to 0..8)."""
    shift = (8 - torch.round(v).clamp(0, 8)).to(torch.int64).view(-1, 1, 1, 1)
    xi = (x * 255).round().to(torch.int64)
    return ((xi >> shift) << shift).to(x.dtype) / 255


def _op_solarize(x: Tensor, v: Tensor) -> Tensor:
    """Invert pixels at or above threshold ``v`` (in [0, 1])."""
    return torch.where(x >= v.view(-1, 1, 1, 1), 1.0 - x, x)


def _op_autocontrast(x: Tensor, v: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    ok = span > 0
    return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), x).clamp_(0, 1)


def _op_equalize(x: Tensor, v: Tensor) -> Tensor:
    """Exact PIL/torchvision histogram equalisation per sample and channel, batched."""
    b, c, h, w = x.shape
    xi = (x * 255).round().to(torch.int64).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, xi, torch.ones_like(xi))
    last = 255 - (hist.flip(1) > 0).to(torch.int64).argmax(1, keepdim=True)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255
    safe = step.clamp_min(1)
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], dim=1).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, xi), xi)
    return (out.to(x.dtype) / 255).reshape(b, c, h, w)


RANDAUGMENT_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "identity": _op_identity,
    "shear_x": _op_shear_x,
    "shear_y": _op_shear_y,
    "translate_x": _op_translate_x,
    "translate_y": _op_translate_y,
    "rotate": _op_rotate,
    "brightness": _op_brightness,
    "color": _op_color,
    "contrast": _op_contrast,
    "sharpness": _op_sharpness,
    "posterize": _op_posterize,
    "solarize": _op_solarize,
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize,
}
"""Op name -> ``fn(x, v)`` with ``v`` (B,) the op's own parameter (degrees, shear factor, fraction
of the image, enhance factor, bits, threshold; ignored by identity/autocontrast/equalize)."""

_PARAM_FREE = frozenset({"identity", "autocontrast", "equalize"})

# torchvision-style magnitude m in [0, 1] and sign s in {-1, 1} -> the op's parameter
_MAGNITUDE_SCALE: dict[str, tuple[float, float, float]] = {
    # name: (offset, scale of m, scale of m*s)  ->  v = offset + a*m + b*m*s
    "shear_x": (0.0, 0.0, 0.3),
    "shear_y": (0.0, 0.0, 0.3),
    "translate_x": (0.0, 0.0, 0.45),  # up to 45% of the size (torchvision: 150/331)
    "translate_y": (0.0, 0.0, 0.45),
    "rotate": (0.0, 0.0, 30.0),
    "brightness": (1.0, 0.0, 0.9),
    "color": (1.0, 0.0, 0.9),
    "contrast": (1.0, 0.0, 0.9),
    "sharpness": (1.0, 0.0, 0.9),
    "posterize": (8.0, -4.0, 0.0),  # keep 8 - 4m bits
    "solarize": (1.0, -1.0, 0.0),  # threshold 1 - m
}

RANDAUGMENT_RANGES: dict[str, dict[str, tuple[float, float] | None]] = {
    # PGRL (arXiv 2509.08748) Table 10, the FixMatch pool: parameters drawn uniformly per sample.
    # Solarize's range is not given there; FixMatch draws the threshold over the whole 0..255 range.
    "pgrl": {
        "autocontrast": None,
        "brightness": (0.05, 0.95),
        "color": (0.05, 0.95),
        "contrast": (0.05, 0.95),
        "identity": None,
        "rotate": (-30.0, 30.0),
        "sharpness": (0.05, 0.95),
        "shear_x": (-0.3, 0.3),
        "shear_y": (-0.3, 0.3),
        "solarize": (0.0, 1.0),
        "translate_x": (-0.3, 0.3),
        "translate_y": (-0.3, 0.3),
    },
}
"""Named per-op parameter ranges for :func:`rand_augment` (``ranges="pgrl"``)."""


def _resolve_ranges(
    ranges: str | dict[str, Any], ops: tuple[str, ...] | list[str] | None
) -> tuple[list[str], list[tuple[float, float]]]:
    """Op names and their [lo, hi] parameter ranges ((0, 0) for param-free ops)."""
    if isinstance(ranges, str):
        if ranges not in RANDAUGMENT_RANGES:
            raise DataError(f"unknown RandAugment ranges {ranges!r}; known presets: {sorted(RANDAUGMENT_RANGES)}")
        table: dict[str, Any] = dict(RANDAUGMENT_RANGES[ranges])
    else:
        table = dict(ranges)
    names = list(ops) if ops is not None else list(table)
    rows = []
    for n in names:
        if n not in RANDAUGMENT_OPS:
            raise DataError(f"unknown RandAugment op {n!r} in ranges; known: {sorted(RANDAUGMENT_OPS)}")
        r = table.get(n)
        if r is None:
            if n not in _PARAM_FREE:
                raise DataError(f"RandAugment ranges: op {n!r} needs a [lo, hi] range (or drop it from ops)")
            rows.append((0.0, 0.0))
            continue
        lo, hi = (float(t) for t in r)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise DataError(f"RandAugment ranges: op {n!r} needs finite lo <= hi, got {r!r}")
        rows.append((lo, hi))
    return names, rows


_ENHANCE_KIND = {"brightness": 0, "contrast": 1, "color": 2, "sharpness": 3}


def _rand_augment_stage_(x: Tensor, names: list[str], choice: Tensor, v: Tensor) -> None:
    """In place: sample ``i`` gets op ``names[choice[i]]`` at parameter ``v[i]``. The geometric ops
    share one ``grid_sample`` (per-sample theta) and the enhance ops one blend (per-sample degenerate),
    so a stage costs a handful of batch passes instead of one per op."""
    h, w = x.shape[-2:]
    geo = [(j, n) for j, n in enumerate(names) if n in _THETAS]
    if geo:
        theta, is_geo = _eye(len(x), x.device), torch.zeros_like(choice, dtype=torch.bool)
        for j, n in geo:
            sel = choice == j
            theta = torch.where(sel.view(-1, 1, 1), _THETAS[n](v, h, w), theta)
            is_geo |= sel
        _apply_masked_(x, is_geo, _affine, theta)
    enh = [(j, _ENHANCE_KIND[n]) for j, n in enumerate(names) if n in _ENHANCE_KIND]
    if enh:
        kind, is_enh = torch.zeros_like(choice), torch.zeros_like(choice, dtype=torch.bool)
        for j, k in enh:
            sel = choice == j
            kind = torch.where(sel, k, kind)
            is_enh |= sel
        sharp = "sharpness" in names
        _apply_masked_(x, is_enh, lambda t, kd, f: _enhance(t, kd, f, sharpness=sharp), kind, v)
    for j, n in enumerate(names):
        if n != "identity" and n not in _THETAS and n not in _ENHANCE_KIND:
            _apply_masked_(x, choice == j, RANDAUGMENT_OPS[n], v)


def rand_augment(
    x: Tensor,
    num_ops: int = 3,
    magnitude: float = 9,
    num_magnitude_bins: int = 31,
    random_magnitude: bool = False,
    ops: tuple[str, ...] | None = None,
    ranges: str | dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandAugment: each sample gets ``num_ops`` ops drawn uniformly from :data:`RANDAUGMENT_OPS`
    (or ``ops``). Default strength: ``magnitude / (num_magnitude_bins - 1)`` (torchvision scale, 9 of
    30), with a random sign for signed ops; ``random_magnitude`` draws each sample's strength
    uniformly in [0, magnitude] (FixMatch style). ``ranges`` (a preset name such as ``"pgrl"`` =
    PGRL Table 10, or ``{op: [lo, hi] | None}``) instead draws each op's own parameter uniformly in
    its range per sample, over the listed ops (magnitude settings are then unused). Per-sample
    choices and parameters are tensors; see :data:`SYNC_FREE` for how ops are applied."""
    x = _check(x).clone()
    b, dev = x.shape[0], x.device
    if ranges is not None:
        names, bounds = _resolve_ranges(ranges, ops)
    else:
        names = list(ops) if ops is not None else list(RANDAUGMENT_OPS)
        bounds = None
    unknown = [n for n in names if n not in RANDAUGMENT_OPS]
    if unknown or not names:
        raise DataError(f"unknown RandAugment ops {unknown}; known: {sorted(RANDAUGMENT_OPS)}")
    m_max = float(magnitude) / (num_magnitude_bins - 1)
    if bounds is None and not 0 <= m_max <= 1:
        raise DataError(f"magnitude must be in [0, {num_magnitude_bins - 1}], got {magnitude}")
    for _ in range(num_ops):
        choice = _randint(len(names), (b,), generator, dev)
        v = torch.zeros(b, device=dev)  # each sample's parameter for its op; Python constants, no host copies
        if bounds is not None:
            u = _rand((b,), generator, dev)
            for j, (lo, hi) in enumerate(bounds):
                v = torch.where(choice == j, lo + (hi - lo) * u, v)
        else:
            mag = _rand((b,), generator, dev) * m_max if random_magnitude else torch.full((b,), m_max, device=dev)
            sign = torch.where(_rand((b,), generator, dev) < 0.5, -1.0, 1.0)
            for j, n in enumerate(names):
                c0, c1, c2 = _MAGNITUDE_SCALE.get(n, (0.0, 0.0, 0.0))
                v = torch.where(choice == j, c0 + c1 * mag + c2 * mag * sign, v)
        _rand_augment_stage_(x, names, choice, v)
    return x.clamp_(0, 1)


# ---------------------------------------------------------------------------------------------
# registry / factory
# ---------------------------------------------------------------------------------------------


def _none(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return _check(x)


def _crop_then_randaugment(
    x: Tensor, pad: int = 4, padding_mode: str = "zeros", generator: torch.Generator | None = None, **kw: Any
) -> Tensor:
    x = random_crop_flip(x, pad=pad, padding_mode=padding_mode, generator=generator)
    return rand_augment(x, generator=generator, **kw)


AUGMENTS: dict[str, Callable[..., Tensor]] = {
    "none": _none,
    "crop_flip": random_crop_flip,
    "simclr": simclr_augment,
    "randaugment": _crop_then_randaugment,
}


def list_augments() -> list[str]:
    """Names accepted by :func:`build_augment`."""
    return sorted(AUGMENTS)


class Augment:
    """A named augmentation with bound keyword arguments: ``aug(x, generator=None) -> x'``.

    The call-time generator wins over the one given at build time."""

    def __init__(self, name: str, fn: Callable[..., Tensor], generator: torch.Generator | None = None, **kw: Any):
        self.name, self.fn, self.generator, self.kwargs = name, fn, generator, kw

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.fn(x, generator=generator if generator is not None else self.generator, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"Augment({self.name!r}{', ' if args else ''}{args})"


def build_augment(name: str, generator: torch.Generator | None = None, **kw: Any) -> Augment:
    """Augmentation by name (``none``, ``crop_flip``, ``simclr``, ``randaugment`` = crop_flip then
    rand_augment) with keyword arguments bound, e.g. ``build_augment("simclr", jitter=(.8,.8,.8,.2))``."""
    key = str(name).lower()
    if key not in AUGMENTS:
        raise DataError(f"unknown augmentation {name!r}; known: {', '.join(list_augments())}")
    fn = AUGMENTS[key]
    if key == "randaugment":
        params = {"pad", "padding_mode", *inspect.signature(rand_augment).parameters}
    else:
        params = set(inspect.signature(fn).parameters)
    allowed = sorted(params - {"x", "generator"})
    bad = sorted(set(kw) - set(allowed))
    if bad:
        raise DataError(f"augmentation {key!r}: unknown option(s) {bad}; accepted: {allowed}")
    return Augment(key, fn, generator=generator, **kw)
