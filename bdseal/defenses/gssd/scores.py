"""GSSD's class-level and sample-level scores (seed Eq. 2-7), all pure functions of the (N, K) matrix of
per-dimension log-densities ``logp[i, k] = log p_{θ_k}(z_i) / D`` and the observed labels.

Everything is computed in log-space; the only exponential is Eq. 3's ``v = exp(per-dim log-density)``,
which is bounded because it is per dimension. Sources: the seed for the equations, REFERENCE.md (GSSD
"Thresholds" and "Scores" [V]) for the values, the histogram details and which side of each class's
ranking is kept — REFERENCE.md wins where the two disagree:

* The seed says a class is ND-poisoned when S_ND "exceeds β_ND"; REFERENCE.md gives the equivalent form
  on the negated score: flagged when the mean per-dim NLL of foreign samples ``−S_ND < β_ND = 0.6``.
* The seed says D-poisoned when "S_D is less than β_D"; REFERENCE.md (the authors' code): flagged when
  **more** than ``β_D·n_y`` samples lie below μ_y (the seed's sentence is a typo: β_D is "the minimum
  fraction of poisoned samples per class").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def standardise(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-dimension standardisation over the training set (REFERENCE.md: flows see standardised 512-d
    encoder outputs)."""
    f = features.float()
    return (f - f.mean(0)) / (f.std(0) + eps)


