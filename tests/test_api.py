"""The Python API (docs/api.md) on a user-defined nn.Module and user tensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bdseal
from bdseal.attacks import Oracle
from bdseal.data import load_dataset
from bdseal.models.wrap import ModelInterfaceError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "api_example.py"


def _example():
    spec = importlib.util.spec_from_file_location("bdseal_api_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    d = load_dataset("digits").train
    return d.x[:400].permute(0, 2, 3, 1).numpy(), d.y[:400].numpy()  # NHWC uint8 arrays, as a user holds them


def test_documented_example_runs_end_to_end_on_a_user_module() -> None:
    """poison -> train -> defend with ft, nad, pgbd (post-hoc) and pgrl (training) -> evaluate."""
    results = _example().main(fast=True)
    assert set(results) == {"none", "ft", "nad", "pgbd", "pgrl"}
    base = results["none"]
    assert base["asr"] >= 0.9 and base["clean_acc"] >= 0.5  # the user's net did learn the backdoor
    for name, m in results.items():
        assert 0.0 <= m["clean_acc"] <= 1.0 and 0.0 <= m["asr"] <= 1.0
        assert m["asr"] + m["ra"] <= 1.0 + 1e-6, name  # both counted on the same triggered images
    assert set(results["pgrl"]["detection"]) >= {"tpr", "fpr", "auroc"}


def test_poison_accepts_arrays_and_keeps_the_defender_pool_clean(digits_arrays) -> None:
    x, y = digits_arrays
    ps = bdseal.poison(x, y, attack="badnets", rate=0.1, target=0, seed=0, test_fraction=0.25, holdout=0.1)
    n = len(ps.train) + len(ps.clean_pool) + len(ps.test_clean)
    assert n == len(x)
    assert int(ps.oracle.is_poison.sum()) == round(0.1 * len(ps.train))
    assert (ps.train.y[ps.oracle.is_poison] == 0).all()
    assert (ps.test_triggered.y == 0).all() and (ps.test_triggered_true != 0).all()
    # the pool holds clean originals of the user's images: each is byte-identical to an input image
    flat_in = {bytes(a) for a in torch.from_numpy(x).permute(0, 3, 1, 2).reshape(len(x), -1).numpy()}
    assert all(bytes(a) in flat_in for a in ps.clean_pool.x.reshape(len(ps.clean_pool), -1).numpy())
    again = bdseal.poison(x, y, attack="badnets", rate=0.1, target=0, seed=0, test_fraction=0.25, holdout=0.1)
    assert torch.equal(again.train.x, ps.train.x) and torch.equal(again.plan.poison_idx, ps.plan.poison_idx)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def test_defend_never_sees_the_oracle_and_leaves_the_user_model_alone(digits_arrays) -> None:
    x, y = digits_arrays
    ps = bdseal.poison(x, y, rate=0.1, seed=0)
    torch.manual_seed(0)
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opts = {"train": {"epochs": 1, "augment": "none"}}
    res = bdseal.defend(ps, "ft", net, device="cpu", **opts)
    assert type(res.model) is _Net and res.model is not net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())
    g = torch.Generator().manual_seed(1)
    n, k = len(ps.train), ps.train.num_classes
    ps.oracle = Oracle(ps.oracle.is_poison[torch.randperm(n, generator=g)], torch.rand(n, generator=g) < 0.5,
                       torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (k,), generator=g), {"name": "x"})
    res2 = bdseal.defend(ps, "ft", net, device="cpu", **opts)
    assert all(torch.equal(v, res2.model.state_dict()[k2]) for k2, v in res.model.state_dict().items())


def test_defender_data_hides_the_target_unless_granted(digits_arrays) -> None:
    x, y = digits_arrays
    ps = bdseal.poison(x, y, rate=0.1, target=3, seed=0)
    assert ps.defender_data().known_target is None
    assert ps.defender_data(target_known=True).known_target == 3
    assert not hasattr(ps.defender_data(), "oracle")


def test_defend_rejects_a_model_with_the_wrong_number_of_classes(digits_arrays) -> None:
    x, y = digits_arrays
    ps = bdseal.poison(x, y, rate=0.1, seed=0)
    bad = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))
    with pytest.raises(ModelInterfaceError, match="10 classes"):
        bdseal.defend(ps, "ft", bad, device="cpu")


def test_evaluate_counts_ra_on_the_triggered_images(digits_arrays) -> None:
    x, y = digits_arrays
    ps = bdseal.poison(x, y, rate=0.1, seed=0)

    class Oracle_(nn.Module):  # predicts the true class of the triggered images, whatever the input
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, xb: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(xb), 10).index_fill_(1, torch.tensor([5]), 1.0) + self.w

    m = bdseal.evaluate(Oracle_(), ps, device="cpu")
    expected_ra = float((ps.test_triggered_true == 5).float().mean())
    assert m["ra"] == pytest.approx(expected_ra) and m["asr"] == 0.0


def test_defend_rejects_a_misspelt_option_before_any_work(digits_arrays) -> None:
    x, y = digits_arrays
    ps = bdseal.poison(x, y, rate=0.1, seed=0)
    with pytest.raises(Exception, match="lamda"):
        bdseal.defend(ps, "pgbd", _Net(), lamda=1.0)


def test_defend_rejects_a_bad_option_value_before_any_work(digits_arrays, monkeypatch) -> None:
    from bdseal.defenses.pgbd import defense as pgbd_defense
    from bdseal.errors import ConfigError

    def no_neural_cleanse(*a, **k):
        raise AssertionError("Neural Cleanse ran before the options were checked")

    monkeypatch.setattr(pgbd_defense, "run_neural_cleanse", no_neural_cleanse)
    x, y = digits_arrays
    ps = bdseal.poison(x, y, rate=0.1, seed=0)
    with pytest.raises(ConfigError, match="defense.refresh must be one of"):
        bdseal.defend(ps, "pgbd", _Net(), refresh="bogus")
