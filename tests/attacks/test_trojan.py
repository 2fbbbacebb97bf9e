import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.triggers.trojan import apple_mask, optimise_trigger, select_neurons
from bdseal.data.sources import load_synthetic
from tests.attacks._fast import CTX, E2E, TINY
from tests.helpers import run_cell

FIT = {**TINY, "opt_steps": 30}


@pytest.fixture(scope="module")
def data():
    return load_synthetic(num_classes=4, n_train=40, n_test=10, image_size=16)


@pytest.fixture(scope="module")
def poisoned(data):
    return build_and_poison(data.train, data.test, "trojan", seed=0, rate=0.1, target=1, ctx=CTX, **FIT)


def test_apple_mask_shape_and_placement():
    m = apple_mask(14, 12)
    assert m.shape == (14, 12) and 60 <= int(m.sum()) <= 140  # a filled logo, not the full box (168)
    assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # fills its box
    atk = build_attack("trojan")
    full = atk.mask((3, 32, 32))[0]
    rows, cols = torch.nonzero(full, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 29, 17, 28)  # BackdoorBench's apple box
    assert torch.equal(full[16:30, 17:29], m) and full.sum() == m.sum()
    big = atk.mask((3, 64, 64))[0]
    assert torch.equal(big[32:60, 34:58], m.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_neurons_with_largest_outgoing_weights():
    head = torch.nn.Linear(5, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.1, -3.0, 0.0, 0.2, 1.0], [0.1, 0.5, 0.0, 0.2, -1.5], [0.0, 0.0, 0.1, 0.1, 0.0]]))
    assert select_neurons(head, 2).tolist() == [1, 4]


def test_trigger_added_with_clipping_inside_mask(poisoned, data):
    ps = poisoned
    p = ps.oracle.is_poison
    assert int(p.sum()) == 16 and (ps.train.y[p] == 1).all() and (ps.oracle.true_labels[p] != 1).all()
    assert torch.equal(ps.train.x[~p], data.train.x[~p])
    outside = build_attack("trojan", **FIT).mask((3, 16, 16))[0] == 0
    assert torch.equal(ps.train.x[p][:, :, outside], data.train.x[p][:, :, outside])
    gain = ps.train.x[p][:, :, ~outside].long() - data.train.x[p][:, :, ~outside].long()
    assert (gain >= 0).all() and gain.float().mean() > 20  # additive: pixels only brighten (clipped at 255)
    assert len(ps.test_triggered) == 30 and (ps.test_triggered.y == 1).all()


class _Probe(torch.nn.Module):
    """features = global max of a fixed 3x3 conv: unit j responds to colour channel j."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for j in range(3):
                self.conv.weight[j, j] = 1.0  # up to 9 on a saturated channel

    def features(self, x):
        return self.conv(x).amax(dim=(2, 3))


class _MeanProbe(torch.nn.Module):
    """features = 100 × per-channel mean: every pixel of channel j pulls unit j alike."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def features(self, x):
        return 100 * x.mean(dim=(2, 3)) + self.dummy


def test_signed_steps_on_blank_input_drive_the_selected_neurons():
    """BackdoorBench's recipe: start at the white mask, signed steps of 0.1 kept within 0.3 of it: the
    trigger is m·x with pixels in [0.7, 1] inside the mask, and the selected units move toward the goal."""
    mask = build_attack("trojan").mask((3, 32, 32))
    probe = _MeanProbe()
    neurons = torch.tensor([0, 2])
    trig = optimise_trigger(probe, mask, neurons, 3, value=6.0, steps=20, alpha=0.1, eps=0.3)
    inside = mask[0] > 0
    assert (trig[:, ~inside] == 0).all()
    assert trig[:, inside].min() >= 0.7 - 1e-6 and trig[:, inside].max() <= 1.0
    assert ((trig[:, inside] * 10).round() - trig[:, inside] * 10).abs().max() < 1e-4  # multiples of the 0.1 step
    # channel 1 is not selected: no gradient, it stays white; channels 0 and 2 fall to the ε bound 0.7 (f_j ≈ 10.5·x > 6)
    assert torch.allclose(trig[1, inside], torch.ones(int(inside.sum())))
    assert torch.allclose(trig[[0, 2]][:, inside], torch.full((2, int(inside.sum())), 0.7), atol=1e-6)
    x = torch.rand(2, 3, 32, 32)
    atk = build_attack("trojan")
    atk.trigger = trig
    assert torch.allclose(atk.apply(x, phase="test"), (x + trig).clamp(0, 1))  # additive, clipped


def test_determinism_by_seed(poisoned, data):
    again = build_and_poison(data.train, data.test, "trojan", seed=0, rate=0.1, target=1, ctx=CTX, **FIT)
    assert torch.equal(again.train.x, poisoned.train.x) and torch.equal(again.test_triggered.x, poisoned.test_triggered.x)


def test_bad_options():
    with pytest.raises(AttackConfigError, match="does not fit"):
        build_attack("trojan").check_image((3, 6, 6))
    with pytest.raises(AttackConfigError, match="does not fit"):
        build_attack("trojan", box=[20, 17, 14, 12]).check_image((3, 32, 32))
    with pytest.raises(AttackConfigError, match="box"):
        build_attack("trojan", box=[16, 17, 3, 12])
    with pytest.raises(RuntimeError, match="fit"):
        build_attack("trojan").apply(torch.zeros(1, 3, 32, 32), phase="test")


def test_end_to_end_backdoor_is_learned(tmp_path):
    m, _ = run_cell(tmp_path, ["attack=trojan", *E2E, "attack.params.opt_steps=30", "attack.rate=0.2"])
    assert m["clean_acc"] > 0.6 and m["asr"] > 0.8
