"""Poisoned pixels of fixed images against values computed here from the reference descriptions
(REFERENCE.md "Attacks" sections: positions, shapes, α, formulas), written independently of the
trigger code in numpy on the 0..255 scale, truncated to uint8 as the reference implementations do.
bdseal rounds to the nearest integer (docs/attacks.md "Rounding"), so every pixel may differ by at
most 1; pixels a trigger does not touch must be identical. Also the label and cover policy of the
presets (rate of the whole set vs of the target class; victims and covers from which classes)."""

import numpy as np
import pytest
import torch

from bdseal.attacks import build_and_poison, build_attack
from bdseal.attacks.patterns import kitty
from bdseal.attacks.poisoned import _apply_batched
from bdseal.data.dataset import ImageDataset
from bdseal.experiment.config import compose_config
from bdseal.experiment.run import plain


def _images() -> np.ndarray:
    """(8, 32, 32, 3) uint8: six random images, one black, one white (clipping at both ends)."""
    x = np.random.default_rng(2026).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    x[6], x[7] = 0, 255
    return x


def _poison(attack, x: np.ndarray, phase: str = "test", index=None) -> np.ndarray:
    """bdseal's stored uint8 result for HWC uint8 images (the path of ``poison_dataset``)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    idx = None if index is None else torch.as_tensor(index)
    return _apply_batched(attack, t, phase, idx, False, torch.device("cpu")).permute(0, 2, 3, 1).numpy()


def _preset(name: str):
    a = compose_config([f"attack={name}"]).attack
    return build_attack(a.name, **plain(a.params))


def _check(got: np.ndarray, ref_float: np.ndarray, x: np.ndarray) -> None:
    """|bdseal − trunc(reference)| ≤ 1 everywhere, and equal where the reference leaves x unchanged."""
    ref = np.clip(ref_float, 0, 255).astype(np.uint8)  # the references' float -> uint8 truncation
    diff = np.abs(got.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    same = np.abs(np.clip(ref_float, 0, 255) - x) < 1e-6  # pixels the reference formula leaves unchanged
    assert (got[same] == x[same]).all()


def _checker(n: int, cell: int = 1) -> np.ndarray:
    ij = np.arange(n) // cell
    return ((ij[:, None] + ij[None, :]) % 2 == 0).astype(float)


# ---------------------------------------------------------------------------------------------- BadNets


def test_badnets_default_checkerboard_bottom_right():
    x = _images()
    ref = x.astype(float)
    ref[:, 29:32, 29:32, :] = 255 * _checker(3)[..., None]
    _check(_poison(build_attack("badnets"), x), ref, x)


def test_pgbd_badnets_white_square():
    x = _images()
    ref = x.astype(float)
    ref[:, 29:32, 29:32, :] = 255
    _check(_poison(_preset("pgbd/badnets"), x), ref, x)


def test_pgrl_badnets_checkerboard_of_2x2_cells_rows_22_27():
    x = _images()
    ref = x.astype(float)
    ref[:, 22:28, 22:28, :] = 255 * _checker(6, 2)[..., None]
    _check(_poison(_preset("pgrl/badnets"), x), ref, x)


def test_gssd_badnets_vibe_colours_rows_cols_4_5():
    """VIBE's resources/cifar_1.png: the only non-zero pixels are (4..5, 4..5) with these values."""
    x = _images()
    ref = x.astype(float)
    ref[:, 4, 4], ref[:, 4, 5] = (180, 249, 112), (155, 50, 126)
    ref[:, 5, 4], ref[:, 5, 5] = (234, 82, 68), (187, 201, 219)
    _check(_poison(_preset("gssd/badnets"), x), ref, x)


# ---------------------------------------------------------------------------------------------- Blend, SIG


@pytest.mark.parametrize("preset,alpha", [("blend", 0.2), ("gssd/blend", 0.1), ("pgbd/blend", 0.2)])
def test_blend_formula(preset, alpha):
    x = _images()
    pattern = kitty(32, 32).permute(1, 2, 0).numpy().astype(float) * 255
    ref = (1 - alpha) * x + alpha * pattern
    _check(_poison(_preset(preset), x, "train"), ref, x)


@pytest.mark.parametrize("preset,delta", [("pgbd/sig", 40), ("pgrl/sig", 20)])
def test_sig_formula(preset, delta):
    x = _images()
    j = np.arange(32)
    ref = x + delta * np.sin(2 * np.pi * j * 6 / 32)[None, None, :, None]
    _check(_poison(_preset(preset), x, "train"), ref, x)