def class_columns(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Column of each sample's observed class in the (N, K) matrix, −1 for classes without a flow."""
    lut = torch.full((int(max(int(labels.max()), max(classes, default=0))) + 1,), -1, dtype=torch.long)
    lut[torch.as_tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    return lut[labels.long().cpu()].to(labels.device)


def own_and_foreign(logp: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: own-class log-density, the best foreign log-density ``max_{y'≠y}`` (Eq. 3 in logs) and
    that foreign column (Eq. 7). Samples with ``col = −1`` get NaN own density and all columns as foreign."""
    own_mask = torch.zeros_like(logp, dtype=torch.bool)
    has = col >= 0
    own_mask[has.nonzero().squeeze(1), col[has]] = True
    own = torch.where(has, logp.gather(1, col.clamp_min(0)[:, None]).squeeze(1), torch.full_like(logp[:, 0], float("nan")))
    foreign_best, foreign_col = logp.masked_fill(own_mask, float("-inf")).max(1)
    return own, foreign_best, foreign_col


def s_nd(logp: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Eq. 2: S_ND^k = mean per-dim log-density under flow k of all samples not labelled k. (K,)"""
    k = logp.shape[1]
    foreign = col[:, None] != torch.arange(k, device=col.device)[None]
    return (logp * foreign).sum(0) / foreign.sum(0).clamp_min(1)


def nd_flags_absolute(snd: torch.Tensor, beta_nd: float) -> torch.Tensor:
    """REFERENCE.md [V]: ND-poisoned when the foreign mean per-dim NLL ``−S_ND < β_ND`` (0.6). Only
    meaningful with standardised features and per-dimension log-densities of the same backbone scale."""
    return -snd < beta_nd


def robust_z(values: torch.Tensor, min_mad: float = 1e-3) -> torch.Tensor:
    """Leave-one-out robust z-score of each class: ``(v_k − median(v_{−k})) / (1.4826·MAD(v_{−k}))``, the
    MAD floored at ``min_mad``. Leaving the candidate out keeps one strong outlier from inflating the
    spread it is judged against (matters with few classes)."""
    k = len(values)
    if k < 3:
        return torch.zeros_like(values)
    others = values.unsqueeze(0).expand(k, k)[~torch.eye(k, dtype=torch.bool, device=values.device)].view(k, k - 1)
    med = others.median(1).values
    mad = (others - med[:, None]).abs().median(1).values.clamp_min(min_mad)
    return (values - med) / (1.4826 * mad)


def loo_z(values: torch.Tensor, min_std: float = 1e-6) -> torch.Tensor:
    """Leave-one-out z of each class: ``(v_k − mean(v_{−k})) / std(v_{−k})`` (unbiased std, floored at
    ``min_std``). Unlike :func:`robust_z` it does not explode when the other classes happen to lie close
    together (a small MAD): on our validation runs (docs/gssd.md, "Calibrating the relative rule") clean classes stayed ≤ 1.2 where
    the robust z reached 3.9."""
    k = len(values)
    if k < 3:
        return torch.zeros_like(values)
    v = values.double()
    others = v.unsqueeze(0).expand(k, k)[~torch.eye(k, dtype=torch.bool, device=values.device)].view(k, k - 1)
    return ((v - others.mean(1)) / others.std(1).clamp_min(min_std)).to(values.dtype)


def nd_flags_robust(snd: torch.Tensor, z_thresh: float, min_mad: float = 1e-3) -> torch.Tensor:
    """Relative rule: a class whose S_ND is an upper outlier among the other classes."""
    return robust_z(snd, min_mad) > z_thresh


@dataclass
class HistogramRule:
    """Result of the D test on one class: μ_y (Eq. 4's threshold; NaN when the rule does not apply), the
    fraction S_D below it, the decision, and the histogram itself (for plots)."""

    mu: float
    s_d: float
    flagged: bool
    counts: list[int]
    edges: list[float]
    lam: float = float("nan")


def histogram_rule(v: torch.Tensor, lam: float = 0.75, bins: int = 30, beta_d: float = 0.05) -> HistogramRule:
    """The D test on the v-scores of one class (seed §4.4 steps i-iv; details from REFERENCE.md [V]).

    A ``bins``-bin equal-width histogram over [min v, max v]; among the bins left of the last edge below
    λ, the emptiest bin m (first on ties) gives μ_y = its left edge; S_D = fraction of samples in bins
    left of m. Flagged when m > 0, S_D·n > β_D·n and the mass left of m is at least twice the count of
    bin m (the authors' guard against flat histograms).
    """
    v = v.detach().double().cpu()
    n = len(v)
    if n == 0:
        return HistogramRule(float("nan"), 0.0, False, [], [], lam)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(v, bins=bins, min=lo, max=hi).long()
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    below = (edges < lam).nonzero().squeeze(1)
    if len(below) <= 1:
        return HistogramRule(float("nan"), 0.0, False, counts.tolist(), edges.tolist(), lam)
    first_below = int(below[-1])
    m = int(torch.argmin(counts[:first_below]))  # argmin returns the first minimum
    mass = int(counts[:m].sum())
    flagged = m != 0 and mass > beta_d * n and mass >= 2 * int(counts[m])
    return HistogramRule(float(edges[m]), mass / n, bool(flagged), counts.tolist(), edges.tolist(), lam)


def v_scores(foreign_best: torch.Tensor) -> torch.Tensor:
    """Eq. 3 with per-dimension densities: v = exp(max_{y'≠y} per-dim log p_{y'}(z))."""
    return foreign_best.exp()


def margin(own: torch.Tensor, foreign_best: torch.Tensor) -> torch.Tensor:
    """Eq. 5 in logs: s = log p_y − max_{y'≠y} log p_{y'} (per-dimension log-densities)."""
    return own - foreign_best


def log_sigma(s: torch.Tensor, disruptive: torch.Tensor) -> torch.Tensor:
    """Eq. 6 in logs: log σ_y = (1 − 2·[y disruptive]) · s. With REFERENCE.md's split (ND: highest s is
    clean; D: lowest s is clean), σ is *lower* for poisoned samples in both cases."""
    return torch.where(disruptive, -s, s)


def poisoning_score(s: torch.Tensor, disruptive: torch.Tensor) -> torch.Tensor:
    """Per-sample suspicion, higher = more likely poisoned: −log σ_y (Eq. 6)."""
    return -log_sigma(s, disruptive)
