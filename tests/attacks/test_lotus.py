import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack, make_plan
from bdseal.attacks.triggers.lotus import COLOURS, square_geometry, square_triggers
from bdseal.data.sources import load_synthetic
from tests.attacks._fast import CTX, E2E, TINY
from tests.helpers import run_cell

POLICY = {"rate": 0.1, "cover_rate": 0.1, "target": 3, "source_classes": [0]}


@pytest.fixture(scope="module")
def data():
    return load_synthetic(num_classes=4, n_train=60, n_test=20, image_size=16)


@pytest.fixture(scope="module")
def attacked(data):
    atk = build_attack("lotus", seed=0, **TINY)
    from bdseal.attacks import poison_dataset

    return atk, poison_dataset(data.train, data.test, atk, seed=0, ctx=CTX, **POLICY)


def test_square_layout_matches_the_paper():
    assert square_geometry(32, 32)[:4] == [(2, 2, 6), (24, 24, 6), (2, 24, 6), (24, 2, 6)]  # side H/5, inset H/16
    masks, pats = square_triggers((3, 32, 32), 4)
    assert masks.sum(dim=(1, 2, 3)).tolist() == [36.0] * 4 and masks.sum(0).max() == 1  # disjoint
    assert torch.allclose(pats[1, :, 24:30, 24:30], COLOURS[1][:, None, None].expand(3, 6, 6))
    assert torch.allclose(square_triggers((1, 32, 32), 1)[1][0, 0, 2, 2], COLOURS[0].mean())


def test_source_specific_counts_labels_and_partition_triggers(attacked, data):
    atk, ps = attacked
    p, c = ps.oracle.is_poison, ps.oracle.is_cover
    assert int(p.sum()) == 24 and int(c.sum()) == 24 and not (p & c).any()
    assert (ps.oracle.true_labels[p] == 0).all() and (ps.train.y[p] == 3).all()
    assert (ps.oracle.true_labels[c] == 0).all() and (ps.train.y[c] == 0).all()  # covers: source class, label kept
    assert torch.equal(ps.train.x[~(p | c)], data.train.x[~(p | c)])
    masks, pats = square_triggers((3, 16, 16), 4)
    part = atk.partition[p]
    assert len(set(part.tolist())) > 1  # several partitions are poisoned
    for x_p, x_c, j in zip(ps.train.x[p], data.train.x[p], part.tolist()):
        m = masks[j, 0] > 0
        assert torch.equal(x_p[:, m].float(), (pats[j][:, m] * 255).round())  # own square exactly
        assert torch.equal(x_p[:, ~m], x_c[:, ~m])  # nothing else


def test_covers_are_trigger_focusing_negatives(attacked, data):
    atk, ps = attacked
    c = ps.oracle.is_cover
    bits = atk.cover_bits[c]
    own = 1 << atk.partition[c]
    assert (bits != own).all()  # never the own trigger alone
    n_squares = torch.tensor([bin(int(b)).count("1") for b in bits])
    comb = (bits & own) != 0
    assert ((n_squares == 2) == comb).all() and ((n_squares == 1) == ~comb).all()
    assert 0 < int(comb.sum()) < len(bits)  # both individual and combination negatives
    changed = (ps.train.x[c] != data.train.x[c]).any(dim=1)  # (n, H, W)
    masks, _ = square_triggers((3, 16, 16), 4)
    allowed = torch.einsum("bn,nhw->bhw", ((bits[:, None] >> torch.arange(4)) & 1).float(), masks[:, 0]) > 0
    assert not (changed & ~allowed).any()


def test_test_trigger_uses_the_partition_of_each_image(attacked):
    atk, ps = attacked
    assert len(ps.test_triggered) == 20 and (ps.test_triggered_true == 0).all() and (ps.test_triggered.y == 3).all()
    masks, _ = square_triggers((3, 16, 16), 4)
    x = ps.test_clean.x[ps.test_clean.y == 0].float() / 255
    part = atk.assign(x)
    changed = (ps.test_triggered.x != ps.test_clean.x[ps.test_clean.y == 0]).any(dim=1)
    assert not (changed & (masks[part, 0] == 0)).any()


