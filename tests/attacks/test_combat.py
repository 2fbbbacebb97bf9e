import pytest
import torch

from bdseal.attacks import AttackConfigError, AttackContext, build_and_poison, build_attack, make_plan
from bdseal.attacks.nets import dct_matrix
from bdseal.data import load_dataset, stratified_subsample

TINY = {"width": 4, "steps": 4, "batch_size": 32, "clean_epochs": 1}


@pytest.fixture(scope="module")
def digits():
    s = load_dataset("digits")
    return stratified_subsample(s.train, 8, seed=0), stratified_subsample(s.test, 4, seed=0)


@pytest.fixture(scope="module")
def fitted(digits):
    train, _ = digits
    atk = build_attack("combat", seed=0, blur_sigma=0.0, **TINY)
    plan = make_plan(train.y, train.num_classes, rate=0.5, mode="clean_label", rate_of="target_class")
    atk.fit(train, plan, AttackContext(progress=False))
    return atk


def test_noise_is_bounded_by_strength_and_low_passed(fitted, digits):
    x = digits[1].x.float() / 255
    n = fitted.noise(x)
    assert n.abs().max() <= 1 + 1e-6 and n.abs().mean() > 1e-3
    assert (fitted.apply(x, phase="test") - x).abs().max() <= 0.08 / 2 + 1e-6  # strength on the [-1, 1] scale
    d = dct_matrix(32)
    coef = d @ n @ d.T
    k = int(32 * 0.65)
    high = coef.pow(2).sum() - coef[..., :k, :k].pow(2).sum()
    assert high / coef.pow(2).sum() < 0.01  # clamping aside, no energy above the cut-off


def test_clean_label_poisoning_keeps_labels_and_is_deterministic(digits):
    train, test = digits
    ps = build_and_poison(train, test, "combat", rate=0.5, target=3, seed=1, **TINY)
    p = ps.oracle.is_poison
    n_target = int((train.y == 3).sum())
    assert int(p.sum()) == round(0.5 * n_target) and (train.y[p] == 3).all()
    assert torch.equal(ps.train.y, train.y)  # clean-label: no label changes
    assert (ps.train.x[p] != train.x[p]).flatten(1).any(dim=1).all()
    assert (ps.test_triggered.y == 3).all() and (ps.test_triggered_true != 3).all()
    again = build_and_poison(train, test, "combat", rate=0.5, target=3, seed=1, **TINY)
    assert torch.equal(again.train.x, ps.train.x) and torch.equal(again.test_triggered.x, ps.test_triggered.x)


def test_bad_options_are_clear_errors(digits):
    for bad in ({"strength": 0}, {"low_pass_ratio": 1.5}, {"blur_kernel": 4}, {"steps": 0}, {"train_fraction": 2.0}):
        with pytest.raises(AttackConfigError):
            build_attack("combat", **bad)
    train, test = digits
    with pytest.raises(AttackConfigError, match="single target"):
        build_and_poison(train, test, "combat", rate=0.1, mode="all_to_all", rate_of="dataset", **TINY)
    with pytest.raises(RuntimeError, match="fit"):
        build_attack("combat").apply(torch.rand(1, 3, 32, 32), phase="test")

