"""``bdseal bench``: a matrix of cells (datasets × attacks × defenses × seeds) run through
:func:`bdseal.experiment.run.run_experiment`, resumable and without duplicated work.

- A matrix comes from ``bdseal/conf/bench/<name>.yaml`` (or any YAML path) with list overrides on top,
  e.g. ``bdseal bench bench=demo attacks=[badnets,blend] seeds=[0,1] train.epochs=5``: keys of
  :class:`BenchSpec` (also dotted: ``defense_overrides.pgrl=[...]``) set the matrix, every other
  ``key=value`` is a Hydra override for all cells, applied after the bench file's overrides.
- Each cell's config is composed with :func:`bdseal.experiment.config.compose_config` exactly as
  ``bdseal run`` would; its key is :func:`bdseal.experiment.store.cell_hash` (the resolved config minus
  out/progress/cache settings). Its run dir is ``<out>/runs/<hash>`` and its row goes to
  ``<out>/results.sqlite``. A cell is done only when its row is in the store: cells found there are
  skipped, so an interrupted bench resumes where it stopped; a run dir without a row (a crash
  mid-cell) is overwritten. Identical cells (same hash) run once.
- Labels and variants: the names in ``datasets`` / ``attacks`` / ``defenses`` are labels. A label is the
  config group option of the same name (``attack=blend``) unless its ``*_overrides`` entry holds a
  ``group=OPTION`` override, which then picks the option: ``attack_overrides: {badnets_a2a:
  [attack=pgbd/badnets, attack.mode=all_to_all]}`` makes the row ``badnets_a2a`` a PGBD-preset BadNets,
  all-to-all. The label is what the store and the report show, so one option can appear as several
  rows (poison rates, target known / inferred, ...).
- All cells share one artefact cache (``<out>/cache`` unless ``cache_dir`` is set), so poisoned sets,
  backdoored baselines and self-supervised backbones are computed once per matrix.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bdseal.errors import ConfigError
from bdseal.experiment import run as run_mod
from bdseal.experiment.config import compose_config
from bdseal.metrics import clean_json
from bdseal.experiment.store import STORE_FILE_NAMES, ResultStore, Row, cell_hash, ingest_run_dirs, resolved_config

log = logging.getLogger("bdseal.bench")

STORE_NAME = STORE_FILE_NAMES[0]


@dataclass
class BenchSpec:
    """A benchmark matrix. ``attacks_by_defense`` restricts a defense to the attacks its paper evaluates
    (defenses not listed get ``attacks``); ``*_overrides`` add Hydra overrides to the cells of one
    dataset / attack / defense label (a ``group=OPTION`` entry among them picks the config option the
    label stands for, see the module doc); ``overrides`` apply to every cell, before the per-label ones;
    ``late_overrides`` apply to every cell after them (the command line's cell overrides go there, so
    they win over the bench file)."""

    name: str = "bench"
    datasets: list[str] = field(default_factory=lambda: ["digits"])
    attacks: list[str] = field(default_factory=lambda: ["badnets"])
    defenses: list[str] = field(default_factory=lambda: ["none"])
    seeds: list[int] = field(default_factory=lambda: [0])
    attacks_by_defense: dict[str, list[str]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    dataset_overrides: dict[str, list[str]] = field(default_factory=dict)
    attack_overrides: dict[str, list[str]] = field(default_factory=dict)
    defense_overrides: dict[str, list[str]] = field(default_factory=dict)
    late_overrides: list[str] = field(default_factory=list)
    out: str = "bench"
    cache_dir: str | None = None
    skip_missing: bool = True  # skip attacks/defenses that are not registered (yet) instead of failing
    keep_going: bool = False  # log a failing cell and go on (it stays undone) instead of stopping
    progress: bool = True  # the bench's progress bar; cells run with progress=false

    @property
    def store_path(self) -> Path:
        return Path(self.out) / STORE_NAME

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"


@dataclass(frozen=True)
class Cell:
    dataset: str
    attack: str
    defense: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.attack}/{self.defense}/s{self.seed}"


@dataclass
class BenchResult:
    ran: list[str] = field(default_factory=list)  # hashes run now
    skipped: list[str] = field(default_factory=list)  # hashes already in the store
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell label, error)
    missing: list[str] = field(default_factory=list)  # names skipped because they are not registered
    elsewhere: list[str] = field(default_factory=list)  # cells another live bench process is running
    store: Path | None = None


def bench_config_path(name: str) -> Path:
    """``bdseal/conf/bench/<name>.yaml``, or ``name`` itself when it is a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    packaged = resources.files("bdseal.conf") / "bench" / f"{name}.yaml"
    if not packaged.is_file():
        known = sorted(f.name[:-5] for f in (resources.files("bdseal.conf") / "bench").iterdir() if f.name.endswith(".yaml"))
        raise ConfigError(f"unknown bench config {name!r}: not a YAML file and not one of {known}")
    return Path(str(packaged))


