"""Preprocessing against disruptive attacks (REFERENCE.md VIBE facts [V], SS variants only).

Unweighted symmetric kNN graph (k = 50, Euclidean, exact via ``torch.cdist`` in chunks) on the
un-augmented training features; Leiden (``igraph``'s C implementation, modularity objective,
iterated to convergence) at resolutions linspace(0.1, 3, 50), keeping the first partition whose
cluster count is closest to K + 1. For each cluster centroid: its mean Euclidean distance to all
K + 1 centroids (itself included), divided by the largest such mean; deviation = |own − mean of the
others|. At most one cluster — the most deviating — is removed, and only if its deviation > δ = 0.275.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bdseal.knn import exact_knn


@dataclass
class LeidenResult:
    keep: torch.Tensor  # (N,) bool
    clusters: torch.Tensor  # (N,) cluster id of the chosen partition
    resolution: float
    deviations: list[float] = field(default_factory=list)
    removed: int | None = None  # removed cluster id

    def summary(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "n_clusters": len(self.deviations), "deviations": self.deviations,
                "removed_cluster": self.removed, "n_removed": int((~self.keep).sum())}


def knn_edges(features: torch.Tensor, k: int) -> np.ndarray:
    """Undirected edge list (E, 2) of the symmetric (union) exact kNN graph, self excluded."""
    n = len(features)
    k = min(k, n - 1)
    j = exact_knn(features, k, include_self=False)[0].reshape(-1)
    i = torch.arange(n).repeat_interleave(k)
    e = torch.stack([torch.minimum(i, j), torch.maximum(i, j)], 1)
    return torch.unique(e, dim=0).numpy()


def leiden_partition(edges: np.ndarray, n: int, target: int, resolutions: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """The first partition (over ``resolutions``) whose cluster count is closest to ``target``."""
    import igraph as ig

    g = ig.Graph(n=n, edges=edges.tolist(), directed=False)
    best, best_gap, best_res = None, None, float(resolutions[0])
    for r in resolutions:
        random.seed(seed)  # igraph draws from Python's random module
        memb = np.asarray(g.community_leiden(objective_function="modularity", resolution=float(r), n_iterations=-1).membership)
        gap = abs(int(memb.max()) + 1 - target)
        if best_gap is None or gap < best_gap:
            best, best_gap, best_res = memb, gap, float(r)
        if gap == 0:
            break
    return best, best_res


def centroid_deviations(features: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Per cluster: |m_j − mean_{i≠j} m_i| with m = mean distance of each centroid to all centroids
    (itself included), scaled by its maximum."""
    m = int(clusters.max()) + 1
    cent = torch.zeros(m, features.shape[1]).index_add_(0, clusters, features.float())
    cent /= torch.bincount(clusters, minlength=m).clamp_min(1)[:, None].float()
    md = torch.cdist(cent, cent).mean(1)
    md = md / md.max().clamp_min(1e-12)
    others = (md.sum() - md) / max(1, m - 1)
    return (md - others).abs()


def leiden_filter(features: torch.Tensor, num_classes: int, k: int = 50, resolutions: tuple[float, float, int] = (0.1, 3.0, 50),
                  delta: float = 0.275, seed: int = 0) -> LeidenResult:
    """Drop at most one outlying cluster of the training features (see module doc)."""
    f = features.detach().float().cpu()
    edges = knn_edges(f, k)
    memb, res = leiden_partition(edges, len(f), num_classes + 1, np.linspace(*resolutions[:2], int(resolutions[2])), seed)
    clusters = torch.as_tensor(memb, dtype=torch.long)
    dev = centroid_deviations(f, clusters)
    keep = torch.ones(len(f), dtype=torch.bool)
    removed = None
    j = int(dev.argmax())
    if len(dev) > 1 and float(dev[j]) > delta:
        removed = j
        keep = clusters != j
    return LeidenResult(keep, clusters, res, [round(float(d), 6) for d in dev], removed)
