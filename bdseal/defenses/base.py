"""What a defense sees (``DefenderView``), what it returns (``DefenseResult``) and the registry.

The defender/oracle wall (DESIGN.md): a defense gets training images, *observed* labels, the clean
defender subset when its threat model grants one, the backdoored model for post-hoc defenses and the
target only when the user says it is known. Ground truth about the poisoning never enters this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bdseal.cache import ArtifactCache, dataset_fingerprint
from bdseal.data.dataset import ImageDataset
from bdseal.errors import BdsealError, ConfigError
from bdseal.models.wrap import as_classifier
from bdseal.registry import import_plugins, unknown_name_message
from bdseal.train.loop import TrainConfig


class ThreatModelError(BdsealError, RuntimeError):
    """A defense asked for something its threat model does not grant."""


@dataclass(frozen=True)
class DefenderView:
    """All a defense may see."""

    train: ImageDataset  # poisoned images with observed labels
    clean: ImageDataset | None = None  # clean defender subset, when granted
    backdoored_model: nn.Module | None = None  # post-hoc defenses
    known_target: int | None = None  # only when the user says the target is known

    @property
    def x(self) -> torch.Tensor:
        return self.train.x

    @property
    def y(self) -> torch.Tensor:
        return self.train.y

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def require_clean(self, who: str) -> ImageDataset:
        if self.clean is None:
            raise ThreatModelError(f"{who} needs a clean defender subset; this run grants none")
        return self.clean

    def require_model(self, who: str) -> nn.Module:
        """The backdoored model with the defense interface (``features``, ``forward_with``, named layers):
        a plain ``nn.Module`` comes back wrapped (``bdseal.models.wrap``), sharing its parameters."""
        if self.backdoored_model is None:
            raise ThreatModelError(f"{who} needs the backdoored model (post-hoc setting)")
        return as_classifier(self.backdoored_model)

    def data_fingerprint(self) -> str:
        """Hash of what the defender holds (images + observed labels): a cache key part. Cheap after the
        first call: tensor digests are memoised per tensor object (``bdseal.cache.tensor_digest``)."""
        return dataset_fingerprint(self.train)


@dataclass
class RunContext:
    """Machinery a defense may use: device, seed, caches, the run directory and model factory."""

    device: torch.device
    seed: int
    build_model: Callable[..., nn.Module]  # build_model(num_classes=None) -> fresh model of the run's choice
    train_cfg: TrainConfig  # the run's standard training recipe
    cache: ArtifactCache
    run_dir: Path | None = None
    progress: bool = True
    log: Callable[[str], None] = print
    # Opaque key of what produced the defender's data (its images, observed labels, the dataset config and
    # the seed): a defense may add it to its own cache keys. Nothing about the attack (its name, target,
    # parameters) enters it — the attack is the oracle's (DESIGN.md, the defender/oracle wall).
    cache_key: str = ""
    # set by the experiment layer: model -> {"clean_acc", "asr"} on the *test* sets, for per-epoch logs only;
    # a defense may record what it returns but must not decide anything from it
    epoch_eval: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class DefenseResult:
    """``model``: the defended classifier. ``scores`` (N,): per-sample suspicion, higher = more likely
    poisoned. ``flagged`` (N,) bool: the defense's own poisoned/clean decision. ``relabels`` (N,):
    new label per sample, −1 where not relabelled. ``kept`` (N,) bool: for defenses that retrain on a
    filtered set (GSSD's D̂_C), the samples the final model was trained on under their observed labels;
    metrics count the poisons left in it and the samples neither kept nor flagged (uncertain).
    ``extras``: defense-specific facts (JSON-able).
    Tensors the experiment layer should plot against the ground truth go to files in ``ctx.run_dir``
    (``gssd_scores.safetensors``, ``pgrl_state.safetensors``, through ``bdseal.io``), read by ``bdseal.experiment.figures``. ``relabel_history``:
    for iterative relabelling defenses (VIBE's E-steps), ``(step, (N,) labels)`` after each round, −1 where
    a sample got none; the experiment layer scores it against the oracle (``metrics.relabel_history``)."""

    model: nn.Module
    scores: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    relabels: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    relabel_history: list[tuple[int, torch.Tensor]] | None = None


DefenseFn = Callable[[DefenderView, dict[str, Any], RunContext], DefenseResult]
OptionsCheck = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    fn: DefenseFn
    needs_clean: bool = False
    post_hoc: bool = False
    check: OptionsCheck | None = None  # config-only check of the options, run before any work
    control_for: tuple[str, ...] = ()  # defenses whose training recipe this one runs with the defense removed

    def check_options(self, cfg: Mapping[str, Any]) -> None:
        """Run the defense's registered option check on its config (``name`` dropped); no-op without one."""
        if self.check is not None:
            self.check({k: v for k, v in cfg.items() if k != "name"})


_DEFENSES: dict[str, DefenseSpec] = {}


def register_defense(name: str, *, needs_clean: bool = False, post_hoc: bool = False,
                     check: OptionsCheck | None = None,
                     control_for: tuple[str, ...] = ()) -> Callable[[DefenseFn], DefenseFn]:
    """Register ``defend(view, cfg, ctx) -> DefenseResult`` under ``name`` with its threat model. ``check(options)``,
    when given, raises :class:`bdseal.errors.ConfigError` for options that cannot work; it runs with the other
    config checks, before the data is loaded or any model trained. ``control_for`` names the defenses this one
    is the no-defense control of (same recipe, nothing filtered): where it does not learn an attack, their
    ASR on that attack is no evidence of removal (``bdseal report`` says so)."""

    def deco(fn: DefenseFn) -> DefenseFn:
        if name in _DEFENSES and _DEFENSES[name].fn is not fn:
            raise ValueError(f"defense {name!r} registered twice")
        _DEFENSES[name] = DefenseSpec(name, fn, needs_clean, post_hoc, check, tuple(control_for))
        return fn

    return deco


def _load_all() -> dict[str, str]:
    return import_plugins("bdseal.defenses")


def get_defense(name: str) -> DefenseSpec:
    errors = _load_all()
    if name not in _DEFENSES:
        raise ConfigError(unknown_name_message("defense", name, sorted(_DEFENSES), errors))
    return _DEFENSES[name]


def list_defenses() -> list[str]:
    _load_all()
    return sorted(_DEFENSES)
