"""SSL backbones: one SimCLR/BYOL step reduces the loss, feature shapes, the cache, foundation loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdseal.cache import ArtifactCache
from bdseal.data.dataset import ImageDataset
from bdseal.defenses.base import DefenderView, RunContext
from bdseal.models import build_model
from bdseal.ssl import backbone_features, extract_features, load_backbone, load_foundation, resolve_cfg
from bdseal.ssl.byol import BYOL
from bdseal.ssl.loop import SSLTrainConfig, make_views, pretrain
from bdseal.ssl.probe import linear_probe, split_argv
from bdseal.ssl.simclr import SimCLR, nt_xent
from bdseal.train.loop import TrainConfig

TINY = {"arch": "small_half", "arch_params": {"widths": [8, 16, 16]}, "epochs": 1, "batch_size": 16}


def _view(n: int = 32, seed: int = 0) -> DefenderView:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return DefenderView(train=ImageDataset(x, torch.arange(n) % 4))


def _ctx(tmp_path: Path, seed: int = 0) -> RunContext:
    return RunContext(device=torch.device("cpu"), seed=seed, build_model=lambda num_classes=None: None,
                      train_cfg=TrainConfig(epochs=1, batch_size=16, progress=False), cache=ArtifactCache(tmp_path),
                      progress=False, log=lambda m: None)


def test_nt_xent_prefers_matching_pairs() -> None:
    z = torch.randn(8, 4)
    assert nt_xent(z, z, 0.5) < nt_xent(z, torch.randn(8, 4), 0.5)


@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_one_step_reduces_loss_on_fixed_views(kind: str) -> None:
    torch.manual_seed(0)
    enc = build_model("small_half", 4, in_channels=3, image_size=16, widths=[8, 16, 16])
    method = SimCLR(enc, 16, 32, 8) if kind == "simclr" else BYOL(enc, 16, 32, 8, 32, ema_base=0.99)
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    v1, v2 = make_views(x, SSLTrainConfig(), torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    method.train()
    before = method.loss(v1, v2)
    for step in range(3):
        opt.zero_grad()
        method.loss(v1, v2).backward()
        opt.step()
        method.after_step(step, 3)
    assert method.loss(v1, v2) < before


def test_byol_target_moves_by_ema() -> None:
    enc = build_model("small_half", 4, in_channels=3, image_size=16, widths=[8, 16, 16])
    m = BYOL(enc, 16, 32, 8, 32, ema_base=0.9)
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in m.target_encoder.parameters()]
    m.after_step(0, 10)  # momentum 0.9 at step 0
    for p0, pt, po in zip(t0, m.target_encoder.parameters(), m.encoder.parameters()):
        assert torch.allclose(pt, 0.9 * p0 + 0.1 * po, atol=1e-6)
    assert m.momentum(10, 10) == pytest.approx(1.0)


def test_backbone_features_shape_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    view, ctx = _view(), _ctx(tmp_path)
    cfg = {"kind": "simclr", **TINY}
    f1 = backbone_features(view, cfg, ctx)
    assert f1.shape == (32, 16) and f1.dtype == torch.float32 and f1.device.type == "cpu"
    import bdseal.ssl.features as F

    def boom(*a, **k):
        raise AssertionError("pre-training ran again despite the cache")

    monkeypatch.setattr(F, "pretrain", boom)
    assert torch.equal(backbone_features(view, cfg, ctx), f1)  # cache hit
    enc = load_backbone(view, cfg, ctx)  # weights cached too
    assert torch.allclose(extract_features(enc, view.x), f1, atol=1e-5)
    with pytest.raises(AssertionError, match="cache"):
        backbone_features(view, {**cfg, "epochs": 2}, ctx)  # different key -> recompute


def test_cache_key_changes_with_epochs_and_seed(tmp_path: Path) -> None:
    view = _view()
    ctx0, ctx1 = _ctx(tmp_path, 0), _ctx(tmp_path, 1)
    import bdseal.ssl.features as F

    p = lambda c, cx: ctx0.cache.path("ssl_features", F._cache_parts(view, resolve_cfg(c), cx))
    base = {"kind": "byol", **TINY}
    assert p(base, ctx0) != p({**base, "epochs": 2}, ctx0)
    assert p(base, ctx0) != p(base, ctx1)
    assert p(base, ctx0) == p(dict(base), ctx0)
    fm = {"kind": "foundation", "checkpoint": "/some/dir"}
    assert p(fm, ctx0) == p(fm, ctx1)  # frozen foundation features: computed once for every seed


def test_byol_and_supervised_backbones_run(tmp_path: Path) -> None:
    view, ctx = _view(), _ctx(tmp_path)
    f = backbone_features(view, {"kind": "byol", **TINY, "proj_hidden": 32, "pred_hidden": 32, "proj_dim": 8}, ctx)
    assert f.shape == (32, 16) and torch.isfinite(f).all()
    f = backbone_features(view, {"kind": "supervised", "arch": "small_half", "arch_params": {"widths": [8, 16, 16]}, "epochs": 1}, ctx)
    assert f.shape == (32, 16) and torch.isfinite(f).all()


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown backbone kind"):
        resolve_cfg({"kind": "mae"})
    with pytest.raises(ValueError, match="unknown option"):
        resolve_cfg({"kind": "simclr", "epochz": 3})
    with pytest.raises(ValueError, match="checkpoint"):
        resolve_cfg({"kind": "foundation"})


@pytest.mark.parametrize("family", ["dinov2", "vit", "clip", "clip_full"])
def test_foundation_round_trip(tmp_path: Path, family: str) -> None:
    """A tiny randomly initialised HF checkpoint (DINOv2, ViT, CLIP vision tower) saved to a local directory."""
    transformers = pytest.importorskip("transformers")
    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    if family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))
    elif family == "clip_full":  # a whole CLIP checkpoint (text + vision towers): the vision tower is used
        text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=16)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=kw))
    else:
        config = transformers.Dinov2Config(**kw) if family == "dinov2" else transformers.ViTConfig(**kw)
        model = transformers.AutoModel.from_config(config)
    model.save_pretrained(tmp_path / "ckpt")
    enc = load_foundation(tmp_path / "ckpt", "cpu")
    x = torch.rand(3, 3, 16, 16)
    f = enc.features(x)
    assert f.shape == (3, 32)
    assert enc.patch_features(x).shape == (3, 32, 2, 2)
    enc2 = load_foundation(tmp_path / "ckpt", "cpu")
    assert torch.allclose(enc2.features(x), f, atol=1e-5)  # same weights back
    gray = extract_features(enc, torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8), batch_size=2)
    assert gray.shape == (5, 32)
    view, ctx = _view(6), _ctx(tmp_path)
    feats = backbone_features(view, {"kind": "foundation", "checkpoint": str(tmp_path / "ckpt"), "image_size": 28}, ctx)
    assert feats.shape == (6, 32)


def test_foundation_missing_path_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local"):
        load_foundation(tmp_path / "nope", "cpu")


def test_linear_probe_and_argv() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    f = torch.randn(60, 5, generator=g) + 4 * torch.nn.functional.one_hot(y, 5).float()
    assert linear_probe(f[:40], y[:40], f[40:], y[40:]) > 0.9
    ssl, rest = split_argv(["dataset=digits", "ssl.kind=byol", "ssl.epochs=3", "ssl.jitter=[0.1,0.1,0.1,0.0]"])
    assert ssl == {"kind": "byol", "epochs": 3, "jitter": [0.1, 0.1, 0.1, 0.0]} and rest == ["dataset=digits"]


class _Stop(Exception):
    pass


def _simclr(seed: int = 0) -> SimCLR:
    torch.manual_seed(seed)
    return SimCLR(build_model("small_half", 4, in_channels=3, image_size=16, widths=[8, 16, 16]), 16, 32, 8)


@pytest.mark.parametrize("kind", ["simclr", "byol"])
def test_pretrain_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path, kind: str) -> None:
    """Cut after k = 2 of 4 epochs (an exception inside epoch 3, after the epoch-2 checkpoint), resume from
    the checkpoint: the same weights, optimiser moments and loss history as one uninterrupted run."""
    x = _view(40).x
    cfg = SSLTrainConfig(epochs=4, batch_size=16, progress=False)  # 2 steps per epoch

    def method():
        if kind == "simclr":
            return _simclr()
        torch.manual_seed(0)
        return BYOL(build_model("small_half", 4, in_channels=3, image_size=16, widths=[8, 16, 16]), 16, 32, 8, 32)

    ref = method()
    hist_ref = pretrain(ref, x, cfg, seed=3)
    ck = tmp_path / "ssl.ckpt.safetensors"
    cut = method()
    real_after = cut.after_step

    def after_step(step: int, total: int) -> None:
        if step == 4:  # first step of epoch 3
            raise _Stop
        real_after(step, total)

    cut.after_step = after_step
    with pytest.raises(_Stop):
        pretrain(cut, x, cfg, seed=3, checkpoint=ck, checkpoint_every=1)
    assert ck.exists()
    resumed = method()  # a fresh process: new objects, state only from the checkpoint
    logs: list[str] = []
    hist = pretrain(resumed, x, cfg, seed=3, checkpoint=ck, log=logs.append)
    assert "after epoch 2 of 4" in logs[0]
    assert hist == pytest.approx(hist_ref, abs=0) and len(hist) == 4
    for (k, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs after resume"


def test_resumed_backbone_has_the_uninterrupted_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``load_backbone``: a pre-training killed mid-way leaves a checkpoint under the backbone's own key
    parts; the re-run resumes it, stores the same weights under the same key as an uninterrupted run, and
    removes the checkpoint. ``checkpoint_every`` does not enter the key."""
    import bdseal.ssl.features as F
    from bdseal.ssl import loop as L

    view = _view(40)
    cfg = {"kind": "simclr", **TINY, "epochs": 3}
    ref = load_backbone(view, cfg, _ctx(tmp_path / "a"))
    ctx = _ctx(tmp_path / "b")
    real = L.pretrain

    def killed(method, *a, **k):
        method.after_step = lambda step, total: (_ for _ in ()).throw(_Stop()) if step == 2 * 2 else None
        return real(method, *a, **k)

    monkeypatch.setattr(F, "pretrain", killed)
    with pytest.raises(_Stop):
        load_backbone(view, cfg, ctx)
    parts = F._cache_parts(view, resolve_cfg(cfg), ctx)
    assert ctx.cache.path(L.CHECKPOINT_KIND, parts).exists()
    monkeypatch.setattr(F, "pretrain", real)
    got = load_backbone(view, {**cfg, "checkpoint_every": 2}, ctx)
    assert not ctx.cache.path(L.CHECKPOINT_KIND, parts).exists()
    assert ctx.cache.path("ssl_backbone", parts).exists()
    assert F._cache_parts(view, resolve_cfg({**cfg, "checkpoint_every": 5}), ctx) == parts
    for (k, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k


def test_foreign_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    from bdseal.io import CorruptFileError, save_tree

    ck = tmp_path / "x.safetensors"
    save_tree(ck, {"a": torch.zeros(2)}, {"kind": "train_checkpoint"})  # a supervised-training checkpoint
    with pytest.raises(CorruptFileError, match="SSL pre-training checkpoint"):
        pretrain(_simclr(), _view(8).x, SSLTrainConfig(epochs=1, batch_size=4, progress=False), checkpoint=ck)


def test_probe_defaults_to_the_small_backbone_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """``bdseal probe`` without ssl.arch trains small_half on a CPU (resnet18 would take hours there)."""
    import json

    from bdseal.ssl.probe import default_arch, probe_main

    assert default_arch(torch.device("cpu")) == "small_half" and default_arch(torch.device("cuda")) == "resnet18"
    assert probe_main(["dataset.train_per_class=12", "dataset.test_per_class=5", "ssl.epochs=1", "device=cpu",
                       "cache=false", "progress=false"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["backbone"]["arch"] == "small_half" and 0.0 <= out["probe_acc"] <= 1.0
