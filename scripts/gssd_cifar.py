#!/usr/bin/env python
"""GSSD on CIFAR-10 against the GSSD-paper attacks, next to defense=none, at a reduced (CPU) scale.

For every attack it runs two cells through ``bdseal.experiment.run`` with the same data, seed and
poisoned set (cached): ``defense=none`` and ``defense=gssd`` (``baseline=false``, so each wall time is
that defense's own). Prints a markdown table: target detected?, detection AUROC, clean acc, ASR, wall
time. Example (the small cell reported in docs/gssd.md):

    .venv/bin/python scripts/gssd_cifar.py --attacks badnets --train-per-class 300 --test-per-class 100 \\
        --epochs 15 --ssl-epochs 15 --flow-epochs 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bdseal.experiment.config import compose_config
from bdseal.experiment.run import run_experiment

ATTACKS = ["badnets", "blend", "wanet", "lc", "adap_patch", "adap_blend"]
ROOT = Path(__file__).resolve().parents[1]


def cell(attack: str, defense: str, args: argparse.Namespace, out: Path) -> dict:
    overrides = [
        "dataset=cifar10", f"dataset.root={args.data}", f"dataset.train_per_class={args.train_per_class}",
        f"dataset.test_per_class={args.test_per_class}", f"attack=gssd/{attack}", f"model={args.model}",
        f"train.epochs={args.epochs}", f"defense={defense}", "baseline=false", f"seed={args.seed}",
        f"out={out / f'{attack}-{defense}'}", "overwrite=true", f"progress={str(args.progress).lower()}",
    ]
    if defense == "gssd":
        overrides += [f"defense.backbone.arch={args.ssl_arch}", f"defense.backbone.epochs={args.ssl_epochs}",
                      f"defense.flow.epochs={args.flow_epochs}", f"defense.nd_rule={args.nd_rule}"]
    t0 = time.time()
    m = run_experiment(compose_config(overrides + list(args.extra)))
    m["wall_s"] = time.time() - t0
    return m


def row(attack: str, defense: str, m: dict) -> str:
    det = m.get("detection", {})
    ex = m.get("extras", {})
    found = "—" if defense == "none" else ("yes" if m["target"] in ex.get("detected_targets", []) else "no") + f" {ex.get('detected_targets')}"
    auroc = det.get("auroc")
    return (f"| {attack} | {defense} | {found} | {'—' if auroc is None else f'{auroc:.3f}'} | {m['clean_acc']:.3f} | "
            f"{m['asr']:.3f} | {m['wall_s']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10.npz"))
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--model", default="small", help="classifier (paper: resnet18 with train=resnet_cifar)")
    p.add_argument("--epochs", type=int, default=30, help="classifier epochs (paper: 200)")
    p.add_argument("--ssl-arch", default="small", help="SimCLR encoder (paper: resnet18)")
    p.add_argument("--ssl-epochs", type=int, default=30, help="SimCLR epochs (paper: 100)")
    p.add_argument("--flow-epochs", type=int, default=50, help="flow epochs (paper: 50)")
    p.add_argument("--nd-rule", default="either", choices=["absolute", "robust", "either"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/gssd_cifar")
    p.add_argument("--progress", action="store_true")
    p.add_argument("extra", nargs="*", help="further Hydra overrides for every cell")
    args = p.parse_args()
    out = Path(args.out)
    lines = ["| attack | defense | target detected? | det. AUROC | clean acc | ASR | wall s |", "|---|---|---|---|---|---|---|"]
    results = {}
    for attack in args.attacks:
        for defense in ("none", "gssd"):
            m = cell(attack, defense, args, out)
            results[f"{attack}/{defense}"] = {k: m.get(k) for k in ("clean_acc", "asr", "detection", "extras", "wall_s", "target")}
            lines.append(row(attack, defense, m))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
