import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.patterns import adaptive_patch_triggers, kitty
from bdseal.attacks.triggers.adaptive import piece_ids
from bdseal.data.dataset import ImageDataset


def _data(n=400, k=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(x, torch.arange(k).repeat(n // k))


def test_piece_grid_covers_every_pixel():
    ids = piece_ids(32, 32, 4)
    assert torch.equal(torch.bincount(ids.flatten()), torch.full((16,), 64))
    assert torch.equal(torch.bincount(piece_ids(30, 50, 4).flatten()).gt(0), torch.ones(16, dtype=torch.bool))


def test_adap_blend_masks_exactly_half_the_pieces_per_sample():
    atk = build_attack("adap_blend")  # 16 pieces, 8 masked, alpha .15 / .2
    idx = torch.arange(50)
    kept = atk.kept_pieces(idx)
    assert (kept.sum(1) == 8).all()
    assert len({tuple(r.tolist()) for r in kept}) > 40  # masks differ between samples
    x = torch.rand(50, 3, 32, 32)
    out = atk.apply(x, phase="train", index=idx)
    m = atk.sample_masks(idx, 32, 32)
    p = kitty(32, 32)
    assert torch.allclose(out, x + 0.15 * m * (p - x), atol=1e-6)
    assert torch.equal(out * (1 - m), x * (1 - m))  # masked pieces untouched
    assert torch.allclose(atk.apply(x, phase="test"), x + 0.2 * (p - x), atol=1e-6)  # full pattern at test


def test_adap_blend_masks_depend_only_on_seed_and_index():
    a, b = build_attack("adap_blend", seed=1), build_attack("adap_blend", seed=2)
    idx = torch.tensor([3, 99, 3])
    x = torch.rand(3, 3, 64, 64)
    out = a.apply(x, phase="train", index=idx)
    assert torch.equal(out[1:2], a.apply(x[1:2], phase="train", index=idx[1:2]))
    assert torch.equal(a.kept_pieces(idx)[0], a.kept_pieces(idx)[2])
    assert not torch.equal(a.kept_pieces(torch.arange(20)), b.kept_pieces(torch.arange(20)))
    with pytest.raises(AttackConfigError, match="training indices"):
        a.apply(x, phase="train")


def test_adap_blend_poison_and_cover_counts():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "adap_blend", rate=0.05, cover_rate=0.05, target=0, seed=0)
    p, c = ps.oracle.is_poison, ps.oracle.is_cover
    assert int(p.sum()) == 20 and int(c.sum()) == 20 and not (p & c).any()
    assert (ps.train.y[p] == 0).all() and (train.y[p] != 0).all() and torch.equal(ps.train.y[c], train.y[c])
    assert (ps.train.x[c] != train.x[c]).flatten(1).any(1).all()  # covers are triggered
    assert torch.equal(ps.train.x[~(p | c)], train.x[~(p | c)])
    again = build_and_poison(train, test, "adap_blend", rate=0.05, cover_rate=0.05, target=0, seed=0)
    assert torch.equal(again.train.x, ps.train.x)


def test_adap_patch_assigns_each_trigger_a_quarter_and_changes_only_its_mask():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "adap_patch", rate=0.1, cover_rate=0.05, target=0, seed=0)
    marks, masks = adaptive_patch_triggers(3, 32, 32)
    p_idx, c_idx = ps.plan.poison_idx, ps.plan.cover_idx
    for idx, n in ((p_idx, 40), (c_idx, 20)):
        assert len(idx) == n
        j = torch.arange(n) * 4 // n  # toolbox: the j-th quarter of the sorted list gets trigger j
        for t in range(4):
            sel = idx[j == t]
            assert len(sel) == n // 4
            changed = (ps.train.x[sel] != train.x[sel]).any(1)  # (n/4, H, W)
            assert not changed[:, ~masks[t, 0].bool()].any()
    assert torch.equal(ps.train.y[c_idx], train.y[c_idx]) and (ps.train.y[p_idx] == 0).all()


def test_adap_patch_train_alphas_and_full_strength_test():
    atk = build_attack("adap_patch")
    marks, masks = adaptive_patch_triggers(3, 32, 32)
    x = torch.rand(4, 3, 32, 32)
    out = atk.apply(x, phase="train", index=torch.arange(4))  # unfitted: trigger = index % 4
    for t, a in enumerate((0.5, 0.2, 0.5, 0.3)):
        assert torch.allclose(out[t], x[t] + a * masks[t] * (marks[t] - x[t]), atol=1e-6)
    tmarks, tmasks = adaptive_patch_triggers(3, 32, 32, ("phoenix_corner2", "badnet_patch4"))
    test = atk.apply(x, phase="test")
    union = tmasks.amax(0).bool()[0]
    assert int(union.sum()) == 50 + 36 - 18  # two 5x5 bottom corners + four 3x3 corners (the bottom two inside them)
    assert torch.equal(test[:, :, ~union], x[:, :, ~union])
    bn = tmasks[1, 0].bool()  # badnet_patch4 applied last at alpha 1: its pixels win
    assert torch.allclose(test[:, :, bn], tmarks[1][:, bn].expand(4, -1, -1), atol=1e-6)
    ph = tmasks[0, 0].bool() & ~bn
    assert torch.allclose(test[:, :, ph], tmarks[0][:, ph].expand(4, -1, -1), atol=1e-6)


@pytest.mark.parametrize("size,c", [(64, 3), (224, 3), (32, 1)])
def test_adaptive_any_size_and_channels(size, c):
    x = torch.rand(2, c, size, size)
    for name in ("adap_blend", "adap_patch"):
        atk = build_attack(name)
        assert atk.apply(x, phase="train", index=torch.tensor([0, 1])).shape == x.shape
        assert atk.apply(x, phase="test").shape == x.shape


@pytest.mark.parametrize("name,kw,msg", [
    ("adap_blend", {"pieces": 15}, "square number"), ("adap_blend", {"masked_pieces": 16}, "masked_pieces"),
    ("adap_blend", {"alpha": 1.5}, "alpha must be in"), ("adap_patch", {"train_alphas": [0.5, 0.5]}, "one train alpha per"),
    ("adap_patch", {"test_triggers": ["logo"]}, "unknown adap_patch trigger"),
    ("adap_patch", {"test_triggers": ["badnet_patch4"], "test_alphas": [1, 1]}, "one value per"),
])
def test_bad_options(name, kw, msg):
    with pytest.raises(AttackConfigError, match=msg):
        build_attack(name, **kw)


def test_too_small_images_are_errors():
    with pytest.raises(AttackConfigError, match="does not fit"):
        build_attack("adap_blend").check_image((3, 2, 2))
    with pytest.raises(AttackConfigError, match="at least 16x16"):
        build_attack("adap_patch").check_image((3, 8, 8))
