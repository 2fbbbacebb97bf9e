#!/usr/bin/env python
"""Generate docs/BENCHMARKS.md from bench results stores (and a bench-speed JSON).

    bdseal bench bench=cifar_cpu                                   # the reduced-scale CIFAR-10 matrix
    bdseal bench-speed out=bench/speed.json                        # loop overhead + defense timings
    python scripts/benchmarks.py --store bench/cifar_cpu --speed bench/speed.json \\
        --command "bdseal bench bench=cifar_cpu" --command "bdseal bench-speed out=bench/speed.json"

``--store`` is repeatable: the per-paper matrices (``bdseal bench bench=gssd_cifar`` / ``pgbd_cifar`` /
``pgrl_cifar`` / ``vibe_cifar`` / ``attacks_cifar``) can be added next to ``cifar_cpu``; their rows are
merged (a cell held by several stores counts once). Every number under "Our runs" is read from the
stores / the speed JSON; the scale is read from the runs' own resolved configs. The seed papers'
numbers below are transcribed from the tables cited next to them (full-scale ResNet/PreAct-ResNet-18
runs on the full CIFAR-10) for reference only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bdseal.experiment.report import Stat, aggregate, build_tables, fmt, post_hoc_labels, resolve_store  # noqa: E402
from bdseal.experiment.store import ResultStore, Row  # noqa: E402

# Seed papers' CIFAR-10 numbers (%): attack (our registry name) -> values. Γ as a fraction.
PAPERS: dict[str, dict[str, Any]] = {
    "gssd": {
        "source": "GSSD paper, Table 1 (CIFAR-10 rows; ResNet-18, target 0; poisoning 10%, Adap-Patch/Adap-Blend 1%, LC 2.5%, Sec. 5)",
        "columns": ["No defense ACC", "No defense ASR", "GSSD ACC", "GSSD ASR"],
        "rows": {
            "badnets": [94.9, 100.0, 91.7, 0.14], "blend": [94.2, 98.25, 92.2, 0.77], "wanet": [94.3, 98.00, 93.7, 1.35],
            "lc": [94.9, 99.33, 92.8, 0.06], "issba": [94.5, 100.0, 93.9, 0.62], "adap_patch": [95.2, 80.9, 92.4, 0.23],
            "adap_blend": [95.0, 64.9, 92.7, 0.22],
        },
    },
    "pgbd": {
        "source": "PGBD paper, Table 2 (CIFAR10 rows; PreAct-ResNet-18, post-hoc on the backdoored model)",
        "columns": ["Baseline CA", "Baseline ASR", "PGBD CA", "PGBD ASR", "PGBD Γ"],
        "rows": {
            "badnets": [92.34, 88.93, 90.66, 0.82, 0.99], "trojan": [93.00, 100.00, 83.60, 6.76, 0.92],
            "blend": [93.06, 92.94, 86.11, 4.87, 0.94], "sig": [92.90, 89.04, 87.18, 0.31, 0.97],
            "wanet": [89.98, 97.60, 88.54, 2.36, 0.98], "iab": [90.49, 91.01, 89.43, 2.68, 0.98],
        },
    },
    "pgrl": {
        "source": "PGRL paper, Table 3 (CIFAR-10, Pattern attack): training time 3.8 h naive training vs 4.4 h PGRL "
                  "(x1.16). The per-cell numbers of Figure 2 (ACC/ASR) and Table 2 (detection) are stripped from the seed "
                  "text; its Sec. 5 states the bounds PGRL reaches over Pattern, AdapBlend and Freq at 5% and 0.3% "
                  "(ResNet-18, 55 epochs): ACC > 91% and ASR < 2% in every case (Fig. 2), TPR > 93% and FPR < 8% in "
                  "most cases (Table 2).",
        "columns": [], "rows": {},
    },
    "vibe": {
        "source": "VIBE: the seed is the authors' README, which lists the attacks (BadNets, Blend, WaNet, LC, Frequency, "
                  "Adap-Patch, Adap-Blend) but no numbers.",
        "columns": [], "rows": {},
    },
}
PAPER_TIME_RATIO = {"pgrl": 4.4 / 3.8}


def scale_of(rows: list[Row]) -> list[str]:
    """The scale, read from the runs' resolved configs: one line per dataset and distinct scale (data
    sizes, model, epochs), naming the defenses of each scale when a dataset has several."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        c = r.config
        key = (r.dataset, c["dataset"].get("train_per_class"), c["dataset"].get("test_per_class"), c["model"]["name"],
               c.get("train", {}).get("epochs"))
        groups.setdefault(key, []).append(r)
    out = []
    for key in sorted(groups, key=str):
        rs = groups[key]
        ds = key[0]
        c = rs[0].config
        tr = c.get("train", {})
        several = sum(k[0] == ds for k in groups) > 1
        out.append(
            f"- **{ds}**{' (defenses ' + ', '.join(sorted({r.defense for r in rs})) + ')' if several else ''}: "
            f"{c['dataset'].get('train_per_class') or 'all'} training images per class "
            f"({sorted({r.metrics.get('n_train') for r in rs})} used for training after holding out "
            f"{c['defender']['holdout']:.0%} as the defender's clean pool), {c['dataset'].get('test_per_class') or 'all'} test "
            f"images per class; model `{c['model']['name']}`; {tr.get('epochs')} epochs, batch {tr.get('batch_size')}, "
            f"{tr.get('optimizer')} lr {tr.get('lr')} ({tr.get('schedule')}), augmentation `{tr.get('augment')}`; "
            f"poison rate {sorted({r.config['attack'].get('rate') for r in rs if r.config['attack'].get('name') != 'none'})}; "
            f"seeds {sorted({r.seed for r in rs})}; {len(rs)} runs; device `{c.get('device')}`."
        )
    return out


