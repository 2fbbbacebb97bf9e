"""bdseal: defenses against data-poisoning backdoors for image classifiers.

Data flows one way (docs/ARCHITECTURE.md): data -> attacks -> PoisonedSet -> DefenderView -> defenses
-> DefenseResult -> metrics. Only metrics read the Oracle.

The Python API (docs/api.md) is imported on first use, so ``import bdseal`` stays light::

    ps = bdseal.poison(images, labels, attack="badnets", rate=0.1, target=0, seed=0)
    res = bdseal.defend(ps, "pgrl", my_model)
    bdseal.evaluate(res.model, ps, result=res)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

_API = {
    "poison": "bdseal.api", "train_model": "bdseal.api", "defend": "bdseal.api", "evaluate": "bdseal.api",
    "load_run": "bdseal.api", "default_recipe": "bdseal.api", "PoisonedData": "bdseal.api",
    "DefenderData": "bdseal.api", "RunRecord": "bdseal.api", "load_poisoned": "bdseal.api", "save_poisoned": "bdseal.api",
    "DefenseResult": "bdseal.defenses", "WrappedClassifier": "bdseal.models.wrap", "as_classifier": "bdseal.models.wrap",
    "register_attack": "bdseal.attacks", "register_defense": "bdseal.defenses", "register_source": "bdseal.data.sources",
    "register_model": "bdseal.models", "register_config": "bdseal.registry", "Attack": "bdseal.attacks",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bdseal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
