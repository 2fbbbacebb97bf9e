"""Compose the run configuration without the command line (tests, ``bench``, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The same configuration ``bdseal run OVERRIDES`` would get (plugins named in them imported first)."""
    from bdseal.registry import preload_plugins

    preload_plugins(overrides)
    with initialize_config_module("bdseal.conf", version_base="1.3"):
        return compose(config_name, overrides=list(overrides))
