import pytest
import torch

from bdseal.attacks.plan import AttackConfigError, make_plan

LABELS = torch.arange(10).repeat_interleave(100)  # 1000 samples, 100 per class


def test_all_to_one_counts_sources_and_labels():
    p = make_plan(LABELS, 10, rate=0.1, target=3, seed=0)
    assert len(p.poison_idx) == 100
    assert (LABELS[p.poison_idx] != 3).all()  # victims from non-target classes
    assert (p.poison_labels == 3).all()
    assert p.target_map[3] == -1 and (p.target_map[torch.arange(10) != 3] == 3).all()


def test_all_to_all_maps_to_next_class():
    p = make_plan(LABELS, 10, rate=0.05, mode="all_to_all", seed=1)
    assert torch.equal(p.poison_labels, (LABELS[p.poison_idx] + 1) % 10)


def test_clean_label_keeps_labels_and_rate_of_target_class():
    p = make_plan(LABELS, 10, rate=0.25, target=2, mode="clean_label", rate_of="target_class")
    assert len(p.poison_idx) == 25
    assert (LABELS[p.poison_idx] == 2).all() and (p.poison_labels == 2).all()
    with pytest.raises(AttackConfigError, match="eligible"):
        make_plan(LABELS, 10, rate=0.5, target=2, mode="clean_label")  # 500 > 100 target images


def test_cover_disjoint_and_counted():
    p = make_plan(LABELS, 10, rate=0.01, cover_rate=0.01, seed=2)
    assert len(p.cover_idx) == 10 and len(p.poison_idx) == 10
    assert not set(p.cover_idx.tolist()) & set(p.poison_idx.tolist())


def test_source_specific():
    p = make_plan(LABELS, 10, rate=0.05, target=9, mode="source_specific", source_classes=[0])
    assert (LABELS[p.poison_idx] == 0).all() and (p.poison_labels == 9).all()
    assert p.target_map.tolist() == [9] + [-1] * 9


def test_determinism_by_seed():
    a, b = make_plan(LABELS, 10, rate=0.1, seed=5), make_plan(LABELS, 10, rate=0.1, seed=5)
    c = make_plan(LABELS, 10, rate=0.1, seed=6)
    assert torch.equal(a.poison_idx, b.poison_idx) and not torch.equal(a.poison_idx, c.poison_idx)


@pytest.mark.parametrize("kw,msg", [({"rate": 0.0}, "rate"), ({"rate": 1.0}, "rate"), ({"rate": 0.1, "target": 10}, "target"),
                                     ({"rate": 0.1, "mode": "bogus"}, "mode"), ({"rate": 0.1, "cover_rate": -0.1}, "cover")])
def test_bad_options(kw, msg):
    with pytest.raises(AttackConfigError, match=msg):
        make_plan(LABELS, 10, **kw)


@pytest.mark.parametrize("mode,kw,cover_from,allowed", [
    ("source_specific", {"target": 9, "source_classes": [0, 1]}, "source", {0, 1}),
    ("all_to_one", {"target": 3}, "source", set(range(10)) - {3}),
    ("all_to_one", {"target": 3}, "target", {3}),
    ("all_to_one", {"target": 3}, "any", set(range(10))),
])
def test_cover_pool(mode, kw, cover_from, allowed):
    p = make_plan(LABELS, 10, rate=0.05, cover_rate=0.05, mode=mode, seed=4, cover_from=cover_from, **kw)
    assert len(p.cover_idx) == 50 and p.cover_from == cover_from and p.cover_rate == 0.05
    assert set(LABELS[p.cover_idx].tolist()) <= allowed
    assert not set(p.cover_idx.tolist()) & set(p.poison_idx.tolist())
    again = make_plan(LABELS, 10, rate=0.05, cover_rate=0.05, mode=mode, seed=4, cover_from=cover_from, **kw)
    assert torch.equal(again.cover_idx, p.cover_idx) and torch.equal(again.poison_idx, p.poison_idx)


def test_cover_pool_does_not_change_the_victims():
    a = make_plan(LABELS, 10, rate=0.05, cover_rate=0.05, target=9, mode="source_specific", source_classes=[0], seed=1)
    b = make_plan(LABELS, 10, rate=0.05, cover_rate=0.05, target=9, mode="source_specific", source_classes=[0], seed=1,
                  cover_from="source")
    assert torch.equal(a.poison_idx, b.poison_idx) and not torch.equal(a.cover_idx, b.cover_idx)


def test_cover_pool_errors():
    with pytest.raises(AttackConfigError, match="cover pool"):
        make_plan(LABELS, 10, rate=0.1, cover_from="bogus")
    with pytest.raises(AttackConfigError, match="source-class covers requested"):  # 100 source images, 50 poisoned
        make_plan(LABELS, 10, rate=0.05, cover_rate=0.06, target=9, mode="source_specific", source_classes=[0],
                  cover_from="source")
    with pytest.raises(AttackConfigError, match="cover samples requested"):
        make_plan(LABELS, 10, rate=0.5, cover_rate=0.6)
