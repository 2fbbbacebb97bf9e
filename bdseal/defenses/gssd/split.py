"""GSSD's dataset split (seed §4.6, REFERENCE.md "Scores" [V]).

Within every flagged class, samples are ranked by the poisoning score π = −log σ_y (higher = more
suspicious): the ``α_P`` share with the highest π forms D̂_P, the ``α_C`` share with the lowest π is kept
in D̂_C, the rest is uncertain (D̂_U, dropped). Counts follow the authors' integer rounding:
``|D̂_P| = ⌊α_P·n⌋`` and ``|D̂_C| = n − ⌊(1 − α_C)·n⌋``. Samples of unflagged classes all go to D̂_C.
Only ND classes are relabelled (Eq. 7: the best foreign flow); D̂_P of a D class is dropped unrelabelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bdseal.errors import ConfigError


@dataclass
class Split:
    """Boolean masks over the training set (disjoint) and relabels (−1 where not relabelled)."""

    clean: torch.Tensor
    poisoned: torch.Tensor
    uncertain: torch.Tensor
    relabels: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {"clean": int(self.clean.sum()), "poisoned": int(self.poisoned.sum()),
                "uncertain": int(self.uncertain.sum()), "relabelled": int((self.relabels >= 0).sum())}


def split_counts(n: int, alpha_c: float, alpha_p: float) -> tuple[int, int]:
    """(kept clean, poisoned) counts of a flagged class of ``n`` samples (authors' rounding)."""
    if not (0 < alpha_c <= 0.5 and 0 <= alpha_p <= 0.5):
        raise ConfigError(f"need α_C in (0, 0.5] and α_P in [0, 0.5], got {alpha_c}, {alpha_p}")
    return n - math.floor((1 - alpha_c) * n + 1e-9), math.floor(alpha_p * n + 1e-9)


def split_dataset(labels: torch.Tensor, score: torch.Tensor, relabel_to: torch.Tensor, flagged_nd: list[int],
                  flagged_d: list[int], alpha_c: float = 0.3, alpha_p: float = 0.15) -> Split:
    """Split by per-class ranking of ``score`` (π, higher = more suspicious). ``relabel_to`` (N,): the
    best foreign class of each sample (Eq. 7), used for D̂_P of ND classes."""
    n = len(labels)
    labels = labels.long()
    clean = torch.ones(n, dtype=torch.bool, device=labels.device)
    poisoned = torch.zeros_like(clean)
    relabels = torch.full((n,), -1, dtype=torch.long, device=labels.device)
    for c in sorted(set(flagged_nd) | set(flagged_d)):
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        order = idx[torch.argsort(score[idx], stable=True)]  # ascending π: cleanest first
        n_c, n_p = split_counts(len(idx), alpha_c, alpha_p)
        clean[idx] = False
        clean[order[:n_c]] = True
        if n_p:
            top = order[len(order) - n_p:]
            poisoned[top] = True
            if c in flagged_nd and c not in flagged_d:
                relabels[top] = relabel_to[top].long()
    uncertain = ~(clean | poisoned)
    return Split(clean, poisoned, uncertain, relabels)