def load_rows(stores: list[Path]) -> list[Row]:
    """The rows of every store, each config hash once (the first store holding it wins)."""
    rows: dict[str, Row] = {}
    for store in stores:
        for r in ResultStore(resolve_store(store)).rows():
            rows.setdefault(r.config_hash, r)
    return list(rows.values())


def _labels_of(agg: dict[tuple[str, str, str], dict[str, Stat]], dataset: str, attack: str, defense: str) -> list[str]:
    """The table labels of ``attack``: itself, or its ``attack [scale]`` labels where merged stores split it;
    only those holding ``defense``; without any, the plain label (one row, empty where nothing ran)."""
    labels = sorted({lab for (ds, lab, _) in agg if ds == dataset and (lab == attack or lab.startswith(attack + " ["))})
    with_defense = [lab for lab in labels if (dataset, lab, defense) in agg]
    return with_defense or [attack]


def comparison(agg: dict[tuple[str, str, str], dict[str, Stat]], dataset: str = "cifar10", heading: str = "###",
               ours: str = "reduced-scale") -> str:
    """Per seed paper: its numbers next to ours for the same attacks (``ours`` names our runs' kind)."""
    parts = []
    for defense, paper in PAPERS.items():
        parts.append(f"{heading} {defense.upper()}\n\nReference: {paper['source']}\n")
        if not paper["rows"]:
            variants = sorted({d for (ds, _, d) in agg if ds == dataset and (d == defense or d.startswith(defense + "_"))})
            attacks = sorted({a for (ds, a, d) in agg if ds == dataset and d in variants})
            parts.append(f"Our {ours} runs of `{'`, `'.join(variants) or defense}`: {', '.join(attacks) if attacks else 'none yet'} "
                         "(see the tables above).\n")
            continue
        header = ["Attack", *[f"paper {c}" for c in paper["columns"]], "ours none ACC", "ours none ASR",
                  f"ours {defense} ACC", f"ours {defense} ASR"] + ([f"ours {defense} Γ"] if "Γ" in " ".join(paper["columns"]) else [])
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for attack, vals in paper["rows"].items():
            for label in _labels_of(agg, dataset, attack, defense):
                none_m = agg.get((dataset, label, "none"), {})
                def_m = agg.get((dataset, label, defense), {})
                # a post-hoc defense's own M_B is its "no defense" (same data setting by construction)
                none_acc = none_m.get("acc") or def_m.get("baseline_acc")
                none_asr = none_m.get("asr") or def_m.get("baseline_asr")
                cells = [label, *[f"{v:.2f}" for v in vals],
                         fmt(none_acc, "acc"), fmt(none_asr, "asr"), fmt(def_m.get("acc"), "acc"), fmt(def_m.get("asr"), "asr")]
                if "Γ" in " ".join(paper["columns"]):
                    cells.append(fmt(def_m.get("dem"), "dem"))
                lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def machine_load(machine: dict[str, Any]) -> str:
    """How busy the CPU was when the speed file was measured (files without a load reading were measured
    on a shared machine)."""
    load = machine.get("load_avg_1min")
    if load is None:
        return "; the machine was shared with other jobs, so absolute numbers are noisy"
    busy = load > 0.5 * machine["cpu_count"]
    return f"; 1-min load average {load:.2f} at the start{', other jobs were running: absolute numbers are noisy' if busy else ''}"


