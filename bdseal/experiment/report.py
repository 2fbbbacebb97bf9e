"""``bdseal report``: the results store as tables in the seed papers' format, plots and one HTML page.

Tables (per dataset, values in %, ``mean ± std`` over seeds when a cell has several seeds):

- ACC / ASR per attack × defense with an ``Average`` row (GSSD Table 1 / PGBD Table 2 layout: one
  ACC/ASR column pair per defense, one row per attack). The average of a column is the mean of its
  per-attack means; ``attack=none`` has no ASR and does not enter the ASR average.
- The poisoned training sets per attack: poison rate, number of poisoned and cover samples.
- Backdoored vs defended model (PGBD Table 2 layout): M_B ACC / ASR (the undefended baseline of the same
  run, ``metrics['baseline']``), M_C ACC / ASR and Γ per attack × defense.
- Γ (DEM, PGBD Eq. 5-6) per attack × defense, for cells whose run also trained the undefended baseline
  (``metrics['dem']``); post-hoc defenses (registry ``post_hoc=True``) are marked with †.
- Detection TPR / FPR / AUROC and relabel accuracy per attack × defense, for defenses that flag, score or
  relabel samples (plus, for defenses that retrain on a kept subset such as GSSD's D̂_C, the removal TPR and
  the poisons flagged / kept / uncertain), and "target found": whether the defense named the attack's target class (GSSD's
  ``extras.detected_targets``, PGBD's ``extras.target_used`` / Neural Cleanse's inferred target) —
  ``yes``/``no``, or ``k/n`` seeds.
- VIBE's last E-step (``extras.final_e_step``): mean p(y = l | l), ‖μ_z‖ and the agreement of the
  pseudo-labels with the observed labels, for cells that report them.
- Wall time per cell (s), and each defense's wall time as a multiple of the ``defense=none`` cell with
  the same data, attack, model, recipe and seed in the store (the mean of the per-seed ratios; PGRL Table 3).

Rows are keyed by the store's dataset / attack / defense *labels* (a bench's variant names, e.g.
``badnets_a2a``); whether a label is a post-hoc defense is read from its runs' ``defense.name``.

Written to ``<out>/``: ``report.md``, ``report.html`` (self-contained: inline PNGs, tables),
``summary.csv`` (long form: dataset, attack, defense, metric, mean, std, n), ``tables/*.csv`` and
``plots/*.png``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bdseal.errors import ConfigError
from bdseal.experiment.store import STORE_FILE_NAMES, ResultStore, Row
from bdseal.metrics import NOT_LEARNED_ASR, attack_not_learned

if TYPE_CHECKING:
    from bdseal.defenses.base import DefenseSpec

# metric name -> path into metrics.json
METRICS: dict[str, tuple[str, ...]] = {
    "acc": ("clean_acc",), "asr": ("asr",), "dem": ("dem",),
    "baseline_acc": ("baseline", "clean_acc"), "baseline_asr": ("baseline", "asr"),
    "tpr": ("detection", "tpr"), "fpr": ("detection", "fpr"), "auroc": ("detection", "auroc"),
    "relabel_acc": ("relabel_acc",), "time_s": ("time_s",),
    "poison_rate": ("poison_rate",), "n_poison": ("n_poison",), "n_cover": ("n_cover",),
    # defenses that retrain on a kept subset (GSSD's D̂_C): metrics.retention_counts
    "flagged_poison": ("detection", "flagged_poison"), "poison_kept": ("detection", "poison_kept"),
    "removal_tpr": ("detection", "removal_tpr"), "uncertain": ("detection", "uncertain"),
    "uncertain_poison": ("detection", "uncertain_poison"),
    # VIBE's last E-step, as the defender sees it (docs/vibe.md "Feature scale")
    "p_keep": ("extras", "final_e_step", "p_keep"), "mu_z_norm": ("extras", "final_e_step", "mu_z_norm"),
    "agree_observed": ("extras", "final_e_step", "agree_observed"),
}
# metrics computed from a row (and, for time_x_none, the store's defense=none rows): see derived_metrics
DERIVED = ("target_found", "time_x_none")
PERCENT = {"acc", "asr", "baseline_acc", "baseline_asr", "tpr", "fpr", "auroc", "relabel_acc", "poison_rate", "removal_tpr",
           "p_keep", "agree_observed"}
COUNTS = {"n_poison", "n_cover", "flagged_poison", "poison_kept", "uncertain", "uncertain_poison"}
# extra detection-table columns, shown when some cell of the dataset has them
SPLIT_COLUMNS = {"removal_tpr": "removal TPR", "flagged_poison": "#poison flagged", "poison_kept": "#poison kept",
                 "uncertain": "#uncertain", "uncertain_poison": "#poison uncertain"}


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


def target_found(row: Row) -> float | None:
    """1.0 / 0.0: did the defense name the attack's target class? ``None`` when the run has no single
    target (no attack, all-to-all) or the defense reports none (GSSD ``extras.detected_targets``: the
    target is among the detected classes; PGBD ``extras.target_used``, else Neural Cleanse's
    ``extras.neural_cleanse.inferred_target``: equal to the target)."""
    target = row.metrics.get("target")
    mode = (row.config.get("attack") or {}).get("mode")
    ex = row.metrics.get("extras")
    if not isinstance(target, int) or isinstance(target, bool) or mode == "all_to_all" or not isinstance(ex, dict):
        return None
    if isinstance(ex.get("detected_targets"), list):
        return float(target in ex["detected_targets"])
    used = ex.get("target_used")
    if used is None and isinstance(ex.get("neural_cleanse"), dict):
        used = ex["neural_cleanse"].get("inferred_target")
    if isinstance(used, int) and not isinstance(used, bool):
        return float(used == target)
    return None


# config keys that may differ between a defense's cell and its defense=none reference
_NOT_PAIRED = ("defense", "baseline", "backdoored_ckpt", "figures")


def _without_defense_side(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` minus the defense's own settings (:data:`_NOT_PAIRED`, ``defender.target_known``)."""
    cfg = {k: v for k, v in cfg.items() if k not in _NOT_PAIRED}
    if isinstance(cfg.get("defender"), dict):
        cfg["defender"] = {k: v for k, v in cfg["defender"].items() if k != "target_known"}
    return cfg


