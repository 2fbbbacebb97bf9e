"""Feature backbones: SimCLR / BYOL pre-training on the (poisoned, unlabeled) training images, frozen
foundation models from local checkpoints, and a supervised baseline backbone — with a feature cache
keyed by what produced the features, so GSSD, VIBE and DBD reuse one pre-training.

Public API: :func:`backbone_features`, :func:`load_backbone`, :func:`extract_features`,
:func:`bdseal.ssl.foundation.load_foundation`, :func:`bdseal.ssl.probe.linear_probe`.
"""

from bdseal.ssl.features import DEFAULTS, backbone_features, extract_features, load_backbone, resolve_cfg
from bdseal.ssl.foundation import FoundationEncoder, load_foundation

__all__ = ["DEFAULTS", "FoundationEncoder", "backbone_features", "extract_features", "load_backbone", "load_foundation",
           "resolve_cfg"]
