"""Validation runs for GSSD's relative S_ND rules: the detection stage only (backbone features, per-class flows,
S_ND of Eq. 2; ``bdseal.defenses.gssd.defense.detect``, the function ``defense=gssd`` runs), over several seeds, for clean (``attack=none``) and poisoned data. Prints and saves, per run, every
class's S_ND, its robust z and its leave-one-out z, so that a threshold can be chosen that separates clean
classes (every class of a null run, every non-target class of a poisoned run) from targets (docs/gssd.md
"Calibrating the relative rule"). No classifier is trained; the SSL features and flows are cached by the same code
as in ``bdseal run defense=gssd``, so a later full run reuses them.

    python scripts/gssd_null.py --seeds 0 1 2 --out bench/gssd_null/digits_none.json -- attack=none
    python scripts/gssd_null.py --seeds 0 1 2 --out bench/gssd_null/digits_badnets.json -- attack=badnets
"""
from __future__ import annotations

import time

from bdseal.defenses import DefenderView
from bdseal.defenses.gssd.defense import detect, resolve
from bdseal.experiment import run as run_mod
from bdseal.experiment.config import compose_config
from bdseal.experiment.sweep_cli import seed_sweep_args, write_json


def detection_stage(overrides: list[str], seed: int) -> dict:
    """S_ND and both relative z-scores of one (config, seed) cell, computed as ``defense=gssd`` computes them."""
    cfg = compose_config(["defense=gssd", f"seed={seed}", "progress=false", *overrides])
    cell = run_mod.prepare_cell(cfg)  # the same data, hold-out, poisoning and cache keys as `bdseal run`
    det = detect(DefenderView(train=cell.poisoned.train), resolve(run_mod.defense_config(cfg)), cell.ctx)
    target = int(cfg.attack.target) if cfg.attack.name != "none" else None  # for the table only, never used above
    a = det.analysis  # per-class vectors follow det.classes (classes too small for a flow are left out)
    return {"seed": seed, "attack": str(cfg.attack.name), "target": target, "classes": det.classes,
            "s_nd": a["snd"].tolist(), "robust_z": a["robust_z"].tolist(), "loo_z": a["loo_z"].tolist()}


def main() -> None:
    a = seed_sweep_args(__doc__, [0, 1, 2])
    rows = []
    for seed in a.seeds:
        t0 = time.time()
        r = detection_stage(a.overrides, seed)
        r["time_s"] = round(time.time() - t0, 1)
        rows.append(r)
        t = r["classes"].index(r["target"]) if r["target"] in r["classes"] else None  # column of the target
        parts = []
        for name in ("loo_z", "robust_z"):
            others = max(v for k, v in enumerate(r[name]) if k != t)
            parts.append(f"{name} target {None if t is None else round(r[name][t], 2)}, max other {others:.2f}")
        print(f"seed {seed} {r['attack']}: {'; '.join(parts)} ({r['time_s']} s)", flush=True)
    write_json(a.out, {"overrides": a.overrides, "runs": rows})


if __name__ == "__main__":
    main()
