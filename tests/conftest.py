"""Shared fixtures: tiny deterministic data and an isolated cache directory for every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10.npz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDSEAL_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # CI: 2 cores; a shared machine may ask for 1


@pytest.fixture
def shared_cifar10() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.skip("../shared/data/cifar10.npz not present")
    return SHARED_CIFAR
