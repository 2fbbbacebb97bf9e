"""Poisoned sets as files other toolkits can read: ``.npz`` arrays + a JSON manifest (``bdseal poison``).

A directory written by :func:`save_poisoned` holds

- ``poisoned.npz``: ``x_train`` (uint8 ``(N, C, H, W)``, poisoned) and ``y_train`` (int64, the *observed*
  labels), ``x_test``/``y_test`` (the clean test split), ``classes`` and, when there is one, the defender's
  clean pool ``x_clean``/``y_clean`` (held out before poisoning). This is the layout of
  ``bdseal.data.load_npz``, so ``dataset=npz dataset.root=DIR`` trains on it.
- ``triggered_test.npz``: ``x`` (the triggered non-target test images), ``y`` (their attack labels) and
  ``y_true`` (their true labels): ASR = accuracy on ``y``, RA = accuracy on ``y_true``.
- ``manifest.json``: what made it (attack, parameters, policy, seed, bdseal version), the ground truth
  (``poison_idx``, ``cover_idx``, the true labels of the poisoned samples, ``target_map``) and the sha256
  of both array files, checked on load.

Arrays are written with ``numpy.savez`` and read with ``allow_pickle=False``: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdseal import __version__
from bdseal.attacks import Oracle, PoisonedSet, PoisonPlan
from bdseal.data import DataError, ImageDataset
from bdseal.data.sources import load_npz
from bdseal.io import atomic_write_bytes, atomic_write_json, read_json

FORMAT = "bdseal-poisoned"
SCHEMA = 1
POISONED_FILE, TRIGGERED_FILE, MANIFEST_FILE = "poisoned.npz", "triggered_test.npz", "manifest.json"


@dataclass
class DefenderData:
    """All a defense may see of a poisoned set: training images with *observed* labels, the held-out clean
    pool, and the attack target only when the user grants it."""

    train: ImageDataset
    clean_pool: ImageDataset | None = None
    known_target: int | None = None


def _empty_pool() -> ImageDataset:
    return ImageDataset(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), ["0"])


@dataclass
class PoisonedData(PoisonedSet):
    """A :class:`~bdseal.attacks.PoisonedSet` (``train``, ``oracle``, ``test_clean``, ``test_triggered``,
    ``test_triggered_true``, ``plan``) plus the defender's clean pool (held out before poisoning) and
    ``info``: what made it (attack, parameters, policy, seed; JSON-able)."""

    clean_pool: ImageDataset = field(default_factory=_empty_pool)
    info: dict[str, Any] = field(default_factory=dict)

    def defender_data(self, target_known: bool = False) -> DefenderData:
        """The defender's side: no oracle; the target only with ``target_known``."""
        attacked = self.info.get("attack", {}).get("name", "none") != "none"
        target = self.info.get("policy", {}).get("target") if target_known and attacked else None
        return DefenderData(self.train, self.clean_pool if len(self.clean_pool) else None,
                            None if target is None else int(target))

    def save(self, directory: str | Path) -> Path:
        """Export to ``directory`` (see the module doc); returns the manifest's path."""
        return save_poisoned(self, directory)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def save_poisoned(ps: PoisonedSet, directory: str | Path, info: dict[str, Any] | None = None,
                  clean_pool: ImageDataset | None = None) -> Path:
    """Write ``ps`` (+ the clean pool and ``info`` of a :class:`PoisonedData`) to ``directory``; each file
    is written atomically, the manifest last. Returns the manifest's path."""
    out = Path(directory)
    info = dict(info if info is not None else getattr(ps, "info", {}))
    pool = clean_pool if clean_pool is not None else getattr(ps, "clean_pool", None)
    classes = np.array(list(ps.train.classes))
    arrays = {"x_train": _np(ps.train.x), "y_train": _np(ps.train.y), "x_test": _np(ps.test_clean.x),
              "y_test": _np(ps.test_clean.y), "classes": classes}
    if pool is not None and len(pool):
        arrays.update(x_clean=_np(pool.x), y_clean=_np(pool.y))
    poisoned = _npz_bytes(**arrays)
    triggered = _npz_bytes(x=_np(ps.test_triggered.x), y=_np(ps.test_triggered.y), y_true=_np(ps.test_triggered_true))
    atomic_write_bytes(out / POISONED_FILE, poisoned)
    atomic_write_bytes(out / TRIGGERED_FILE, triggered)
    o, plan = ps.oracle, ps.plan
    manifest = {
        "format": FORMAT, "schema": SCHEMA, "bdseal_version": __version__, **info,
        "oracle_attack": o.attack, "classes": list(ps.train.classes), "image_shape": list(ps.train.image_shape),
        "n_train": len(ps.train), "n_test": len(ps.test_clean), "n_triggered": len(ps.test_triggered),
        "n_clean_pool": len(pool) if pool is not None else 0,
        "plan": {"mode": plan.mode, "rate": plan.rate, "rate_of": plan.rate_of, "cover_rate": plan.cover_rate,
                 "cover_from": plan.cover_from},
        "poison_idx": plan.poison_idx.tolist(), "poison_labels": plan.poison_labels.tolist(),
        "poison_true_labels": o.true_labels[plan.poison_idx.cpu()].tolist(), "cover_idx": plan.cover_idx.tolist(),
        "target_map": o.target_map.tolist(),
        "files": {POISONED_FILE: hashlib.sha256(poisoned).hexdigest(), TRIGGERED_FILE: hashlib.sha256(triggered).hexdigest()},
    }
    return atomic_write_json(out / MANIFEST_FILE, manifest)


