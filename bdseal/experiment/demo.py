"""``bdseal demo``: the toolkit's point in a few minutes on a laptop CPU — poison the embedded digits, train
without a defense and with the defenses that work at that scale, and print one comparison table.

The demo is the first seed and first attack of the ``demo`` bench (``bdseal/conf/bench/demo.yaml``), run
through :func:`bdseal.experiment.bench.run_bench` into that bench's store, then
:func:`bdseal.experiment.report.make_report` over the store. So ``bdseal bench bench=demo`` afterwards only
adds the remaining seeds and attacks of the study, and every number in the table is a stored run whose
folder (``config.yaml``, ``metrics.json``, model) is printed next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bdseal.experiment import bench
from bdseal.experiment.store import ResultStore, Row

BENCH = "demo"
# a backdoor counts as removed below this ASR, at a clean-accuracy cost below MAX_ACC_DROP (fractions)
REMOVED_ASR = 0.10
MAX_ACC_DROP = 0.05


@dataclass
class DemoResult:
    spec: bench.BenchSpec
    rows: list[Row]
    table: str
    report: dict[str, Any]
    wall_s: float


def demo_spec(argv: list[str]) -> bench.BenchSpec:
    """The ``demo`` bench restricted to its first attack and first seed; ``argv`` as for ``bdseal bench``
    (``out=``, matrix keys, cell overrides) applies on top."""
    base, _ = bench.parse_args([f"bench={BENCH}"])
    first_attack = next(a for a in base.attacks if a != "none")
    spec, _ = bench.parse_args([f"bench={BENCH}", f"attacks=[{first_attack}]", f"seeds=[{base.seeds[0]}]", *argv])
    return spec


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or v != v else f"{100 * v:.1f}"


def removed(row: Row, none: Row | None) -> str:
    """``yes`` when the defense's ASR is below :data:`REMOVED_ASR` and its clean accuracy within
    :data:`MAX_ACC_DROP` of the undefended model's; ``–`` for ``none`` itself."""
    if row.defense == "none" or none is None:
        return "–"
    m, n = row.metrics, none.metrics
    ok = m.get("asr") is not None and m["asr"] < REMOVED_ASR and m["clean_acc"] >= n["clean_acc"] - MAX_ACC_DROP
    return "yes" if ok else "no"


def demo_table(rows: list[Row]) -> str:
    """One line per defense: clean ACC, ASR, detection TPR / FPR (%), wall time (s), backdoor removed."""
    none = next((r for r in rows if r.defense == "none"), None)
    header = ["defense", "clean ACC", "ASR", "TPR", "FPR", "time (s)", "removed"]
    body = []
    for r in sorted(rows, key=lambda r: (r.defense != "none", r.defense)):
        det = r.metrics.get("detection") or {}
        body.append([r.defense, _pct(r.metrics.get("clean_acc")), _pct(r.metrics.get("asr")), _pct(det.get("tpr")),
                     _pct(det.get("fpr")), f"{r.metrics.get('time_s', float('nan')):.0f}", removed(r, none)])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


def scale_line(row: Row) -> str:
    """What the runs are: data size, image size, model, epochs, attack and poisoned count."""
    c, m = row.config, row.metrics
    size = (c["dataset"].get("options") or {}).get("image_size", 32)
    return (f"{c['dataset']['name']} {size}x{size}, {m.get('n_train')} training images ({m.get('n_poison')} poisoned by "
            f"{row.attack}, target class {m.get('target')}), model {row.model}, {c['train']['epochs']} epochs, seed {row.seed}")


def run_demo(argv: list[str]) -> DemoResult:
    """Run the demo cells (skipping those already in the store), then the report over the bench's store."""
    from bdseal.experiment.report import make_report

    t0 = time.time()
    spec = demo_spec(argv)
    spec.progress = False
    res = bench.run_bench(spec)
    if res.failed:
        raise RuntimeError("demo: " + "; ".join(f"{label}: {err}" for label, err in res.failed))
    wanted = {bench.cell_config(c, spec)[1] for c in bench.plan_cells(spec)}
    rows = [r for r in ResultStore(spec.store_path).rows() if r.config_hash in wanted]
    report = make_report(spec.out)
    return DemoResult(spec, rows, demo_table(rows), report, time.time() - t0)


def summary(res: DemoResult) -> str:
    """The text ``bdseal demo`` prints after the runs."""
    lines = [f"bdseal demo: {scale_line(res.rows[0])}" if res.rows else "bdseal demo: no runs", "",
             res.table, "",
             f"ACC = accuracy on the clean test images; ASR = share of triggered test images (true class != target) "
             f"classified as the target; TPR / FPR = share of poisoned / clean training images the defense flagged "
             f"(– = the defense flags none); removed = ASR < {REMOVED_ASR:.0%} at < {100 * MAX_ACC_DROP:.0f} points of accuracy "
             f"lost; time = wall time of the run (the none row trains the backdoored model that post-hoc defenses reuse).",
             "", "run folders (config.yaml, metrics.json, model):"]
    lines += [f"  {r.defense:10s} {r.run_dir}" for r in sorted(res.rows, key=lambda r: (r.defense != "none", r.defense))]
    lines += ["", f"report: {res.report['html']} (and {res.report['markdown']})",
              f"the full study (more seeds and attacks, reusing these runs): bdseal bench bench={BENCH} && "
              f"bdseal report {res.spec.out}",
              f"total wall time {res.wall_s:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    res = run_demo(argv)
    print(summary(res))
    return 0


__all__ = ["DemoResult", "demo_spec", "demo_table", "main", "removed", "run_demo", "summary"]


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))
