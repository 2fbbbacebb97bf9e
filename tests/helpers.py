"""Test helpers shared across test modules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bdseal.attacks import Oracle, PoisonedSet
from bdseal.experiment import run as run_mod
from bdseal.experiment.config import compose_config
from bdseal.io import load_model_state


def scrambled(ps: PoisonedSet, seed: int = 123) -> PoisonedSet:
    """The same defender-visible data with a nonsense oracle."""
    g = torch.Generator().manual_seed(seed)
    n, k = len(ps.train), ps.train.num_classes
    fake = Oracle(
        is_poison=ps.oracle.is_poison[torch.randperm(n, generator=g)],
        is_cover=torch.rand(n, generator=g) < 0.5,
        true_labels=torch.randint(0, k, (n,), generator=g),
        target_map=torch.randint(0, k, (k,), generator=g),
        attack={"name": "scrambled"},
    )
    return PoisonedSet(ps.train, fake, ps.test_clean, ps.test_triggered, ps.test_triggered_true, ps.plan)


def run_cell(tmp_path: Path, overrides: Sequence[str], name: str = "run", scramble: bool = False, monkeypatch=None) -> tuple[dict, dict]:
    """Run one cell; with ``scramble`` the oracle handed around the pipeline is nonsense.
    Returns (metrics, final model state dict)."""
    cfg = compose_config([*overrides, f"out={tmp_path / name}", "progress=false", "cache=false"])
    if scramble:
        real = run_mod.poison
        monkeypatch.setattr(run_mod, "poison", lambda *a, **k: scrambled(real(*a, **k)))
    metrics = run_mod.run_experiment(cfg)
    if scramble:
        monkeypatch.setattr(run_mod, "poison", real)
    return metrics, load_model_state(tmp_path / name)[0]


def assert_oracle_blind(tmp_path: Path, overrides: Sequence[str], monkeypatch, extra_keys: Sequence[str] = ()) -> None:
    """A defense's output (final weights, and ``extra_keys`` of metrics['extras']) must not change when
    the oracle is scrambled."""
    m1, w1 = run_cell(tmp_path, overrides, "real")
    m2, w2 = run_cell(tmp_path, overrides, "scrambled", scramble=True, monkeypatch=monkeypatch)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), f"weights {k} changed when the oracle was scrambled"
    for key in extra_keys:
        assert m1["extras"][key] == m2["extras"][key]
