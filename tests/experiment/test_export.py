"""``bdseal poison`` and PoisonedData.save: .npz + manifest that round-trip pixels, labels and indices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import bdseal
from bdseal.cli import main
from bdseal.data import DataError, load_dataset
from bdseal.experiment.config import compose_config
from bdseal.experiment.export import load_poisoned
from bdseal.experiment.run import prepare_cell

OVERRIDES = ["attack=blend", "dataset.train_per_class=20", "dataset.test_per_class=5", "seed=3", "cache=false", "progress=false"]


def test_bdseal_poison_round_trips_the_poisoned_set_of_a_run(tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert main(["poison", *OVERRIDES, f"out={out}"]) == 0
    ref = prepare_cell(compose_config(OVERRIDES))  # what `bdseal run` with the same overrides trains on
    ps = load_poisoned(out)
    assert torch.equal(ps.train.x, ref.poisoned.train.x) and torch.equal(ps.train.y, ref.poisoned.train.y)
    assert torch.equal(ps.plan.poison_idx, ref.poisoned.plan.poison_idx)
    assert torch.equal(ps.plan.cover_idx, ref.poisoned.plan.cover_idx)
    assert torch.equal(ps.oracle.is_poison, ref.poisoned.oracle.is_poison)
    assert torch.equal(ps.oracle.true_labels, ref.poisoned.oracle.true_labels)
    assert torch.equal(ps.oracle.target_map, ref.poisoned.oracle.target_map)
    assert torch.equal(ps.test_triggered.x, ref.poisoned.test_triggered.x)
    assert torch.equal(ps.test_triggered_true, ref.poisoned.test_triggered_true)
    assert torch.equal(ps.clean_pool.x, ref.defender_pool.x)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attack"]["name"] == "blend" and manifest["seed"] == 3 and manifest["bdseal_version"] == bdseal.__version__
    assert manifest["policy"]["rate"] == 0.1 and len(manifest["poison_idx"]) == int(ps.oracle.is_poison.sum())
    # other toolkits: plain arrays, no pickle
    with np.load(out / "poisoned.npz", allow_pickle=False) as z:
        assert z["x_train"].dtype == np.uint8 and z["x_train"].shape[1:] == (3, 32, 32)
        assert np.array_equal(z["y_train"], ref.poisoned.train.y.numpy())
    # dataset=npz reads it back as a training set (observed labels, clean test split)
    splits = load_dataset("npz", root=str(out))
    assert torch.equal(splits.train.x, ref.poisoned.train.x) and torch.equal(splits.test.x, ref.poisoned.test_clean.x)


def test_api_save_and_load_and_tamper_detection(tmp_path: Path) -> None:
    d = load_dataset("digits").train
    ps = bdseal.poison(d.x[:200], d.y[:200], attack="badnets", rate=0.2, target=1, seed=0)
    ps.save(tmp_path / "p")
    back = load_poisoned(tmp_path / "p")
    assert torch.equal(back.train.x, ps.train.x) and torch.equal(back.plan.poison_idx, ps.plan.poison_idx)
    assert torch.equal(back.plan.poison_labels, ps.plan.poison_labels)
    assert back.info["policy"]["target"] == 1 and back.defender_data(target_known=True).known_target == 1
    raw = bytearray((tmp_path / "p" / "poisoned.npz").read_bytes())
    raw[-200] ^= 0xFF
    (tmp_path / "p" / "poisoned.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="does not match the sha256"):
        load_poisoned(tmp_path / "p")


def test_poison_refuses_a_non_empty_out_and_no_attack(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    from bdseal.experiment.export import poison_main
    from bdseal.experiment.run import RunDirError

    with pytest.raises(RunDirError, match="not empty"):
        poison_main(compose_config([*OVERRIDES, f"out={tmp_path / 'x'}"]))
    with pytest.raises(DataError, match="needs an attack"):
        poison_main(compose_config(["attack=none", f"out={tmp_path / 'y'}"]))


def test_npz_dataset_needs_a_root() -> None:
    with pytest.raises(DataError, match="dataset.root"):
        load_dataset("npz")
