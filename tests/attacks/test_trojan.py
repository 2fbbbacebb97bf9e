import pytest
import torch

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.triggers.trojan import apple_mask, optimise_trigger, select_neurons
from bdseal.data.sources import load_synthetic
from tests.attacks._fast import CTX, E2E, TINY
from tests.helpers import run_cell

FIT = {**TINY, "opt_steps": 30, "opt_images": 32}


@pytest.fixture(scope="module")
def data():
    return load_synthetic(num_classes=4, n_train=40, n_test=10, image_size=16)


@pytest.fixture(scope="module")
def poisoned(data):
    return build_and_poison(data.train, data.test, "trojan", seed=0, rate=0.1, target=1, ctx=CTX, **FIT)


def test_apple_mask_shape_and_placement():
    m = apple_mask(10)
    assert m.shape == (10, 10) and 30 <= int(m.sum()) <= 80  # a filled logo, not a square
    assert m[:, 9].sum() == 0 and m[9].sum() == 0  # inside its box
    atk = build_attack("trojan")
    full = atk.mask((3, 32, 32))[0]
    assert torch.equal(full[21:31, 21:31], m) and full.sum() == m.sum()  # lower right, 1 px margin
    big = atk.mask((3, 64, 64))[0]
    assert torch.equal(big[42:62, 42:62], m.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_neurons_with_largest_outgoing_weights():
    head = torch.nn.Linear(5, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.1, -3.0, 0.0, 0.2, 1.0], [0.1, 0.5, 0.0, 0.2, -1.5], [0.0, 0.0, 0.1, 0.1, 0.0]]))
    assert select_neurons(head, 2).tolist() == [1, 4]


def test_trigger_stamped_exactly_inside_mask(poisoned, data):
    ps = poisoned
    p = ps.oracle.is_poison
    assert int(p.sum()) == 16 and (ps.train.y[p] == 1).all() and (ps.oracle.true_labels[p] != 1).all()
    assert torch.equal(ps.train.x[~p], data.train.x[~p])
    outside = build_attack("trojan").mask((3, 16, 16))[0] == 0
    assert torch.equal(ps.train.x[p][:, :, outside], data.train.x[p][:, :, outside])
    inside = ps.train.x[p][:, :, ~outside]
    assert (inside == inside[:1]).all()  # same trigger pixels on every poisoned image
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


def test_optimised_trigger_drives_the_selected_neurons_inside_the_mask():
    x = torch.rand(8, 3, 16, 16) * 0.1
    mask = build_attack("trojan").mask((3, 16, 16))
    probe = _Probe()
    trig = optimise_trigger(probe, x, mask, torch.tensor([0, 2]), torch.zeros(3, 16, 16), value=6.0, steps=150, lr=0.1)
    assert trig.min() >= 0 and trig.max() <= 1 and (trig[:, mask[0] == 0] == 0).all()
    f = probe.features(x * (1 - mask) + trig)
    assert (f[:, [0, 2]] - 6.0).abs().max() < 0.5  # driven to the goal value
    assert f[:, [0, 2]].min() > probe.features(x)[:, [0, 2]].max() + 4


def test_determinism_by_seed(poisoned, data):
    again = build_and_poison(data.train, data.test, "trojan", seed=0, rate=0.1, target=1, ctx=CTX, **FIT)
    assert torch.equal(again.train.x, poisoned.train.x) and torch.equal(again.test_triggered.x, poisoned.test_triggered.x)


def test_bad_options():
    with pytest.raises(AttackConfigError, match="does not fit"):
        build_attack("trojan").check_image((3, 8, 8))
    with pytest.raises(AttackConfigError, match="size"):
        build_attack("trojan", size=3)
    with pytest.raises(RuntimeError, match="fit"):
        build_attack("trojan").apply(torch.zeros(1, 3, 32, 32), phase="test")


def test_end_to_end_backdoor_is_learned(tmp_path):
    m, _ = run_cell(tmp_path, ["attack=trojan", *E2E, "attack.params.opt_steps=30", "attack.params.opt_images=32"])
    assert m["clean_acc"] > 0.6 and m["asr"] > 0.8
