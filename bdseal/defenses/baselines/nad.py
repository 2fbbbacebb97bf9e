"""``nad``: Neural Attention Distillation (Li et al., ICLR 2021).

1. Teacher = M_B fine-tuned on D_S with CE (``teacher_train``: 10 epochs, lr 0.01 as in the NAD paper).
2. Student = M_B trained on D_S with CE + Σ_l β_l·L_AT(F_s^l, F_t^l) over several stages, where the
   attention map of a (B, C, H, W) activation is A = normalize(mean_c |F|^p) flattened, p = 2, and
   L_AT = mean of (A_s − A_t)² (NAD's AT loss). β = (500, 1000, 1000) on the last three stages (the NAD
   paper's CIFAR-10 values for the three WRN groups); student 20 epochs, lr 0.01.
Same D_S as PGBD; budgets are configurable.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.errors import ConfigError
from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.train.loop import Batch, fit


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD attention: channel mean of |a|^p, flattened and L2-normalised per sample (B, H·W)."""
    am = a.float().abs().pow(p)
    am = am.mean(dim=1) if am.ndim == 4 else am
    return F.normalize(am.flatten(1), dim=1)


def at_loss(a_s: torch.Tensor, a_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps."""
    return (attention_map(a_s, p) - attention_map(a_t, p)).pow(2).mean()


@register_defense("nad", needs_clean=True, post_hoc=True)
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """Distil the fine-tuned teacher's attention into M_B on D_S."""
    model = view.require_model("nad").to(ctx.device)
    clean = view.require_clean("nad")
    teacher = copy.deepcopy(model)
    t_state = fit(teacher, clean.x, clean.y, ctx.train_cfg.replace(**cfg.get("teacher_train", {})),
                  device=ctx.device, seed=ctx.seed, desc="nad teacher")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = list(cfg.get("layers") or model.layer_names[-3:])
    betas = [float(b) for b in cfg.get("betas", [500.0, 1000.0, 1000.0])]
    if len(betas) != len(layers):
        raise ConfigError(f"nad: {len(layers)} layers {layers} but {len(betas)} betas")
    p = float(cfg.get("p", 2.0))

    def loss_fn(m: nn.Module, batch: Batch) -> torch.Tensor:
        net = getattr(m, "module", m)
        logits, acts = net.forward_with(batch.x, layers)
        with torch.no_grad():
            _, t_acts = teacher.forward_with(batch.x, layers)
        loss = F.cross_entropy(logits.float(), batch.y)
        for name, beta in zip(layers, betas):
            loss = loss + beta * at_loss(acts[name], t_acts[name], p)
        return loss

    s_state = fit(model, clean.x, clean.y, ctx.train_cfg.replace(**cfg.get("train", {})), device=ctx.device,
                  loss_fn=loss_fn, seed=ctx.seed, desc="nad student")
    return DefenseResult(model.eval(), extras={
        "layers": layers, "betas": betas,
        "teacher_loss_history": [round(h["loss"], 5) for h in t_state.history],
        "loss_history": [round(h["loss"], 5) for h in s_state.history]})
