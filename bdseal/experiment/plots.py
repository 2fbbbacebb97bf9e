"""Report plots (matplotlib, Agg backend): ACC–ASR scatter per defense and bar charts, one PNG each."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bdseal.plotting import save_figure  # noqa: E402

if TYPE_CHECKING:
    from bdseal.experiment.report import Stat

Agg = dict[tuple[str, str, str], dict[str, "Stat"]]
MARKERS = "os^Dv<>pPX*h"


def _order(names: set[str]) -> list[str]:
    return sorted(names, key=lambda n: (n != "none", n))


def scatter_acc_asr(agg: Agg, dataset: str, path: Path) -> Path | None:
    """One point per (attack, defense): x = ASR, y = ACC (means over seeds, %); a colour/marker per defense.
    The best corner is top-left (high ACC, low ASR)."""
    cells = {(a, d): m for (ds, a, d), m in agg.items() if ds == dataset and "acc" in m and "asr" in m}
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, d in enumerate(_order({d for _, d in cells})):
        pts = [(a, m) for (a, dd), m in sorted(cells.items()) if dd == d]
        ax.scatter([m["asr"].mean * 100 for _, m in pts], [m["acc"].mean * 100 for _, m in pts],
                   marker=MARKERS[i % len(MARKERS)], s=50, label=d)
        for a, m in pts:
            ax.annotate(a, (m["asr"].mean * 100, m["acc"].mean * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="ASR (%)", ylabel="clean ACC (%)", title=f"{dataset}: ACC vs ASR per defense", xlim=(-3, 103), ylim=(-3, 103))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bars(agg: Agg, dataset: str, metric: str, label: str, path: Path, scale: float = 100.0) -> Path | None:
    """Grouped bars: attacks on the x axis, one bar per defense, error bars = std over seeds."""
    cells = {(a, d): m[metric] for (ds, a, d), m in agg.items() if ds == dataset and metric in m}
    if not cells:
        return None
    attacks = _order({a for a, _ in cells})
    defenses = _order({d for _, d in cells})
    width = 0.8 / len(defenses)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(attacks) * max(1, len(defenses)) / 2), 4.2))
    for i, d in enumerate(defenses):
        xs = [j + (i - (len(defenses) - 1) / 2) * width for j, a in enumerate(attacks) if (a, d) in cells]
        st = [cells[(a, d)] for a in attacks if (a, d) in cells]
        ax.bar(xs, [s.mean * scale for s in st], width, yerr=[s.std * scale for s in st], label=d, capsize=2)
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set(ylabel=label, title=f"{dataset}: {label}")
    if scale == 100.0:  # percentages: the full 0-100 axis, so a drop from 98 to 90 is not drawn as a collapse
        ax.set_ylim(0, 103)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def make_plots(agg: Agg, out: Path) -> list[Path]:
    """Every plot for every dataset in ``agg``; returns the PNGs written."""
    written: list[Path | None] = []
    for ds in sorted({k[0] for k in agg}):
        written.append(scatter_acc_asr(agg, ds, out / f"{ds}_acc_asr_scatter.png"))
        written.append(bars(agg, ds, "acc", "clean ACC (%)", out / f"{ds}_acc_bars.png"))
        written.append(bars(agg, ds, "asr", "ASR (%)", out / f"{ds}_asr_bars.png"))
        written.append(bars(agg, ds, "dem", "Γ (DEM)", out / f"{ds}_dem_bars.png", scale=1.0))
    return [p for p in written if p is not None]
