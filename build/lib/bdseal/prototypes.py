"""Class prototypes in a feature space (shared by PGRL and PGBD).

- ``class_means``: per-class mean vectors (PGRL: normalised mean sphere vectors of D_v).
- ``kmeans_prototypes``: per class, k-means with k centres, prototype = mean of the centres
  (PGBD, REFERENCE.md: k = 3 on flattened activations).
- ``momentum_update``: P ← α·P_new + (1 − α)·P_old (PGBD: α = 0.75 weights the *new* prototype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int, normalize: bool = False) -> torch.Tensor:
    """(K, D) mean feature per class; raises when a class has no sample."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"no samples for classes {missing}")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    means = sums / counts[:, None].to(features.dtype)
    return F.normalize(means, dim=1) if normalize else means


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding on (N, D) points; returns (k, D) centres."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=g).item()]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(dim=1).values
        probs = (d2 / d2.sum()).cpu() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        centres.append(x[torch.multinomial(probs, 1, generator=g).item()])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        new = c.clone()
        for j in range(k):  # k is tiny (3); loop over centres, not samples
            members = x[assign == j]
            if len(members):
                new[j] = members.mean(dim=0)
        if torch.allclose(new, c):
            break
        c = new
    return c


def kmeans_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class k-means centres (K, k, D) and prototypes = mean of the centres (K, D)."""
    flat = features.flatten(1)
    centres = torch.stack([kmeans(flat[labels == c], k, seed=seed + c) for c in range(num_classes)])
    return centres, centres.mean(dim=1)


def momentum_update(old: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·new + (1 − α)·old."""
    return alpha * new + (1.0 - alpha) * old
