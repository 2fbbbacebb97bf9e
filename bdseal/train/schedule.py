"""Learning-rate schedules as per-step multipliers of the base lr."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from bdseal.errors import ConfigError


def lr_multiplier(
    kind: str, total_steps: int, steps_per_epoch: int, milestones: Sequence[int] = (), gamma: float = 0.1,
    warmup_steps: int = 0, min_lr_ratio: float = 0.0,
) -> Callable[[int], float]:
    """``cosine`` (to ``min_lr_ratio``), ``step`` (×gamma at epoch milestones), ``constant``; optional
    linear warm-up over ``warmup_steps``."""
    if kind not in ("cosine", "step", "constant"):
        raise ConfigError(f"unknown lr schedule {kind!r}; choose cosine, step or constant")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        if kind == "step":
            epoch = step // max(1, steps_per_epoch)
            return gamma ** sum(epoch >= m for m in milestones)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f
