"""Plugin discovery shared by the registries (attacks, defenses, datasets, models).

Every module below a built-in package is imported once; a module that fails to import (a missing
optional dependency, say) does not take the others down, but its error is kept and reported when a
name cannot be found, so nothing fails silently.

User plugins (docs/api.md "Plugins"): modules named in the ``plugins=[...]`` config key (imported by the
command line before Hydra composes the config, so their :func:`register_config` entries are selectable)
and the ``bdseal.plugins`` entry points of installed packages (imported before any registry is read).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from bdseal.errors import BdsealError


ENTRY_POINT_GROUP = "bdseal.plugins"
_ERRORS: dict[str, dict[str, str]] = {}
_ENTRY_POINTS_LOADED: list[str] = []
_ENTRY_POINTS_STATE = {"done": False}


class PluginError(BdsealError, ImportError):
    """A plugin named in ``plugins=`` or a ``bdseal.plugins`` entry point could not be imported."""


def load_entry_point_plugins() -> list[str]:
    """Import every ``bdseal.plugins`` entry point of the installed packages (once); returns their names.
    A package declares one in its ``pyproject.toml``: ``[project.entry-points."bdseal.plugins"] my = "my_pkg.bd"``."""
    if _ENTRY_POINTS_STATE["done"]:
        return list(_ENTRY_POINTS_LOADED)
    _ENTRY_POINTS_STATE["done"] = True  # before loading: a plugin that lists a registry must not recurse
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - one broken plugin must not hide the others
            raise PluginError(f"bdseal.plugins entry point {ep.name!r} ({ep.value}) failed to import: "
                              f"{type(e).__name__}: {e}; fix or uninstall the package that declares it") from e
        _ENTRY_POINTS_LOADED.append(ep.name)
    return list(_ENTRY_POINTS_LOADED)


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: a module name (``my_pkg.bd``; the working directory is searched too) or the path
    of a ``.py`` file. Importing it runs its ``register_*`` decorators."""
    spec = str(spec).strip()
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugins: file {spec} does not exist")
        name = f"bdseal_plugin_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise PluginError(f"plugins: {spec} failed to import: {type(e).__name__}: {e}") from e
        return module
    top = spec.split(".")[0]
    for attempt in range(2):
        try:
            return importlib.import_module(spec)
        except ModuleNotFoundError as e:
            if e.name != top:
                raise PluginError(f"plugins: {spec!r} failed to import: {e}") from e
        except Exception as e:
            raise PluginError(f"plugins: {spec!r} failed to import: {type(e).__name__}: {e}") from e
        if attempt == 0 and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # `bdseal` runs as a console script: the working directory is not on the path
        else:
            break
    raise PluginError(f"plugins: no module {spec!r} (looked on sys.path and in {os.getcwd()}); install it, "
                      "add its folder to PYTHONPATH or give the path of a .py file")


def load_plugins(specs: Iterable[str] | str | None = ()) -> list[ModuleType]:
    """Entry-point plugins, then each of ``specs`` (the ``plugins=[...]`` config key), in order."""
    load_entry_point_plugins()
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    return [load_plugin(s) for s in specs]


# Every config group's keys, so that a plugin's attack/defense/dataset/model can be chosen with
# ``attack=NAME`` on the command line without a YAML file (REFERENCE of the keys: bdseal/conf/<group>/).
CONFIG_TEMPLATES: dict[str, dict[str, Any]] = {
    "attack": {"rate": 0.1, "target": 0, "mode": None, "cover_rate": None, "rate_of": None, "source_classes": None, "params": {}},
    "defense": {},
    "dataset": {"root": None, "options": {}, "train_per_class": None, "test_per_class": None},
    "model": {"params": {}},
}


def register_config(group: str, name: str, **values: Any) -> dict[str, Any]:
    """Make ``group=name`` selectable in ``bdseal run``: stores ``{name, <group template>, **values}`` in
    Hydra's ConfigStore (e.g. ``register_config("defense", "my_def", epochs=3)``). Returns the node."""
    if group not in CONFIG_TEMPLATES:
        raise ValueError(f"register_config: group must be one of {sorted(CONFIG_TEMPLATES)}, got {group!r}")
    from hydra.core.config_store import ConfigStore

    node = {"name": name, **CONFIG_TEMPLATES[group], **values}
    ConfigStore.instance().store(group=group, name=name, node=node)
    return node


def has_config(group: str, name: str) -> bool:
    """Whether ``group=name`` resolves: a YAML file in ``bdseal/conf/<group>/`` or a ConfigStore entry."""
    if (Path(__file__).parent / "conf" / group / f"{name}.yaml").exists():
        return True
    from hydra.core.config_store import ConfigStore

    try:
        return f"{name}.yaml" in ConfigStore.instance().list(group)
    except OSError:
        return False


def import_plugins(package_name: str) -> dict[str, str]:
    """Import every module below ``package_name`` (after the entry-point plugins); return {module: error}
    for those that failed."""
    load_entry_point_plugins()
    if package_name in _ERRORS:
        return _ERRORS[package_name]
    pkg = importlib.import_module(package_name)
    errors: dict[str, str] = {}
    for mod in pkgutil.walk_packages(pkg.__path__, prefix=f"{package_name}."):
        try:
            importlib.import_module(mod.name)
        except Exception as e:  # noqa: BLE001 - reported below and on lookup failure
            errors[mod.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"plugin module {mod.name} failed to import: {errors[mod.name]}", RuntimeWarning, stacklevel=2)
    _ERRORS[package_name] = errors
    return errors


def unknown_name_message(kind: str, name: str, known: list[str], errors: dict[str, str]) -> str:
    msg = f"unknown {kind} {name!r}; known: {known}"
    if errors:
        msg += "; modules that failed to import: " + "; ".join(f"{m} ({e})" for m, e in errors.items())
    return msg


def register_missing_configs() -> list[str]:
    """Give every registered attack, defense, dataset and model that has no config a template one
    (:data:`CONFIG_TEMPLATES`), so ``attack=NAME`` works for plugins that registered no config."""
    from bdseal.attacks.base import _ATTACKS
    from bdseal.data.sources import SOURCES
    from bdseal.defenses.base import _DEFENSES
    from bdseal.models import MODELS

    added = []
    for group, names in (("attack", _ATTACKS), ("defense", _DEFENSES), ("dataset", SOURCES), ("model", MODELS)):
        for name in list(names):
            if not has_config(group, name):
                register_config(group, name)
                added.append(f"{group}/{name}")
    return added


def plugin_overrides(overrides: Iterable[str]) -> list[str]:
    """The module specs of the ``plugins=[...]`` (or ``+plugins=``) items of Hydra command-line overrides."""
    specs: list[str] = []
    for item in overrides:
        key, sep, _ = str(item).partition("=")
        if not sep or key.lstrip("+~") != "plugins":
            continue
        from hydra.core.override_parser.overrides_parser import OverridesParser

        value = OverridesParser.create().parse_overrides([str(item)])[0].value()
        specs += [str(v) for v in value] if isinstance(value, (list, tuple)) else ([] if value is None else [str(value)])
    return specs


def preload_plugins(overrides: Iterable[str]) -> list[ModuleType]:
    """Before Hydra composes a config: import the entry-point plugins and those named by ``plugins=`` in
    ``overrides``, then give their registrations template configs (:func:`register_missing_configs`)."""
    modules = load_plugins(plugin_overrides(overrides))
    register_missing_configs()
    return modules
