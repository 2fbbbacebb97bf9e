import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.triggers.label_consistent import four_corner_trigger, pgd_untargeted
from bdseal.data.sources import load_synthetic
from tests.attacks._fast import CTX, TINY

FIT = {**TINY, "steps": 10}


@pytest.fixture(scope="module")
def data():
    return load_synthetic(num_classes=4, n_train=40, n_test=10, image_size=16)


@pytest.fixture(scope="module")
def poisoned(data):
    return build_and_poison(data.train, data.test, "lc", seed=0, rate=0.5, target=2, ctx=CTX, **FIT)


def test_four_corner_pattern_is_mirrored_and_scaled():
    mask, pat = four_corner_trigger((3, 32, 32))
    br = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert int(mask.sum()) == 36 and torch.equal(pat[0, 29:, 29:], br)
    # left copies mirrored left-right, top copies equal to the bottom ones (REFERENCE.md "LC")
    assert torch.equal(pat[1, :3, :3], br.flip(1)) and torch.equal(pat[2, :3, 29:], br)
    assert torch.equal(pat[0, 29:, :3], br.flip(1))
    _, both = four_corner_trigger((3, 32, 32), mirror="both")  # the toolbox's badnet_patch4 variant
    assert torch.equal(both[0, :3, :3], br.flip(0).flip(1)) and torch.equal(both[0, :3, 29:], br.flip(0))
    mask64, pat64 = four_corner_trigger((3, 64, 64))
    assert int(mask64.sum()) == 4 * 36 and torch.equal(pat64[0, 58:, 58:], br.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_clean_label_counts_and_labels(poisoned, data):
    ps = poisoned
    p = ps.oracle.is_poison
    assert int(p.sum()) == 20  # 50% of the 40 target-class images
    assert (ps.oracle.true_labels[p] == 2).all() and torch.equal(ps.train.y, data.train.y)  # labels unchanged
    assert torch.equal(ps.train.x[~p], data.train.x[~p])
    assert len(ps.test_triggered) == 30 and (ps.test_triggered_true != 2).all() and (ps.test_triggered.y == 2).all()


def test_perturbation_within_eps_and_corners_stamped(poisoned, data):
    ps = poisoned
    p = ps.oracle.is_poison
    mask, pat = four_corner_trigger((3, 16, 16))
    inside = mask[0] > 0
    got, clean = ps.train.x[p].long(), data.train.x[p].long()
    assert (got[:, :, inside] == pat[:, inside].mul(255).long()).all()  # corners stamped exactly
    delta = (got - clean)[:, :, ~inside]
    assert delta.abs().max() <= 16 and delta.abs().float().mean() > 2  # PGD moved pixels, within eps
    test_in = ps.test_triggered.x.long()
    assert (test_in[:, :, inside] == pat[:, inside].mul(255).long()).all()


def test_pgd_increases_true_label_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    adv = pgd_untargeted(model, x, y, eps=8 / 255, step=1 / 255, steps=10)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    assert ce(model(adv), y) > ce(model(x), y) + 0.05


def test_determinism_by_seed(poisoned, data):
    again = build_and_poison(data.train, data.test, "lc", seed=0, rate=0.5, target=2, ctx=CTX, **FIT)
    assert torch.equal(again.train.x, poisoned.train.x)


def test_bad_options(data):
    with pytest.raises(AttackConfigError, match="do not fit"):
        build_attack("lc").check_image((3, 5, 5))
    with pytest.raises(AttackConfigError, match="eps"):
        build_attack("lc", eps=0)
    with pytest.raises(AttackConfigError, match="clean-label"):
        build_and_poison(data.train, data.test, "lc", rate=0.1, mode="all_to_one", rate_of="dataset", ctx=CTX, **FIT)
