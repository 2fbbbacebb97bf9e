import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.triggers.wanet import WaNet
from bdseal.data.dataset import ImageDataset


def _data(n=200, k=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(x, torch.arange(k).repeat(n // k))


@pytest.mark.parametrize("h,w", [(32, 32), (64, 64), (224, 224), (32, 48)])
def test_warp_field_shape_and_bounded_displacement(h, w):
    atk = build_attack("wanet")
    grid = atk.warp_grid(h, w)
    assert grid.shape == (1, h, w, 2) and grid.abs().max() <= 1
    disp = (grid - WaNet.identity_grid(h, w)) * torch.tensor([(w - 1) / 2, (h - 1) / 2])  # in pixels
    bound = atk.s * atk.control.abs().max() / 2 * 1.5  # bicubic overshoot margin
    assert 0 < disp.abs().max() <= bound


def test_zero_strength_is_the_identity():
    x = torch.rand(2, 3, 32, 48)
    assert torch.allclose(build_attack("wanet", s=0).apply(x, phase="train"), x, atol=1e-5)


def test_grid_is_drawn_once_from_the_seed():
    a, b, c = build_attack("wanet", seed=5), build_attack("wanet", seed=5), build_attack("wanet", seed=6)
    assert torch.equal(a.warp_grid(32, 32), b.warp_grid(32, 32))
    assert not torch.equal(a.warp_grid(32, 32), c.warp_grid(32, 32))
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(a.apply(x, phase="train"), a.apply(x, phase="test"))  # same warp for train and test
    assert torch.equal(a.apply(x[:2], phase="train"), a.apply(x, phase="train")[:2])


def test_noise_mode_cover_is_per_sample_and_bounded():
    atk = build_attack("wanet", noise=True)
    x = torch.rand(3, 3, 32, 32)
    idx = torch.tensor([7, 11, 7])
    out = atk.apply_cover(x, index=idx)
    single = atk.apply_cover(x[1:2], index=idx[1:2])
    assert torch.equal(out[1:2], single)  # independent of the batch
    n7, n11 = atk.cross_noise(torch.tensor([7]), 32, 32), atk.cross_noise(torch.tensor([11]), 32, 32)
    assert not torch.equal(n7, n11) and n7.abs().max() <= 1 / 32
    assert not torch.allclose(out, atk.apply(x, phase="train"))
    with pytest.raises(AttackConfigError, match="indices"):
        atk.apply_cover(x)
    plain = build_attack("wanet", noise=False)
    assert torch.equal(plain.apply_cover(x), plain.apply(x, phase="train"))


def test_wanet_poisoning_counts_and_cover_labels():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "wanet", rate=0.05, cover_rate=0.1, target=0, seed=2)
    p, c = ps.oracle.is_poison, ps.oracle.is_cover
    assert int(p.sum()) == 10 and int(c.sum()) == 20 and not (p & c).any()
    assert (ps.train.y[p] == 0).all() and torch.equal(ps.train.y[c], train.y[c])
    assert torch.equal(ps.train.x[~(p | c)], train.x[~(p | c)])
    again = build_and_poison(train, test, "wanet", rate=0.05, cover_rate=0.1, target=0, seed=2)
    assert torch.equal(again.train.x, ps.train.x)


@pytest.mark.parametrize("kw,msg", [({"k": 1}, "k must be"), ({"s": -1}, "s must be"), ({"grid_rescale": 0}, "grid_rescale")])
def test_bad_options(kw, msg):
    with pytest.raises(AttackConfigError, match=msg):
        build_attack("wanet", **kw)


def test_cover_rate_defaults_to_cross_ratio_times_rate():
    """cover_rate null -> cross_ratio (2) x rate, so attack.rate=0.05 gives 10% covers."""
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "wanet", rate=0.05, target=0, seed=2)  # cover_rate left to the attack
    assert int(ps.oracle.is_poison.sum()) == 10 and int(ps.oracle.is_cover.sum()) == 20
    assert ps.plan.cover_rate == pytest.approx(0.1)
    half = build_and_poison(train, test, "wanet", rate=0.05, target=0, seed=2, cross_ratio=0.5)
    assert int(half.oracle.is_cover.sum()) == 5
    plain = build_and_poison(train, test, "wanet", rate=0.05, target=0, seed=2, noise=False)
    assert int(plain.oracle.is_cover.sum()) == 0  # no noise mode: no cross samples


def test_explicit_cover_rate_wins():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "wanet", rate=0.05, cover_rate=0.03, target=0, seed=2)
    assert int(ps.oracle.is_cover.sum()) == 6
    none = build_and_poison(train, test, "wanet", rate=0.05, cover_rate=0.0, target=0, seed=2)
    assert int(none.oracle.is_cover.sum()) == 0


def test_config_rate_override_scales_covers(tmp_path):
    """Through the config: attack=wanet attack.rate=0.05 (cover_rate null) poisons 5% and covers 10%."""
    from bdseal.cache import ArtifactCache
    from bdseal.experiment.config import compose_config
    from bdseal.experiment.run import poison

    cfg = compose_config(["attack=wanet", "attack.rate=0.05", "progress=false"])
    train, test = _data(), _data(40, seed=1)
    ps = poison(cfg, train, test, torch.device("cpu"), ArtifactCache(tmp_path), seed=0)
    assert int(ps.oracle.is_poison.sum()) == 10 and int(ps.oracle.is_cover.sum()) == 20
    cfg = compose_config(["attack=wanet", "attack.rate=0.05", "attack.cover_rate=0.01", "progress=false"])
    assert int(poison(cfg, train, test, torch.device("cpu"), ArtifactCache(tmp_path), seed=0).oracle.is_cover.sum()) == 2


def test_out_of_range_cover_rates_are_errors():
    train, test = _data(), _data(40, seed=1)
    with pytest.raises(AttackConfigError, match="cover rate 1.2 implied by wanet"):
        build_and_poison(train, test, "wanet", rate=0.6, target=0)  # 2 x 0.6 >= 1
    with pytest.raises(AttackConfigError, match="cover rate must be in"):
        build_and_poison(train, test, "wanet", rate=0.05, cover_rate=1.5, target=0)
    with pytest.raises(AttackConfigError, match="cover rate must be in"):
        build_and_poison(train, test, "wanet", rate=0.05, cover_rate=-0.1, target=0)
    with pytest.raises(AttackConfigError, match="cover pool holds only"):
        build_and_poison(train, test, "wanet", rate=0.4, target=0)  # 80 poisoned + 160 covers > 200 samples
    with pytest.raises(AttackConfigError, match="cross_ratio"):
        build_attack("wanet", cross_ratio=-1)
