"""The fast recipe's pieces (conf/train/fast.yaml): Lookahead, whitened stem, test-time flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bdseal.data import load_dataset
from bdseal.experiment.config import compose_config
from bdseal.models import build_model
from bdseal.train import TrainConfig, fit, predict
from bdseal.train.loop import Lookahead, predict_logits, whiten_first_conv


def test_lookahead_matches_hand_computation() -> None:
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    la = Lookahead(lin, every=2, alpha=0.25)
    with torch.no_grad():
        lin.weight.fill_(1.0)  # step 1: fast moves, no sync
    la.step(1)
    assert torch.equal(lin.weight, torch.ones(1, 2))
    with torch.no_grad():
        lin.weight.fill_(2.0)  # step 2: slow = 0 + 0.25 (2 - 0) = 0.5, fast reset to slow
    la.step(2)
    assert torch.allclose(lin.weight, torch.full((1, 2), 0.5))
    with torch.no_grad():
        lin.weight.fill_(4.5)
    la.finish()  # the model ends on the slow weights
    assert torch.allclose(lin.weight, torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="lookahead_alpha"):
        Lookahead(lin, 2, 0.0)


def test_lookahead_alpha_one_every_step_is_plain_training() -> None:
    s = load_dataset("synthetic")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False)
    models = []
    for extra in ({}, {"lookahead_every": 1, "lookahead_alpha": 1.0}):
        torch.manual_seed(0)
        m = build_model("small_half", s.num_classes, mean=[0.5] * 3, std=[0.25] * 3)
        fit(m, s.train.x[:192], s.train.y[:192], cfg.replace(**extra), seed=0)
        models.append(m)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)


def test_whitened_stem_whitens_patches_and_is_frozen() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, 3, 1, 1, generator=g)  # correlated channels: strong shared component
    x = ((base + 0.1 * torch.rand(200, 3, 12, 12, generator=g)).clamp(0, 1) * 255).to(torch.uint8)
    m = build_model("small_half", 10, mean=[0.5] * 3, std=[0.25] * 3)
    whiten_first_conv(m, x, eps=1e-8)
    conv = next(mod for mod in m.modules() if isinstance(mod, nn.Conv2d))
    assert not conv.weight.requires_grad
    w = conv.weight.detach()
    assert torch.allclose(w[0::2], -w[1::2])  # (+v, -v) pairs
    out = F.conv2d(m.normalize(x.float() / 255), w[0::2])  # the + channels on valid patches
    flat = out.permute(1, 0, 2, 3).reshape(out.shape[1], -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov, torch.eye(len(cov)), atol=0.05)  # whitened: identity covariance


def test_tta_flip_averages_mirror_logits() -> None:
    torch.manual_seed(0)
    m = build_model("small_half", 4, image_size=8).eval()
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    plain, mirror = predict_logits(m, x), predict_logits(m, x.flip(-1))
    assert torch.allclose(predict_logits(m, x, tta_flip=True), (plain + mirror) / 2, atol=1e-5)
    assert not torch.allclose(plain, mirror)


def test_fast_preset_composes_and_trains() -> None:
    cfg = compose_config(["train=fast"])
    tc = TrainConfig.from_dict(dict(cfg.train))
    assert tc.batch_size == 1024 and tc.epochs == 10 and tc.whiten_stem and tc.tta_flip and tc.lookahead_every == 5
    s = load_dataset("synthetic")
    torch.manual_seed(0)
    m = build_model("small_half", s.num_classes, mean=[0.5] * 3, std=[0.25] * 3)
    fit(m, s.train.x, s.train.y, tc.replace(batch_size=64, lr=0.2, epochs=5, progress=False), seed=0)  # 3 epochs: 0.65-1.0 by thread count
    acc = (predict(m, s.test.x, tta_flip=True) == s.test.y).float().mean()
    assert acc > 0.8