def speed_section(speed: dict[str, Any] | None, speed_cmd: str) -> str:
    if not speed:
        return "_No bench-speed results given (run `bdseal bench-speed out=FILE.json` and pass `--speed FILE.json`)._\n"
    m = speed["machine"]
    out = [f"Measured {speed.get('date', '')} on {m['platform']}, torch {m['torch']}, device `{m['device']}`"
           f"{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['cpu_threads']} torch threads ({m['cpu_count']} CPUs visible"
           f"{'' if 'gpu' in m else machine_load(m)}"
           f"; each timing is the best of several repeats).",
           f"Command: `{speed_cmd}`\n"]
    if "loop" in speed:
        lp = speed["loop"]
        out += ["#### Training-loop overhead", "",
                f"Model `{lp['model']}` {lp.get('params') or ''}, batch {lp['batch_size']}, {lp['steps']} steps on {lp['image_size']}px images, "
                f"best of {lp['repeats']}.", "",
                "| loop | images/s |", "|---|---|",
                f"| bare forward/backward/step (one pre-made float batch) | {lp['bare_images_per_s']:.1f} |",
                f"| `bdseal.train.fit`, augment none | {lp['fit_images_per_s']:.1f} |",
                f"| `bdseal.train.fit`, augment crop_flip | {lp['fit_crop_flip_images_per_s']:.1f} |", "",
                f"Overhead (bare ÷ fit, augment none): **{lp['overhead']:.3f}** (goal ≤ {lp['goal']}); with crop_flip: {lp['overhead_with_crop_flip']:.3f}"
                + (f"; from the median times instead of the best: {lp['overhead_median']:.3f}." if "overhead_median" in lp else "."), ""]
        if lp.get("bare_s") and lp.get("fit_s"):
            out += [f"Spread of the repeats (s): bare {min(lp['bare_s']):.2f}–{max(lp['bare_s']):.2f}, fit "
                    f"{min(lp['fit_s']):.2f}–{max(lp['fit_s']):.2f}; a ratio inside that spread is not a measured overhead.", ""]
        if lp["fit_crop_flip_images_per_s"] > lp["fit_images_per_s"]:
            out += ["`fit` with crop_flip (strictly more work) measured faster than without augmentation: timing noise on "
                    "this machine is larger than the loop's own overhead, so the ratio above reflects noise, "
                    "not a measured cost of the loop.", ""]
    if "defense_times" in speed:
        dt = speed["defense_times"]
        out += ["#### Defense wall time vs plain training", "",
                f"Cell: `{' '.join(dt['cell'])}`; plain training (defense none) took {dt['plain_training_s']:.1f} s per cell.", "",
                "| defense | seconds | × plain training | paper's ratio |", "|---|---|---|---|"]
        for name, v in sorted(dt["defenses"].items()):
            ref = PAPER_TIME_RATIO.get(name)
            out.append(f"| {name}{' (post-hoc)' if v['post_hoc'] else ''} | {v['seconds']:.1f} | {v['x_plain_training']:.2f} | "
                       f"{f'{ref:.2f} (PGRL Table 3)' if ref else '–'} |")
        if dt["skipped"]:
            out += ["", "Not measured: " + "; ".join(f"`{k}` ({v})" for k, v in sorted(dt["skipped"].items())) + "."]
    return "\n".join(out) + "\n"


def tables_of(stores: list[Path]) -> tuple[list[Row], dict[tuple[str, str, str], dict[str, Stat]], str]:
    """The stores' merged rows, their aggregate and its Markdown tables; no finished run is an error."""
    rows = load_rows(stores)
    if not rows:
        raise SystemExit(f"{', '.join(map(str, stores))}: no finished runs")
    agg = aggregate(rows)
    return rows, agg, "\n".join(t.markdown() for t in build_tables(agg, post_hoc_labels(rows)))


