"""Batched augmentation: shapes, ranges, determinism, exact crop/flip semantics, op correctness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from bdseal.data import DataError, build_augment, list_augments, rand_augment, random_crop_flip, simclr_augment, to_float
from bdseal.data import augment as A


def _batch(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_float() -> None:
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 1.0, 0.2]).view(1, 1, 1, 3))
    f = torch.rand(2, 3)
    assert to_float(f) is f
    with pytest.raises(DataError):
        to_float(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_crop_flip_is_exact_shifted_crop(pad_mode: str) -> None:
    b, h, w, pad = 32, 6, 7, 2
    x = torch.arange(b * 3 * h * w, dtype=torch.float32).view(b, 3, h, w) / (b * 3 * h * w)
    out = random_crop_flip(x, pad=pad, padding_mode=pad_mode, generator=_gen(1))
    assert out.shape == x.shape and out.dtype == torch.float32
    padded = F.pad(x, (pad,) * 4, mode="constant" if pad_mode == "zeros" else "reflect")
    shifts, flips = set(), 0
    for i in range(b):
        found = None
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                crop = padded[i, :, oy:oy + h, ox:ox + w]
                for fl in (False, True):
                    if torch.equal(out[i], crop.flip(-1) if fl else crop):
                        found = (oy, ox, fl)
        assert found is not None, f"sample {i} is not a (flipped) crop of its padded input"
        shifts.add(found[:2])
        flips += found[2]
    assert len(shifts) > 5 and 0 < flips < b  # offsets and flips actually vary


def test_crop_flip_zero_pad_and_uint8_input() -> None:
    x = torch.full((64, 1, 4, 4), 255, dtype=torch.uint8)
    out = random_crop_flip(x, pad=2, generator=_gen(0))
    assert out.dtype == torch.float32
    assert (out == 0).any() and out.max() == 1.0  # zero padding shows up somewhere
    assert torch.equal(random_crop_flip(x, pad=0, flip=False), to_float(x))


def test_determinism_and_range() -> None:
    x = _batch()
    for name in list_augments():
        aug = build_augment(name)
        a, b = aug(x, generator=_gen(5)), aug(x, generator=_gen(5))
        assert a.shape == x.shape and a.dtype == torch.float32
        assert torch.equal(a, b), name
        assert a.min() >= 0 and a.max() <= 1, name
        if name != "none":
            assert not torch.equal(a, aug(x, generator=_gen(6))), name


def test_simclr_changes_and_resizes() -> None:
    x = to_float(_batch(16))
    y = simclr_augment(x, generator=_gen(0))
    assert y.shape == x.shape and not torch.equal(x, y)
    assert (y - x).abs().mean() > 0.05
    z = simclr_augment(x, size=8, jitter=(0.8, 0.8, 0.8, 0.2), generator=_gen(0))
    assert z.shape == (16, 3, 8, 8) and 0 <= z.min() and z.max() <= 1
    # no jitter, no grayscale, full-image crop => only a possible horizontal flip
    same = simclr_augment(x, scale=(1.0, 1.0), p_jitter=0.0, p_gray=0.0, generator=_gen(0))
    for i in range(16):
        assert torch.allclose(same[i], x[i], atol=1e-5) or torch.allclose(same[i], x[i].flip(-1), atol=1e-5)
    gray = simclr_augment(x, p_jitter=0.0, p_gray=1.0, generator=_gen(0))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    one = simclr_augment(to_float(_batch(4, c=1)), generator=_gen(0))
    assert one.shape == (4, 1, 16, 16)


def test_hue_roundtrip_and_jitter_identity() -> None:
    x = to_float(_batch(4))
    assert torch.allclose(A._hsv_to_rgb(A._rgb_to_hsv(x)), x, atol=1e-5)
    assert torch.allclose(A._hue(x, torch.ones(4)), x, atol=1e-5)  # a full turn
    assert torch.allclose(A.color_jitter(x, 0, 0, 0, 0, generator=_gen(0)), x)


def test_rand_augment_changes_images() -> None:
    x = to_float(_batch(16))
    y = rand_augment(x, num_ops=3, generator=_gen(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    changed = (y - x).abs().flatten(1).amax(1) > 0
    assert changed.sum() >= 12  # identity thrice in a row is rare
    z = rand_augment(x, num_ops=1, ops=("identity",), generator=_gen(0))
    assert torch.equal(z, x)
    with pytest.raises(DataError):
        rand_augment(x, ops=("warp",))
    with pytest.raises(DataError):
        rand_augment(x, magnitude=40)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy().copy())


def _from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def test_ops_match_pil() -> None:
    x = _batch(3, h=12, w=10)
    xf = to_float(x)
    v = lambda t: torch.full((3,), float(t))  # noqa: E731
    to8 = lambda t: (t * 255).round().to(torch.uint8)  # noqa: E731
    eq = to8(A._op_equalize(xf, v(0)))
    post = to8(A._op_posterize(xf, v(6)))
    rot = to8(A._op_rotate(xf, v(10)))
    sol = to8(A._op_solarize(xf, v(0.5)))
    for i in range(3):
        assert torch.equal(eq[i], _from_pil(ImageOps.equalize(_pil(x[i]))))
        assert torch.equal(post[i], _from_pil(ImageOps.posterize(_pil(x[i]), 6)))
        assert torch.equal(rot[i], _from_pil(_pil(x[i]).rotate(10, resample=Image.NEAREST)))
        assert (sol[i].int() - _from_pil(ImageOps.solarize(_pil(x[i]), 128)).int()).abs().max() <= 1


def test_build_augment_registry() -> None:
    assert set(list_augments()) == {"none", "crop_flip", "simclr", "randaugment"}
    x = _batch(4)
    assert torch.equal(build_augment("none")(x), to_float(x))
    aug = build_augment("randaugment", pad=2, num_ops=2, magnitude=5, generator=_gen(3))
    a = aug(x)
    assert a.shape == x.shape
    assert torch.equal(a, build_augment("randaugment", pad=2, num_ops=2, magnitude=5)(x, generator=_gen(3)))
    assert "simclr" in repr(build_augment("simclr", jitter=(0.8, 0.8, 0.8, 0.2)))
    with pytest.raises(DataError, match="known"):
        build_augment("mixup")
    with pytest.raises(DataError, match="unknown option"):
        build_augment("crop_flip", size=3)


def _both_modes(monkeypatch: pytest.MonkeyPatch, fn) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(A, "SYNC_FREE", False)
    masked = fn()
    monkeypatch.setattr(A, "SYNC_FREE", True)
    return masked, fn()


@pytest.mark.parametrize("which", ["simclr", "randaugment", "randaugment_pgrl", "randaugment_random_mag"])
def test_sync_free_mode_gives_the_same_images(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    x = _batch(24, h=12, w=12, seed=3)
    kw = {"simclr": ("simclr", {}), "randaugment": ("randaugment", {}),
          "randaugment_pgrl": ("randaugment", {"ranges": "pgrl", "padding_mode": "reflect"}),
          "randaugment_random_mag": ("randaugment", {"random_magnitude": True})}[which]
    aug = build_augment(kw[0], **kw[1])
    masked, free = _both_modes(monkeypatch, lambda: aug(x, generator=_gen(7)))
    assert torch.allclose(masked, free, atol=1e-5)
    assert not torch.equal(free, to_float(x))


def test_sync_free_mode_makes_no_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sync-free mode never calls bool()/.item() on a tensor (the per-op read-backs it removes) nor builds
    tensors from Python lists (a host-to-device copy, which also waits for the device)."""
    monkeypatch.setattr(A, "SYNC_FREE", True)
    calls = []
    orig_bool, orig_item, orig_tensor = torch.Tensor.__bool__, torch.Tensor.item, torch.tensor
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append("bool") or orig_bool(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item") or orig_item(t))
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append("tensor") or orig_tensor(*a, **k))
    x = _batch(8)
    simclr_augment(x, generator=_gen(0))
    rand_augment(x, generator=_gen(0))
    rand_augment(x, ranges="pgrl", generator=_gen(0))
    assert calls == []
    monkeypatch.setattr(A, "SYNC_FREE", False)
    rand_augment(x, generator=_gen(0))
    assert "bool" in calls  # the masked mode does read back (the counter works)