_SPEC_KEYS = {f.name for f in fields(BenchSpec)}
_AXES = {"dataset": "datasets", "attack": "attacks", "defense": "defenses", "seed": "seeds"}


def parse_args(argv: list[str]) -> tuple[BenchSpec, dict[str, Any]]:
    """``bench=NAME`` + matrix keys (``attacks=[a,b]``...) + cell overrides; returns the spec and the
    command options ``dry_run`` / ``ingest`` / ``prune``."""
    bench_name, matrix, cell_over, options = None, [], [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"bench: expected key=value, got {arg!r}")
        if key == "bench":
            bench_name = value
        elif key in ("dry_run", "ingest", "prune"):
            options[key] = OmegaConf.to_container(OmegaConf.from_dotlist([arg]))[key]  # type: ignore[index]
        elif key.split(".")[0] in _SPEC_KEYS:  # also defense_overrides.pgrl=[...]
            matrix.append(arg)
        elif key in _AXES:
            raise ConfigError(f"bench: {arg!r} would fix one axis of the matrix for every cell; use {_AXES[key]}=[...]")
        else:
            cell_over.append(arg)
    base = OmegaConf.load(bench_config_path(bench_name)) if bench_name else OmegaConf.create({})
    merged = OmegaConf.merge(OmegaConf.structured(BenchSpec), base, OmegaConf.from_dotlist(matrix))
    spec = BenchSpec(**OmegaConf.to_container(merged))  # type: ignore[arg-type]
    given = {a.partition("=")[0] for a in matrix}
    if "attacks" in given and "attacks_by_defense" not in given:
        spec.attacks_by_defense = {}  # attacks=[...] on the command line applies to every defense
    spec.late_overrides = [*spec.late_overrides, *cell_over]
    check_override_labels(spec, {a.partition("=")[0] for a in matrix})
    return spec, options


def check_override_labels(spec: BenchSpec, given: set[str]) -> None:
    """A ``<group>_overrides.<label>`` given on the command line must name a label of the matrix (a typo
    would otherwise be ignored silently); the valid labels are listed."""
    for key in sorted(given):
        head, _, label = key.partition(".")
        group = head[: -len("_overrides")] if head.endswith("_overrides") else None
        if group not in ("dataset", "attack", "defense") or not label:
            continue
        labels = list(getattr(spec, _AXES[group]))
        if labels != ["all"] and label not in labels:
            raise ConfigError(f"bench: {key} names no {group} of the matrix; {_AXES[group]} are {labels}: "
                              f"fix the label or add it to {_AXES[group]}=[...]")


def validate_cells(todo: list[tuple["Cell", DictConfig, str]]) -> None:
    """:func:`bdseal.experiment.validate.validate_run_config` on every cell before the first one runs, so a
    typo in one cell's overrides (``+defense.<key>``, a per-class size...) stops the bench up front."""
    from bdseal.experiment.validate import validate_run_config

    for cell, cfg, _ in todo:
        try:
            validate_run_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"bench cell {cell.label}: {e}") from None


def _conf_file(group: str, option: str) -> Any:
    """``bdseal/conf/<group>/<option>.yaml`` as a Traversable (``option`` may be nested: ``pgbd/badnets``)."""
    node = resources.files("bdseal.conf") / group
    parts = option.split("/")
    for part in parts[:-1]:
        node = node / part
    return node / f"{parts[-1]}.yaml"


def _has_config(group: str, name: str) -> bool:
    """A YAML in ``bdseal/conf/<group>/`` or a plugin's ``register_config`` entry."""
    from bdseal.registry import has_config

    return _conf_file(group, name).is_file() or has_config(group, name)


def split_choice(group: str, label: str, overrides: list[str]) -> tuple[str, list[str]]:
    """(config option, remaining overrides) of ``label``: the option named by a ``group=OPTION`` entry
    of ``overrides`` (the last one wins), else ``label`` itself."""
    choice, rest = label, []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key == group:
            choice = value
        else:
            rest.append(o)
    return choice, rest