def gpu_section(stores: list[Path], commands: list[str], note: str, speed: dict[str, Any] | None, speed_cmd: str) -> str:
    """The runs made on a lent GPU: their own scale lines and tables (never merged with the CPU rows)."""
    if not stores:
        return ""
    rows, agg, tables = tables_of(stores)
    cmds = "\n".join(commands) or "(commands not recorded)"
    return f"""## GPU runs

{note}

```bash
{cmds}
```

Scale (read from the runs' configs):

{chr(10).join(scale_of(rows))}

{tables}
### Seed papers' numbers next to the GPU runs

Rows are labelled with their scale where several were run; `all/cls` rows are full-scale.

{comparison(agg, heading="####", ours="GPU")}
{('### GPU speed' + chr(10) + chr(10) + speed_section(speed, speed_cmd)) if speed else ''}"""


def render(store: Path | list[Path], speed: dict[str, Any] | None, commands: list[str], speed_cmd: str, note: str = "",
           speed_path: str | None = None, gpu: str = "", gpu_args: str = "") -> str:
    stores = list(store) if isinstance(store, (list, tuple)) else [store]
    rows, agg, tables = tables_of(stores)
    defenses = sorted({r.defense for r in rows})
    cmds = "\n".join([*commands, speed_cmd] if speed else commands) or "(commands not recorded)"
    return f"""# Benchmarks

> **Reduced scale, CPU.** These are real runs of this toolkit at a small fraction of the papers' scale
> (fewer images, a small CNN, few epochs). Absolute ACC/ASR are *not* comparable with the papers' numbers,
> which are quoted below for reference only. Runs made on a lent GPU are in their own section ("GPU runs").
> Generated by `scripts/benchmarks.py` — do not edit by hand.

## How these numbers were made

```bash
{cmds}
python scripts/benchmarks.py {' '.join(f'--store {x}' for x in stores)} {f'--speed {speed_path} ' if speed else ''}{gpu_args}--out docs/BENCHMARKS.md
```

Scale (read from the runs' configs):

{chr(10).join(scale_of(rows))}
{chr(10) + note + chr(10) if note else ""}
Defenses in {'this store' if len(stores) == 1 else 'these stores'}: {', '.join(defenses)}. The full matrix (`bdseal bench bench=cifar_cpu`: every defense ×
the attacks its seed paper evaluates on CIFAR-10, see `bdseal/conf/bench/cifar_cpu.yaml`) fills in the rest;
attacks or defenses that are not registered are skipped by `bench` and are absent here. Each seed paper's
own table setting is a bench config too (`bdseal bench bench=gssd_cifar|pgbd_cifar|pgrl_cifar|vibe_cifar|attacks_cifar`,
then `bdseal report bench/<name>`).

## Our runs

{tables}
## Seed papers' numbers (full scale) next to ours (reduced scale)

{comparison(agg)}
## Speed

{speed_section(speed, speed_cmd)}
{gpu}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, action="append", type=Path,
                   help="bench directory or results.sqlite (repeatable: the stores' rows are merged)")
    p.add_argument("--speed", help="JSON written by `bdseal bench-speed out=...`")
    p.add_argument("--command", action="append", default=[], help="the exact bench command(s) run (repeatable)")
    p.add_argument("--speed-command", default="bdseal bench-speed out=FILE.json")
    p.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--note", default="", help="a sentence about the machine / conditions of the runs")
    p.add_argument("--gpu-store", action="append", default=[], type=Path, help="a store of runs made on a GPU (own section)")
    p.add_argument("--gpu-command", action="append", default=[], help="the exact command(s) of the GPU runs")
    p.add_argument("--gpu-note", default="", help="the GPU, the data copy and the conditions of the GPU runs")
    p.add_argument("--gpu-speed", help="JSON written by `bdseal bench-speed` on the GPU")
    p.add_argument("--gpu-speed-command", default="bdseal bench-speed part=loop out=FILE.json")
    a = p.parse_args(argv)
    speed = json.loads(Path(a.speed).read_text()) if a.speed else None
    gpu_speed = json.loads(Path(a.gpu_speed).read_text()) if a.gpu_speed else None
    gpu = gpu_section(a.gpu_store, a.gpu_command, a.gpu_note, gpu_speed, a.gpu_speed_command)
    gpu_args = "".join(f"--gpu-store {x} " for x in a.gpu_store) + (f"--gpu-speed {a.gpu_speed} " if a.gpu_speed else "")
    gpu_args += "--gpu-command ... --gpu-note ... " if a.gpu_store else ""
    text = render(a.store, speed, a.command, a.speed_command, a.note, a.speed, gpu, gpu_args)
    Path(a.out).write_text(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
