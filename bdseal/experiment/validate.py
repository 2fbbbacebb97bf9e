"""Checks of a run configuration that happen before any work (no data loaded, nothing trained).

Each failure is a :class:`bdseal.errors.ConfigError` whose message names the key, the bad value and
what to do (docs/safety.md). ``run_experiment`` calls :func:`validate_run_config` first and
:func:`check_per_class` right after loading the data, so a bad setting never costs a training run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bdseal.errors import ConfigError
from bdseal.train.loop import TrainConfig

_TRAIN_KEYS = frozenset(f.name for f in fields(TrainConfig))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be a whole number >= {minimum}; set {key}=<integer>")
    if value < minimum:
        raise ConfigError(f"{key}={value} must be >= {minimum}; set {key}=<integer >= {minimum}>")
    return value


def _number(key: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}; set {key}=<number>")
    if value < lo or value > hi or (hi_open and value == hi):
        raise ConfigError(f"{key}={value} must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}")
    return float(value)


@functools.lru_cache(maxsize=None)
def defense_defaults(name: str) -> dict[str, Any] | None:
    """The composed ``conf/defense/<name>.yaml`` (presets included), or None when the defense has none."""
    return _group_yaml("defense", name)


def _group_yaml(group: str, option: str) -> dict[str, Any] | None:
    """``conf/<group>/<option>.yaml`` merged over its ``defaults`` of the same group (Hydra's preset
    rule, without Hydra: this also runs inside a Hydra app)."""
    f = resources.files("bdseal.conf") / group / f"{option}.yaml"
    if not f.is_file():
        return None
    node = OmegaConf.create(f.read_text())
    merged = OmegaConf.create({})
    for d in node.pop("defaults", None) or []:
        if isinstance(d, str) and d != "_self_":
            base = _group_yaml(group, d)
            if base:
                merged = OmegaConf.merge(merged, base)
    return _plain(OmegaConf.merge(merged, node))


def _unknown_keys(given: Mapping[str, Any], default: Mapping[str, Any], prefix: str, closed: bool = True) -> None:
    """Raise on a key of ``given`` that ``default`` lacks (when ``closed``) and on a value whose type does
    not match a numeric / boolean default; nested dicts are checked against their defaults (a training
    recipe accepts every :class:`TrainConfig` option, a backbone its kind's options; other nested dicts
    are checked for types only: their own module checks their keys). An empty default is open."""
    if not default:
        return
    allowed = set(default)
    if set(default) <= _TRAIN_KEYS:
        allowed |= _TRAIN_KEYS
    for k, v in given.items():
        if closed and k not in allowed:
            raise ConfigError(f"unknown key {prefix}{k}; valid keys under {prefix.rstrip('.')}: {', '.join(sorted(allowed))}")
        d = default.get(k)
        if isinstance(v, Mapping) and isinstance(d, Mapping):
            nested = _nested_defaults(v, d)
            _unknown_keys(v, d if nested is None else nested, f"{prefix}{k}.", closed=nested is not None)
        elif v is None:
            continue  # null switches an option off (e.g. clean_per_class=null with clean_fraction)
        elif isinstance(d, bool) and not isinstance(v, bool):
            raise ConfigError(f"{prefix}{k}={v!r} must be true or false")
        elif isinstance(d, (int, float)) and not isinstance(d, bool) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{prefix}{k}={v!r} must be a number (default {d!r}); set {prefix}{k}=<number>")


def _nested_defaults(given: Mapping[str, Any], default: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """What a nested option dict accepts, where that is known: a training recipe (``TrainConfig``) or a
    backbone (``kind`` + ``bdseal.ssl.features.DEFAULTS`` of that kind); None = checked by its own module."""
    if default and set(default) <= _TRAIN_KEYS:
        return default
    if "kind" in default:
        from bdseal.ssl.features import DEFAULTS

        kind = given.get("kind", default["kind"])
        if kind in DEFAULTS:
            return {"kind": kind, **DEFAULTS[kind], **({k: v for k, v in default.items()} if kind == default["kind"] else {})}
    return None


def check_defense_keys(cfg: DictConfig) -> None:
    """Every ``defense.<key>`` must exist in the defense's own config (a typo is not silently ignored)."""
    d = _plain(cfg.defense) or {}
    default = defense_defaults(str(d.get("name")))
    if default is not None:
        _unknown_keys(d, default, "defense.")


def check_defense_options(cfg: DictConfig) -> None:
    """The defense's own option check (``register_defense(check=...)``): bad choices fail before any work."""
    from bdseal.defenses import get_defense

    d = _plain(cfg.defense) or {}
    get_defense(str(d.get("name"))).check_options(d)


def validate_run_config(cfg: DictConfig) -> None:
    """Config-only checks (types, ranges, threat-model consistency, defense keys) before any work."""
    _int("seed", cfg.seed, 0)
    d = cfg.dataset
    for key in ("train_per_class", "test_per_class"):
        v = d.get(key)
        if v is not None and not isinstance(v, float):
            _int(f"dataset.{key}", v, 1)
        elif isinstance(v, float):
            _number(f"dataset.{key}", v, 0.0, 1.0)
            if v == 0.0:
                raise ConfigError(f"dataset.{key}=0.0 keeps no images; use a fraction in (0, 1] or a count >= 1")
    _number("defender.holdout", cfg.defender.holdout, 0.0, 1.0, hi_open=True)
    a = cfg.attack
    if a.name != "none":
        _number("attack.rate", a.rate, 0.0, 1.0)
        _int("attack.target", a.target, 0)
    if cfg.defender.target_known and (a.name == "none" or a.get("target") is None):
        why = "attack=none has no target" if a.name == "none" else f"attack.target is not set for attack={a.name}"
        raise ConfigError(f"defender.target_known=true but {why}; set attack.target=<class> or defender.target_known=false")
    try:
        TrainConfig.from_dict({**(_plain(cfg.train) or {}), "progress": False})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train: {e}") from None
    ckpt = cfg.get("backdoored_ckpt")
    if ckpt and not Path(str(ckpt)).exists():
        raise ConfigError(f"backdoored_ckpt={ckpt}: no such file or run directory; fix the path")
    check_defense_keys(cfg)
    check_defense_options(cfg)
    if cfg.device not in ("auto", "cpu") and str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available here; use device=cpu or device=auto")


def check_per_class(key: str, size: Any, counts: torch.Tensor, classes: list[str]) -> None:
    """``dataset.<split>_per_class=size`` must not exceed what every class has (the smallest is named)."""
    if size is None or isinstance(size, float):
        return
    if size > int(counts.min()):
        c = int(counts.argmin())
        raise ConfigError(f"{key}={size} but class {classes[c]!r} has only {int(counts[c])} images "
                          f"(available per class: {int(counts.min())} to {int(counts.max())}); "
                          f"set {key} to at most {int(counts.min())} or to a fraction in (0, 1]")
