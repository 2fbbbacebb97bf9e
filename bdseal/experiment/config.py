"""Compose the run configuration without the command line (tests, ``bench``, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from omegaconf import DictConfig


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """The same configuration ``bdseal run OVERRIDES`` would get (plugins named in them imported first)."""
    from bdseal.registry import preload_plugins

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bdseal.errors import ConfigError

    preload_plugins(overrides)
    try:
        with initialize_config_module("bdseal.conf", version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:  # model=nope, a typo'd key, a malformed value
        raise ConfigError(f"bad override: {one_line_hydra_message(e)}") from None


def one_line_hydra_message(error: BaseException) -> str:
    """Hydra's multi-line message on one line: option lists joined by commas; its search path and
    HYDRA_FULL_ERROR hint dropped."""
    parts: list[str] = []
    listing: list[str] = []
    for raw in str(error).splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line or "HYDRA_FULL_ERROR" in line or line.startswith("object_type="):
            continue
        if raw.startswith(("\t", "    ")) and parts and parts[-1].endswith(":"):
            listing.append(line)
            continue
        if listing:
            parts[-1] += " " + ", ".join(listing)
            listing = []
        parts.append(line)
    if listing:
        parts[-1] += " " + ", ".join(listing)
    return "; ".join(p.rstrip(".;") for p in parts)