def _run_key(r: Row) -> str:
    """A row's config without the defense's own settings: equal for a cell and its defense=none twin."""
    return json.dumps([r.dataset, r.attack, _without_defense_side(r.config)], sort_keys=True, default=str)


def derived_metrics(rows: Sequence[Row]) -> dict[int, dict[str, float]]:
    """Row index -> the :data:`DERIVED` metrics it has. ``time_x_none`` = the row's ``time_s`` ÷ the
    ``time_s`` of the ``defense=none`` run with the same config apart from the defense's own settings
    (``defense``, ``baseline``, ``backdoored_ckpt``, ``figures``, ``defender.target_known``): same data,
    attack, model, training recipe and seed."""
    plain: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        t = _get(r.metrics, ("time_s",))
        if r.defense == "none" and t is not None:
            plain[_run_key(r)].append(t)
    out: dict[int, dict[str, float]] = {}
    for i, r in enumerate(rows):
        d: dict[str, float] = {}
        found = target_found(r)
        if found is not None:
            d["target_found"] = found
        t = _get(r.metrics, ("time_s",))
        ref = plain.get(_run_key(r))
        if r.defense != "none" and t is not None and ref and np.mean(ref) > 0:
            d["time_x_none"] = t / float(np.mean(ref))
        if d:
            out[i] = d
    return out


# Config keys that do not change a cell's result (run bookkeeping) or name the same data differently.
_NOT_SETTING = ("seed", "out", "overwrite", "progress", "cache", "cache_dir", "figures", "device")


def setting_of(row: Row) -> str:
    """Fingerprint of everything in a row's config that produced its numbers, except the seed (and run
    bookkeeping, and ``dataset.root``): rows may be averaged only within one setting."""
    from bdseal.cache import fingerprint

    return fingerprint(_setting_config(row))


def data_setting_of(row: Row) -> str:
    """Fingerprint of the setting minus the defense side (as for ``time_x_none``'s pairing): the data,
    attack, model and recipe that every defense of one table row must share with that row's ``none``."""
    from bdseal.cache import fingerprint

    return fingerprint(_without_defense_side(_setting_config(row)))


