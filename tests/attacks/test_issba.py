import pytest
import torch

from bdseal.attacks import AttackConfigError, AttackContext, build_and_poison, build_attack, make_plan
from bdseal.cache import ArtifactCache
from bdseal.data import load_dataset, stratified_subsample

TINY = {"width": 4, "steps": 100, "batch_size": 16, "secret_mode": "fixed", "max_residual": 0.1, "lr": 1e-3}  # CPU variant


@pytest.fixture(scope="module")
def digits():
    s = load_dataset("digits")
    return stratified_subsample(s.train, 10, seed=0), stratified_subsample(s.test, 4, seed=0)


@pytest.fixture(scope="module")
def fitted(digits):
    train, _ = digits
    atk = build_attack("issba", seed=0, **TINY)
    atk.fit(train, make_plan(train.y, train.num_classes, rate=0.1), AttackContext(progress=False))
    return atk


def test_residual_is_sample_specific_invisible_and_decodable(fitted, digits):
    x = digits[1].x.float() / 255
    r = fitted.residual(x)
    assert r.abs().max() <= 0.1 + 1e-6  # max_residual bound
    half = len(r) // 2
    pair_diff = (r[:half] - r[half : 2 * half]).abs().mean(dim=(1, 2, 3))
    assert (pair_diff > 0.01 * r.abs().mean()).all()  # the encoder is image-conditioned: no two alike
    xp = (fitted.apply(x, phase="test") * 255).round() / 255  # stored as uint8
    delta = xp - x
    assert ((delta[:half] - delta[half : 2 * half]).abs().mean(dim=(1, 2, 3)) > 0.1 * delta.abs().mean()).all()
    psnr = 10 * torch.log10(1 / (xp - x).pow(2).mean(dim=(1, 2, 3)))
    assert psnr.mean() > 25
    acc_p, acc_c = fitted.bit_accuracy(xp).mean(), fitted.bit_accuracy(x).mean()
    assert acc_p > 0.75 and acc_c < 0.5  # the decoder finds the secret in poisoned images only


def test_poisoned_set_counts_labels_and_determinism(digits):
    train, test = digits
    fast = {**TINY, "steps": 10}
    ps = build_and_poison(train, test, "issba", rate=0.1, target=2, seed=3, **fast)
    p = ps.oracle.is_poison
    assert int(p.sum()) == round(0.1 * len(train)) and (ps.train.y[p] == 2).all()
    assert (ps.oracle.true_labels[p] != 2).all() and torch.equal(ps.train.x[~p], train.x[~p])
    assert (ps.train.x[p] != train.x[p]).flatten(1).any(dim=1).all()
    assert (ps.test_triggered.y == 2).all() and (ps.test_triggered_true != 2).all()
    again = build_and_poison(train, test, "issba", rate=0.1, target=2, seed=3, **fast)
    assert torch.equal(again.train.x, ps.train.x) and torch.equal(again.test_triggered.x, ps.test_triggered.x)
    other = build_and_poison(train, test, "issba", rate=0.1, target=2, seed=4, **fast)
    assert not torch.equal(other.train.x, ps.train.x)


def test_fitted_weights_are_cached(digits, tmp_path):
    train, _ = digits
    plan = make_plan(train.y, train.num_classes, rate=0.1)
    ctx = AttackContext(seed=0, cache=ArtifactCache(tmp_path), progress=False)
    a, b = build_attack("issba", **{**TINY, "steps": 5}), build_attack("issba", **{**TINY, "steps": 5})
    a.fit(train, plan, ctx)
    assert len(list((tmp_path / "issba_stegastamp").glob("*.safetensors"))) == 1
    b.fit(train, plan, ctx)
    for k, v in a.encoder.state_dict().items():
        assert torch.equal(v, b.encoder.state_dict()[k])
    build_attack("issba", **{**TINY, "steps": 6}).fit(train, plan, ctx)  # other params, other entry
    assert len(list((tmp_path / "issba_stegastamp").glob("*.safetensors"))) == 2


def test_bad_options_are_clear_errors():
    for bad in ({"bits": 0}, {"steps": 0}, {"max_residual": 2.0}, {"lr": 0}, {"secret_mode": "lpips"}):
        with pytest.raises(AttackConfigError):
            build_attack("issba", **bad)
    with pytest.raises(AttackConfigError, match="bad parameters"):
        build_attack("issba", lpips=True)
    with pytest.raises(RuntimeError, match="fit"):
        build_attack("issba").apply(torch.rand(1, 3, 32, 32), phase="test")

