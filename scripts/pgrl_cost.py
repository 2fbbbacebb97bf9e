"""PGRL's cost, measured three ways on one cell (docs/pgrl.md "Cost").

    python scripts/pgrl_cost.py [--out cost.json] [OVERRIDE ...]

with the usual ``bdseal run`` overrides for the cell (dataset, model, attack, ``defense.*`` for the PGRL
rows). In one process it times, with the per-epoch test evaluation off:

- ``plain``: ``bdseal.train.fit`` with the run's plain recipe (``train.*``, crop+flip, one view) for the
  same number of epochs as PGRL — the ``defense=none`` training;
- ``pgrl_recipe``: PGRL's recipe with every sample trusted and w = 1 — the same epochs, views, D_v and
  optimizer as PGRL, so ``pgrl / pgrl_recipe`` is PGRL's overhead *beyond* its inherent views
  (LCV's prototypes and Sinkhorn, WCE's UMAP refreshes, feature bookkeeping);
- ``pgrl``: the defense itself.

Seconds are this process's CPU time on a CPU-only machine (single-threaded runs: robust to other jobs on a
shared machine) and wall time on a GPU. It prints per-epoch seconds (post-warm-up epochs, refreshes apart), the ratios, and PGRL's multiple of the
paper's plain budget: 55 PGRL epochs against 200 plain epochs (the authors' ``train.py``; REFERENCE.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bdseal.defenses import DefenderView, get_defense
from bdseal.experiment import run as run_mod
from bdseal.experiment.config import compose_config
from bdseal.train.loop import fit

CPU = not torch.cuda.is_available()  # on a CPU: CPU seconds of this process (robust to other jobs); on a GPU: wall


def _pgrl_row(name: str, overrides: list[str], tmp: str) -> dict[str, Any]:
    cfg = compose_config([*overrides, f"defense={name}", "defense.epoch_eval=false", "progress=false", f"out={tmp}/{name}"])
    cell = run_mod.prepare_cell(cfg, run_dir=None)
    spec = get_defense(name)
    view = DefenderView(train=cell.poisoned.train, clean=run_mod._clean_subset(cell.defender_pool, cfg, cell.seed))
    t0, c0 = time.perf_counter(), time.process_time()
    res = spec.fn(view, run_mod.defense_config(cfg), cell.ctx)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = res.extras["per_epoch"]
    post = [r for r in rows if "trusted" in r]
    key = "train_cpu_s" if CPU else "train_s"
    train_post = sum(r[key] for r in post)
    refresh = sum(r.get("refresh_cpu_s" if CPU else "refresh_s", 0.0) for r in rows)
    acc = run_mod.evaluate(res.model, cell.poisoned, cell.device)
    return {"total_s": total_cpu if CPU else total, "wall_s": total, "epochs": len(rows), "post_warmup_epochs": len(post),
            "epoch_s": train_post / max(1, len(post)), "warmup_s": sum(r[key] for r in rows if "trusted" not in r),
            "refresh_s": refresh, "n_refresh": sum("refresh_s" in r for r in rows),
            "epoch_s_with_refresh": (train_post + refresh) / max(1, len(post)), **acc}


def _plain_row(overrides: list[str], epochs: int, tmp: str) -> dict[str, Any]:
    plain_ov = [o for o in overrides if not o.lstrip("+~").startswith("defense.")]
    cfg = compose_config([*plain_ov, "defense=none", "progress=false", f"out={tmp}/none"])
    cell = run_mod.prepare_cell(cfg, run_dir=None)
    model = cell.ctx.build_model()
    tc = cell.ctx.train_cfg.replace(epochs=epochs, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    fit(model, cell.poisoned.train.x, cell.poisoned.train.y, tc, device=cell.device, seed=cell.seed)
    total = time.process_time() - c0 if CPU else time.perf_counter() - t0
    return {"total_s": total, "wall_s": time.perf_counter() - t0, "epochs": epochs, "epoch_s": total / epochs, "batch_size": tc.batch_size,
            **run_mod.evaluate(model, cell.poisoned, cell.device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the measurements here as JSON")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgrl-cost-") as tmp:
        ov = [*a.overrides, f"cache_dir={tmp}/cache", "baseline=false"]
        recipe = _pgrl_row("pgrl_recipe", ov, tmp)
        pgrl = _pgrl_row("pgrl", ov, tmp)
        plain = _plain_row(ov, pgrl["epochs"], tmp)
    out = {
        "overrides": a.overrides, "device": str(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "torch_threads": torch.get_num_threads(), "plain": plain, "pgrl_recipe": recipe, "pgrl": pgrl,
        "pgrl_over_recipe_per_epoch": pgrl["epoch_s_with_refresh"] / recipe["epoch_s"],
        "pgrl_over_recipe_total": pgrl["total_s"] / recipe["total_s"],
        "recipe_over_plain_per_epoch": recipe["epoch_s"] / plain["epoch_s"],
        "pgrl_over_plain_per_epoch": pgrl["epoch_s_with_refresh"] / plain["epoch_s"],
        "pgrl_over_plain_total": pgrl["total_s"] / plain["total_s"],
        # the paper's comparison: 55 PGRL epochs (5 of them D_v-only warm-up) vs 200 plain epochs
        "paper_budget_ratio": (50 * pgrl["epoch_s_with_refresh"] + 5 * pgrl["warmup_s"] / max(1, pgrl["epochs"] - pgrl["post_warmup_epochs"]))
        / (200 * plain["epoch_s"]),
    }
    print(json.dumps(out, indent=2))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
