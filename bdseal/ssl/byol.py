"""BYOL (Grill et al. 2020), the "stronger method" standing in for the VIBE authors' All4One/solo-learn
backbones: online encoder + projector + predictor, a target encoder + projector updated by
an exponential moving average whose momentum follows a cosine schedule from ``ema_base`` to 1
(solo-learn's default for BYOL: 0.99 → 1.0), symmetric loss 2 − 2·cos(p_online, z_target)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.ssl.simclr import projector


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of 2 − 2·cos(p, z) with the target ``z`` detached."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class BYOL(nn.Module):
    """Online (encoder, projector, predictor) and EMA target (encoder, projector)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, proj_hidden: int = 4096, proj_dim: int = 256,
                 pred_hidden: int = 4096, ema_base: float = 0.99) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector(feature_dim, proj_hidden, proj_dim)
        self.predictor = projector(proj_dim, pred_hidden, proj_dim)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target_encoder.parameters(), *self.target_projector.parameters()]:
            p.requires_grad_(False)
        self.ema_base = ema_base

    def _target(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target_projector(self.target_encoder.features(v))

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        p = self.predictor(self.projector(self.encoder.features(torch.cat([v1, v2]))))
        p1, p2 = p.chunk(2)
        z = self._target(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def momentum(self, step: int, total: int) -> float:
        """Cosine schedule of the EMA momentum: ``ema_base`` at step 0, 1 at the end."""
        return 1 - (1 - self.ema_base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        """target ← m·target + (1 − m)·online (parameters; BN buffers copied)."""
        m = self.momentum(step, total)
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)
