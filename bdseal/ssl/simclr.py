"""SimCLR (Chen et al. 2020) as GSSD pre-trains it (REFERENCE.md, GSSD facts [V]): CIFAR ResNet-18
encoder (512-d), projector 512→512→128 (Linear-ReLU-Linear, no BN, as in the authors' code), NT-Xent with
τ = 0.5, batch 256, Adam 3e-4 without weight decay, SimCLR views with jitter (0.8, 0.8, 0.8, 0.2) p 0.8 and
grayscale p 0.2. ``proj_bn=True`` gives the Linear-BN-ReLU-Linear projector of Chen et al."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projector(in_dim: int, hidden: int, out: int, bn: bool = True) -> nn.Sequential:
    """Linear → BN → ReLU → Linear (BN left out with ``bn=False``)."""
    mid = [nn.BatchNorm1d(hidden)] if bn else []
    return nn.Sequential(nn.Linear(in_dim, hidden), *mid, nn.ReLU(inplace=True), nn.Linear(hidden, out))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy over the 2B views: each view's positive is its
    partner, the other 2B − 2 views are negatives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    b = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimCLR(nn.Module):
    """Encoder (a StagedClassifier; its ``features`` is the embedding) + projector + NT-Xent."""

    def __init__(self, encoder: nn.Module, feature_dim: int, proj_hidden: int = 512, proj_dim: int = 128,
                 temperature: float = 0.5, proj_bn: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector(feature_dim, proj_hidden, proj_dim, bn=proj_bn)
        self.temperature = temperature

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        h = self.encoder.features(torch.cat([v1, v2]))
        z = self.projector(h)
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature)

    def after_step(self, step: int, total: int) -> None:
        """Nothing to do after a SimCLR step."""