def _setting_config(row: Row) -> dict[str, Any]:
    cfg = {k: v for k, v in row.config.items() if k not in _NOT_SETTING}
    if isinstance(cfg.get("dataset"), dict):
        cfg["dataset"] = {k: v for k, v in cfg["dataset"].items() if k != "root"}
    return cfg


def _scale_tag(row: Row) -> str:
    """Short human label of a row's scale: train images per class, epochs, model."""
    c = row.config
    per = (c.get("dataset") or {}).get("train_per_class")
    ep = (c.get("train") or {}).get("epochs")
    return f"{per if per is not None else 'all'}/cls {ep}ep {row.model}"


def _labels(rows: Sequence[Row]) -> list[str]:
    """Attack label per row. Where the rows of one (dataset, attack) come from different data settings
    (e.g. stores of different scales merged: a ``none`` at one scale, a defense at another), or one
    (dataset, attack, defense) holds rows of different settings, every row of that attack is labelled
    ``attack [scale]`` (plus a short fingerprint where the scale tag alone is ambiguous), so that no mean is
    taken across settings and a defense shares a table row only with the ``none`` of its own data setting."""
    full = [setting_of(r) for r in rows]
    data = [data_setting_of(r) for r in rows]
    data_per_attack: dict[tuple[str, str], set[str]] = defaultdict(set)
    full_per_defense: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    data_per_tag: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    full_per_tag: dict[tuple[str, str, str, str, str], set[str]] = defaultdict(set)
    for r, st, dst in zip(rows, full, data):
        tag = _scale_tag(r)
        data_per_attack[(r.dataset, r.attack)].add(dst)
        full_per_defense[(r.dataset, r.attack, r.defense)].add(st)
        data_per_tag[(r.dataset, r.attack, tag)].add(dst)
        full_per_tag[(r.dataset, r.attack, r.defense, tag, dst)].add(st)
    split = {k for k, sts in data_per_attack.items() if len(sts) > 1}
    split |= {(ds, a) for (ds, a, _), sts in full_per_defense.items() if len(sts) > 1}
    labels = []
    for r, st, dst in zip(rows, full, data):
        if (r.dataset, r.attack) not in split:
            labels.append(r.attack + _pattern_suffix(r))
            continue
        tag = _scale_tag(r)
        suffix = f" {dst[:6]}" if len(data_per_tag[(r.dataset, r.attack, tag)]) > 1 else ""
        suffix += f" {st[:6]}" if len(full_per_tag[(r.dataset, r.attack, r.defense, tag, dst)]) > 1 else ""
        labels.append(f"{r.attack}{_pattern_suffix(r)} [{tag}{suffix}]")
    return labels


def _pattern_suffix(row: Row) -> str:
    """`` (cartoon)`` for Blend/Adap-Blend rows made with the built-in cartoon instead of the papers' photo
    (``metrics['attack_pattern']``, or the run's attack config for rows stored before that key existed)."""
    from bdseal.attacks.patterns import pattern_label

    label = row.metrics.get("attack_pattern") or pattern_label(row.config.get("attack"))
    return " (cartoon)" if label == "cartoon" else ""


def aggregate(rows: Sequence[Row]) -> dict[tuple[str, str, str], dict[str, Stat]]:
    """(dataset, attack, defense) -> metric -> mean/std (sample std, 0 for one seed)/n over seeds.

    Only rows of one setting (:func:`setting_of`) are averaged: a label holding several settings is split
    into ``attack [scale]`` labels."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    extra = derived_metrics(rows)
    for i, (r, attack) in enumerate(zip(rows, _labels(rows))):
        key = (r.dataset, attack, r.defense)
        for name, path in METRICS.items():
            v = _get(r.metrics, path)
            if v is not None:
                values[key][name].append(v)
        for name, v in extra.get(i, {}).items():
            values[key][name].append(v)
    out: dict[tuple[str, str, str], dict[str, Stat]] = {}
    for key, per in values.items():
        out[key] = {m: Stat(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for m, v in per.items()}
    return out


def post_hoc_labels(rows: Sequence[Row]) -> set[str]:
    """Defense labels whose runs' ``defense.name`` is a post-hoc defense in the registry."""
    names = {r.defense: str((r.config.get("defense") or {}).get("name", r.defense)) for r in rows}
    return {label for label, name in names.items() if _post_hoc(name)}


