import math

import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.data.dataset import ImageDataset


def _data(n=200, k=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(x, torch.arange(k).repeat(n // k))


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 1, 64, 48), (1, 3, 224, 224)])
def test_sig_formula_is_exact(shape):
    atk = build_attack("sig")  # delta 20/255, f 6
    x = torch.full(shape, 0.5)
    w = shape[-1]
    j = torch.arange(w, dtype=torch.float64)
    expect = (20 / 255 * torch.sin(2 * math.pi * j * 6 / w)).float()
    d = atk.apply(x, phase="train") - x
    assert torch.allclose(d, expect.expand(shape), atol=1e-6)  # same on every row and channel


def test_sig_clips_and_uses_test_delta():
    atk = build_attack("sig", delta=20, test_delta=60)
    out = atk.apply(torch.ones(1, 3, 32, 32), phase="train")
    assert out.max() <= 1 and out.min() < 1 and (out == 1).any()  # clipped above, lowered where sin < 0
    j = torch.arange(32, dtype=torch.float64)
    expect = (60 / 255 * torch.sin(2 * math.pi * j * 6 / 32)).float()
    d_test = atk.apply(torch.full((1, 3, 32, 32), 0.5), phase="test") - 0.5
    assert torch.allclose(d_test, expect.expand(1, 3, 32, 32), atol=1e-6)


def test_sig_is_clean_label_with_rate_of_whole_set():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "sig", rate=0.1, target=1, seed=0)
    p = ps.oracle.is_poison
    assert int(p.sum()) == 20  # 10% of the whole set, all from the target class
    assert (train.y[p] == 1).all() and torch.equal(ps.train.y, train.y)
    assert ps.plan.mode == "clean_label" and ps.plan.rate_of == "dataset"
    assert (ps.test_triggered.y == 1).all() and (ps.test_triggered_true != 1).all()
    by_class = build_and_poison(train, test, "sig", rate=0.4, rate_of="target_class", target=1, seed=0)
    assert int(by_class.oracle.is_poison.sum()) == 20


def test_sig_too_many_clean_label_victims_is_an_error():
    with pytest.raises(AttackConfigError, match="eligible"):
        build_and_poison(_data(), _data(40, seed=1), "sig", rate=0.3, target=0)


@pytest.mark.parametrize("kw,msg", [({"delta": 0}, "delta must be"), ({"delta": 300}, "delta must be"), ({"freq": 0}, "freq must be")])
def test_sig_bad_options(kw, msg):
    with pytest.raises(AttackConfigError, match=msg):
        build_attack("sig", **kw)


def test_sig_frequency_above_nyquist_is_an_error():
    with pytest.raises(AttackConfigError, match="Nyquist"):
        build_attack("sig", freq=6).check_image((3, 8, 8))
