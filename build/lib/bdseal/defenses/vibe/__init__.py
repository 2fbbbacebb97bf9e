"""VIBE (ICCV 2025): variational EM over latent clean labels. See :mod:`bdseal.defenses.vibe.defense`."""

from bdseal.defenses.vibe.defense import PRESETS, resolve, run_vibe
from bdseal.defenses.vibe.em import e_step
from bdseal.defenses.vibe.leiden_filter import leiden_filter
from bdseal.defenses.vibe.model import Prior, VIBEClassifier, VIBEHead

__all__ = ["PRESETS", "Prior", "VIBEClassifier", "VIBEHead", "e_step", "leiden_filter", "resolve", "run_vibe"]
