"""Grad-CAM maps (Selvaraju et al. 2017) of models before/after PGBD — the seed's Fig. 4.

Pure functions: the defense never sees triggered test images, so the experiment layer (which holds the
triggered test set) calls ``save_gradcam_figure({"M_B": backdoored, "M_C": defended}, x_triggered, path)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.plotting import pyplot, save_figure


def gradcam(model: nn.Module, x: torch.Tensor, layer: str | None = None,
            class_idx: torch.Tensor | int | None = None) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] at stage ``layer`` (default: the last stage) for float [0, 1]
    or uint8 images ``x``; ``class_idx`` defaults to each image's predicted class."""
    layer = layer or model.layer_names[-1]
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    x = x.to(dev)
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    try:
        with torch.enable_grad():
            logits, acts = model.forward_with(x, [layer])
            a = acts[layer]
            if class_idx is None:
                idx = logits.argmax(1)
            elif isinstance(class_idx, int):
                idx = torch.full((len(x),), class_idx, device=dev, dtype=torch.long)
            else:
                idx = class_idx.to(dev).long()
            score = logits.gather(1, idx[:, None]).sum()
            (grad,) = torch.autograd.grad(score, a)
    finally:
        model.train(was_training)
    w = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((w * a).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return ((cam - lo) / (hi - lo).clamp_min(1e-12)).cpu()


def save_gradcam_figure(models: Mapping[str, nn.Module], x: torch.Tensor, path: str | Path,
                        layer: str | None = None, max_images: int = 6) -> Path:
    """One row per image: the input, then each model's Grad-CAM overlay (titled with its prediction)."""
    plt = pyplot()

    x = x[:max_images]
    x01 = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    cams, preds = {}, {}
    for name, m in models.items():
        cams[name] = gradcam(m, x01, layer)
        with torch.no_grad():
            preds[name] = m(x01.to(next(m.parameters()).device)).argmax(1).cpu()
    n, cols = len(x01), 1 + len(models)
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols, 2.0 * n), squeeze=False)
    for i in range(n):
        img = x01[i].permute(1, 2, 0).cpu().numpy()
        img = img[..., 0] if img.shape[-1] == 1 else img
        axes[i][0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[i][0].set_title("input", fontsize=8)
        for j, name in enumerate(models, start=1):
            axes[i][j].imshow(img, cmap="gray" if img.ndim == 2 else None)
            axes[i][j].imshow(cams[name][i].numpy(), cmap="jet", alpha=0.5)
            axes[i][j].set_title(f"{name}: pred {int(preds[name][i])}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