# ---------------------------------------------------------------------------------------------- Adap-Patch

FIREFOX_ROWS = {1: (23, 27), 2: (19, 29), 3: (19, 29), 4: (19, 30), 5: (18, 30), 6: (18, 30), 7: (18, 30),
                8: (18, 30), 9: (18, 30), 10: (19, 30), 11: (20, 29), 12: (21, 28), 13: (22, 27)}
BR = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=float)  # bottom-right 3x3 BadNet/LC pattern


def _toolbox_masks() -> dict[str, np.ndarray]:
    """The backdoor-toolbox trigger masks as REFERENCE.md describes them (32x32 bool)."""
    m = {k: np.zeros((32, 32), bool) for k in ("phoenix_corner", "firefox_corner", "badnet_patch4", "trojan_square",
                                                "phoenix_corner2")}
    m["phoenix_corner"][27:32, 27:32] = True
    m["phoenix_corner2"][27:32, 27:32] = m["phoenix_corner2"][27:32, 0:5] = True
    for r, (c0, c1) in FIREFOX_ROWS.items():
        m["firefox_corner"][r, c0 : c1 + 1] = True
    for r0 in (0, 29):
        for c0 in (0, 29):
            m["badnet_patch4"][r0 : r0 + 3, c0 : c0 + 3] = True
    m["trojan_square"][21:29, 21:29] = True
    return m


def _badnet_patch4() -> np.ndarray:
    """The toolbox's badnet_patch4 mark: BR in the bottom-right, mirrored about both axes elsewhere."""
    p = np.zeros((32, 32))
    p[29:, 29:], p[29:, :3], p[:3, 29:], p[:3, :3] = BR, BR[:, ::-1], BR[::-1], BR[::-1, ::-1]
    return p


def test_adap_patch_training_triggers_places_and_alphas():
    masks = _toolbox_masks()
    assert masks["firefox_corner"].sum() == 140
    x = np.repeat(_images()[:2], 4, axis=0)
    atk = _preset("gssd/adap_patch")
    got = _poison(atk, x, "train", index=np.arange(8))  # unfitted: trigger j = index % 4
    marks = {n: atk.triggers([n], (3, 32, 32), torch.device("cpu"))[0][0].permute(1, 2, 0).numpy() * 255
             for n in ("phoenix_corner", "firefox_corner", "trojan_square")}
    marks["badnet_patch4"] = 255 * _badnet_patch4()[..., None].repeat(3, -1)
    for i in range(8):
        name = ("phoenix_corner", "firefox_corner", "badnet_patch4", "trojan_square")[i % 4]
        alpha = (0.5, 0.2, 0.5, 0.3)[i % 4]
        m = masks[name][..., None]
        ref = x[i] + alpha * m * (marks[name] - x[i])
        _check(got[i : i + 1], ref[None], x[i : i + 1])
        changed = (got[i] != x[i]).any(-1)
        assert not changed[~masks[name]].any()


def test_adap_patch_test_time_two_toolbox_triggers_full_strength():
    x = _images()
    atk = _preset("adap_patch")
    masks = _toolbox_masks()
    phoenix = atk.triggers(["phoenix_corner2"], (3, 32, 32), torch.device("cpu"))[0][0].permute(1, 2, 0).numpy() * 255
    ref = x.astype(float)
    ref[:, masks["phoenix_corner2"]] = phoenix[masks["phoenix_corner2"]]
    ref[:, masks["badnet_patch4"]] = 255 * _badnet_patch4()[masks["badnet_patch4"]][:, None]  # applied second
    _check(_poison(atk, x), ref, x)
    assert np.array_equal(phoenix[27:32, 0:5], phoenix[27:32, 27:32])  # the left copy is not mirrored


# ---------------------------------------------------------------------------------------------- LC


