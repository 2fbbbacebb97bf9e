"""Deterministic per-class subsets: defender hold-outs, k-per-class subsets, reduced-scale runs.

All selections are stratified by label, seeded with a CPU ``torch.Generator`` (so results do not
depend on the dataset's device), and returned with indices sorted ascending (subsets keep the
original order). Index tensors are int64 on the dataset's label device.
"""

from __future__ import annotations

import numbers

import torch

from .dataset import DataError, ImageDataset

__all__ = ["per_class_subset", "split_holdout", "stratified_subsample"]


def _grouped_ranks(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random order of ``range(len(y))`` grouped by class, and each element's rank in its class.

    Returns ``(order, rank)``: ``order`` lists indices class by class (random within a class),
    ``rank[i]`` is the 0-based position of ``order[i]`` inside its class."""
    y = y.cpu()
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    ys = y[perm]
    srt = torch.sort(ys, stable=True).indices
    order = perm[srt]
    ys = ys[srt]
    counts = torch.bincount(ys, minlength=int(ys.max()) + 1 if len(ys) else 0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(ys)) - starts[ys]
    return order, rank


def _take(ds: ImageDataset, quota: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``quota[c]`` random samples of each class ``c``; return sorted (picked, rest) indices."""
    order, rank = _grouped_ranks(ds.y, seed)
    y = ds.y.cpu()
    chosen = rank < quota[y[order]]
    picked = torch.sort(order[chosen]).values
    rest = torch.sort(order[~chosen]).values
    dev = ds.y.device
    return picked.to(dev), rest.to(dev)


def _counts(ds: ImageDataset) -> torch.Tensor:
    return torch.bincount(ds.y.cpu(), minlength=ds.num_classes)


def split_holdout(
    ds: ImageDataset, fraction: float, seed: int = 0, min_per_class: int = 0
) -> tuple[ImageDataset, ImageDataset, torch.Tensor, torch.Tensor]:
    """Stratified hold-out: returns ``(kept, held, idx_kept, idx_held)``.

    Each class with ``n`` samples holds out ``max(round(fraction * n), min(min_per_class, n // 2))`` of them
    (the floor never takes more than half a class), at least 1 when ``fraction > 0`` and at most ``n - 1``
    when ``n > 1`` (a singleton class goes to ``held``). ``fraction`` must be in [0, 1); ``min_per_class``
    applies only when ``fraction > 0``."""
    if not 0.0 <= float(fraction) < 1.0:
        raise DataError(f"hold-out fraction must be in [0, 1), got {fraction}")
    if isinstance(min_per_class, bool) or int(min_per_class) != min_per_class or min_per_class < 0:
        raise DataError(f"hold-out min_per_class must be a non-negative integer, got {min_per_class!r}")
    n = _counts(ds)
    quota = torch.round(float(fraction) * n.double()).long()
    if fraction > 0:
        quota = torch.maximum(quota, torch.clamp(n // 2, max=int(min_per_class)))
        quota = torch.minimum(quota.clamp_min(1), (n - 1).clamp_min(1))
    quota = torch.minimum(quota, n)
    held, kept = _take(ds, quota, seed)
    return ds.subset(kept), ds.subset(held), kept, held


def per_class_subset(
    ds: ImageDataset, k: int | None = None, fraction: float | None = None, seed: int = 0
) -> tuple[ImageDataset, torch.Tensor]:
    """Exactly ``k`` samples of every class (``DataError`` if a class has fewer), or
    ``round(fraction * n_c)`` of each class (at least 1 of a non-empty class) with ``fraction``
    in (0, 1]. Give exactly one of ``k`` / ``fraction``. Returns ``(subset, idx)``."""
    if (k is None) == (fraction is None):
        raise DataError("per_class_subset: give exactly one of k or fraction")
    n = _counts(ds)
    if k is not None:
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise DataError(f"per_class_subset: k must be a non-negative integer, got {k!r}")
        short = [(ds.classes[c], int(n[c])) for c in range(len(n)) if n[c] < k]
        if short:
            raise DataError(f"per_class_subset: need {k} per class but classes have fewer: {short[:10]}")
        quota = torch.full_like(n, int(k))
    else:
        if not 0.0 < float(fraction) <= 1.0:  # type: ignore[arg-type]
            raise DataError(f"per_class_subset: fraction must be in (0, 1], got {fraction}")
        quota = torch.round(float(fraction) * n.double()).long()  # type: ignore[arg-type]
        quota = torch.where(n > 0, quota.clamp(1), quota)
    idx, _ = _take(ds, quota, seed)
    return ds.subset(idx), idx


def stratified_subsample(ds: ImageDataset, size: int | float, seed: int = 0) -> ImageDataset:
    """Reduced-scale copy for CPU runs: an ``int`` keeps at most ``size`` samples per class (all of a
    smaller class), a ``float`` in (0, 1] keeps that fraction of each class (at least 1)."""
    n = _counts(ds)
    if isinstance(size, bool):
        raise DataError(f"stratified_subsample: size must be an int or a float, got {size!r}")
    if isinstance(size, numbers.Integral):
        size = int(size)
        if size < 0:
            raise DataError(f"stratified_subsample: per-class size must be >= 0, got {size}")
        quota = n.clamp(max=size)
    elif isinstance(size, numbers.Real):
        size = float(size)
        if not 0.0 < size <= 1.0:
            raise DataError(f"stratified_subsample: fraction must be in (0, 1], got {size}")
        quota = torch.round(size * n.double()).long()
        quota = torch.where(n > 0, quota.clamp(1), quota)
    else:
        raise DataError(f"stratified_subsample: size must be an int or a float, got {size!r}")
    idx, _ = _take(ds, quota, seed)
    return ds.subset(idx)
