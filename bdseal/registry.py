"""Plugin discovery shared by the attack and defense registries.

Every module below a plugin package is imported once; a module that fails to import (a missing
optional dependency, say) does not take the others down, but its error is kept and reported when a
name cannot be found, so nothing fails silently.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

_ERRORS: dict[str, dict[str, str]] = {}


def import_plugins(package_name: str) -> dict[str, str]:
    """Import every module below ``package_name``; return {module: error} for those that failed."""
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
