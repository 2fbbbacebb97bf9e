"""The results store of a benchmark: one SQLite file (stdlib ``sqlite3``), one row per finished cell.

A row holds the cell's key (``config_hash``: :func:`cell_hash` of its resolved config), its coordinates
(dataset, model, attack, defense, seed), the full resolved config and the ``metrics.json`` content
as JSON text. A row is written in one transaction, so a cell is either entirely in the store or not at
all — a crash or Ctrl-C mid-cell leaves nothing half-written, and that cell simply runs again.

SQLite was chosen over JSON-lines because a half-written last line cannot happen and concurrent
writers (cells dispatched to a cluster, several ``bench`` processes on one matrix) are serialised by
SQLite's file lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bdseal.cache import fingerprint
from bdseal.errors import BdsealError, ConfigError
from bdseal.io import CorruptFileError, read_json

log = logging.getLogger("bdseal.bench")

STORE_FILE_NAMES = ("results.sqlite",)  # what ``bdseal report DIR`` looks for in a bench directory

# Keys of the run config that change where or how verbosely a cell runs, never its results (``plugins``
# says where the code of a named attack/defense/... comes from; the names themselves are in the cell).
VOLATILE_KEYS = ("out", "progress", "overwrite", "cache", "cache_dir", "plugins")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    attack TEXT NOT NULL,
    defense TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    run_dir TEXT,
    created REAL DEFAULT (julianday('now'))
)
"""


_CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    config_hash TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    heartbeat REAL NOT NULL
)
"""

CLAIM_TTL_S = 120.0  # a claim whose heartbeat is older than this is abandoned (its claimant crashed)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolved_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as plain containers with every interpolation resolved and volatile keys removed."""
    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else json.loads(json.dumps(cfg))
    assert isinstance(d, dict)
    return {k: v for k, v in d.items() if k not in VOLATILE_KEYS and k != "hydra"}


def cell_hash(cfg: DictConfig | dict[str, Any]) -> str:
    """``bdseal.cache.fingerprint`` of the resolved cell config minus :data:`VOLATILE_KEYS`."""
    return fingerprint(resolved_config(cfg))


@dataclass
class Row:
    """One finished cell."""

    config_hash: str
    dataset: str
    model: str
    attack: str
    defense: str
    seed: int
    config: dict[str, Any]
    metrics: dict[str, Any]
    run_dir: str | None = None