@functools.lru_cache(maxsize=None)
def _registered_name(group: str, option: str) -> str:
    """The ``name`` an option's YAML gives its attack/defense (``pgbd/badnets`` -> ``badnets``)."""
    if not _conf_file(group, option).is_file():  # a plugin's config: registered under its own name
        return option.split("/")[-1]
    name = OmegaConf.load(str(_conf_file(group, option))).get("name")
    return str(name) if name is not None else option.split("/")[-1]


def _expand(names: list[str], group: str) -> list[str]:
    """``all`` -> every registered name of ``group`` (attack | defense)."""
    if list(names) != ["all"]:
        return list(names)
    if group == "defense":
        from bdseal.defenses import list_defenses

        return list_defenses()
    from bdseal.attacks import list_attacks

    return ["none", *list_attacks()]


def available(group: str, name: str) -> bool:
    """Has a config in ``bdseal/conf/<group>/`` (``name`` may be nested: ``pgbd/badnets``) whose attack /
    defense is registered."""
    if not _has_config(group, name):
        return False
    registered = _registered_name(group, name) if group in ("attack", "defense") else name
    if group == "defense":
        from bdseal.defenses import list_defenses

        return registered in list_defenses()
    if group == "attack":
        from bdseal.attacks import list_attacks

        return registered == "none" or registered in list_attacks()
    return True


def _per_label(spec: BenchSpec, group: str) -> dict[str, list[str]]:
    return {"dataset": spec.dataset_overrides, "attack": spec.attack_overrides, "defense": spec.defense_overrides}[group]


def label_available(spec: BenchSpec, group: str, label: str) -> bool:
    """``available`` for the config option that ``label`` stands for in ``spec``."""
    return available(group, split_choice(group, label, list(_per_label(spec, group).get(label, [])))[0])


def plan_cells(spec: BenchSpec, missing: list[str] | None = None) -> list[Cell]:
    """The matrix's cells in run order (dataset, defense, attack, seed). Unavailable names are skipped
    (and appended to ``missing``) when ``spec.skip_missing``, else an error."""
    from bdseal.registry import preload_plugins

    preload_plugins([*spec.overrides, *spec.late_overrides])  # plugins=[...]: their names become available
    cells = []
    defenses = _expand(spec.defenses, "defense")
    for group, names in (("dataset", spec.datasets), ("defense", defenses),
                         ("attack", sorted({a for d in defenses for a in spec.attacks_by_defense.get(d, _expand(spec.attacks, "attack"))}))):
        for n in names:
            if not label_available(spec, group, n):
                if not spec.skip_missing:
                    raise ConfigError(f"bench: {group} {n!r} is not available (not registered or no conf/{group}/ config)")
                if missing is not None and f"{group}={n}" not in missing:
                    missing.append(f"{group}={n}")
    for ds, df in itertools.product(spec.datasets, defenses):
        attacks = spec.attacks_by_defense.get(df, _expand(spec.attacks, "attack"))
        for at, seed in itertools.product(attacks, spec.seeds):
            if not all(label_available(spec, g, n) for g, n in (("dataset", ds), ("defense", df), ("attack", at))):
                continue
            ds_opt, ds_over = split_choice("dataset", ds, list(spec.dataset_overrides.get(ds, [])))
            at_opt, at_over = split_choice("attack", at, list(spec.attack_overrides.get(at, [])))
            df_opt, df_over = split_choice("defense", df, list(spec.defense_overrides.get(df, [])))
            over = (f"dataset={ds_opt}", f"attack={at_opt}", f"defense={df_opt}", f"seed={int(seed)}", *spec.overrides,
                    *ds_over, *at_over, *df_over, *spec.late_overrides)
            cells.append(Cell(ds, at, df, int(seed), over))
    return cells


def cell_config(cell: Cell, spec: BenchSpec) -> tuple[DictConfig, str]:
    """The composed config of ``cell`` pointed at its run dir and the bench's cache, and its hash."""
    cfg = compose_config(list(cell.overrides))
    h = cell_hash(cfg)
    cfg.out = str(Path(spec.out) / "runs" / h)
    cfg.cache_dir = str(spec.cache_path)
    cfg.progress = False
    cfg.overwrite = True  # only ever this cell's own dir, and only when its row is not in the store
    return cfg, h


