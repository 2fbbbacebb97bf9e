"""How strongly PGBD's sanitisation term pulls on the backdoored model, before any fine-tuning step.

For one cell (the same data, hold-out, poisoning, backdoored model M_B and cache keys as ``bdseal run
defense=pgbd``), builds PGBD's prototypes and PAVs on D_S exactly as ``defense=pgbd`` does (known target) and
reports, over D_S in batches of the defense's batch size, the parameter-gradient norms of CE and of λ·L_s
(Eq. 4 with REFERENCE's Σ_batch |cos|), their ratio, and ‖a − P_c‖ in the hooked layer (docs/pgbd.md,
"Why PGBD collapses at small scale").

    python scripts/pgbd_grad_ratio.py --seeds 0 1 2 --out bench/pgbd_grad/digits.json -- attack=pgbd/badnets attack.rate=0.05
"""
from __future__ import annotations

import json

import torch

from bdseal.defenses import DefenderView
from bdseal.defenses.pgbd.defense import Sanitiser
from bdseal.defenses.pgbd.pav import gradient_pull, to_space
from bdseal.experiment import run as run_mod
from bdseal.experiment.config import compose_config
from bdseal.experiment.sweep_cli import seed_sweep_args, write_json


def measure(overrides: list[str], seed: int) -> dict:
    cfg = compose_config(["defense=pgbd", "defender.target_known=true", f"seed={seed}", "progress=false", *overrides])
    cell = run_mod.prepare_cell(cfg)
    model = run_mod.train_baseline(cfg, cell.ctx, cell.poisoned.train).eval()
    dcfg = run_mod.defense_config(cfg)
    view = DefenderView(train=cell.poisoned.train, clean=cell.defender_pool, backdoored_model=model,
                        known_target=int(cfg.attack.target))
    clean = view.require_clean("pgbd")
    san = Sanitiser("pgbd", model, clean, dcfg, cell.ctx, None, view.known_target)
    feats = to_space(san.clean_acts, san.space)
    dist = (feats - san.state.protos[clean.y]).norm(dim=1)
    bs = int(dcfg["train"]["batch_size"])
    pull = gradient_pull(model, clean.x, clean.y, san.layer, san.space, san.state.centres, san.state.V, san.state.active,
                         san.lam, bs, device=cell.ctx.device)
    ce_t, ls_t = torch.tensor(pull["ce"]), torch.tensor(pull["lam_ls"])
    return {"seed": seed, "overrides": overrides, "layer": san.layer, "dim": int(feats.shape[1]), "n_clean": len(clean.y),
            "lam": san.lam, "act_norm_mean": float(feats.norm(dim=1).mean()), "dist_to_proto_mean": float(dist.mean()),
            "dist_to_proto_min": float(dist.min()), "grad_ce_median": float(ce_t.median()),
            "grad_lam_ls_median": float(ls_t.median()), "ratio_median": float((ls_t / ce_t).median())}


def main() -> None:
    a = seed_sweep_args(__doc__, [0])
    rows = []
    for s in a.seeds:
        r = measure(a.overrides, s)
        print(json.dumps(r))
        rows.append(r)
    write_json(a.out, rows)


if __name__ == "__main__":
    main()
