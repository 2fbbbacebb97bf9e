"""bench-speed at a tiny scale: both measurements run and report consistent numbers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bdseal.cli import main
from bdseal.experiment import speed

TINY_CELL = ["dataset=synthetic", "dataset.train_per_class=10", "+dataset.options.n_train=10", "+dataset.options.n_test=4", "+dataset.options.num_classes=3",
             "+dataset.options.image_size=16", "+model.params.widths=[8,16,16]", "train.epochs=1", "train.batch_size=16",
             "attack=badnets", "attack.rate=0.2"]


def test_loop_overhead_tiny():
    r = speed.loop_overhead(batch_size=8, n=16, image_size=16, epochs=1, repeats=1, params={"widths": [8, 16, 16]})
    assert r["steps"] == 2 and len(r["fit_s"]) == len(r["bare_s"]) == 1
    assert r["fit_images_per_s"] == pytest.approx(16 / r["fit_s"][0])
    assert r["overhead"] == pytest.approx(r["bare_images_per_s"] / r["fit_images_per_s"]) and r["overhead"] > 0
    assert r["overhead_median"] == pytest.approx(r["fit_s"][0] / r["bare_s"][0])  # one repeat: median = the time
    with pytest.raises(ValueError, match="no full batch"):
        speed.loop_overhead(batch_size=64, n=32, epochs=1)


def test_loop_overhead_min_steps_and_paired_ratio():
    r = speed.loop_overhead(batch_size=8, n=16, image_size=16, epochs=1, repeats=2, params={"widths": [8, 16, 16]},
                            min_steps=5)
    assert r["steps"] == 6 and r["timer"] == "perf_counter"  # epochs raised to 3 (2 steps each) for >= 5 steps
    ratios = sorted(f / b for f, b in zip(r["fit_s"], r["bare_s"]))
    assert r["overhead_paired"] == pytest.approx(sum(ratios) / 2)  # median of two paired ratios
    assert r["bare_spread"] == pytest.approx((max(r["bare_s"]) - min(r["bare_s"])) / (sum(r["bare_s"]) / 2))


def test_bench_speed_cli_defense_times(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench-speed", "part=defenses", "device=cpu", f"out={out}", "defenses=[none,no_such_defense]", *TINY_CELL]) == 0
    res = json.loads(out.read_text())
    d = res["defense_times"]
    assert d["defenses"]["none"]["x_plain_training"] == pytest.approx(1.0) and d["plain_training_s"] > 0
    assert d["skipped"] == {"no_such_defense": "not registered"}
    assert res["machine"]["device"] == "cpu" and "loop" not in res
    assert json.loads(capsys.readouterr().out)["defense_times"]["cell"][-1] == "attack.rate=0.2"
    with pytest.raises(ValueError, match="unknown loop option"):
        speed.run_from_args(["loop.bogus=1"])


def test_machine_info_records_load_average():
    info = speed.machine_info(torch.device("cpu"))
    assert info["cpu_count"] == os.cpu_count() and info["device"] == "cpu"
    if hasattr(os, "getloadavg"):
        assert info["load_avg_1min"] >= 0