def fmt(stat: Stat | None, metric: str) -> str:
    """``93.1 ± 0.4`` (percent metrics), ``0.97 ± 0.01`` (Γ, time×none), ``12.3 ± 0.5`` (seconds), ``190``
    (counts), ``yes`` / ``no`` / ``1/2`` (target found over seeds); ``–`` if absent."""
    if stat is None:
        return "–"
    if metric == "target_found":
        k = round(stat.mean * stat.n)
        return ("yes" if k else "no") if stat.n == 1 else f"{k}/{stat.n}"
    if metric in COUNTS and stat.std == 0 and float(stat.mean).is_integer():
        return str(int(stat.mean))
    scale, digits = (100.0, 2 if metric == "poison_rate" else 1) if metric in PERCENT else (1.0, 2 if metric in ("dem", "time_x_none") else 1)
    s = f"{stat.mean * scale:.{digits}f}"
    if stat.n > 1:
        s += f" ± {stat.std * scale:.{digits}f}"
    return s


def _order(names: set[str], first: str = "none") -> list[str]:
    return sorted(names, key=lambda n: (n != first, n))


def _spec(defense: str) -> DefenseSpec | None:
    """The registered defense ``defense``; None for a name this install does not know (a store written by
    another version)."""
    from bdseal.defenses import get_defense

    try:
        return get_defense(defense)
    except ValueError:
        return None


def _post_hoc(defense: str) -> bool:
    spec = _spec(defense)
    return spec is not None and spec.post_hoc


def _avg(stats: Sequence[Stat | None]) -> Stat | None:
    means = [s.mean for s in stats if s is not None]
    return Stat(float(np.mean(means)), 0.0, 1) if means else None


