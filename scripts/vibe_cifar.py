"""VIBE-SS-F and VIBE-SS-A versus no defense on CIFAR-10 at a reduced, CPU-friendly scale.

    python scripts/vibe_cifar.py --attacks badnets blend wanet adap_blend --train-per-class 500 \
        --ssl-epochs 20 --iterations 2000 --out runs/vibe_cifar

Every cell goes through ``bdseal.experiment.run.run_experiment`` (the same path as ``bdseal run``),
so poisoned sets, the no-defense baseline and the SSL backbone are cached and shared between the two
VIBE variants of an attack. Writes ``<out>/vibe_cifar.md`` (clean_acc, asr, relabel_acc, wall time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bdseal.experiment.config import compose_config
from bdseal.experiment.run import run_experiment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", default=["badnets", "blend", "wanet", "adap_blend"])
    p.add_argument("--defenses", nargs="+", default=["none", "vibe_ss_f", "vibe_ss_a"])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--model", default="small_half", help="model of the no-defense run")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the no-defense run")
    p.add_argument("--ssl-kind", default="simclr")
    p.add_argument("--ssl-arch", default="small_half")
    p.add_argument("--ssl-epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--e-step-every", type=int, default=200)
    p.add_argument("--lr", type=float, default=None, help="VIBE M-step lr (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/vibe_cifar")
    return p.parse_args(argv)


def overrides(a: argparse.Namespace, attack: str, defense: str) -> list[str]:
    o = [f"dataset=cifar10", f"dataset.root={a.data}", f"dataset.train_per_class={a.train_per_class}",
         f"dataset.test_per_class={a.test_per_class}", f"attack={attack}", f"defense={defense}", f"model={a.model}",
         f"train.epochs={a.epochs}", f"seed={a.seed}", f"device={a.device}", "progress=false", "baseline=false",
         f"out={Path(a.out) / f'{attack}-{defense}'}", "overwrite=true"]
    if defense != "none":
        o += [f"defense.ssl.kind={a.ssl_kind}", f"defense.ssl.arch={a.ssl_arch}", f"defense.ssl.epochs={a.ssl_epochs}",
              f"defense.iterations={a.iterations}", f"defense.e_step_every={a.e_step_every}"]
        if a.lr is not None:
            o.append(f"defense.lr={a.lr}")
    return o


def fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) and v == v else ("–" if isinstance(v, float) else str(v))


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| attack | defense | clean_acc | asr | relabel_acc | flagged tpr/fpr | wall s |", "|---|---|---|---|---|---|---|"]
    for attack in a.attacks:
        for defense in a.defenses:
            t0 = time.time()
            m = run_experiment(compose_config(overrides(a, attack, defense)))
            det = m.get("detection") or {}
            rows.append(f"| {attack} | {defense} | {fmt(m['clean_acc'])} | {fmt(m['asr'])} | {fmt(m.get('relabel_acc', float('nan')))} | "
                        f"{fmt(det.get('tpr', float('nan')))}/{fmt(det.get('fpr', float('nan')))} | {time.time() - t0:.0f} |")
            print(rows[-1], flush=True)
    scale = (f"CIFAR-10, {a.train_per_class} train/class, {a.test_per_class} test/class; none: {a.model} {a.epochs} epochs; "
             f"VIBE: {a.ssl_kind} {a.ssl_arch} {a.ssl_epochs} SSL epochs, {a.iterations} EM iterations, E-step every "
             f"{a.e_step_every}, seed {a.seed}")
    text = f"# VIBE on CIFAR-10 (reduced scale)\n\n{scale}\n\n" + "\n".join(rows) + "\n"
    (out / "vibe_cifar.md").write_text(text)
    (out / "args.json").write_text(json.dumps(vars(a), indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
