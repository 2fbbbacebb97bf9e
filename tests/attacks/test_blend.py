import pytest
import torch
from PIL import Image

from bdseal.attacks import AttackConfigError, build_and_poison, build_attack
from bdseal.attacks.patterns import get_pattern, kitty
from bdseal.data.dataset import ImageDataset


def _data(n=200, k=4, size=32, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(x, torch.arange(k).repeat(n // k))


def test_blend_formula_is_exact_for_train_and_test_alpha():
    atk = build_attack("blend", alpha=0.2, test_alpha=0.35)
    x = torch.rand(3, 3, 32, 32)
    p = kitty(32, 32)
    assert torch.allclose(atk.apply(x, phase="train"), 0.8 * x + 0.2 * p, atol=1e-6)
    assert torch.allclose(atk.apply(x, phase="test"), 0.65 * x + 0.35 * p, atol=1e-6)
    default = build_attack("blend", alpha=0.3)
    assert torch.equal(default.apply(x, phase="test"), default.apply(x, phase="train"))


@pytest.mark.parametrize("size,c", [(32, 3), (64, 3), (224, 3), (32, 1)])
def test_builtin_pattern_any_size_and_channels(size, c):
    p = get_pattern("kitty", c, size, size)
    assert p.shape == (c, size, size) and 0 <= p.min() and p.max() <= 1 and p.std() > 0.1
    out = build_attack("blend").apply(torch.zeros(2, c, size, size), phase="train")
    assert torch.allclose(out, 0.2 * p.expand(2, -1, -1, -1), atol=1e-6)


def test_noise_pattern_follows_the_seed():
    a, b, c = (build_attack("blend", seed=s, pattern="noise") for s in (0, 0, 1))
    x = torch.zeros(1, 3, 32, 32)
    assert torch.equal(a.apply(x, phase="train"), b.apply(x, phase="train"))
    assert not torch.equal(a.apply(x, phase="train"), c.apply(x, phase="train"))


def test_user_image_pattern_is_loaded_and_resized(tmp_path):
    img = torch.zeros(16, 16, 3, dtype=torch.uint8)
    img[:, :8, 0] = 255  # left half red, right half black
    path = tmp_path / "trigger.png"
    Image.fromarray(img.numpy()).save(path)
    atk = build_attack("blend", alpha=1.0, pattern=str(path))
    out = atk.apply(torch.rand(1, 3, 64, 64), phase="train")[0]
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out[0, :, :28], torch.ones(64, 28)) and torch.allclose(out[0, :, 36:], torch.zeros(64, 28))
    assert out[1:].abs().max() < 1e-6
    grey = atk.apply(torch.rand(1, 1, 32, 32), phase="train")
    assert grey.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("kw,msg", [({"alpha": 1.5}, "alpha must be in"), ({"alpha": -0.1}, "alpha must be in"),
                                    ({"test_alpha": 2}, "test_alpha must be in"), ({"pattern": "/no/such.png"}, "neither a built-in")])
def test_bad_options_are_clear_errors(kw, msg):
    with pytest.raises(AttackConfigError, match=msg):
        build_attack("blend", **kw)


def test_poisoning_counts_labels_and_determinism():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "blend", rate=0.1, target=2, seed=3)
    p = ps.oracle.is_poison
    assert int(p.sum()) == 20 and (ps.train.y[p] == 2).all() and (train.y[p] != 2).all()
    assert torch.equal(ps.train.x[~p], train.x[~p])
    expect = (0.8 * train.x[p].float() / 255 + 0.2 * kitty(32, 32)).mul(255).round().to(torch.uint8)
    assert torch.equal(ps.train.x[p], expect)
    assert (ps.test_triggered.y == 2).all() and (ps.test_triggered_true != 2).all()
    again = build_and_poison(train, test, "blend", rate=0.1, target=2, seed=3)
    assert torch.equal(again.train.x, ps.train.x) and torch.equal(again.test_triggered.x, ps.test_triggered.x)
    other = build_and_poison(train, test, "blend", rate=0.1, target=2, seed=4)
    assert not torch.equal(other.oracle.is_poison, p)


def test_all_to_all_maps_labels():
    train, test = _data(), _data(40, seed=1)
    ps = build_and_poison(train, test, "blend", rate=0.1, mode="all_to_all", seed=0)
    p = ps.oracle.is_poison
    assert torch.equal(ps.train.y[p], (train.y[p] + 1) % 4)
    assert torch.equal(ps.test_triggered.y, (ps.test_triggered_true + 1) % 4)


def test_runs_made_with_the_cartoon_are_labelled():
    """metrics['attack_pattern'] names the blend image; report rows made with the built-in cartoon say so."""
    from bdseal.attacks.patterns import pattern_label
    from bdseal.experiment.report import _labels
    from bdseal.experiment.store import Row

    assert pattern_label({"name": "blend", "params": {"pattern": "kitty"}}) == "cartoon"
    assert pattern_label({"name": "adap_blend", "params": {"pattern": "/data/hello_kitty.png"}}) == "image:hello_kitty.png"
    assert pattern_label({"name": "badnets", "params": {"pattern": "white"}}) is None

    def row(attack, pattern):
        cfg = {"attack": {"name": attack, "params": {"pattern": pattern}}, "dataset": {"name": "cifar10"}}
        return Row(attack + pattern, "cifar10", "small_half", attack, "none", 0, cfg, {"clean_acc": 0.9, "asr": 0.9})

    assert _labels([row("blend", "kitty"), row("adap_blend", "/x/hk.png")]) == ["blend (cartoon)", "adap_blend"]