def build_tables(agg: dict[tuple[str, str, str], dict[str, Stat]], post_hoc: set[str] | None = None) -> list[Table]:
    """Every table of every dataset in ``agg``. ``post_hoc``: the post-hoc defense labels (default: the
    labels that are post-hoc defense names in the registry)."""
    is_post_hoc = (lambda d: d in post_hoc) if post_hoc is not None else _post_hoc
    tables: list[Table] = []
    for ds in sorted({k[0] for k in agg}):
        cells = {(a, d): m for (dd, a, d), m in agg.items() if dd == ds}
        attacks = _order({a for a, _ in cells})
        defenses = _order({d for _, d in cells})
        has = lambda a, d, *ms: any(k in cells.get((a, d), {}) for k in ms)  # noqa: E731
        n_seeds = max((s.n for m in cells.values() for s in m.values()), default=0)
        note = f"mean ± std over seeds (up to {n_seeds}); – = not run / not applicable"
        t = Table(f"{ds}_acc_asr", f"{ds}: ACC / ASR (%) per attack × defense", ["Attack"] + [f"{d} {m}" for d in defenses for m in ("ACC", "ASR")], note=note)
        for a in attacks:
            t.rows.append([a] + [fmt(cells.get((a, d), {}).get(m), m) for d in defenses for m in ("acc", "asr")])
        t.rows.append(["Average"] + [fmt(_avg([cells.get((a, d), {}).get(m) for a in attacks if not (m == "asr" and a == "none")]), m)
                                     for d in defenses for m in ("acc", "asr")])
        tables.append(t)
        poisoned = [a for a in attacks if a != "none" and any(has(a, d, "n_poison") for d in defenses)]
        if poisoned:
            t = Table(f"{ds}_poison", f"{ds}: poisoned training sets per attack", ["Attack", "poison rate (%)", "#poison", "#cover"],
                      note="of the training set after the defender's hold-out; the same for every defense of an attack and seed")
            for a in poisoned:
                m = cells.get((a, "none")) or next(cells[(a, d)] for d in defenses if has(a, d, "n_poison"))
                t.rows.append([a, fmt(m.get("poison_rate"), "poison_rate"), fmt(m.get("n_poison"), "n_poison"), fmt(m.get("n_cover"), "n_cover")])
            tables.append(t)
        base = [(a, d) for a in attacks for d in defenses if d != "none" and has(a, d, "baseline_acc")]
        if base:
            t = Table(f"{ds}_backdoored_vs_defended", f"{ds}: backdoored model M_B vs defended model M_C (%) and Γ",
                      ["Attack", "Defense", "M_B ACC", "M_B ASR", "M_C ACC", "M_C ASR", "Γ"],
                      note="M_B = the undefended model trained in the same run (the input of post-hoc defenses, marked †)")
            for a, d in base:
                m = cells[(a, d)]
                t.rows.append([a, d + (" †" if is_post_hoc(d) else ""), fmt(m.get("baseline_acc"), "baseline_acc"), fmt(m.get("baseline_asr"), "baseline_asr"),
                               fmt(m.get("acc"), "acc"), fmt(m.get("asr"), "asr"), fmt(m.get("dem"), "dem")])
            tables.append(t)
        dem_def = [d for d in defenses if any(has(a, d, "dem") for a in attacks)]
        if dem_def:
            t = Table(f"{ds}_dem", f"{ds}: Γ (DEM, PGBD Eq. 5-6) per attack × defense",
                      ["Attack"] + [d + (" †" if is_post_hoc(d) else "") for d in dem_def],
                      note="Γ against the undefended model trained in the same run; † = post-hoc defense")
            dem_att = [a for a in attacks if any(has(a, d, "dem") for d in dem_def)]
            for a in dem_att:
                t.rows.append([a] + [fmt(cells.get((a, d), {}).get("dem"), "dem") for d in dem_def])
            t.rows.append(["Average"] + [fmt(_avg([cells.get((a, d), {}).get("dem") for a in dem_att]), "dem") for d in dem_def])
            tables.append(t)
        det_metrics = ("tpr", "fpr", "auroc", "relabel_acc", "target_found")
        det = [(a, d) for a in attacks for d in defenses if has(a, d, *det_metrics)]
        if det:
            with_target = any(has(a, d, "target_found") for a, d in det)
            split_cols = [k for k in SPLIT_COLUMNS if any(has(a, d, k) for a, d in det)]
            t = Table(f"{ds}_detection", f"{ds}: poison detection (%) per attack × defense",
                      ["Attack", "Defense", "TPR", "FPR", "AUROC", "relabel ACC"] + (["target found"] if with_target else [])
                      + [SPLIT_COLUMNS[k] for k in split_cols],
                      note="removal TPR = 1 − #poison kept / #poison; kept = the set a filtering defense retrains on "
                           "(GSSD's D̂_C), uncertain = neither kept nor flagged (dropped)" if split_cols else "")
            for a, d in det:
                m = cells[(a, d)]
                t.rows.append([a, d] + [fmt(m.get(k), k) for k in [*det_metrics[: 5 if with_target else 4], *split_cols]])
            tables.append(t)
        em = [(a, d) for a in attacks for d in defenses if has(a, d, "p_keep")]
        if em:
            t = Table(f"{ds}_e_step", f"{ds}: last E-step of relabelling defenses (VIBE)",
                      ["Attack", "Defense", "p(y=l|l) (%)", "‖μ_z‖", "pseudo = observed (%)"],
                      note="p(y=l|l) near 100/K %: the corruption model is uninformative and the E-step ignores the observed labels")
            for a, d in em:
                m = cells[(a, d)]
                t.rows.append([a, d, fmt(m.get("p_keep"), "p_keep"), fmt(m.get("mu_z_norm"), "dem"), fmt(m.get("agree_observed"), "agree_observed")])
            tables.append(t)
        t = Table(f"{ds}_time", f"{ds}: wall time per cell (s)", ["Attack"] + defenses,
                  note="whole cell: data, poisoning (cached), baseline (cached), defense, evaluation")
        for a in attacks:
            t.rows.append([a] + [fmt(cells.get((a, d), {}).get("time_s"), "time_s") for d in defenses])
        tables.append(t)
        rel_def = [d for d in defenses if any(has(a, d, "time_x_none") for a in attacks)]
        if rel_def:
            rel_att = [a for a in attacks if any(has(a, d, "time_x_none") for d in rel_def)]
            t = Table(f"{ds}_time_x_none", f"{ds}: wall time as a multiple of defense=none", ["Attack"] + rel_def,
                      note="per seed: the cell's wall time ÷ that of the defense=none cell with the same data, attack, model, recipe and seed "
                           "(whichever of the two ran first also paid for the cached poisoning; a defense's baseline is "
                           "included when baseline training is on)")
            for a in rel_att:
                t.rows.append([a] + [fmt(cells.get((a, d), {}).get("time_x_none"), "time_x_none") for d in rel_def])
            t.rows.append(["Average"] + [fmt(_avg([cells.get((a, d), {}).get("time_x_none") for a in rel_att]), "time_x_none") for d in rel_def])
            tables.append(t)
    return tables


