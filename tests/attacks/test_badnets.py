import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.triggers.patch import checkerboard
from bdseal.data.dataset import ImageDataset


def _data(n=200, k=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(x, torch.arange(k).repeat(n // k))


def test_badnets_changes_exactly_the_patch():
    atk = build_attack("badnets")
    x = torch.rand(2, 3, 32, 32)
    out = atk.apply(x, phase="train")
    changed = (out != x).any(dim=(0, 1))
    assert changed[:29].sum() == 0 and changed[:, :29].sum() == 0  # only rows/cols 29..31
    assert torch.equal(out[:, :, 29:, 29:], checkerboard(3).expand(2, 3, 3, 3))


def test_badnets_scales_with_image_size_by_nearest_upsampling():
    atk = build_attack("badnets")
    out = atk.apply(torch.zeros(1, 3, 64, 64), phase="test")
    assert torch.equal(out[0, 0, 58:, 58:], checkerboard(3).repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert out[0, :, :58].sum() == 0


def test_badnets_too_small_image_is_an_error():
    with pytest.raises(AttackConfigError, match="does not fit"):
        build_attack("badnets", size=9).check_image((3, 8, 8))


def test_unknown_attack_and_parameter():
    with pytest.raises(AttackConfigError, match="unknown attack"):
        build_attack("nope")
    with pytest.raises(AttackConfigError, match="bad parameters"):
        build_attack("badnets", colour="red")


def test_poisoned_set_records_oracle_and_triggered_test():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "badnets", rate=0.1, target=1, seed=0)
    p = ps.oracle.is_poison
    assert int(p.sum()) == 20 and (ps.train.y[p] == 1).all() and (ps.oracle.true_labels[p] != 1).all()
    assert torch.equal(ps.train.x[~p], train.x[~p]) and torch.equal(ps.oracle.true_labels, train.y)
    assert (ps.train.x[p][:, :, 29:, 29:] == checkerboard(3).mul(255).to(torch.uint8)).all()
    assert len(ps.test_triggered) == 30 and (ps.test_triggered.y == 1).all() and (ps.test_triggered_true != 1).all()
    again = build_and_poison(train, test, "badnets", rate=0.1, target=1, seed=0)
    assert torch.equal(again.train.x, ps.train.x)  # bit-for-bit by seed