def run_bench(spec: BenchSpec, dry_run: bool = False) -> BenchResult:
    """Run every cell of ``spec`` whose row is not in the store yet."""
    store = ResultStore(spec.store_path)
    result = BenchResult(store=spec.store_path)
    cells = plan_cells(spec, result.missing)
    for m in result.missing:
        log.warning("bench %s: skipping %s (not registered or no config)", spec.name, m)
    done = store.hashes()
    todo: list[tuple[Cell, DictConfig, str]] = []
    for cell in cells:
        cfg, h = cell_config(cell, spec)
        if h in done or any(h == t[2] for t in todo):
            result.skipped.append(h)
        else:
            todo.append((cell, cfg, h))
    validate_cells(todo)
    log.info("bench %s: %d cells, %d done, %d to run; store %s", spec.name, len(cells), len(result.skipped), len(todo), spec.store_path)
    if dry_run:
        for cell, _, h in todo:
            print(f"{h}  {cell.label}  {' '.join((*cell.overrides[:3], *cell.overrides[4:]))}")
        return result
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    bar = tqdm(total=len(todo), desc=f"bench {spec.name}", disable=not spec.progress, dynamic_ncols=True)
    busy = _run_claimed(todo, spec, store, owner, result, bar)
    if busy:  # cells another bench held: run those whose claimant has finished or died meanwhile
        still = _run_claimed(busy, spec, store, owner, result, bar)
        for cell, _, h in still:
            if not store.has(h):
                result.elsewhere.append(cell.label)
            else:
                result.skipped.append(h)
    bar.close()
    return result


def _run_claimed(todo: list[tuple[Cell, DictConfig, str]], spec: BenchSpec, store: ResultStore, owner: str,
                 result: BenchResult, bar: Any) -> list[tuple[Cell, DictConfig, str]]:
    """Run each cell this process can claim in the store (:meth:`ResultStore.claim`); returns the cells
    that another live bench holds."""
    busy = []
    for cell, cfg, h in todo:
        if not store.claim(h, owner):
            if store.has(h):
                result.skipped.append(h)
                bar.update(1)
            else:
                busy.append((cell, cfg, h))
            continue
        bar.set_postfix_str(cell.label, refresh=True)
        t0 = time.time()
        try:
            with store.claimed(h, owner):
                metrics = run_mod.run_experiment(cfg)
        except Exception as e:  # a KeyboardInterrupt propagates: the cell stays undone (claim released)
            if not spec.keep_going:
                raise
            log.error("bench %s: cell %s failed: %s: %s", spec.name, cell.label, type(e).__name__, e)
            result.failed.append((cell.label, f"{type(e).__name__}: {e}"))
            bar.update(1)
            continue
        store.finish(Row(h, cell.dataset, str(cfg.model.name), cell.attack, cell.defense, cell.seed,
                         resolved_config(cfg), clean_json(metrics), str(cfg.out)), owner)  # type: ignore[arg-type]
        result.ran.append(h)
        bar.update(1)
        log.info("bench %s: %s done in %.1fs (acc %.4f asr %s)", spec.name, cell.label, time.time() - t0,
                 metrics.get("clean_acc", float("nan")), metrics.get("asr"))
    return busy


STALE_NAME = "stale.sqlite"


def prune_stale(spec: BenchSpec) -> list[Row]:
    """Move the store's rows that sit on one of this matrix's cells (same dataset, attack and defense
    labels and seed) but under another config hash — results of an older default or code setting — into
    ``<out>/stale.sqlite``, so reports show only rows of the current configs; nothing is deleted, and rows
    of cells outside this matrix stay. Returns the moved rows."""
    store = ResultStore(spec.store_path)
    current = {(c.dataset, c.attack, c.defense, c.seed): cell_config(c, spec)[1] for c in plan_cells(spec)}
    stale = [r for r in store.rows() if current.get((r.dataset, r.attack, r.defense, r.seed), r.config_hash) != r.config_hash]
    store.move_to(ResultStore(Path(spec.out) / STALE_NAME), stale)
    for r in stale:
        log.info("bench %s: moved stale row %s/%s/%s/s%d (%s) to %s", spec.name, r.dataset, r.attack, r.defense, r.seed,
                 r.config_hash, STALE_NAME)
    return stale


def ingest(spec: BenchSpec, roots: list[str], refused: list[str] | None = None) -> int:
    """Add finished run dirs (e.g. from ``bdseal run -m hydra/launcher=submitit_slurm ...``) to the store;
    directories whose config.yaml and metrics.json disagree are refused (appended to ``refused``)."""
    return ingest_run_dirs(ResultStore(spec.store_path), roots, refused)
