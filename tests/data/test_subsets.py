"""Per-class subsets: counts, disjointness, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from bdseal.data import DataError, ImageDataset, per_class_subset, split_holdout, stratified_subsample


def _ds(counts: list[int]) -> ImageDataset:
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.arange(len(y), dtype=torch.int64).view(-1, 1, 1, 1).expand(-1, 1, 2, 2) % 256
    return ImageDataset(x.to(torch.uint8).contiguous(), y, [f"c{i}" for i in range(len(counts))])


def test_split_holdout_counts_disjoint() -> None:
    ds = _ds([50, 20, 7, 1])
    kept, held, ik, ih = split_holdout(ds, 0.1, seed=0)
    assert held.y.bincount(minlength=4).tolist() == [5, 2, 1, 1]
    assert kept.y.bincount(minlength=4).tolist() == [45, 18, 6, 0]
    assert set(ik.tolist()).isdisjoint(ih.tolist())
    assert sorted(ik.tolist() + ih.tolist()) == list(range(len(ds)))
    assert torch.equal(ik, ik.sort().values) and ik.dtype == torch.int64
    assert torch.equal(held.y, ds.y[ih]) and torch.equal(kept.x, ds.x[ik])
    assert held.classes == ds.classes
    # determinism and seed dependence
    assert torch.equal(split_holdout(ds, 0.1, seed=0)[3], ih)
    assert not torch.equal(split_holdout(ds, 0.1, seed=1)[3], ih)
    # fraction 0 keeps everything
    k0, h0, _, _ = split_holdout(ds, 0.0, seed=0)
    assert len(h0) == 0 and len(k0) == len(ds)
    # at least one held per class even for tiny fractions, never a whole class of size > 1
    _, h, _, _ = split_holdout(ds, 0.001, seed=0)
    assert h.y.bincount(minlength=4).tolist() == [1, 1, 1, 1]
    kept9, _, _, _ = split_holdout(ds, 0.99, seed=0)
    assert kept9.y.bincount(minlength=4).tolist()[:3] == [1, 1, 1]


def test_split_holdout_min_per_class_raises_small_quotas_only() -> None:
    """max(round(fraction * n), min(min_per_class, n // 2)); classes above the floor are unchanged, a small class
    gives at most half, and the hold-out without a floor is what the fraction alone gives."""
    ds = _ds([200, 50, 12, 1])
    _, held, _, _ = split_holdout(ds, 0.1, seed=0, min_per_class=10)
    assert held.y.bincount(minlength=4).tolist() == [20, 10, 6, 1]
    _, held0, _, _ = split_holdout(ds, 0.1, seed=0)
    assert held0.y.bincount(minlength=4).tolist() == [20, 5, 1, 1]
    _, none_held, _, _ = split_holdout(ds, 0.0, seed=0, min_per_class=10)
    assert len(none_held) == 0  # no hold-out asked for: the floor does not apply
    with pytest.raises(DataError, match="min_per_class"):
        split_holdout(ds, 0.1, seed=0, min_per_class=-1)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_holdout_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError):
        split_holdout(_ds([5, 5]), fraction, seed=0)


def test_per_class_subset() -> None:
    ds = _ds([30, 12, 9])
    sub, idx = per_class_subset(ds, k=5, seed=2)
    assert sub.y.bincount().tolist() == [5, 5, 5]
    assert len(set(idx.tolist())) == 15 and torch.equal(sub.y, ds.y[idx])
    assert torch.equal(per_class_subset(ds, k=5, seed=2)[1], idx)
    frac, _ = per_class_subset(ds, fraction=0.5)
    assert frac.y.bincount().tolist() == [15, 6, 4]  # round(4.5) == 4 (banker's rounding)
    with pytest.raises(DataError, match="fewer"):
        per_class_subset(ds, k=10)
    with pytest.raises(DataError):
        per_class_subset(ds)
    with pytest.raises(DataError):
        per_class_subset(ds, k=2, fraction=0.5)
    with pytest.raises(DataError):
        per_class_subset(ds, fraction=0.0)


def test_stratified_subsample() -> None:
    ds = _ds([40, 10, 3])
    s = stratified_subsample(ds, 8, seed=0)
    assert s.y.bincount().tolist() == [8, 8, 3]  # capped, small classes kept whole
    f = stratified_subsample(ds, 0.25, seed=0)
    assert f.y.bincount().tolist() == [10, 2, 1]
    assert torch.equal(stratified_subsample(ds, 8, seed=0).x, s.x)
    assert len(stratified_subsample(ds, 1.0)) == len(ds)
    with pytest.raises(DataError):
        stratified_subsample(ds, -1)
    with pytest.raises(DataError):
        stratified_subsample(ds, 1.5)