def write_summary_csv(agg: dict[tuple[str, str, str], dict[str, Stat]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "attack", "defense", "metric", "mean", "std", "n"])
        for (ds, a, d), per in sorted(agg.items()):
            for m, s in sorted(per.items()):
                w.writerow([ds, a, d, m, f"{s.mean:.6g}", f"{s.std:.6g}", s.n])


def _html_page(title: str, intro: str, tables: Sequence[Table], images: Sequence[Path], notes: str = "") -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%;margin:1em 0}")
    imgs = "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in images)
    body = "".join(t.html() for t in tables)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{notes}{body}<h2>Plots</h2>{imgs}</body></html>")


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


# one line per metric, at the top of every report
METRIC_NOTES = (
    ("ACC", "accuracy on the clean test set (%)."),
    ("ASR", "attack success rate: share of triggered test images (true class ≠ target) classified as the attacker wants (%)."),
    ("M_B / M_C", "the undefended (backdoored) model trained in the same run / the defended model."),
    ("Γ (DEM)", "PGBD Eq. 5-6: ½·min(1, ACC_C/ACC_B) + ½·max(0, (ASR_B − ASR_C)/ASR_B); 1 = backdoor gone at no cost, "
                "0.5 = no change."),
    ("TPR / FPR", "share of poisoned / clean training images the defense flagged as poisoned (%)."),
    ("AUROC", "how well the defense's per-sample suspicion score ranks poisoned above clean images (%; 50 = chance)."),
    ("relabel ACC", "share of the relabelled poisoned images whose new label is their true class (%)."),
    ("target found", "whether the defense named the attack's target class (k/n over seeds)."),
    ("time", "wall time of the whole run (s); ×none = the same divided by the undefended run's time."),
)
CHANCE_FACTOR = 2.0  # clean ACC below CHANCE_FACTOR / #classes counts as (near) chance


def _num_classes(rows: Sequence[Row], dataset: str) -> int | None:
    """Classes of ``dataset`` as recorded by its runs (``metrics['num_classes']``)."""
    ks = {r.metrics.get("num_classes") for r in rows if r.dataset == dataset}
    ks.discard(None)
    return int(next(iter(ks))) if len(ks) == 1 else None


def _controlled(defense: str) -> tuple[str, ...]:
    """The defenses ``defense`` is the no-defense control of (its registered ``control_for``)."""
    spec = _spec(defense)
    return spec.control_for if spec is not None else ()


def quality_flags(agg: dict[tuple[str, str, str], dict[str, Stat]], rows: Sequence[Row]) -> list[str]:
    """Cells that must not be read as results: an attack the undefended model did not learn
    (:func:`bdseal.metrics.attack_not_learned` of its mean ASR, the rule ``bdseal run`` warns with); an attack
    that a defense's own recipe without the defense (its control, e.g. ``pgrl_recipe``) did not learn while the
    plain recipe did, so the defense's low ASR there is the recipe's, not a removal; and cells whose clean accuracy is near chance (below :data:`CHANCE_FACTOR` /
    #classes: the model learned nothing, so a low ASR means nothing)."""
    out = []
    for (ds, a, d), m in sorted(agg.items()):
        if d == "none" and a != "none" and "asr" in m and attack_not_learned(m["asr"].mean):
            out.append(f"{ds} / {a}: the attack was not learned (ASR of the undefended model {100 * m['asr'].mean:.1f}% "
                       f"< {100 * NOT_LEARNED_ASR:.0f}%); no defense result on this attack is evidence")
        plain = agg.get((ds, a, "none"), {}).get("asr")
        controlled = [c for c in _controlled(d) if (ds, a, c) in agg]
        if (controlled and "asr" in m and attack_not_learned(m["asr"].mean)
                and plain is not None and plain.mean >= NOT_LEARNED_ASR):
            out.append(f"{ds} / {a} / {d}: the control did not learn the attack (ASR {100 * m['asr'].mean:.1f}% < "
                       f"{100 * NOT_LEARNED_ASR:.0f}%, undefended {100 * plain.mean:.1f}%); the ASR of "
                       f"{', '.join(controlled)} on this attack is not evidence of removal (their detection still is)")
        k = _num_classes(rows, ds)
        if k and "acc" in m and m["acc"].mean < CHANCE_FACTOR / k:
            out.append(f"{ds} / {a} / {d}: clean ACC {100 * m['acc'].mean:.1f}% is near chance ({100 / k:.0f}% for {k} "
                       f"classes); its ASR is not evidence of a defense")
    return out


