"""Large-model mapping of PGBD (seed Sec. 4.2 "Large-Model Mapping"; facts from REFERENCE.md "PGBD").

A frozen teacher gives feature maps t (B, D, h, w) of class-balanced clean images (150 by default); they
are reduced to 64 channels with PCA (fitted over all spatial positions) and cached. A shallow
autoencoder links the spaces (REFERENCE, the authors' ``CD_utils``): E (teacher → student) = one 3×3
ConvTranspose 64 → C_s **with bias**, D (student → teacher) = one 3×3 Conv C_s → 64 **with bias**, trained
with ‖t − D(E(t))‖² + ‖E(t) − s‖² (Adam 1e-4, 5 epochs), s = the student's activations at the PGBD layer.

Optimiser steps (REFERENCE): in the authors' ``map_activation_spaces`` the per-image losses are
back-propagated inside the image loop and ``optimizer.step()`` sits outside it, so E and D receive **one
Adam step per epoch** (gradients of every image accumulated): five steps in all, and they stay close to
their random initialisation. ``step_per="epoch"`` reproduces that; ``step_per="batch"`` trains the
mapping properly (one step per mini-batch). With one Adam step moving each weight by about ``lr``, five
steps move it by at most ~5·lr: the PAV V_c = E(D(P_c) − D(Q_c)) is then in effect a fixed random linear
map of P_c − Q_c, and which teacher produced t hardly matters.

The teacher map is resized (bilinear) to the student's spatial size (our choice: a ViT's patch grid rarely
matches the student's map). The sign of V is opposite to Eq. 1, which does not matter since L_s uses |cos|.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.errors import ConfigError

Teacher = Callable[[torch.Tensor], torch.Tensor]
StepPer = Literal["epoch", "batch"]


def load_teacher(checkpoint: str, device: torch.device) -> Teacher:
    """A frozen foundation encoder's ``patch_features`` from a local checkpoint (the authors: DINO ViT-B/8)."""
    from bdseal.ssl.foundation import load_foundation

    return load_foundation(checkpoint, device).patch_features


def staged_teacher(model: nn.Module, layer: str | None = None) -> Teacher:
    """A frozen :class:`~bdseal.models.base.StagedClassifier` (e.g. a cached SSL backbone) as a teacher: the
    feature map of stage ``layer`` (default its last stage)."""
    name = layer or model.layer_names[-1]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def teacher(x01: torch.Tensor) -> torch.Tensor:
        a = model.forward_with(x01, [name])[1][name]
        if a.ndim != 4:
            raise ConfigError(f"mapping teacher layer {name!r} gives {tuple(a.shape)}; choose a convolutional stage")
        return a

    return teacher


@torch.no_grad()
def teacher_features(teacher: Teacher, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Teacher feature maps (N, D, h, w) of uint8 images, fp32, on CPU."""
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size].to(device).float().div_(255)
        out.append(teacher(xb).float().cpu())
    return torch.cat(out)


def pca_reduce(t: torch.Tensor, channels: int = 64) -> torch.Tensor:
    """PCA of the channel dimension over all (image, position) rows: (N, D, h, w) → (N, channels, h, w)."""
    n, d, h, w = t.shape
    rows = t.permute(0, 2, 3, 1).reshape(-1, d)
    q = min(channels, d, rows.shape[0])
    centred = rows - rows.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    z = centred @ vh[:q].T
    if q < channels:  # fewer components than asked: pad with zeros so the shapes stay fixed
        z = F.pad(z, (0, channels - q))
    return z.view(n, h, w, channels).permute(0, 3, 1, 2).contiguous()


class Mapping(nn.Module):
    """E: teacher (64 ch) → student (C_s ch); D: student → teacher; 3×3, with bias (REFERENCE)."""

    def __init__(self, student_channels: int, teacher_channels: int = 64, bias: bool = True) -> None:
        super().__init__()
        self.E = nn.ConvTranspose2d(teacher_channels, student_channels, 3, padding=1, bias=bias)
        self.D = nn.Conv2d(student_channels, teacher_channels, 3, padding=1, bias=bias)

    def per_sample_loss(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """‖t − D(E(t))‖² + ‖E(t) − s‖² per sample (means over each sample's elements), (B,)."""
        e = self.E(t)
        rec = (self.D(e) - t).pow(2).flatten(1).mean(1)
        return rec + (e - s).pow(2).flatten(1).mean(1)

    def pav(self, P: torch.Tensor, Q: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """V_c = E(D(P_c) − D(Q_c)) for flattened prototypes P, Q (K, C_s·h·w); returns (K, C_s·h·w).

        With bias, D(P) − D(Q) cancels D's bias and E adds its own: E(u) = E_lin(u) + b_E."""
        with torch.no_grad():
            p, q = P.view(-1, *shape), Q.view(-1, *shape)
            return self.E(self.D(p) - self.D(q)).flatten(1)


@dataclass
class MappingResult:
    mapping: Mapping
    losses: list[float]  # mean per-sample loss per epoch (before that epoch's step when step_per="epoch")
    steps: int  # optimiser steps taken (Adam's own step counter)


def fit_mapping(t: torch.Tensor, s: torch.Tensor, *, epochs: int = 5, lr: float = 1e-4, batch_size: int = 16,
                step_per: StepPer = "epoch", bias: bool = True, seed: int = 0,
                device: torch.device | str = "cpu") -> MappingResult:
    """Train E/D on teacher maps ``t`` (N, 64, h', w') and student maps ``s`` (N, C, h, w).

    ``step_per="epoch"`` (the authors' code): per-sample losses summed over the whole set, one Adam step per
    epoch; ``"batch"``: one step per mini-batch of ``batch_size``."""
    if step_per not in ("epoch", "batch"):
        raise ConfigError(f"mapping.step_per must be 'epoch' or 'batch', got {step_per!r}")
    device = torch.device(device)
    if s.ndim != 4:
        raise ConfigError("large-model mapping needs spatial student activations (N, C, H, W); "
                         "choose a convolutional layer")
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapping = Mapping(s.shape[1], t.shape[1], bias=bias).to(device)
    opt = torch.optim.Adam(mapping.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t, s = t.to(device), s.to(device)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(t), generator=g).to(device)
        tot = torch.zeros((), device=device)
        opt.zero_grad(set_to_none=True)
        for b in range(0, len(t), batch_size):
            i = perm[b : b + batch_size]
            loss = mapping.per_sample_loss(t[i], s[i]).sum()
            loss.backward()
            tot += loss.detach()
            if step_per == "batch":
                opt.step()
                opt.zero_grad(set_to_none=True)
        if step_per == "epoch":
            opt.step()
        losses.append(float(tot) / max(len(t), 1))
    first = next(iter(mapping.parameters()))
    steps = int(opt.state[first]["step"]) if opt.state.get(first) else 0
    mapping.eval()
    for p in mapping.parameters():
        p.requires_grad_(False)
    return MappingResult(mapping.cpu(), losses, steps)


def balanced_indices(y: torch.Tensor, total: int, seed: int = 0) -> torch.Tensor:
    """Up to ``total`` indices, as class-balanced as the labels allow (150 images by default)."""
    k = int(y.max()) + 1
    per = max(1, total // k)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(k):  # loop over classes, not samples
        members = torch.nonzero(y == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:per]])
    return torch.cat(idx).sort().values
