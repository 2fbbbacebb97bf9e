"""Figures that need the ground truth, drawn by the experiment layer (defenses never see it).

- Post-hoc defenses (PGBD Fig. 4): Grad-CAM of M_B vs the repaired model on triggered test images.
- GSSD (Fig. 3): σ distribution of each flagged class, clean vs poisoned, from ``gssd_scores.safetensors``;
  (Fig. 1, with ``figures.umap=true``): UMAP of the backbone features with poisoned samples in black.
- PGRL: distribution of the final per-sample weights, clean vs poisoned, from ``pgrl_state.safetensors``;
  per epoch, the clean share of the label-consistent set (:func:`add_oracle_per_epoch`, also into metrics).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdseal.attacks import PoisonedSet
from bdseal.defenses import DefenderView, DefenseResult, DefenseSpec, RunContext
from bdseal.io import load_tensors, load_tree

log = logging.getLogger("bdseal")


def draw_ground_truth_figures(spec: DefenseSpec, defense_cfg: dict[str, Any], result: DefenseResult, ps: PoisonedSet,
                              baseline_model: nn.Module | None, view: DefenderView, ctx: RunContext,
                              umap: bool = False) -> list[str]:
    """Write the figures that apply to this run into ``ctx.run_dir``; returns their file names."""
    out = ctx.run_dir
    assert out is not None
    written: list[Path] = []
    if spec.post_hoc and baseline_model is not None and len(ps.test_triggered):
        from bdseal.defenses.pgbd.gradcam import save_gradcam_figure

        written.append(save_gradcam_figure({"M_B": baseline_model, "M_C": result.model}, ps.test_triggered.x[:6].to(ctx.device),
                                           out / "gradcam.png", layer=defense_cfg.get("layer")))
    if (out / "gssd_scores.safetensors").exists():
        written += _gssd_figures(out, ps, view, defense_cfg, ctx, umap)
    if (out / "pgrl_state.safetensors").exists():
        from bdseal.defenses.pgrl import plot_weight_distribution

        weights = load_tensors(out / "pgrl_state.safetensors")[0]["weights"]
        written.append(Path(plot_weight_distribution(weights, poison_mask=ps.oracle.is_poison, path=out / "pgrl_weights.png")))
    return [p.name for p in written]


def _gssd_figures(out: Path, ps: PoisonedSet, view: DefenderView, defense_cfg: dict[str, Any], ctx: RunContext, umap: bool) -> list[Path]:
    from bdseal.defenses.gssd import plots

    d, _ = load_tree(out / "gssd_scores.safetensors")
    written = []
    for t in list(d["nd"]) + list(d["d"]):
        m = d["labels"] == t
        path = out / f"gssd_sigma_class{t}_gt.png"
        plots.plot_sigma_distribution(d["pi"][m], poison_mask=ps.oracle.is_poison[m], title=f"class {t}: clean vs poisoned", path=path)
        written.append(path)
    if umap:
        from bdseal.ssl import backbone_features

        feats = backbone_features(view, defense_cfg["backbone"], ctx)  # cached by the defense's own call
        path = out / "gssd_umap_gt.png"
        plots.plot_umap(feats, view.y, poison_mask=ps.oracle.is_poison, path=path)
        written.append(path)
    return written


def per_epoch_oracle_stats(state: dict[str, Any], is_poison: torch.Tensor) -> list[dict[str, Any]]:
    """PGRL, per post-warm-up epoch, the label-consistent set's size
    and the fraction of it that is clean, from ``pgrl_state.safetensors``'s ``trusted_history`` and the oracle."""
    hist, epochs = state.get("trusted_history"), state.get("history_epochs")
    if hist is None or len(hist) == 0:
        return []
    poison = torch.as_tensor(is_poison).bool().cpu()
    out = []
    for e, mask in zip(torch.as_tensor(epochs).tolist(), hist.bool()):
        n = int(mask.sum())
        out.append({"epoch": int(e), "trusted": n, "trusted_clean_frac": float((mask & ~poison).sum()) / n if n else float("nan"),
                    "poison_trusted": int((mask & poison).sum())})
    return out


def add_oracle_per_epoch(run_dir: str | Path, metrics: dict[str, Any], is_poison: torch.Tensor) -> None:
    """After the defense: merge :func:`per_epoch_oracle_stats` into
    ``metrics["extras"]["per_epoch"]`` (by epoch) and draw ``pgrl_per_epoch.png`` in ``run_dir``."""
    state, _ = load_tensors(Path(run_dir) / "pgrl_state.safetensors")
    extras = metrics.setdefault("extras", {})
    rows = {r["epoch"]: r for r in extras.get("per_epoch", [])}
    for r in per_epoch_oracle_stats(state, is_poison):
        rows.setdefault(r["epoch"], {"epoch": r["epoch"]}).update(r)
    extras["per_epoch"] = [rows[e] for e in sorted(rows)]
    if extras["per_epoch"]:
        from bdseal.defenses.pgrl import plot_per_epoch

        plot_per_epoch(extras["per_epoch"], int(metrics.get("n_train", len(is_poison))), Path(run_dir) / "pgrl_per_epoch.png")
