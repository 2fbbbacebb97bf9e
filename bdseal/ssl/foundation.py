"""Frozen foundation-model encoders (VIBE's FM variants: DINOv2 ViT-g/14, inputs resized to 224 —
REFERENCE.md [V]) loaded from a local HuggingFace-format checkpoint directory.

``transformers`` does the model loading (``AutoModel`` for ViT / DINO / DINOv2, ``CLIPVisionModel``
for CLIP checkpoints) with ``local_files_only=True``: nothing is ever downloaded. Normalisation stats
come from the checkpoint's ``preprocessor_config.json`` when present, else ImageNet's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FoundationEncoder(nn.Module):
    """A frozen vision transformer: ``features(x01)`` → pooled (B, D) embedding, ``patch_features(x01)``
    → (B, D, h, w) patch-token map. Inputs are float images in [0, 1] of any size and 1 or 3 channels;
    they are resized (bilinear, antialiased) to ``image_size`` and normalised with the checkpoint's
    processor stats. Pooled embedding: the CLS token of the final (layer-normed) sequence; for CLIP the
    post-layernorm pooled output."""

    def __init__(self, model: nn.Module, image_size: int, patch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], is_clip: bool = False, interpolate_pos: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.is_clip = is_clip
        self.interpolate_pos = interpolate_pos  # resize target differs from the position-embedding grid
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.feature_dim = int(getattr(model.config, "hidden_size"))

    def train(self, mode: bool = True) -> "FoundationEncoder":
        """The backbone stays frozen in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"foundation encoder expects (B, 1|3, H, W) images in [0, 1], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _hidden(self, x: torch.Tensor):
        kw = {"interpolate_pos_encoding": True} if self.interpolate_pos else {}
        return self.model(pixel_values=self._prepare(x), **kw)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self._hidden(x)
        if self.is_clip:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a (B, D, h, w) map (the last h·w tokens: CLS and register tokens dropped)."""
        out = self._hidden(x)
        h = w = self.image_size // self.patch_size
        tokens = out.last_hidden_state[:, -h * w:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _processor_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pre = path / "preprocessor_config.json"
    if pre.exists():
        d = json.loads(pre.read_text())
        if "image_mean" in d and "image_std" in d:
            return tuple(float(v) for v in d["image_mean"]), tuple(float(v) for v in d["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def load_foundation(path: str | Path, device: torch.device | str = "cpu", image_size: int | None = None) -> FoundationEncoder:
    """Load a local HuggingFace checkpoint directory as a frozen :class:`FoundationEncoder`.

    ``image_size`` overrides the resize target (default: the checkpoint config's ``image_size``;
    VIBE uses 224). Raises ``FileNotFoundError`` for a missing directory — no download is attempted.
    """
    try:
        from transformers import AutoConfig, AutoModel, CLIPVisionModel
    except ImportError as e:
        raise ImportError("foundation backbones need the transformers package: pip install 'bdseal[fm]' "
                          f"(or pip install transformers); import failed: {e}") from e

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no HuggingFace checkpoint (config.json) at {path}; foundation backbones are "
                                "loaded from a local directory only (set the backbone's checkpoint= path)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    is_clip = config.model_type in ("clip", "clip_vision_model")
    if is_clip:
        model = CLIPVisionModel.from_pretrained(path, local_files_only=True, use_safetensors=True)  # never a pickled .bin
        vcfg = model.config
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)  # never a pickled .bin
        vcfg = model.config
    size = int(image_size or getattr(vcfg, "image_size", 224))
    patch = int(getattr(vcfg, "patch_size", 16))
    if size % patch:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {patch}")
    mean, std = _processor_stats(path)
    native = int(getattr(vcfg, "image_size", size))
    interp = size != native and config.model_type not in ("dinov2", "dinov2_with_registers")  # DINOv2 always interpolates
    return FoundationEncoder(model, size, patch, mean, std, is_clip=is_clip, interpolate_pos=interp).to(torch.device(device))
