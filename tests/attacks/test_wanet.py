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
