import pytest
import torch
from torch import nn

from bdseal.attacks import AttackConfigError, AttackContext, build_and_poison, build_attack, make_plan
from bdseal.attacks.triggers.iab import blend
from bdseal.data import load_dataset, stratified_subsample

TINY = {"width": 4, "mask_steps": 40, "steps": 30, "batch_size": 32}


@pytest.fixture(scope="module")
def digits():
    s = load_dataset("digits")
    return stratified_subsample(s.train, 10, seed=0), stratified_subsample(s.test, 4, seed=0)


@pytest.fixture(scope="module")
def fitted(digits):
    train, _ = digits
    atk = build_attack("iab", seed=0, **TINY)
    atk.fit(train, make_plan(train.y, train.num_classes, rate=0.1, cover_rate=0.1), AttackContext(progress=False))
    return atk


def test_mask_density_near_target_and_triggers_are_input_aware(fitted, digits):
    x = digits[1].x.float() / 255
    pattern, mask = fitted.pattern_and_mask(x)
    assert pattern.shape == x.shape and mask.shape == (len(x), 1, 32, 32)
    assert 0.032 / 4 < float(mask.mean()) < 0.032 * 2  # the norm penalty keeps the mask sparse
    half = len(x) // 2
    assert ((pattern[:half] - pattern[half : 2 * half]).abs().mean(dim=(1, 2, 3)) > 1e-3).all()
    assert ((mask[:half] - mask[half : 2 * half]).abs().mean(dim=(1, 2, 3)) > 1e-4).all()
    assert torch.allclose(fitted.apply(x, phase="test"), x + mask * (pattern - x))
    assert isinstance(fitted.classifier, nn.Module)  # jointly-trained classifier kept for later use


def test_cover_samples_are_cross_triggered_and_keep_labels(digits):
    train, test = digits
    ps = build_and_poison(train, test, "iab", rate=0.1, cover_rate=0.1, target=0, seed=1, **{**TINY, "steps": 3, "mask_steps": 3})
    p, c = ps.oracle.is_poison, ps.oracle.is_cover
    assert int(p.sum()) == 10 and int(c.sum()) == 10 and not (p & c).any()
    assert (ps.train.y[p] == 0).all() and torch.equal(ps.train.y[c], train.y[c])
    assert (ps.train.x[c] != train.x[c]).flatten(1).any(dim=1).all()
    assert torch.equal(ps.train.x[~(p | c)], train.x[~(p | c)])


def test_apply_cover_uses_another_images_trigger(fitted, digits):
    train, _ = digits
    idx = torch.arange(6)
    x = train.x[idx].float() / 255
    partner = fitted._partner[idx]
    assert (partner != idx).all()
    pattern, mask = fitted.pattern_and_mask(train.x[partner].float() / 255)
    assert torch.allclose(fitted.apply_cover(x, index=idx), blend(x, pattern, mask))
    assert not torch.allclose(fitted.apply_cover(x, index=idx), fitted.apply(x, phase="train"))


def test_all_to_all_labels_and_determinism(digits):
    train, test = digits
    kw = dict(rate=0.1, mode="all_to_all", seed=2, **{**TINY, "steps": 2, "mask_steps": 2})
    ps = build_and_poison(train, test, "iab", **kw)
    p = ps.oracle.is_poison
    assert torch.equal(ps.train.y[p], (train.y[p] + 1) % 10)
    again = build_and_poison(train, test, "iab", **kw)
    assert torch.equal(again.train.x, ps.train.x) and torch.equal(again.test_triggered.x, ps.test_triggered.x)


def test_bad_options_are_clear_errors():
    for bad in ({"mask_density": 0}, {"p_attack": 0.6, "p_cross": 0.5}, {"steps": 0}, {"lr_G": -1}):
        with pytest.raises(AttackConfigError):
            build_attack("iab", **bad)
    with pytest.raises(RuntimeError, match="fit"):
        build_attack("iab").apply(torch.rand(1, 3, 32, 32), phase="test")