def test_ranged_parameters_follow_the_ranges() -> None:
    x = to_float(_batch(64, seed=1))
    # brightness only, factor in [0.2, 0.3]: every pixel scales by one factor in that range
    y = rand_augment(x, num_ops=1, ranges={"brightness": (0.2, 0.3)}, generator=_gen(0))
    ratio = (y.flatten(1) / x.flatten(1).clamp_min(1e-6))[x.flatten(1) > 0.2]
    assert ratio.min() >= 0.2 - 1e-5 and ratio.max() <= 0.3 + 1e-5
    per = y.flatten(1).sum(1) / x.flatten(1).sum(1)
    assert per.std() > 0.01  # drawn per sample, not once per batch
    # a degenerate range [a, a] equals the op at a
    z = rand_augment(x, num_ops=1, ranges={"rotate": (10.0, 10.0)}, generator=_gen(0))
    assert torch.equal(z, A._op_rotate(x, torch.full((64,), 10.0)).clamp(0, 1))
    # the PGRL preset covers Table 10's twelve ops and drops equalize/posterize
    names, bounds = A._resolve_ranges("pgrl", None)
    assert len(names) == 12 and "equalize" not in names and "posterize" not in names
    assert bounds[names.index("rotate")] == (-30.0, 30.0)
    assert bounds[names.index("translate_x")] == pytest.approx((-0.3, 0.3))
    with pytest.raises(DataError, match="needs a"):
        rand_augment(x, ranges={"rotate": None})
    with pytest.raises(DataError, match="lo <= hi"):
        rand_augment(x, ranges={"rotate": (5, -5)})
    with pytest.raises(DataError, match="presets"):
        rand_augment(x, ranges="fixmatch2")
    aug = build_augment("randaugment", ranges="pgrl", padding_mode="reflect", num_ops=3)
    assert aug(_batch(4), generator=_gen(0)).shape == (4, 3, 16, 16)


def test_magnitude_mode_matches_the_torchvision_scale() -> None:
    """Default mode: rotate at magnitude 9/30 is +-9 degrees, translate 0.45*m of the size."""
    x = to_float(_batch(32, seed=2))
    y = rand_augment(x, num_ops=1, ops=("rotate",), generator=_gen(4))
    plus, minus = A._op_rotate(x, torch.full((32,), 9.0)), A._op_rotate(x, torch.full((32,), -9.0))
    for i in range(32):
        assert torch.equal(y[i], plus[i].clamp(0, 1)) or torch.equal(y[i], minus[i].clamp(0, 1))
