"""Backdoor attacks: a poisoning plan (who, which labels) + a batched trigger (how)."""

from bdseal.attacks.base import Attack, AttackContext, build_attack, list_attacks, register_attack
from bdseal.attacks.plan import AttackConfigError, PoisonPlan, make_plan
from bdseal.attacks.poisoned import Oracle, PoisonedSet, build_and_poison, poison_dataset

__all__ = [
    "Attack", "AttackContext", "AttackConfigError", "Oracle", "PoisonPlan", "PoisonedSet",
    "build_and_poison", "build_attack", "list_attacks", "make_plan", "poison_dataset", "register_attack",
]
