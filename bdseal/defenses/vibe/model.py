"""VIBE's probabilistic model (REFERENCE.md VIBE facts [V]).

* classifier (von Mises–Fisher):  p(l|x) = softmax_l( κ·cos(v, μ_z[l]) + log_softmax(c·π)[l] ),
  v = f(x); the prior is scaled *before* the log-softmax.
* corruption, class-conditional ("-A"):  p(y|l) = softmax_y( ν·cos(μ_y[y], μ_z[l]) );
* corruption, x-conditioned ("-F", the authors' ``mixxcond``):
  p(y|l,x) = softmax_y( ν·⟨normalize(μ_y[y]), normalize(μ_z[l]) + v⟩ ) with v *not* normalised.

``normalize_input=True`` replaces v by v/‖v‖ everywhere in the head. The authors' FM runs see unit-norm
features (their feature cache is L2-normalised on reload, REFERENCE.md [V]); with raw features of norm
≈ 15–18 the x-conditioned term ν·⟨·, v⟩ spans tens of logits and drowns the label-dependent part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.errors import ConfigError


class Prior(nn.Module):
    """The learned class prior softmax(c·π), π ~ N(0, 1) at init (trained with its own lr)."""

    def __init__(self, num_classes: int, scale: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.pi = nn.Parameter(torch.randn(num_classes, generator=generator))
        self.scale = scale

    def log_prior(self) -> torch.Tensor:
        return F.log_softmax(self.scale * self.pi.float(), dim=0)


class VIBEHead(nn.Module):
    """Class means μ_z (classifier) and μ_y (corruption model), both (K, D), initialised at the
    per-class means of the features under the observed labels; ``corruption`` is ``"x"`` or ``"class"``."""

    def __init__(self, init_means: torch.Tensor, kappa: float = 10.0, nu: float | None = None,
                 corruption: str = "x", freeze_mu_y: bool = False, normalize_input: bool = False) -> None:
        super().__init__()
        if corruption not in ("x", "class"):
            raise ConfigError(f"corruption must be 'x' (VIBE-*-F) or 'class' (VIBE-*-A), got {corruption!r}")
        self.mu_z = nn.Parameter(init_means.detach().clone().float())
        self.mu_y = nn.Parameter(init_means.detach().clone().float(), requires_grad=not freeze_mu_y)
        self.kappa = float(kappa)
        self.nu = float(kappa if nu is None else nu)
        self.corruption = corruption
        self.normalize_input = bool(normalize_input)

    def embed(self, v: torch.Tensor) -> torch.Tensor:
        """The embedding the head works on: v, or v/‖v‖ with ``normalize_input``."""
        return F.normalize(v.float(), dim=1) if self.normalize_input else v.float()

    @property
    def num_classes(self) -> int:
        return self.mu_z.shape[0]

    def log_p_l(self, v: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """ln p(l|x), (B, K)."""
        cos = F.normalize(v.float(), dim=1) @ F.normalize(self.mu_z.float(), dim=1).t()  # scale-free in v
        return F.log_softmax(self.kappa * cos + log_prior[None, :], dim=1)

    def log_p_y_all(self, v: torch.Tensor) -> torch.Tensor:
        """ln p(y|l[,x]) for every (l, y): (B, K_l, K_y) (for ``class`` the same (K, K) for each row)."""
        nz = F.normalize(self.mu_z.float(), dim=1)
        ny = F.normalize(self.mu_y.float(), dim=1)
        logits = self.nu * (nz @ ny.t())  # (K_l, K_y): ν·cos(μ_z[l], μ_y[y])
        if self.corruption == "x":
            logits = logits[None] + self.nu * (self.embed(v) @ ny.t())[:, None, :]  # + ν·⟨n(μ_y[y]), v⟩
        else:
            logits = logits[None].expand(v.shape[0], -1, -1)
        return F.log_softmax(logits, dim=2)

    def log_p_obs(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ln p(y_i | l, x_i) for every l: (B, K)."""
        lp = self.log_p_y_all(v)
        return lp.gather(2, y.view(-1, 1, 1).expand(-1, lp.shape[1], 1)).squeeze(2)

    def joint(self, v: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor, uniform_corruption: bool = False) -> torch.Tensor:
        """ln P[i, l] = ln p(l|x_i) + ln p(y_i|l, x_i); with ``uniform_corruption`` the second term is
        the constant −ln K (the first E-step [V])."""
        lp = self.log_p_l(v, log_prior)
        if uniform_corruption:
            return lp - torch.log(torch.tensor(float(self.num_classes)))
        return lp + self.log_p_obs(v, y)

    def nll(self, v: torch.Tensor, y: torch.Tensor, l: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """M-step loss: mean of −[ln p(l_i|x_i) + ln p(y_i|l_i, x_i)]."""
        lp = self.log_p_l(v, log_prior).gather(1, l.view(-1, 1))
        ly = self.log_p_y_all(v).gather(1, l.view(-1, 1, 1).expand(-1, 1, self.num_classes)).squeeze(1)
        return -(lp.squeeze(1) + ly.gather(1, y.view(-1, 1)).squeeze(1)).mean()


class VIBEClassifier(nn.Module):
    """The defended model: [0, 1] images → logits of p(l|x) (log-probabilities; argmax = prediction).
    ``encoder.features`` gives v (a StagedClassifier or a frozen foundation encoder)."""

    def __init__(self, encoder: nn.Module, head: VIBEHead, prior: Prior) -> None:
        super().__init__()
        self.encoder, self.head, self.prior = encoder, head, prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.log_p_l(self.encoder.features(x), self.prior.log_prior())
