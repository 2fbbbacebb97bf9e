"""``bdseal report``: the results store as tables in the seed papers' format, plots and one HTML page.

Tables (per dataset, values in %, ``mean ± std`` over seeds when a cell has several seeds):

- ACC / ASR per attack × defense with an ``Average`` row (GSSD Table 1 / PGBD Table 2 layout: one
  ACC/ASR column pair per defense, one row per attack). The average of a column is the mean of its
  per-attack means; ``attack=none`` has no ASR and does not enter the ASR average.
- Γ (DEM, PGBD Eq. 5-6) per attack × defense, for cells whose run also trained the undefended baseline
  (``metrics['dem']``); post-hoc defenses (registry ``post_hoc=True``) are marked with †.
- Detection TPR / FPR / AUROC per attack × defense, for defenses that flag or score samples.
- Wall time per cell (s).

Written to ``<out>/``: ``report.md``, ``report.html`` (self-contained: inline PNGs, tables),
``summary.csv`` (long form: dataset, attack, defense, metric, mean, std, n), ``tables/*.csv`` and
``plots/*.png``.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bdseal.experiment.store import STORE_FILE_NAMES, ResultStore, Row

# metric name -> path into metrics.json
METRICS: dict[str, tuple[str, ...]] = {
    "acc": ("clean_acc",), "asr": ("asr",), "dem": ("dem",),
    "baseline_acc": ("baseline", "clean_acc"), "baseline_asr": ("baseline", "asr"),
    "tpr": ("detection", "tpr"), "fpr": ("detection", "fpr"), "auroc": ("detection", "auroc"),
    "relabel_acc": ("relabel_acc",), "time_s": ("time_s",),
}
PERCENT = {"acc", "asr", "baseline_acc", "baseline_asr", "tpr", "fpr", "auroc", "relabel_acc"}


@dataclass
class Stat:
    mean: float
    std: float
    n: int


@dataclass
class Table:
    """A titled table of text cells (the same cells go to Markdown, CSV and HTML)."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.header)
            w.writerows(self.rows)


def _get(metrics: dict[str, Any], path: Sequence[str]) -> float | None:
    v: Any = metrics
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(float(v)) else float(v)


