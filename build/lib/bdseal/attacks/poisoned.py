"""Apply an attack (plan + trigger) to a dataset: the ``PoisonedSet`` and its ``Oracle``.

``PoisonedSet.train`` holds the images and *observed* labels a defender receives. The ``Oracle``
(is_poison, is_cover, true labels, target mapping) is for metrics and reports only: defenses never
see it (they get a ``DefenderView``, built in ``bdseal.experiment``). Poisoned and triggered images
are stored as uint8, as an attacker would ship them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bdseal.attacks.base import Attack, AttackContext, build_attack, resolve_cover_rate
from bdseal.attacks.plan import AttackConfigError, PoisonPlan, make_plan
from bdseal.data.dataset import ImageDataset


@dataclass(frozen=True)
class Oracle:
    """Ground truth about the poisoning. Read by ``bdseal.metrics`` and reports alone."""

    is_poison: torch.Tensor  # (N,) bool
    is_cover: torch.Tensor  # (N,) bool
    true_labels: torch.Tensor  # (N,) int64
    target_map: torch.Tensor  # (K,) attack label per true class, -1 = not attacked
    attack: dict[str, Any]

    @property
    def target_classes(self) -> list[int]:
        return sorted({int(t) for t in self.target_map.tolist() if t >= 0})


@dataclass
class PoisonedSet:
    """Poisoned training set + clean and triggered test sets of one attack on one dataset."""

    train: ImageDataset  # poisoned images, observed labels
    oracle: Oracle
    test_clean: ImageDataset
    test_triggered: ImageDataset  # triggered test images labelled with the *attack* label
    test_triggered_true: torch.Tensor  # their true labels
    plan: PoisonPlan

    @property
    def poison_rate(self) -> float:
        return float(self.oracle.is_poison.float().mean())


def _apply_batched(attack: Attack, x: torch.Tensor, phase: str, index: torch.Tensor | None, cover: bool, device: torch.device, batch: int = 1024) -> torch.Tensor:
    """Trigger uint8 images in batches on ``device``; returns uint8 on x's device."""
    out = torch.empty_like(x)
    for s in range(0, len(x), batch):
        xb = x[s : s + batch].to(device).float().div_(255)
        ib = None if index is None else index[s : s + batch].to(device)
        yb = attack.apply_cover(xb, index=ib) if cover else attack.apply(xb, phase=phase, index=ib)
        out[s : s + batch] = yb.clamp(0, 1).mul(255).round().to(torch.uint8).to(x.device)
    return out


def poison_dataset(
    train: ImageDataset,
    test: ImageDataset,
    attack: Attack,
    *,
    rate: float,
    target: int = 0,
    mode: str | None = None,
    cover_rate: float | None = None,
    rate_of: str | None = None,
    source_classes: list[int] | None = None,
    seed: int = 0,
    ctx: AttackContext | None = None,
) -> PoisonedSet:
    """Plan, fit the trigger, apply it. Same seed ⇒ same indices and triggers, bit for bit.

    ``cover_rate=None`` uses the attack's ``default_cover_rate(rate)`` (WaNet: cross ratio × rate,
    Lotus: rate, others: no covers); covers are drawn from the attack's ``cover_pool``. The trigger is
    applied to ``plan.cover_idx`` as it stands after ``attack.fit``."""
    ctx = ctx or AttackContext(seed=seed)
    attack.check_image(train.image_shape)
    covers = resolve_cover_rate(attack, rate, cover_rate)
    plan = make_plan(
        train.y, train.num_classes, rate=rate, target=target, mode=mode or attack.default_mode,
        cover_rate=covers, rate_of=rate_of or attack.default_rate_of, source_classes=source_classes, seed=seed,
        cover_from=attack.cover_pool,
    )
    attack.fit(train, plan, ctx)
    x = train.x.clone()
    y = train.y.clone()
    p, c = plan.poison_idx.to(x.device), plan.cover_idx.to(x.device)
    x[p] = _apply_batched(attack, train.x[p], "train", plan.poison_idx, False, ctx.device)
    if len(c):
        x[c] = _apply_batched(attack, train.x[c], "train", plan.cover_idx, True, ctx.device)
    y[p] = plan.poison_labels.to(y.device)
    is_poison = torch.zeros(len(train), dtype=torch.bool)
    is_poison[plan.poison_idx] = True
    is_cover = torch.zeros(len(train), dtype=torch.bool)
    is_cover[plan.cover_idx] = True
    oracle = Oracle(is_poison, is_cover, train.y.cpu().clone(), plan.target_map.clone(), attack.describe())
    attack_labels = plan.attack_labels(test.y.cpu())
    keep = torch.nonzero((attack_labels >= 0) & (attack_labels != test.y.cpu())).flatten()
    if len(keep) == 0:
        raise AttackConfigError("no test image is attacked: cannot measure ASR")
    xt = _apply_batched(attack, test.x[keep.to(test.x.device)], "test", None, False, ctx.device)
    triggered = ImageDataset(xt, attack_labels[keep].to(test.y.device), list(test.classes))
    return PoisonedSet(
        ImageDataset(x, y, list(train.classes)), oracle, test, triggered, test.y.cpu()[keep], plan
    )


def build_and_poison(
    train: ImageDataset, test: ImageDataset, name: str, *, seed: int = 0, rate: float, target: int = 0,
    mode: str | None = None, cover_rate: float | None = None, rate_of: str | None = None,
    source_classes: list[int] | None = None, ctx: AttackContext | None = None, **params: Any,
) -> PoisonedSet:
    """``build_attack`` + ``poison_dataset`` in one call (what configs and tests use)."""
    attack = build_attack(name, seed=seed, **params)
    return poison_dataset(
        train, test, attack, rate=rate, target=target, mode=mode, cover_rate=cover_rate,
        rate_of=rate_of, source_classes=source_classes, seed=seed, ctx=ctx,
    )