def scale_lines(rows: Sequence[Row]) -> list[str]:
    """Per dataset: training-set size, image size, model and epochs of its runs (each distinct setting once)."""
    seen: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        c = r.config
        opts = (c.get("dataset") or {}).get("options") or {}
        size = opts.get("image_size")
        text = (f"{r.metrics.get('n_train', '?')} training images" + (f" at {size}x{size}" if size else "") +
                f", model {r.model}, {(c.get('train') or {}).get('epochs', '?')} epochs")
        if text not in seen[r.dataset]:
            seen[r.dataset].append(text)
    return [f"{ds}: " + "; ".join(texts) for ds, texts in sorted(seen.items())]


def _notes_markdown(scale: list[str], flags: list[str]) -> str:
    md = "**Scale.** " + " | ".join(scale) + "\n\n"
    if flags:
        md += "**Not results (check before reading the tables):**\n\n" + "\n".join(f"- ⚠ {f}" for f in flags) + "\n\n"
    md += "**Metrics.**\n\n" + "\n".join(f"- {name}: {text}" for name, text in METRIC_NOTES) + "\n\n"
    return md


def _notes_html(scale: list[str], flags: list[str]) -> str:
    h = f"<p><b>Scale.</b> {html.escape(' | '.join(scale))}</p>"
    if flags:
        h += ("<p><b>Not results (check before reading the tables):</b></p><ul>" +
              "".join(f"<li>⚠ {html.escape(f)}</li>" for f in flags) + "</ul>")
    h += "<p><b>Metrics.</b></p><ul>" + "".join(f"<li>{html.escape(n)}: {html.escape(t)}</li>" for n, t in METRIC_NOTES) + "</ul>"
    return h


def make_report(store_path: str | Path, out: str | Path | None = None, title: str | None = None) -> dict[str, Any]:
    """Write every table, plot and the HTML page for the store at ``store_path`` (or a bench dir);
    returns the paths written and the tables."""
    from bdseal.experiment import plots

    store_file = resolve_store(store_path)
    rows = ResultStore(store_file).rows()
    if not rows:
        raise ConfigError(f"results store {store_file} holds no finished runs")
    out = Path(out) if out is not None else store_file.parent / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows)
    tables = build_tables(agg, post_hoc_labels(rows))
    for t in tables:
        t.write_csv(out / "tables" / f"{t.name}.csv")
    write_summary_csv(agg, out / "summary.csv")
    images = plots.make_plots(agg, out / "plots")
    title = title or f"bdseal report: {store_file}"
    intro = (f"{len(rows)} runs; datasets {sorted({r.dataset for r in rows})}; attacks {sorted({r.attack for r in rows})}; "
             f"defenses {sorted({r.defense for r in rows})}; seeds {sorted({r.seed for r in rows})}.")
    scale, flags = scale_lines(rows), quality_flags(agg, rows)
    md = f"# {title}\n\n{intro}\n\n" + _notes_markdown(scale, flags) + "\n".join(t.markdown() for t in tables)
    md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in images) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html_page(title, intro, tables, images, notes=_notes_html(scale, flags)))
    return {"out": out, "markdown": out / "report.md", "html": out / "report.html", "summary_csv": out / "summary.csv",
            "tables": tables, "plots": images, "n_runs": len(rows), "flags": flags}
