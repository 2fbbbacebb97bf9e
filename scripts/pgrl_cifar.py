"""PGRL on CIFAR-10: detection TPR/FPR and clean_acc/ASR of LCV, WCE, PGRL and no defense for the
paper's three attacks (Pattern = BadNets, AdapBlend, Freq) at poison rates 0.05 and 0.003 — the seed's
Table 2 / Fig. 2 setting at a reduced, CPU-friendly scale — plus wall time relative to plain training.

Every cell goes through ``bdseal.experiment.run.run_experiment`` with the PGRL attack presets
(``attack=pgrl/<name>``: target 2 for Pattern/AdapBlend, 0 for Freq; rates of the whole training set;
AdapBlend covers = poison count). ``none`` is plain training with the run's recipe; its wall time is the
denominator of the ``time×`` column (both include the same data loading; poisoned sets are cached).

Scale flags: ``--model`` (``small`` default; the paper: ``resnet18``), ``--train-per-class`` (of 5000),
``--epochs`` (PGRL's 55, scaled schedule: warm-up, first weight estimate and interval shrink with it),
``--views`` (weak,strong; paper 2,4), ``--clean-per-class`` (paper 10).

Example (CPU, one small cell):
  python scripts/pgrl_cifar.py --attacks badnets --rates 0.05 --defenses none,pgrl --train-per-class 200 \\
      --test-per-class 50 --epochs 12 --views 1,2 --out runs/pgrl_cifar_small
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
    "badnets": ["attack=pgrl/badnets"],
    "adap_blend": ["attack=pgrl/adap_blend"],
    "freq": ["attack=pgrl/freq"],
}
DEFENSES = ["none", "lcv", "wce", "pgrl"]


def pgrl_schedule(epochs: int) -> list[str]:
    """The paper's 55-epoch schedule (warm-up 5, weights from 10 every 5) scaled to ``epochs``."""
    if epochs >= 55:
        return [f"defense.train.epochs={epochs}"]
    f = epochs / 55
    warm = max(1, round(5 * f))
    start = max(warm + 1, round(10 * f))
    every = max(1, round(5 * f))
    return [f"defense.train.epochs={epochs}", f"defense.warmup_epochs={warm}", f"defense.weight_start={start}",
            f"defense.weight_every={every}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--rates", default="0.05,0.003")
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--model", default="small")
    ap.add_argument("--train-per-class", type=int, default=1000, help="CIFAR-10 training images per class (0 = all)")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class (0 = all)")
    ap.add_argument("--epochs", type=int, default=55, help="epochs of every method (none uses the same count)")
    ap.add_argument("--views", default="2,4", help="weak,strong augmented views per sample (paper 2,4)")
    ap.add_argument("--clean-per-class", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"))
    ap.add_argument("--out", default="runs/pgrl_cifar")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every cell")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weak, strong = (int(v) for v in args.views.split(","))
    base = ["dataset=cifar10", f"dataset.root={args.root}", f"model={args.model}", f"train.epochs={args.epochs}",
            f"seed={args.seed}", f"device={args.device}", "progress=false", "overwrite=true", "baseline=false"]
    if args.train_per_class:
        base.append(f"dataset.train_per_class={args.train_per_class}")
    if args.test_per_class:
        base.append(f"dataset.test_per_class={args.test_per_class}")
    pgrl_over = [*pgrl_schedule(args.epochs), f"defense.n_weak={weak}", f"defense.n_strong={strong}",
                 f"defense.clean_per_class={args.clean_per_class}", f"defense.train.batch_size={args.batch_size}"]
    rows = []
    for attack in args.attacks.split(","):
        for rate in args.rates.split(","):
            plain_wall = None
            for defense in args.defenses.split(","):
                cell = f"{attack}-{rate}-{defense}"
                over = [*base, *ATTACKS[attack], f"attack.rate={rate}", f"defense={defense}", f"out={out / cell}"]
                if attack == "adap_blend":
                    over.append(f"attack.cover_rate={rate}")  # PGRL: covers = poison count
                if defense != "none":
                    over += pgrl_over
                over += args.extra
                t0 = time.time()
                try:
                    m = run_experiment(compose_config(over))
                except Exception as e:  # keep the table going; the failure is reported in it
                    traceback.print_exc()
                    rows.append({"attack": attack, "rate": rate, "defense": defense, "error": f"{type(e).__name__}: {e}"[:120]})
                    continue
                wall = time.time() - t0
                if defense == "none":
                    plain_wall = wall
                det = m.get("detection") or {}
                rows.append({"attack": attack, "rate": rate, "defense": defense, "n_poison": m["n_poison"],
                             "tpr": det.get("tpr"), "fpr": det.get("fpr"), "auroc": det.get("auroc"),
                             "clean_acc": m["clean_acc"], "asr": m["asr"], "wall_s": wall,
                             "rel_time": wall / plain_wall if plain_wall else None})
                print(json.dumps(rows[-1]), flush=True)
    table = render(rows, args)
    print(table)
    (out / "table.md").write_text(table)
    (out / "rows.json").write_text(json.dumps(rows, indent=2))


def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None or v != v else f"{v:.{nd}f}"


def render(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"PGRL on CIFAR-10 ({args.model}, {args.train_per_class or 5000}/class train, {args.epochs} epochs, "
            f"views {args.views}, D_v {args.clean_per_class}/class, seed {args.seed})\n\n"
            "| attack | rate | defense | #poison | TPR | FPR | AUROC | clean_acc | ASR | wall s | time× none |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attack']} | {r['rate']} | {r['defense']} | error: {r['error']} |||||||| ")
            continue
        lines.append(f"| {r['attack']} | {r['rate']} | {r['defense']} | {r['n_poison']} | {_f(r['tpr'], 2)} | "
                     f"{_f(r['fpr'], 2)} | {_f(r['auroc'], 2)} | {_f(r['clean_acc'])} | {_f(r['asr'])} | "
                     f"{_f(r['wall_s'], 0)} | {_f(r['rel_time'], 2)} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
