"""Blend (Chen et al. 2017, "Targeted backdoor attacks on deep learning systems using data poisoning").

Trigger: x' = (1 − α)·x + α·pattern over the whole image. Defaults follow BackdoorBench
(PGBD's setting): train α = 0.2, test α = train α, the Hello-Kitty-like built-in pattern
(``bdseal.attacks.patterns.kitty``; BackdoorBench blends ``hello_kitty.jpeg``), poisoned-label
all-to-one, rate = fraction of the **whole training set** (victims from non-target classes).
Presets: GSSD/VIBE use α = 0.1 (REFERENCE.md), PGBD α = 0.2. ``pattern`` is ``kitty`` | ``noise``
(uniform noise drawn from the attack seed, Chen et al.'s other pattern) | a path to an image file
(loaded with PIL and resized bilinearly to the data's size). Works for any size and 1 or 3 channels.
"""

from __future__ import annotations

import torch

from bdseal.attacks.base import Attack, register_attack
from bdseal.attacks.patterns import check_pattern_spec, get_pattern
from bdseal.attacks.plan import AttackConfigError


def check_alpha(name: str, alpha: float) -> float:
    """A blend strength in [0, 1] or a clear error."""
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise AttackConfigError(f"{name} must be in [0, 1], got {alpha}")
    return a


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """x' = (1 − α)·x + α·pattern (α a scalar or a tensor broadcastable to x)."""
    return x * (1 - alpha) + pattern * alpha


class PatternMixin:
    """Caches the (C, H, W) pattern per image shape and device."""

    pattern_spec: str
    seed: int

    def pattern_for(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        cache: dict = self.__dict__.setdefault("_pattern_cache", {})
        key = (tuple(shape), str(device))
        if key not in cache:
            c, h, w = shape
            cache[key] = get_pattern(self.pattern_spec, c, h, w, seed=self.seed, device=device)
        return cache[key]


@register_attack
class Blend(PatternMixin, Attack):
    """Whole-image blend with a fixed pattern: ``alpha`` (train, default 0.2), ``test_alpha``
    (default: ``alpha``), ``pattern`` (``kitty`` | ``noise`` | image path)."""

    name = "blend"

    def __init__(self, seed: int = 0, alpha: float = 0.2, test_alpha: float | None = None, pattern: str = "kitty") -> None:
        super().__init__(seed, alpha=alpha, test_alpha=test_alpha, pattern=pattern)
        self.alpha = check_alpha("blend alpha", alpha)
        self.test_alpha = self.alpha if test_alpha is None else check_alpha("blend test_alpha", test_alpha)
        check_pattern_spec(pattern)
        self.pattern_spec = str(pattern)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        alpha = self.test_alpha if phase == "test" else self.alpha
        return blend(x, self.pattern_for(tuple(x.shape[1:]), x.device), alpha)
