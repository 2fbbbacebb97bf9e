"""Large-model mapping of PGBD (seed Sec. 4.2 "Large-Model Mapping"; facts from REFERENCE.md).

A frozen teacher (REFERENCE: DINO ViT-B/8 patch features) gives feature maps t (B, D, h, w) of the
class-balanced clean images (150 by default); they are reduced to 64 channels with PCA (fitted over all
spatial positions) and cached. A shallow *linear* autoencoder links the spaces:
E (teacher → student) = one 3×3 ConvTranspose 64 → C_s, D (student → teacher) = one 3×3 Conv C_s → 64,
both without bias so that they are linear maps, trained with ‖t − D(E(t))‖² + ‖E(t) − s‖² (Adam 1e-4,
5 epochs), s = the student's activations at the PGBD layer. The teacher map is resized (bilinear) to
the student's spatial size before training (our choice: the patch grid of a ViT rarely matches the
student's map). PAVs are then computed in teacher space and brought back (REFERENCE):
V_c = E(D(P_c) − D(Q_c)) with Q_c the target-side prototype (P_t for PGBD, P'_c for ST-PGBD); the
sign is opposite to Eq. 1, which does not matter since L_s uses |cos|.

The teacher is any callable ``teacher(x01) -> (B, D, h, w)``; ``load_teacher`` wires the config key
``mapping.teacher_checkpoint`` to ``bdseal.ssl.foundation.load_foundation`` when that module exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Teacher = Callable[[torch.Tensor], torch.Tensor]


def load_teacher(checkpoint: str, device: torch.device) -> Teacher:
    """A frozen foundation encoder's ``patch_features`` from a local checkpoint."""
    try:
        from bdseal.ssl.foundation import load_foundation
    except ImportError as e:  # the foundation loader is another module of the project
        raise RuntimeError("mapping.teacher_checkpoint needs bdseal.ssl.foundation.load_foundation, "
                           f"which could not be imported ({e})") from e
    enc = load_foundation(checkpoint, device)
    return enc.patch_features


@torch.no_grad()
def teacher_features(teacher: Teacher, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Teacher feature maps (N, D, h, w) of uint8 images, on CPU."""
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
    """E: teacher (64 ch) → student (C_s ch); D: student → teacher; both linear 3×3 (REFERENCE)."""

    def __init__(self, student_channels: int, teacher_channels: int = 64) -> None:
        super().__init__()
        self.E = nn.ConvTranspose2d(teacher_channels, student_channels, 3, padding=1, bias=False)
        self.D = nn.Conv2d(student_channels, teacher_channels, 3, padding=1, bias=False)

    def loss(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """‖t − D(E(t))‖² + ‖E(t) − s‖² (means over elements)."""
        e = self.E(t)
        return F.mse_loss(self.D(e), t) + F.mse_loss(e, s)

    def pav(self, P: torch.Tensor, Q: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """V_c = E(D(P_c) − D(Q_c)) for flattened prototypes P, Q (K, C_s·h·w); returns (K, C_s·h·w)."""
        with torch.no_grad():
            p, q = P.view(-1, *shape), Q.view(-1, *shape)
            return self.E(self.D(p) - self.D(q)).flatten(1)


@dataclass
class MappingResult:
    mapping: Mapping
    losses: list[float]  # mean loss per epoch


def fit_mapping(t: torch.Tensor, s: torch.Tensor, *, epochs: int = 5, lr: float = 1e-4, batch_size: int = 16,
                seed: int = 0, device: torch.device | str = "cpu") -> MappingResult:
    """Train the linear autoencoder on teacher maps ``t`` (N, 64, h', w') and student maps ``s`` (N, C, h, w)."""
    device = torch.device(device)
    if s.ndim != 4:
        raise ValueError("large-model mapping needs spatial student activations (N, C, H, W); "
                         "choose a convolutional layer")
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    torch.manual_seed(seed)
    mapping = Mapping(s.shape[1], t.shape[1]).to(device)
    opt = torch.optim.Adam(mapping.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    t, s = t.to(device), s.to(device)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(t), generator=g).to(device)
        tot, nb = 0.0, 0
        for b in range(0, len(t), batch_size):
            i = perm[b : b + batch_size]
            loss = mapping.loss(t[i], s[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, nb = tot + float(loss.detach()), nb + 1
        losses.append(tot / max(nb, 1))
    mapping.eval()
    for p in mapping.parameters():
        p.requires_grad_(False)
    return MappingResult(mapping.cpu(), losses)


def balanced_indices(y: torch.Tensor, total: int, seed: int = 0) -> torch.Tensor:
    """Up to ``total`` indices, as class-balanced as the labels allow (REFERENCE: 150 images)."""
    k = int(y.max()) + 1
    per = max(1, total // k)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(k):  # loop over classes, not samples
        members = torch.nonzero(y == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:per]])
    return torch.cat(idx).sort().values
