"""VIBE's E-step (REFERENCE.md [V]): ln P[i, l] = ln p(l|x_i) + ln p(y_i|l, x_i) over the whole
(filtered, un-augmented) training set, entropy-regularised OT solved by ``bdseal.ot.sinkhorn_log``
with ε = 1/λ (λ = 25: the authors multiply ln P by λ), class marginal = the learned prior softmax(c·π),
uniform sample marginal; pseudo-label = argmax of the plan. The first E-step uses a uniform p(y|l)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdseal.defenses.vibe.model import Prior, VIBEHead
from bdseal.ot import sinkhorn_log


@dataclass
class EStepResult:
    labels: torch.Tensor  # (N,) pseudo-labels l_i
    log_plan: torch.Tensor  # (N, K) log transport plan (rows sum to 1/N)
    iterations: int
    marginal_error: float


@torch.no_grad()
def joint_log_probs(head: VIBEHead, prior: Prior, v: torch.Tensor, y: torch.Tensor, uniform_corruption: bool = False,
                    chunk: int = 8192) -> torch.Tensor:
    """ln P (N, K) in chunks (the x-conditioned corruption term is (chunk, K, K))."""
    lp = prior.log_prior().detach()
    return torch.cat([head.joint(v[s:s + chunk], y[s:s + chunk], lp, uniform_corruption)
                      for s in range(0, len(v), chunk)])


@torch.no_grad()
def e_step(head: VIBEHead, prior: Prior, v: torch.Tensor, y: torch.Tensor, lam: float = 25.0,
           uniform_corruption: bool = False, max_iter: int = 1000, tol: float = 1e-6) -> EStepResult:
    """Pseudo-labels by Sinkhorn on λ·ln P with the prior as class marginal."""
    log_p = joint_log_probs(head, prior, v, y, uniform_corruption)
    col = prior.log_prior().detach().exp().to(log_p)
    res = sinkhorn_log(log_p, epsilon=1.0 / lam, col_marginal=col, max_iter=max_iter, tol=tol)
    return EStepResult(res.assignments(), res.log_plan, res.iterations, res.marginal_error)


def observed_agreement(labels: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of pseudo-labels equal to the observed labels (the defender's own diagnostic)."""
    return float((labels.to(y.device) == y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def corruption_diagnostics(head: VIBEHead, v: torch.Tensor, chunk: int = 8192) -> dict[str, float]:
    """The E-step's view of the corruption model: mean ‖μ_z‖, ‖μ_y‖ and the mean probability of keeping
    the label, p(y = l | l) (x-conditioned: averaged over the samples ``v`` as well). Near 1/K the
    corruption model is uninformative and the E-step ignores the observed labels."""
    if head.corruption == "class" or len(v) == 0:  # p(y|l) does not depend on x: any one row will do
        probe = torch.zeros(1, head.mu_z.shape[1], device=head.mu_z.device)
        p_keep = float(head.log_p_y_all(probe)[0].diagonal().exp().mean())
    else:
        total = sum(float(head.log_p_y_all(v[s:s + chunk]).diagonal(dim1=1, dim2=2).exp().sum()) for s in range(0, len(v), chunk))
        p_keep = total / (len(v) * head.num_classes)
    return {"mu_z_norm": float(head.mu_z.norm(dim=1).mean()), "mu_y_norm": float(head.mu_y.norm(dim=1).mean()),
            "p_keep": p_keep}