def aggregate(rows: Sequence[Row]) -> dict[tuple[str, str, str], dict[str, Stat]]:
    """(dataset, attack, defense) -> metric -> mean/std (sample std, 0 for one seed)/n over seeds."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for name, path in METRICS.items():
            v = _get(r.metrics, path)
            if v is not None:
                values[(r.dataset, r.attack, r.defense)][name].append(v)
    out: dict[tuple[str, str, str], dict[str, Stat]] = {}
    for key, per in values.items():
        out[key] = {m: Stat(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for m, v in per.items()}
    return out


def fmt(stat: Stat | None, metric: str) -> str:
    """``93.1 ± 0.4`` (percent metrics), ``0.97 ± 0.01`` (Γ), ``12.3 ± 0.5`` (seconds); ``–`` if absent."""
    if stat is None:
        return "–"
    scale, digits = (100.0, 1) if metric in PERCENT else (1.0, 2 if metric == "dem" else 1)
    s = f"{stat.mean * scale:.{digits}f}"
    if stat.n > 1:
        s += f" ± {stat.std * scale:.{digits}f}"
    return s


def _order(names: set[str], first: str = "none") -> list[str]:
    return sorted(names, key=lambda n: (n != first, n))


def _post_hoc(defense: str) -> bool:
    try:
        from bdseal.defenses import get_defense

        return get_defense(defense).post_hoc
    except ValueError:
        return False


def _avg(stats: Sequence[Stat | None]) -> Stat | None:
    means = [s.mean for s in stats if s is not None]
    return Stat(float(np.mean(means)), 0.0, 1) if means else None


def build_tables(agg: dict[tuple[str, str, str], dict[str, Stat]]) -> list[Table]:
    tables: list[Table] = []
    for ds in sorted({k[0] for k in agg}):
        cells = {(a, d): m for (dd, a, d), m in agg.items() if dd == ds}
        attacks = _order({a for a, _ in cells})
        defenses = _order({d for _, d in cells})
        n_seeds = max((s.n for m in cells.values() for s in m.values()), default=0)
        note = f"mean ± std over seeds (up to {n_seeds}); – = not run / not applicable"
        t = Table(f"{ds}_acc_asr", f"{ds}: ACC / ASR (%) per attack × defense", ["Attack"] + [f"{d} {m}" for d in defenses for m in ("ACC", "ASR")], note=note)
        for a in attacks:
            t.rows.append([a] + [fmt(cells.get((a, d), {}).get(m), m) for d in defenses for m in ("acc", "asr")])
        t.rows.append(["Average"] + [fmt(_avg([cells.get((a, d), {}).get(m) for a in attacks if not (m == "asr" and a == "none")]), m)
                                     for d in defenses for m in ("acc", "asr")])
        tables.append(t)
        dem_def = [d for d in defenses if any("dem" in cells.get((a, d), {}) for a in attacks)]
        if dem_def:
            t = Table(f"{ds}_dem", f"{ds}: Γ (DEM, PGBD Eq. 5-6) per attack × defense",
                      ["Attack"] + [d + (" †" if _post_hoc(d) else "") for d in dem_def],
                      note="Γ against the undefended model trained in the same run; † = post-hoc defense")
            dem_att = [a for a in attacks if any("dem" in cells.get((a, d), {}) for d in dem_def)]
            for a in dem_att:
                t.rows.append([a] + [fmt(cells.get((a, d), {}).get("dem"), "dem") for d in dem_def])
            t.rows.append(["Average"] + [fmt(_avg([cells.get((a, d), {}).get("dem") for a in dem_att]), "dem") for d in dem_def])
            tables.append(t)
        det = [(a, d) for a in attacks for d in defenses if any(k in cells.get((a, d), {}) for k in ("tpr", "fpr", "auroc"))]
        if det:
            t = Table(f"{ds}_detection", f"{ds}: poison detection (%) per attack × defense", ["Attack", "Defense", "TPR", "FPR", "AUROC", "relabel ACC"])
            for a, d in det:
                m = cells[(a, d)]
                t.rows.append([a, d, fmt(m.get("tpr"), "tpr"), fmt(m.get("fpr"), "fpr"), fmt(m.get("auroc"), "auroc"), fmt(m.get("relabel_acc"), "relabel_acc")])
            tables.append(t)
        t = Table(f"{ds}_time", f"{ds}: wall time per cell (s)", ["Attack"] + defenses,
                  note="whole cell: data, poisoning (cached), baseline (cached), defense, evaluation")
        for a in attacks:
            t.rows.append([a] + [fmt(cells.get((a, d), {}).get("time_s"), "time_s") for d in defenses])
        tables.append(t)
    return tables


def write_summary_csv(agg: dict[tuple[str, str, str], dict[str, Stat]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "attack", "defense", "metric", "mean", "std", "n"])
        for (ds, a, d), per in sorted(agg.items()):
            for m, s in sorted(per.items()):
                w.writerow([ds, a, d, m, f"{s.mean:.6g}", f"{s.std:.6g}", s.n])


def _html_page(title: str, intro: str, tables: Sequence[Table], images: Sequence[Path]) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%;margin:1em 0}")
    imgs = "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in images)
    body = "".join(t.html() for t in tables)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{body}<h2>Plots</h2>{imgs}</body></html>")


def resolve_store(path: str | Path) -> Path:
    """A store file, or a bench directory holding one."""
    p = Path(path)
    if p.is_dir():
        for name in STORE_FILE_NAMES:
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"no results store ({', '.join(STORE_FILE_NAMES)}) in {p}")
    if not p.exists():
        raise FileNotFoundError(f"results store {p} does not exist")
    return p


def make_report(store_path: str | Path, out: str | Path | None = None, title: str | None = None) -> dict[str, Any]:
    """Write every table, plot and the HTML page for the store at ``store_path`` (or a bench dir);
    returns the paths written and the tables."""
    from bdseal.experiment import plots

    store_file = resolve_store(store_path)
    rows = ResultStore(store_file).rows()
    if not rows:
        raise ValueError(f"results store {store_file} holds no finished runs")
    out = Path(out) if out is not None else store_file.parent / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    tables = build_tables(agg)
    for t in tables:
        t.write_csv(out / "tables" / f"{t.name}.csv")
    write_summary_csv(agg, out / "summary.csv")
    images = plots.make_plots(agg, out / "plots")
    title = title or f"bdseal report: {store_file}"
    intro = (f"{len(rows)} runs; datasets {sorted({r.dataset for r in rows})}; attacks {sorted({r.attack for r in rows})}; "
             f"defenses {sorted({r.defense for r in rows})}; seeds {sorted({r.seed for r in rows})}.")
    md = f"# {title}\n\n{intro}\n\n" + "\n".join(t.markdown() for t in tables)
    md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in images) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html_page(title, intro, tables, images))
    return {"out": out, "markdown": out / "report.md", "html": out / "report.html", "summary_csv": out / "summary.csv",
            "tables": tables, "plots": images, "n_runs": len(rows)}
