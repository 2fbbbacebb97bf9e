"""Poisoning *plans*: which training indices are poisoned or cover, and which labels they get.

A plan is independent of the trigger, so every trigger works with every policy:

- ``all_to_one``: victims drawn from non-target classes (REFERENCE.md), relabelled to ``target``.
- ``all_to_all``: victims from every class, relabelled y -> (y + 1) mod K.
- ``clean_label``: victims drawn from the target class only; labels unchanged.
- ``source_specific``: victims from ``source_classes`` only, relabelled to ``target`` (Lotus).

``rate_of`` says what the rate is a fraction of: ``dataset`` (the whole training set, the default of
every seed paper except LC) or ``target_class`` (LC: 25% of the target class; COMBAT: 50%).
Cover samples (Adap-Patch/Blend, WaNet noise mode, Lotus negatives) are triggered but keep their
correct labels; they are drawn, with the same seeded generator right after the victims, from the
not-poisoned samples of a *cover pool* (``cover_from``, declared by the attack as ``Attack.cover_pool``):

- ``any``: every class (the default);
- ``source``: the classes the attack relabels at test time (``target_map >= 0``: the source classes of
  ``source_specific``, the non-target classes of ``all_to_one``/``clean_label``, every class of
  ``all_to_all``) — Lotus's trigger-focusing negatives;
- ``target``: the target class only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdseal.errors import BdsealError

MODES = ("all_to_one", "all_to_all", "clean_label", "source_specific")
COVER_POOLS = ("any", "source", "target")


class AttackConfigError(BdsealError, ValueError):
    """A bad attack option (unknown name, rate out of range, target outside the classes...)."""


@dataclass
class PoisonPlan:
    poison_idx: torch.Tensor  # (P,) int64 indices into the training set
    poison_labels: torch.Tensor  # (P,) observed labels the poisoned samples get
    cover_idx: torch.Tensor  # (C,) int64, triggered but correctly labelled
    target_map: torch.Tensor  # (K,) attack label per true class, -1 where the class is not attacked
    mode: str
    rate: float
    rate_of: str
    cover_rate: float = 0.0  # fraction of the whole training set drawn as covers
    cover_from: str = "any"  # the cover pool (COVER_POOLS)

    def attack_labels(self, true_labels: torch.Tensor) -> torch.Tensor:
        """Label the attacker wants for images of ``true_labels`` (−1 when not attacked)."""
        return self.target_map.to(true_labels.device)[true_labels]


def target_map_for(mode: str, num_classes: int, target: int, source_classes: list[int] | None = None) -> torch.Tensor:
    """(K,) attack label per true class for a policy; −1 for classes the attack leaves alone."""
    if mode in ("all_to_one", "clean_label"):
        m = torch.full((num_classes,), target, dtype=torch.long)
        m[target] = -1  # ASR is measured on non-target classes only
        return m
    if mode == "all_to_all":
        return (torch.arange(num_classes) + 1) % num_classes
    if mode == "source_specific":
        m = torch.full((num_classes,), -1, dtype=torch.long)
        m[torch.tensor(source_classes, dtype=torch.long)] = target
        return m
    raise AttackConfigError(f"unknown poisoning mode {mode!r}; choose one of {MODES}")


def _check(rate: float, cover_rate: float, target: int, num_classes: int, mode: str, rate_of: str, cover_from: str = "any") -> None:
    if cover_from not in COVER_POOLS:
        raise AttackConfigError(f"unknown cover pool {cover_from!r}; choose one of {COVER_POOLS}")
    if mode not in MODES:
        raise AttackConfigError(f"unknown poisoning mode {mode!r}; choose one of {MODES}")
    if not 0.0 < rate < 1.0:
        raise AttackConfigError(f"poison rate must be in (0, 1), got {rate}")
    if not 0.0 <= cover_rate < 1.0:
        raise AttackConfigError(f"cover rate must be in [0, 1), got {cover_rate}")
    if not 0 <= target < num_classes:
        raise AttackConfigError(f"target class {target} outside [0, {num_classes})")
    if rate_of not in ("dataset", "target_class"):
        raise AttackConfigError(f"rate_of must be 'dataset' or 'target_class', got {rate_of!r}")


def make_plan(
    labels: torch.Tensor,
    num_classes: int,
    *,
    rate: float,
    target: int = 0,
    mode: str = "all_to_one",
    cover_rate: float = 0.0,
    rate_of: str = "dataset",
    source_classes: list[int] | None = None,
    seed: int = 0,
    cover_from: str = "any",
) -> PoisonPlan:
    """Draw a plan deterministically from ``seed`` (same seed ⇒ same indices). ``cover_rate`` is a
    fraction of the whole set; covers come from the not-poisoned samples of the ``cover_from`` pool."""
    _check(rate, cover_rate, target, num_classes, mode, rate_of, cover_from)
    labels = labels.cpu()
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    if mode == "source_specific":
        if not source_classes:
            raise AttackConfigError("source_specific mode needs source_classes")
        if target in source_classes:
            raise AttackConfigError("the target cannot be a source class")
    tmap = target_map_for(mode, num_classes, target, source_classes)
    if mode == "clean_label":
        eligible = torch.nonzero(labels == target).flatten()
    elif mode == "all_to_all":
        eligible = torch.arange(n)
    else:  # all_to_one / source_specific: victims from attacked non-target classes
        eligible = torch.nonzero(tmap[labels] >= 0).flatten()
    base = n if rate_of == "dataset" else int((labels == target).sum())
    n_poison = int(round(rate * base))
    if n_poison < 1:
        raise AttackConfigError(f"rate {rate} of {base} samples poisons nothing")
    if n_poison > len(eligible):
        raise AttackConfigError(
            f"{mode} needs {n_poison} victims but only {len(eligible)} eligible samples exist "
            f"(for clean-label attacks use rate_of=target_class or a smaller rate)"
        )
    poison_idx = eligible[torch.randperm(len(eligible), generator=g)[:n_poison]].sort().values
    poison_labels = labels[poison_idx] if mode == "clean_label" else tmap[labels[poison_idx]]
    cover_idx = _draw_covers(labels, tmap, poison_idx, int(round(cover_rate * n)), cover_from, target, g)
    return PoisonPlan(poison_idx, poison_labels.long(), cover_idx, tmap, mode, rate, rate_of, cover_rate, cover_from)


def cover_pool_mask(labels: torch.Tensor, target_map: torch.Tensor, cover_from: str, target: int) -> torch.Tensor:
    """(N,) bool: the samples of the ``cover_from`` pool (before removing the victims)."""
    if cover_from == "any":
        return torch.ones(len(labels), dtype=torch.bool)
    if cover_from == "source":
        return target_map[labels] >= 0
    if cover_from == "target":
        return labels == target
    raise AttackConfigError(f"unknown cover pool {cover_from!r}; choose one of {COVER_POOLS}")


def _draw_covers(labels: torch.Tensor, tmap: torch.Tensor, poison_idx: torch.Tensor, n_cover: int, cover_from: str,
                 target: int, g: torch.Generator) -> torch.Tensor:
    """``n_cover`` sorted indices drawn by ``g`` among the not-poisoned samples of the pool."""
    if n_cover == 0:
        return torch.empty(0, dtype=torch.long)
    free = cover_pool_mask(labels, tmap, cover_from, target)
    free[poison_idx] = False
    pool = torch.nonzero(free).flatten()
    if n_cover > len(pool):
        kind = {"any": "cover samples", "source": "source-class covers", "target": "target-class covers"}[cover_from]
        raise AttackConfigError(
            f"{n_cover} {kind} requested but the {cover_from!r} cover pool holds only {len(pool)} "
            f"not-poisoned samples; lower cover_rate"
        )
    return pool[torch.randperm(len(pool), generator=g)[:n_cover]].sort().values
