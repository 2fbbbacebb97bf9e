"""``ft``: plain fine-tuning of the backdoored model M_B on the clean subset D_S with cross-entropy.

Same D_S and epoch/batch budget as PGBD (35 epochs, batch 16); lr 0.01 (BackdoorBench's FT default)
with SGD momentum 0.9 — PGBD's lr 1e-4 barely moves a plain CE fine-tune. Configurable via ``train``.
"""

from __future__ import annotations

from typing import Any

from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.train.loop import fit


@register_defense("ft", needs_clean=True, post_hoc=True)
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """Fine-tune M_B on D_S with the standard loop (BN in train mode, as a plain fine-tune)."""
    model = view.require_model("ft").to(ctx.device)
    clean = view.require_clean("ft")
    state = fit(model, clean.x, clean.y, ctx.train_cfg.replace(**cfg.get("train", {})), device=ctx.device,
                seed=ctx.seed, desc="ft")
    return DefenseResult(model.eval(), extras={"loss_history": [round(h["loss"], 5) for h in state.history]})
