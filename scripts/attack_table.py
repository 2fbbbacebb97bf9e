#!/usr/bin/env python
"""No-defense clean accuracy and ASR of every attack on CIFAR-10 at a reduced CPU scale.

Each attack runs as ``bdseal run attack=NAME defense=none dataset=cifar10 ...`` (through
``compose_config`` + ``run_experiment``, so exactly the CLI's cell) into ``<out>/<attack>``; finished
runs (a ``metrics.json`` present) are read back instead of re-run. Prints a markdown table and writes
it to ``<out>/table.md``.

Example (the scale used for the issue-3 note)::

    .venv/bin/python scripts/attack_table.py --attacks blend wanet sig freq adap_patch adap_blend \\
        --train-per-class 300 --epochs 10 --model small_half
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bdseal.attacks import list_attacks  # noqa: E402
from bdseal.experiment.config import compose_config  # noqa: E402
from bdseal.experiment.run import run_experiment  # noqa: E402

CONF = REPO / "bdseal" / "conf" / "attack"


def default_attacks() -> list[str]:
    """Every registered attack that has a config file (``attack=NAME`` must compose)."""
    return [a for a in list_attacks() if (CONF / f"{a}.yaml").exists()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=None, help="attack configs (e.g. blend, pgrl/freq); default: all registered")
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "cifar10.npz"), help="CIFAR-10 .npz or directory")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=None, help="default: the whole test set")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--model", default="small_half")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/attack_table")
    p.add_argument("--progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    return p.parse_args(argv)


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Run (or read back) one attack's no-defense cell."""
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    overrides = [
        f"attack={name}", "defense=none", f"dataset={args.dataset}", f"dataset.root={args.root}",
        f"dataset.train_per_class={args.train_per_class}", f"train.epochs={args.epochs}", f"model={args.model}",
        f"seed={args.seed}", f"out={out}", "overwrite=true", f"progress={str(args.progress).lower()}",
    ]
    if args.test_per_class:
        overrides.append(f"dataset.test_per_class={args.test_per_class}")
    t0 = time.time()
    metrics = run_experiment(compose_config([*overrides, *args.overrides]))
    metrics.setdefault("time_s", time.time() - t0)
    return metrics


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| attack | clean_acc | asr | poison rate | n_poison | n_cover | time (s) |", "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        asr = m.get("asr")
        lines.append(
            f"| {name} | {m['clean_acc']:.4f} | {'n/a' if asr is None else f'{asr:.4f}'} | {m['poison_rate']:.4f} "
            f"| {m['n_poison']} | {m['n_cover']} | {m['time_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = args.attacks or default_attacks()
    root = Path(args.out)
    rows = []
    for name in names:
        out = root / name.replace("/", "_")
        print(f"[attack_table] {name} -> {out}", flush=True)
        m = run_one(name, args, out)
        rows.append((name, m))
        print(f"[attack_table] {name}: clean_acc={m['clean_acc']:.4f} asr={m.get('asr')} ({m['time_s']:.0f}s)", flush=True)
    md = table(rows)
    root.mkdir(parents=True, exist_ok=True)
    header = (f"Scale: {args.dataset} {args.train_per_class}/class, {args.epochs} epochs, model {args.model}, "
              f"seed {args.seed}, extra overrides {args.overrides or 'none'}\n\n")
    (root / "table.md").write_text(header + md + "\n")
    print(header + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
