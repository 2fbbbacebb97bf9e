"""PGBD on CIFAR-10 at 1% poisoning: M_B vs M_C clean accuracy / ASR and DEM Γ for FT, NAD, PGBD,
NT-PGBD and ST-PGBD (seed ``pgbd_paper.txt`` Tab. 2 / Tab. 4 setting, reduced scale).

Every cell goes through ``bdseal.experiment.run.run_experiment`` with the PGBD attack presets
(``attack=pgbd/<name>``, target 0, rate 1%); the backdoored model M_B is cached by the experiment layer,
so the defenses of one attack reuse one M_B. Prints a markdown table (and writes it to ``--out``/table.md).

Scale flags: ``--model`` (``small`` = the airbench-style net, default; ``preact_resnet18`` = the paper's
model), ``--train-per-class`` (default 1000 of 5000), ``--epochs`` for M_B, ``--defense-epochs`` (paper 35).

Example (CPU, small): python scripts/pgbd_cifar.py --attacks badnets --defenses ft,pgbd --train-per-class 300 \
    --epochs 15 --defense-epochs 10 --out runs/pgbd_cifar_small
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from bdseal.experiment.config import compose_config
from bdseal.experiment.run import run_experiment

ATTACKS = {
    "badnets": ["attack=pgbd/badnets"],
    "blend": ["attack=pgbd/blend"],
    "trojan": ["attack=pgbd/trojan"],
    "sig": ["attack=pgbd/sig"],
    "wanet": ["attack=pgbd/wanet"],
    "badnets_a2a": ["attack=pgbd/badnets", "attack.mode=all_to_all"],
}
DEFENSES = ["ft", "nad", "pgbd", "nt_pgbd", "st_pgbd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--model", default="small", help="small | small_half | preact_resnet18 | ...")
    ap.add_argument("--train-per-class", type=int, default=1000, help="CIFAR-10 training images per class (0 = all)")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class (0 = all)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs to train the backdoored model M_B")
    ap.add_argument("--defense-epochs", type=int, default=35, help="fine-tuning epochs of every defense")
    ap.add_argument("--nc-steps", type=int, default=300, help="Neural Cleanse steps (all classes jointly)")
    ap.add_argument("--target-known", action="store_true", help="give PGBD the target (else Neural Cleanse infers it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"))
    ap.add_argument("--out", default="runs/pgbd_cifar")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every cell")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"dataset=cifar10", f"dataset.root={args.root}", f"model={args.model}", f"train.epochs={args.epochs}",
            f"seed={args.seed}", f"device={args.device}", "progress=false", "overwrite=true"]
    if args.train_per_class:
        base.append(f"dataset.train_per_class={args.train_per_class}")
    if args.test_per_class:
        base.append(f"dataset.test_per_class={args.test_per_class}")
    if args.target_known:
        base.append("defender.target_known=true")
    rows = []
    for attack in args.attacks.split(","):
        for defense in args.defenses.split(","):
            over = [*base, *ATTACKS[attack], f"defense={defense}", f"out={out / f'{attack}-{defense}'}", *args.extra]
            over += _defense_budget(defense, args)
            t0 = time.time()
            try:
                m = run_experiment(compose_config(over))
            except Exception as e:  # keep the table going; the failure is reported in it
                traceback.print_exc()
                rows.append({"attack": attack, "defense": defense, "error": f"{type(e).__name__}: {e}"[:120]})
                continue
            b = m.get("baseline", {})
            ex = m.get("extras", {})
            rows.append({"attack": attack, "defense": defense, "ca_b": b.get("clean_acc"), "asr_b": b.get("asr"),
                         "ca_d": m["clean_acc"], "asr_d": m["asr"], "dem": m.get("dem"), "wall_s": time.time() - t0,
                         "target": ex.get("target_used", ex.get("neural_cleanse", {}).get("inferred_target"))})
            print(json.dumps(rows[-1]), flush=True)
    table = _table(rows, args)
    (out / "table.md").write_text(table)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    print(table)


def _defense_budget(defense: str, args: argparse.Namespace) -> list[str]:
    over = [f"defense.train.epochs={args.defense_epochs}"]
    if defense in ("pgbd", "nt_pgbd", "st_pgbd"):
        over.append(f"defense.neural_cleanse.steps={args.nc_steps}")
    if defense == "nad":
        over = [f"defense.train.epochs={max(1, args.defense_epochs * 20 // 35)}",
                f"defense.teacher_train.epochs={max(1, args.defense_epochs * 10 // 35)}"]
    return over


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"CIFAR-10, model {args.model}, {args.train_per_class or 5000} train/class, M_B {args.epochs} epochs, "
            f"defenses {args.defense_epochs} epochs, 1% poisoning, target 0, seed {args.seed}\n\n"
            "| attack | defense | CA M_B | ASR M_B | CA M_C | ASR M_C | Γ | target | wall (s) |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attack']} | {r['defense']} | error: {r['error']} |||||||")
        else:
            lines.append(f"| {r['attack']} | {r['defense']} | {_fmt(r['ca_b'])} | {_fmt(r['asr_b'])} | {_fmt(r['ca_d'])} | "
                         f"{_fmt(r['asr_d'])} | {_fmt(r['dem'])} | {_fmt(r['target'])} | {r['wall_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