class ResultStore:
    """``ResultStore(path)``: ``has(hash)``, ``add(row)``, ``rows()``; the file is created on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute(_SCHEMA)
            con.execute(_CLAIMS)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            with con:  # one transaction: committed on success, rolled back on any exception
                yield con
        finally:
            con.close()

    def has(self, config_hash: str) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM runs WHERE config_hash = ?", (config_hash,)).fetchone() is not None

    def hashes(self) -> set[str]:
        with self._connect() as con:
            return {r[0] for r in con.execute("SELECT config_hash FROM runs")}

    def add(self, row: Row, replace: bool = False) -> None:
        """Insert ``row`` atomically; an existing hash is an error unless ``replace``."""
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self._connect() as con:
            con.execute(
                f"{verb} INTO runs (config_hash, dataset, model, attack, defense, seed, config, metrics, run_dir) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.config_hash, row.dataset, row.model, row.attack, row.defense, int(row.seed),
                 json.dumps(row.config, sort_keys=True), json.dumps(row.metrics, sort_keys=True), row.run_dir),
            )

    # --- claims: several bench processes on one store run each cell once ---------------------------------

    def claim(self, config_hash: str, owner: str, ttl: float = CLAIM_TTL_S) -> bool:
        """Take ``config_hash`` for ``owner`` unless its row exists or another live claimant holds it. A
        claim is abandoned when its process is gone (same host) or its heartbeat is older than ``ttl``
        seconds (any host). One ``BEGIN IMMEDIATE`` transaction, so two processes never both win."""
        host, now = socket.gethostname(), time.time()
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            if con.execute("SELECT 1 FROM runs WHERE config_hash = ?", (config_hash,)).fetchone():
                con.execute("COMMIT")
                return False
            held = con.execute("SELECT owner, host, pid, heartbeat FROM claims WHERE config_hash = ?", (config_hash,)).fetchone()
            if held is not None and held[0] != owner:
                o_host, o_pid, beat = held[1], int(held[2]), float(held[3])
                alive = now - beat < ttl and (o_host != host or _pid_alive(o_pid))
                if alive:
                    con.execute("COMMIT")
                    return False
            con.execute("INSERT OR REPLACE INTO claims (config_hash, owner, host, pid, heartbeat) VALUES (?, ?, ?, ?, ?)",
                        (config_hash, owner, host, os.getpid(), now))
            con.execute("COMMIT")
            return True
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def heartbeat(self, config_hash: str, owner: str) -> None:
        with self._connect() as con:
            con.execute("UPDATE claims SET heartbeat = ? WHERE config_hash = ? AND owner = ?", (time.time(), config_hash, owner))

    def release(self, config_hash: str, owner: str) -> None:
        with self._connect() as con:
            con.execute("DELETE FROM claims WHERE config_hash = ? AND owner = ?", (config_hash, owner))

    def finish(self, row: Row, owner: str) -> None:
        """Store ``row`` and drop ``owner``'s claim in one transaction (a row already there is kept)."""
        with self._connect() as con:
            con.execute(
                "INSERT OR IGNORE INTO runs (config_hash, dataset, model, attack, defense, seed, config, metrics, run_dir) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.config_hash, row.dataset, row.model, row.attack, row.defense, int(row.seed),
                 json.dumps(row.config, sort_keys=True), json.dumps(row.metrics, sort_keys=True), row.run_dir),
            )
            con.execute("DELETE FROM claims WHERE config_hash = ? AND owner = ?", (row.config_hash, owner))

    @contextmanager
    def claimed(self, config_hash: str, owner: str, every: float = CLAIM_TTL_S / 4) -> Iterator[None]:
        """Keep ``owner``'s claim fresh (a heartbeat thread) while the block runs; release it on failure."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                with contextlib.suppress(sqlite3.Error):
                    self.heartbeat(config_hash, owner)

        t = threading.Thread(target=beat, daemon=True)
        t.start()
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.release(config_hash, owner)
            raise
        finally:
            stop.set()
            t.join()

    def move_to(self, other: "ResultStore", rows: Iterable[Row]) -> None:
        """Move ``rows`` (read from this store) into ``other``: added there first, replacing a same-hash
        row, then deleted here."""
        rows = list(rows)
        for r in rows:
            other.add(r, replace=True)
        with self._connect() as con:
            con.executemany("DELETE FROM runs WHERE config_hash = ?", [(r.config_hash,) for r in rows])

    def rows(self) -> list[Row]:
        with self._connect() as con:
            cur = con.execute("SELECT config_hash, dataset, model, attack, defense, seed, config, metrics, run_dir "
                              "FROM runs ORDER BY dataset, attack, defense, seed")
            return [Row(h, d, m, a, df, s, json.loads(c), json.loads(mt), rd) for h, d, m, a, df, s, c, mt, rd in cur]

    def to_dataframe(self) -> Any:
        """A ``pandas.DataFrame``, one row per cell: ``config_hash, dataset, model, attack, defense, seed,
        run_dir`` and every metric, nested ones flattened with dots (``baseline.asr``, ``detection.auroc``);
        lists (loss histories) stay lists. Needs pandas (``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("ResultStore.to_dataframe needs pandas: pip install pandas (or bdseal[dev])") from e
        records = []
        for r in self.rows():
            rec: dict[str, Any] = {"config_hash": r.config_hash, "dataset": r.dataset, "model": r.model, "attack": r.attack,
                                   "defense": r.defense, "seed": r.seed, "run_dir": r.run_dir}
            for k, v in flatten(r.metrics).items():
                rec.setdefault(k, v)
            records.append(rec)
        return pd.DataFrame.from_records(records, columns=None if records else
                                         ["config_hash", "dataset", "model", "attack", "defense", "seed", "run_dir"])

    def __len__(self) -> int:
        with self._connect() as con:
            return int(con.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``{"baseline": {"asr": 1}}`` -> ``{"baseline.asr": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def row_from_run_dir(run_dir: str | Path) -> Row | None:
    """A store row from a finished run directory (``config.yaml`` + ``metrics.json``), e.g. a cell run by
    ``bdseal run -m`` on a cluster; ``None`` when the run did not finish."""
    run_dir = Path(run_dir)
    cfg_path, met_path = run_dir / "config.yaml", run_dir / "metrics.json"
    if not (cfg_path.exists() and met_path.exists()):
        return None
    try:
        cfg = OmegaConf.load(cfg_path)
    except Exception as e:  # yaml's and OmegaConf's parse errors
        raise CorruptFileError(f"{cfg_path} does not parse ({e}); rerun the cell or remove the directory") from e
    metrics = read_json(met_path)
    check_run_dir_consistent(run_dir, cfg, metrics)
    return Row(cell_hash(cfg), str(cfg.dataset.name), str(cfg.model.name), str(cfg.attack.name), str(cfg.defense.name),
               int(cfg.seed), resolved_config(cfg), metrics, str(run_dir))


def check_run_dir_consistent(run_dir: Path, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """:class:`ConfigError` when ``metrics.json`` was not produced by ``config.yaml`` (a mixed directory)."""
    want = {"dataset": str(cfg.dataset.name), "model": str(cfg.model.name), "attack": str(cfg.attack.name),
            "defense": str(cfg.defense.name), "seed": int(cfg.seed)}
    diff = {k: (v, metrics.get(k)) for k, v in want.items() if metrics.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: config {a!r} vs metrics {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"run directory {run_dir}: config.yaml and metrics.json disagree ({shown}); rerun the cell or remove the directory")


def ingest_run_dirs(store: ResultStore, roots: Iterable[str | Path], refused: list[str] | None = None) -> int:
    """Add every finished run directory under ``roots`` (searched for ``metrics.json``) that the store
    does not hold yet; returns how many rows were added. A directory whose config and metrics disagree, or
    whose files do not parse, is refused (logged, and appended to ``refused``)."""
    added = 0
    known = store.hashes()
    for root in roots:
        for met in sorted(Path(root).rglob("metrics.json")):
            try:
                row = row_from_run_dir(met.parent)
            except BdsealError as e:
                log.warning("not ingested: %s", e)
                if refused is not None:
                    refused.append(str(e))
                continue
            if row is not None and row.config_hash not in known:
                store.add(row)
                known.add(row.config_hash)
                added += 1
    return added
