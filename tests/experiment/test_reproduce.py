"""``bdseal reproduce``: a tiny table filled across budget-cut windows gives the uninterrupted numbers."""

from __future__ import annotations

import pytest
import torch

from bdseal.experiment import reproduce as rp
from bdseal.experiment.store import ResultStore
from bdseal.train import TrainConfig, fit
from bdseal.train.loop import BudgetExhausted, window

TABLE = """
name: tiny_table
datasets: [digits]
attacks: [badnets, none]
defenses: [none]
seeds: [0]
overrides: [dataset.train_per_class=12, dataset.test_per_class=6, train.epochs=3, train.batch_size=32, model=small_half]
"""


def _rows(out) -> dict[str, tuple[float, float]]:
    return {f"{r.attack}/{r.defense}": (r.metrics["clean_acc"], r.metrics["asr"]) for r in ResultStore(out / "results.sqlite").rows()}


def test_reproduce_stops_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "tiny_table.yaml"
    table.write_text(TABLE)
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    windows = []
    for _ in range(3):  # a tiny budget: each window trains one epoch of the first cell, then stops
        res = rp.reproduce(str(table), 1e-3, out=str(cut))
        windows.append(res)
    assert windows[0].interrupted and "epoch 1/3" in windows[0].interrupted and not windows[0].ran
    assert windows[0].left == ["digits/badnets/none/s0", "digits/none/none/s0"]
    assert windows[1].interrupted and "epoch 2/3" in windows[1].interrupted
    assert len(windows[2].ran) == 1 and windows[2].interrupted is None  # finished, then no new cell
    assert windows[2].left == ["digits/none/none/s0"]
    last = rp.reproduce(str(table), 1e6, out=str(cut))
    assert len(last.ran) == 1 and last.left == [] and last.interrupted is None
    assert rp.reproduce(str(table), 1e6, out=str(cut)).ran == []  # nothing left to do
    rp.reproduce(str(table), 1e6, out=str(whole))
    assert _rows(cut) == _rows(whole) and len(_rows(cut)) == 2


def test_parse_args_and_default_store():
    assert rp.parse_args(["pgbd", "budget_s=540", "seeds=[0]"]) == ("pgbd_gpu", 540.0, ["seeds=[0]"])
    with pytest.raises(ValueError, match="budget_s"):
        rp.parse_args(["pgbd"])
    with pytest.raises(ValueError, match="paper first"):
        rp.parse_args(["budget_s=5"])
    with pytest.raises(ValueError, match="number"):
        rp.parse_args(["pgbd", "budget_s=ten"])


def test_window_checkpoints_plain_fits_and_resumes_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False, augment="crop_flip")

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))

    ref = model()
    fit(ref, x, y, cfg, seed=1)
    m = model()
    with window(tmp_path, deadline=0.0), pytest.raises(BudgetExhausted, match="epoch 1/3"):
        fit(m, x, y, cfg, seed=1)
    assert len(list(tmp_path.glob("fit-train-*.safetensors"))) == 1
    m = model()  # a new process would start from the same initial weights
    with window(tmp_path, deadline=None):
        fit(m, x, y, cfg, seed=1)
    for a, b in zip(ref.state_dict().values(), m.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(ResultStore, "claim"), reason="jobs=N runs on the store's cell claims")
def test_bench_jobs_runs_every_cell_once(tmp_path, monkeypatch):
    from bdseal.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_table.yaml").write_text(TABLE)
    assert main(["bench", f"bench={tmp_path / 'tiny_table.yaml'}", f"out={tmp_path / 'par'}", "jobs=2"]) == 0
    rows = ResultStore(tmp_path / "par" / "results.sqlite").rows()
    assert sorted(r.attack for r in rows) == ["badnets", "none"]  # each cell once, by one of the two workers


def test_bench_jobs_needs_claims_or_a_positive_count():
    from bdseal.experiment.parallel import run_jobs

    with pytest.raises(ValueError, match="jobs"):
        run_jobs([], 0)