def _checked(path: Path, manifest: dict[str, Any]) -> None:
    want = manifest.get("files", {}).get(path.name)
    if not path.exists():
        raise DataError(f"{path} is missing; re-export the poisoned set with bdseal poison")
    if want and hashlib.sha256(path.read_bytes()).hexdigest() != want:
        raise DataError(f"{path} does not match the sha256 in {path.parent / MANIFEST_FILE} (altered or damaged); re-export it")


def load_poisoned(directory: str | Path) -> PoisonedData:
    """Read a directory written by :func:`save_poisoned` back into a :class:`PoisonedData` (oracle
    included, rebuilt from the manifest); files are checked against the manifest's sha256."""
    d = Path(directory)
    if not (d / MANIFEST_FILE).exists():
        raise DataError(f"{d} has no {MANIFEST_FILE}: not a directory written by bdseal poison")
    m = read_json(d / MANIFEST_FILE)
    if m.get("format") != FORMAT or int(m.get("schema", 0)) > SCHEMA:
        raise DataError(f"{d / MANIFEST_FILE}: format {m.get('format')!r} schema {m.get('schema')} is not one this bdseal reads")
    for name in (POISONED_FILE, TRIGGERED_FILE):
        _checked(d / name, m)
    splits = load_npz(d / POISONED_FILE, name="npz")
    with np.load(d / POISONED_FILE, allow_pickle=False) as z:
        pool = (ImageDataset(torch.from_numpy(z["x_clean"]), torch.from_numpy(z["y_clean"]).long(), list(splits.train.classes))
                if "x_clean" in z.files else _empty_pool())
    with np.load(d / TRIGGERED_FILE, allow_pickle=False) as z:
        trig = ImageDataset(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]).long(), list(splits.train.classes))
        trig_true = torch.from_numpy(z["y_true"]).long()
    n = len(splits.train)
    pidx = torch.tensor(m["poison_idx"], dtype=torch.long)
    cidx = torch.tensor(m["cover_idx"], dtype=torch.long)
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[pidx] = True
    is_cover = torch.zeros(n, dtype=torch.bool)
    is_cover[cidx] = True
    true_labels = splits.train.y.clone()
    true_labels[pidx] = torch.tensor(m["poison_true_labels"], dtype=torch.long)
    target_map = torch.tensor(m["target_map"], dtype=torch.long)
    p = m["plan"]
    plan = PoisonPlan(pidx, torch.tensor(m["poison_labels"], dtype=torch.long), cidx, target_map, p["mode"], float(p["rate"]),
                      p["rate_of"], float(p["cover_rate"]), p["cover_from"])
    oracle = Oracle(is_poison, is_cover, true_labels, target_map, dict(m.get("oracle_attack") or {}))
    info = {k: m[k] for k in ("attack", "policy", "seed", "holdout", "dataset") if k in m}
    return PoisonedData(splits.train, oracle, splits.test, trig, trig_true, plan, clean_pool=pool, info=info)


def poison_main(cfg: Any) -> Path:
    """``bdseal poison``: the poisoned set of ``cfg`` exactly as ``bdseal run`` would train on it (same
    defender hold-out, indices and pixels), written to ``out`` (default ``poisoned/<dataset>-<attack>-s<seed>``)."""
    from omegaconf import OmegaConf

    from bdseal.experiment.run import RunDirError, attack_kwargs, plain, prepare_cell
    from bdseal.registry import load_plugins

    load_plugins(cfg.get("plugins"))
    out = Path(str(cfg.out)) if cfg.get("out") else Path("poisoned") / f"{cfg.dataset.name}-{cfg.attack.name}-s{cfg.seed}"
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise RunDirError(f"{out} is not empty; pass overwrite=true or choose another out=")
    if cfg.attack.name == "none":
        raise DataError("bdseal poison needs an attack: pass attack=<name> (bdseal list shows them)")
    cell = prepare_cell(cfg)
    info = {"attack": {"name": str(cfg.attack.name), "params": plain(cfg.attack.get("params"))}, "policy": attack_kwargs(cfg),
            "seed": int(cfg.seed), "holdout": float(cfg.defender.holdout),
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)}
    return save_poisoned(cell.poisoned, out, info, clean_pool=cell.defender_pool)
