"""The trigger half of an attack and the attack registry.

An ``Attack`` holds its trigger parameters and a default poisoning policy: ``default_mode``,
``default_rate_of``, ``cover_pool`` (where ``make_plan`` draws its covers: any | source | target) and
``default_cover_rate(rate)`` (the cover rate used when the config's ``cover_rate`` is null, e.g. WaNet's
cross ratio × rate; an explicit ``cover_rate`` always wins, :func:`resolve_cover_rate`). Its ``apply``
is a batched function on float images in [0, 1] that runs on the batch's device; triggers are applied
before normalisation (REFERENCE.md). Attacks whose trigger must be fitted (LC's PGD, ISSBA's encoder,
IAB/COMBAT generators) override ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from bdseal.attacks.plan import AttackConfigError, PoisonPlan
from bdseal.data.dataset import ImageDataset
from bdseal.registry import import_plugins, unknown_name_message


@dataclass
class AttackContext:
    """What an attack's ``fit`` may use: the device, a seed and a cache for fitted artefacts."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cache: Any = None  # bdseal.cache.ArtifactCache or None
    progress: bool = True


class Attack:
    """Base class. Subclasses set ``name``, default policy, and implement ``apply``."""

    name: ClassVar[str] = "base"
    default_mode: ClassVar[str] = "all_to_one"
    default_rate_of: ClassVar[str] = "dataset"
    cover_pool: ClassVar[str] = "any"  # plan.COVER_POOLS: where make_plan draws this attack's covers

    def __init__(self, seed: int = 0, **params: Any) -> None:
        self.seed = seed
        self.params = params

    def default_cover_rate(self, rate: float) -> float | None:
        """Cover rate (fraction of the whole set) implied by the poison ``rate`` when the config leaves
        ``cover_rate`` null; ``None`` = no covers. Default: none."""
        return None

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Fit trigger parameters (default: nothing to fit)."""

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        """Raise AttackConfigError when the trigger cannot be applied to images of this shape."""

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        """Triggered copy of ``x`` (B, C, H, W) in [0, 1]. ``phase`` is ``train`` (poisoned training
        samples) or ``test`` (ASR images); ``index`` gives training indices for per-sample triggers."""
        raise NotImplementedError

    def apply_cover(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Trigger of cover samples (correct labels kept). Default: the training trigger."""
        return self.apply(x, phase="train", index=index)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


def resolve_cover_rate(attack: Attack, rate: float, cover_rate: float | None) -> float:
    """The cover rate a poisoning uses: an explicit ``cover_rate`` wins (its range is checked by
    ``make_plan``); ``None`` asks the attack's ``default_cover_rate(rate)`` (``None`` from the attack = 0),
    which must lie in [0, 1)."""
    if cover_rate is not None:
        return float(cover_rate)
    implied = attack.default_cover_rate(float(rate))
    if implied is None:
        return 0.0
    if not 0.0 <= implied < 1.0:
        raise AttackConfigError(
            f"cover rate {implied} implied by {attack.name}'s default for rate {rate} is outside [0, 1); "
            "lower the rate or set cover_rate explicitly"
        )
    return float(implied)


_ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    if cls.name in _ATTACKS and _ATTACKS[cls.name] is not cls:
        raise ValueError(f"attack {cls.name!r} registered twice")
    _ATTACKS[cls.name] = cls
    return cls


def _load_all() -> dict[str, str]:
    return import_plugins("bdseal.attacks.triggers")


def list_attacks() -> list[str]:
    _load_all()
    return sorted(_ATTACKS)


def build_attack(name: str, seed: int = 0, **params: Any) -> Attack:
    """Instantiate a registered attack; unknown names and unknown parameters are errors."""
    errors = _load_all()
    if name not in _ATTACKS:
        raise AttackConfigError(unknown_name_message("attack", name, sorted(_ATTACKS), errors))
    try:
        return _ATTACKS[name](seed=seed, **params)
    except TypeError as e:
        raise AttackConfigError(f"bad parameters for attack {name!r}: {e}") from e


TriggerFn = Callable[[torch.Tensor], torch.Tensor]
