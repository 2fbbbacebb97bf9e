"""Defenses: one module each with one entry point ``defend(view, cfg, ctx) -> DefenseResult``."""

from bdseal.defenses.base import (
    DefenderView, DefenseResult, DefenseSpec, RunContext, ThreatModelError, get_defense, list_defenses, register_defense,
)

__all__ = [
    "DefenderView", "DefenseResult", "DefenseSpec", "RunContext", "ThreatModelError",
    "get_defense", "list_defenses", "register_defense",
]