@pytest.mark.parametrize("amplitude", [1.0, 0.5])
def test_lc_four_corner_trigger_left_right_mirrored(amplitude):
    """Corners: BR in the bottom-right, left copies mirrored left-right, top copies = bottom copies;
    x' = clip(x ± amplitude·255) (+ where the pattern is 1, − where it is 0)."""
    x = _images()
    p = np.zeros((32, 32))
    m = np.zeros((32, 32), bool)
    for r0 in (0, 29):
        p[r0 : r0 + 3, 29:], p[r0 : r0 + 3, :3] = BR, BR[:, ::-1]
        m[r0 : r0 + 3, 29:] = m[r0 : r0 + 3, :3] = True
    ref = x + (m * amplitude * 255 * (2 * p - 1))[None, ..., None]
    atk = build_attack("lc", amplitude=amplitude)
    _check(_poison(atk, x), ref, x)


# ---------------------------------------------------------------------------------------------- Trojan


def test_trojan_additive_trigger_in_the_apple_box():
    x = _images()
    atk = build_attack("trojan")
    mask = atk.mask((3, 32, 32))[0].numpy().astype(bool)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 29, 17, 28)
    t = np.zeros((32, 32, 3))
    t[mask] = np.random.default_rng(1).choice([0.7, 0.8, 0.9, 1.0], size=(int(mask.sum()), 3))
    atk.trigger = torch.from_numpy(t).permute(2, 0, 1).float()
    ref = x + 255 * t  # added, then clipped (BackdoorBench's uint8 wrap-around is not reproduced)
    got = _poison(atk, x)
    _check(got, ref, x)
    assert (got[7][mask] == 255).all() and (got[6][mask] >= 178).all()


# ---------------------------------------------------------------------------------------------- ISSBA


def test_issba_defaults_are_the_reference_training_and_the_trigger_is_x_plus_residual():
    atk = build_attack("issba")
    p = atk.params
    assert (p["lr"], p["l2_weight"], p["grad_weight"], p["secret_weight"], p["max_residual"], p["secret_mode"]) == (
        1e-4, 2.0, 1.5, 1.5, None, "random")
    assert atk.secret.shape == (100,) and torch.equal(atk.secret, build_attack("issba").secret)  # one fixed secret
    enc, dec = atk._make(3)
    atk.encoder, atk.decoder = enc.eval(), dec.eval()
    x = _images()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        residual = enc(xt, atk.secret).permute(0, 2, 3, 1).numpy()
    _check(_poison(atk, x), x + 255 * residual, x)


# ---------------------------------------------------------------------------------------------- policies


def _labelled(n_per_class: int = 40, k: int = 5) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_per_class * k, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset(x, torch.arange(k).repeat_interleave(n_per_class))


def _poison_preset(preset: str, data: ImageDataset, params: dict | None = None, **over):
    a = compose_config([f"attack={preset}"]).attack
    kw = {"rate": a.rate, "target": a.target, "mode": a.mode, "cover_rate": a.cover_rate, "rate_of": a.rate_of, **over}
    return build_and_poison(data, data, a.name, seed=0, **kw, **{**plain(a.params), **(params or {})})


@pytest.mark.parametrize("preset", ["pgrl/wanet", "pgrl/adap_blend"])
def test_pgrl_covers_come_from_non_target_classes(preset):
    data = _labelled()
    ps = _poison_preset(preset, data, rate=0.1, cover_rate=0.1)
    p, c, y = ps.oracle.is_poison, ps.oracle.is_cover, data.y
    assert int(p.sum()) == 20 and int(c.sum()) == 20  # rates of the whole set (200 images)
    assert (y[p] != 2).all() and (y[c] != 2).all()  # PGRL target 2: victims and covers from other classes
    assert (ps.train.y[p] == 2).all() and torch.equal(ps.train.y[c], y[c])


def test_gssd_adap_patch_covers_from_any_class_and_rates_of_the_whole_set():
    data = _labelled(k=4, n_per_class=100)
    ps = _poison_preset("gssd/adap_patch", data, rate=0.05, cover_rate=0.05)
    p, c = ps.oracle.is_poison, ps.oracle.is_cover
    assert int(p.sum()) == 20 and int(c.sum()) == 20 and (data.y[p] != 0).all()
    assert ps.plan.cover_from == "any"


def test_lc_rate_is_of_the_target_class_and_labels_are_kept():
    data = _labelled()
    ps = _poison_preset("gssd/lc", data, params={"steps": 1, "surrogate_epochs": 1,
                                                     "surrogate_model": {"widths": [8, 16, 16]}})
    p = ps.oracle.is_poison
    assert int(p.sum()) == 10 and (data.y[p] == 0).all()  # 25% of the 40 target-class images
    assert torch.equal(ps.train.y, data.y)
