"""GSSD figures as pure functions (matplotlib, Agg backend): Fig. 2 (v_y histograms per class), Fig. 3
(poisoning-score distribution within a target class) and Fig. 1 (2-D UMAP of the feature space).

The defense itself draws them without ground truth (``poison_mask=None``). The experiment layer, which
holds the ground truth, redraws Fig. 3 / Fig. 1 with its poison mask from the ``gssd_scores.safetensors`` the
defense saves in the run directory (see docs/gssd.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from bdseal.plotting import pyplot, save_figure


def _save(fig, path: str | Path | None):
    if path is not None:
        save_figure(fig, path, dpi=110, tight_bbox=True)
    return fig


def plot_vy_histograms(v_by_class: Mapping[int, torch.Tensor], mu_by_class: Mapping[int, float] | None = None, *,
                       lam: float | Mapping[int, float] = 0.75, bins: int = 30, flagged: Sequence[int] = (), path: str | Path | None = None):
    """Fig. 2: one panel per class with the 30-bin histogram of v_y (Eq. 3), λ (dashed; one value
    or one per class) and μ_y (red)."""
    plt = pyplot()
    ks = sorted(v_by_class)
    cols = min(5, max(1, len(ks)))
    rows = -(-len(ks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(ks):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, ks):
        v = torch.as_tensor(v_by_class[k]).double().cpu().numpy()
        ax.hist(v, bins=bins, color="tab:red" if k in flagged else "tab:blue", alpha=0.8)
        ax.axvline(lam[k] if isinstance(lam, Mapping) else lam, ls="--", c="k", lw=0.8)
        mu = (mu_by_class or {}).get(k)
        if mu is not None and mu == mu:
            ax.axvline(mu, c="r", lw=1.0)
        ax.set_title(f"class {k}" + (" (flagged)" if k in flagged else ""), fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("max foreign per-dim density v_y", fontsize=10)
    return _save(fig, path)


def plot_sigma_distribution(score: torch.Tensor, poison_mask: torch.Tensor | None = None, *, bins: int = 40,
                            title: str = "poisoning score", path: str | Path | None = None):
    """Fig. 3: histogram of a target class's poisoning scores; with ``poison_mask`` clean samples blue and
    poisoned red (the mask comes from the experiment layer, never from the defense)."""
    plt = pyplot()
    s = torch.as_tensor(score).double().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 3))
    edges = np.histogram_bin_edges(s, bins=bins)
    if poison_mask is None:
        ax.hist(s, bins=edges, color="tab:gray")
    else:
        m = torch.as_tensor(poison_mask).bool().cpu().numpy()
        ax.hist(s[~m], bins=edges, color="tab:blue", alpha=0.7, label="clean")
        ax.hist(s[m], bins=edges, color="tab:red", alpha=0.7, label="poisoned")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_umap(features: torch.Tensor, labels: torch.Tensor, poison_mask: torch.Tensor | None = None, *,
              n_neighbors: int = 15, seed: int = 0, path: str | Path | None = None):
    """Fig. 1: 2-D UMAP (umap-learn, precomputed exact kNN from ``torch.cdist`` instead of its approximate
    search) coloured by class, poisoned samples in black when ``poison_mask`` is given."""
    from bdseal.knn import umap_embed

    plt = pyplot()
    emb = umap_embed(torch.as_tensor(features).float(), 2, n_neighbors=n_neighbors, seed=seed)
    y = torch.as_tensor(labels).cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    m = np.zeros(len(y), dtype=bool) if poison_mask is None else torch.as_tensor(poison_mask).bool().cpu().numpy()
    ax.scatter(emb[~m, 0], emb[~m, 1], c=y[~m], cmap="tab10", s=3, linewidths=0)
    if m.any():
        ax.scatter(emb[m, 0], emb[m, 1], c="k", s=3, linewidths=0, label="poisoned")
        ax.legend(fontsize=8, markerscale=3)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)
