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
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(-1, 1, 1)  # (B, 6, H, W)
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    a4 = torch.stack((a1, a2, a3), dim=1)  # (B, 3, 6, H, W)
    return (a4 * mask.unsqueeze(1).to(x.dtype)).sum(dim=2)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (B,) in turns, via RGB<->HSV (matches torchvision's adjust_hue)."""
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1)).clamp_(0, 1)


def _apply_masked_(x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *args: Tensor) -> None:
    """In place: ``x[mask] = fn(x[mask], *(a[mask] for a in args))`` (one op on a sub-batch)."""
    if bool(mask.any()):
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
    ops = [_brightness, _contrast, _saturation, _hue]
    strengths = [brightness, contrast, saturation, hue]
    order = _rand((b, 4), generator, dev).argsort(dim=1)  # per-sample permutation of the 4 ops
    apply = _rand((b,), generator, dev) < p
    for k in range(4):
        for j, op in enumerate(ops):
            if strengths[j] > 0:
                _apply_masked_(x, apply & (order[:, k] == j), op, factors[j])
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


def _op_rotate(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    a = torch.deg2rad(30.0 * m * s)
    h, w = x.shape[-2:]
    theta = _eye(len(x), x.device)
    # rotation in pixel space expressed in normalised coords (aspect-correct)
    theta[:, 0, 0] = torch.cos(a)
    theta[:, 0, 1] = -torch.sin(a) * h / w
    theta[:, 1, 0] = torch.sin(a) * w / h
    theta[:, 1, 1] = torch.cos(a)
    return _affine(x, theta)


def _op_shear_x(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    theta = _eye(len(x), x.device)
    theta[:, 0, 1] = 0.3 * m * s * h / w
    return _affine(x, theta)


def _op_shear_y(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    theta = _eye(len(x), x.device)
    theta[:, 1, 0] = 0.3 * m * s * w / h
    return _affine(x, theta)


def _op_translate_x(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    theta = _eye(len(x), x.device)
    theta[:, 0, 2] = 2 * 0.45 * m * s  # up to 45% of the width (torchvision: 150/331)
    return _affine(x, theta)


def _op_translate_y(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    theta = _eye(len(x), x.device)
    theta[:, 1, 2] = 2 * 0.45 * m * s
    return _affine(x, theta)


def _op_identity(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return x


def _op_brightness(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return _brightness(x, 1 + 0.9 * m * s)


def _op_color(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return _saturation(x, 1 + 0.9 * m * s)


def _op_contrast(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return _contrast(x, 1 + 0.9 * m * s)


def _op_sharpness(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    blurred = F.conv2d(x, k, groups=c)  # valid conv; borders keep the original pixels (as PIL)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = blurred
    return _blend(x, degenerate, 1 + 0.9 * m * s)


def _op_posterize(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    shift = torch.round(4 * m).to(torch.int64).view(-1, 1, 1, 1)  # keep 8 - round(4m) bits
    xi = (x * 255).round().to(torch.int64)
    return ((xi >> shift) << shift).to(x.dtype) / 255


def _op_solarize(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    thr = (1.0 - m).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1.0 - x, x)


def _op_autocontrast(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    ok = span > 0
    return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), x).clamp_(0, 1)


def _op_equalize(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
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


RANDAUGMENT_OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
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


def rand_augment(
    x: Tensor,
    num_ops: int = 3,
    magnitude: float = 9,
    num_magnitude_bins: int = 31,
    random_magnitude: bool = False,
    ops: tuple[str, ...] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RandAugment: each sample gets ``num_ops`` ops drawn uniformly from :data:`RANDAUGMENT_OPS`
    (or ``ops``) at strength ``magnitude / (num_magnitude_bins - 1)`` (torchvision scale, 9 of 30
    by default), with a random sign for signed ops. ``random_magnitude`` draws each sample's
    strength uniformly in [0, magnitude] (FixMatch style). Each op runs once per stage on the
    masked sub-batch that drew it."""
    x = _check(x).clone()
    names = list(ops) if ops is not None else list(RANDAUGMENT_OPS)
    unknown = [n for n in names if n not in RANDAUGMENT_OPS]
    if unknown or not names:
        raise DataError(f"unknown RandAugment ops {unknown}; known: {sorted(RANDAUGMENT_OPS)}")
    fns = [RANDAUGMENT_OPS[n] for n in names]
    b, dev = x.shape[0], x.device
    m_max = float(magnitude) / (num_magnitude_bins - 1)
    if not 0 <= m_max <= 1:
        raise DataError(f"magnitude must be in [0, {num_magnitude_bins - 1}], got {magnitude}")
    for _ in range(num_ops):
        choice = _randint(len(fns), (b,), generator, dev)
        mag = _rand((b,), generator, dev) * m_max if random_magnitude else torch.full((b,), m_max, device=dev)
        sign = torch.where(_rand((b,), generator, dev) < 0.5, -1.0, 1.0)
        for j, fn in enumerate(fns):
            if fn is not _op_identity:
                _apply_masked_(x, choice == j, fn, mag, sign)
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
