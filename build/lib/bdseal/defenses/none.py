"""``none``: plain training on the data as given — the backdoored baseline."""

from __future__ import annotations

from typing import Any

from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.train.loop import fit


@register_defense("none")
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """Train a fresh model with the run's standard recipe on all (possibly poisoned) samples."""
    model = ctx.build_model()
    fit(model, view.x, view.y, ctx.train_cfg, device=ctx.device, seed=ctx.seed, desc="none")
    return DefenseResult(model)