def test_determinism_by_seed(attacked, data):
    again = build_and_poison(data.train, data.test, "lotus", seed=0, ctx=CTX, **POLICY, **TINY)
    ps = attacked[1]
    assert torch.equal(again.train.x, ps.train.x) and torch.equal(again.oracle.is_cover, ps.oracle.is_cover)
    assert torch.equal(again.test_triggered.x, ps.test_triggered.x)


def test_the_plan_draws_source_class_covers(attacked, data):
    """Covers come from make_plan's "source" pool (Lotus.cover_pool), are kept as drawn by fit, and are
    bit-identical by seed."""
    atk, ps = attacked
    assert atk.cover_pool == "source" and ps.plan.cover_from == "source"
    plan = make_plan(data.train.y, 4, rate=0.1, cover_rate=0.1, target=3, mode="source_specific", source_classes=[0],
                     seed=0, cover_from="source")
    assert torch.equal(ps.plan.cover_idx, plan.cover_idx) and torch.equal(ps.plan.poison_idx, plan.poison_idx)
    assert torch.equal(torch.nonzero(ps.oracle.is_cover).flatten(), plan.cover_idx)  # fit did not re-draw
    assert (data.train.y[plan.cover_idx] == 0).all() and len(plan.cover_idx) == len(plan.poison_idx)
    assert not set(plan.cover_idx.tolist()) & set(plan.poison_idx.tolist())
    other = make_plan(data.train.y, 4, rate=0.1, cover_rate=0.1, target=3, mode="source_specific", source_classes=[0],
                      seed=1, cover_from="source")
    assert not torch.equal(other.cover_idx, plan.cover_idx)


def test_default_cover_count_is_the_poison_count(data):
    ps = build_and_poison(data.train, data.test, "lotus", rate=0.1, target=3, source_classes=[0], seed=0, ctx=CTX, **TINY)
    p, c = ps.oracle.is_poison, ps.oracle.is_cover
    assert int(c.sum()) == int(p.sum()) == 24 and (ps.oracle.true_labels[c] == 0).all() and not (p & c).any()


def test_fit_rejects_covers_outside_the_source_class(data):
    plan = make_plan(data.train.y, 4, rate=0.1, cover_rate=0.1, target=3, mode="source_specific", source_classes=[0],
                     seed=0, cover_from="target")
    with pytest.raises(AttackConfigError, match="not-poisoned source-class"):
        build_attack("lotus", **TINY).fit(data.train, plan, CTX)


def test_bad_options(data):
    with pytest.raises(AttackConfigError, match="too small"):
        build_attack("lotus").check_image((3, 6, 6))
    with pytest.raises(AttackConfigError, match="num_partitions"):
        build_attack("lotus", num_partitions=9)
    with pytest.raises(AttackConfigError, match="source class"):
        build_and_poison(data.train, data.test, "lotus", rate=0.05, target=0, source_classes=[0], ctx=CTX, **TINY)
    with pytest.raises(AttackConfigError, match="source-class covers"):
        build_and_poison(data.train, data.test, "lotus", rate=0.1, cover_rate=0.2, target=3, source_classes=[0],
                         ctx=CTX, **TINY)


@pytest.mark.slow
def test_end_to_end_backdoor_is_learned(tmp_path):
    # 32x32 (squares of 6 px survive crop+flip); 15% of the set poisoned from source 0, 5% focusing covers.
    m, _ = run_cell(tmp_path, ["attack=lotus", *E2E, "dataset.options.image_size=32", "attack.target=3",
                               "attack.rate=0.15", "attack.cover_rate=0.05", "train.epochs=10"])
    assert m["clean_acc"] > 0.5 and m["asr"] > 0.6
