"""Entropy-regularised optimal transport, log domain (shared by PGRL's LCV and VIBE's E-step).

Solves  max_Q  <Q, S> + ε·H(Q)  s.t.  Q 1 = a (samples), Qᵀ 1 = b (classes)
with scores ``S`` (N, K) (a log-likelihood or a cosine similarity). With ``ε = 1/λ`` the solution is
Q = diag(u) exp(S/ε) diag(v); iterations alternate the two marginal projections in log space, so
large λ (VIBE: λ = 25 on log-probabilities) and tiny ε (PGRL: ε = 0.05 on cosines) do not overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bdseal.errors import TrainingDivergedError


@dataclass
class SinkhornResult:
    log_plan: torch.Tensor  # (N, K) log of the transport plan (rows sum to a_i, cols to b_k)
    iterations: int
    marginal_error: float  # max abs deviation of the column marginal at exit

    @property
    def plan(self) -> torch.Tensor:
        return self.log_plan.exp()

    def assignments(self) -> torch.Tensor:
        """Hard pseudo-labels: argmax over classes of each row of the plan."""
        return self.log_plan.argmax(dim=1)


def sinkhorn_log(
    scores: torch.Tensor,
    epsilon: float,
    row_marginal: torch.Tensor | None = None,
    col_marginal: torch.Tensor | None = None,
    max_iter: int = 1000,
    tol: float | None = 1e-6,
) -> SinkhornResult:
    """Log-domain Sinkhorn-Knopp on ``scores / epsilon``.

    ``row_marginal`` defaults to uniform 1/N and ``col_marginal`` to uniform 1/K. ``tol=None`` runs
    exactly ``max_iter`` iterations (PGRL's SwAV-style 3 iterations); otherwise stops when the column
    marginal is met to ``tol`` (VIBE: the authors' test never fired; REFERENCE.md asks for a real one).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, K), got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    n, k = scores.shape
    s = scores.double() / epsilon
    a = torch.full((n,), 1.0 / n, dtype=s.dtype, device=s.device) if row_marginal is None else row_marginal.to(s)
    b = torch.full((k,), 1.0 / k, dtype=s.dtype, device=s.device) if col_marginal is None else col_marginal.to(s)
    if not torch.allclose(a.sum(), b.sum(), rtol=1e-4):
        raise ValueError(f"marginals must have equal mass, got {float(a.sum())} and {float(b.sum())}")
    log_a, log_b = a.clamp_min(1e-300).log(), b.clamp_min(1e-300).log()
    log_u = torch.zeros(n, dtype=s.dtype, device=s.device)
    log_v = torch.zeros(k, dtype=s.dtype, device=s.device)
    err = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        log_u = log_a - torch.logsumexp(s + log_v[None, :], dim=1)
        log_v = log_b - torch.logsumexp(s + log_u[:, None], dim=0)
        if tol is not None and (it % 10 == 0 or it == max_iter):
            # after the column update columns are exact; measure the row violation instead
            row = torch.logsumexp(s + log_u[:, None] + log_v[None, :], dim=1).exp()
            err = float((row - a).abs().max())
            if err < tol * max(1.0, float(a.max()) * n) / n:
                break
    log_plan = s + log_u[:, None] + log_v[None, :]
    if tol is None:
        err = float((log_plan.exp().sum(0) - b).abs().max())
    if not math.isfinite(err) or bool(torch.isnan(log_plan).any()):  # one host sync per solve
        raise TrainingDivergedError("Sinkhorn produced a non-finite transport plan (the scores hold NaN/inf, e.g. from a "
                                    "diverged model); lower the learning rate, or raise epsilon if the scores are finite")
    return SinkhornResult(log_plan.to(scores.dtype if scores.is_floating_point() else torch.float32), it, err)
