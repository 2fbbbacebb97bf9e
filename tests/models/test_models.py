"""Model zoo: shapes, staged forward consistency, gradient flow, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdseal.models import MODELS, StagedClassifier, build_model, list_models
from bdseal.models.speed import measure_throughput

NUM_CLASSES = 5

# name -> (build kwargs, image_size, expected stage names, expected feature_dim).
# Thin variants keep the suite fast; full-width architectures are covered by FULL_SIZE below.
CASES: dict[str, tuple[dict, int, list[str], int]] = {
    "resnet18": ({"width": 8}, 16, ["stem", "layer1", "layer2", "layer3", "layer4"], 64),
    "preact_resnet18": ({"width": 8}, 16, ["stem", "layer1", "layer2", "layer3", "layer4"], 64),
    "vgg16": ({"width_mult": 0.125}, 32, [f"block{i}" for i in range(1, 6)], 64),
    "densenet121": ({"growth": 4}, 16, ["stem", "dense1", "dense2", "dense3", "dense4"], 128),
    "resnet50": ({"width": 8}, 64, ["stem", "layer1", "layer2", "layer3", "layer4"], 256),
    "small": ({}, 16, ["stem", "block1", "block2", "block3"], 256),
    "small_half": ({}, 16, ["stem", "block1", "block2", "block3"], 128),
}

# Standard widths: name -> (feature_dim, parameter count with 10 classes, 3 channels).
FULL_SIZE = {
    "resnet18": (512, 11_173_962),
    "preact_resnet18": (512, 11_171_146),  # BackdoorBench layout: no final BN
    "vgg16": (512, 14_724_042),
    "densenet121": (1024, 6_956_298),
    "resnet50": (2048, 23_520_842),
    "small": (256, None),
    "small_half": (128, None),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _build(name: str, in_channels: int = 3) -> tuple[StagedClassifier, torch.Tensor]:
    kwargs, size, _, _ = CASES[name]
    model = build_model(name, NUM_CLASSES, in_channels=in_channels, image_size=size, **kwargs)
    return model, torch.rand(2, in_channels, size, size)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_registry_covers_all_names() -> None:
    assert set(list_models()) == set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", list(CASES))
def test_staged_forward_consistency(name: str) -> None:
    model, x = _build(name)
    model.eval()
    _, _, stages, feature_dim = CASES[name]
    assert isinstance(model, StagedClassifier)
    assert model.layer_names == stages
    assert model.feature_dim == feature_dim
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        assert logits.shape == (2, NUM_CLASSES)
        assert feats.shape == (2, feature_dim)
        torch.testing.assert_close(model.head(feats), logits)
        out, acts = model.forward_with(x, stages)
        torch.testing.assert_close(out, logits)
        assert list(acts) == stages
        for layer in stages:
            assert acts[layer].shape[0] == 2
            torch.testing.assert_close(model.forward_from(acts[layer], layer), logits)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_reach_first_conv(name: str) -> None:
    model, x = _build(name)
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    grad = _first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_single_channel_input(name: str) -> None:
    model, x = _build(name, in_channels=1)
    assert x.shape[1] == 1
    assert model.eval()(x).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("size", [8, 9, 28, 33])
def test_small_any_input_size(size: int) -> None:
    model = build_model("small_half", NUM_CLASSES, in_channels=1).eval()
    assert model(torch.rand(1, 1, size, size)).shape == (1, NUM_CLASSES)


def test_resnet50_stem_follows_image_size() -> None:
    big = build_model("resnet50", NUM_CLASSES, image_size=64, width=8)
    tiny = build_model("resnet50", NUM_CLASSES, image_size=32, width=8)
    assert _first_conv(big).kernel_size == (7, 7) and _first_conv(big).stride == (2, 2)
    assert _first_conv(tiny).kernel_size == (3, 3) and _first_conv(tiny).stride == (1, 1)
    with torch.no_grad():
        _, acts = big.eval().forward_with(torch.rand(1, 3, 64, 64), ["stem", "layer4"])
    assert acts["stem"].shape[-1] == 16  # 64 / 4 after conv stride 2 + max-pool
    assert acts["layer4"].shape[-1] == 2


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_dimensions(name: str) -> None:
    feature_dim, n_params = FULL_SIZE[name]
    model = build_model(name, 10)
    assert model.feature_dim == feature_dim
    if n_params is not None:
        assert sum(p.numel() for p in model.parameters()) == n_params


def test_full_size_resnet18_forward() -> None:
    model = build_model("resnet18", 10).eval()
    with torch.no_grad():
        _, acts = model.forward_with(torch.rand(1, 3, 32, 32), ["layer4"])
    assert acts["layer4"].shape == (1, 512, 4, 4)
    assert (acts["layer4"] >= 0).all()


@pytest.mark.parametrize("name", ["preact_resnet18", "densenet121"])
def test_features_are_post_relu(name: str) -> None:
    kwargs, size, _, _ = CASES[name]
    extra = {"final_bn": True} if name == "preact_resnet18" else {}
    model = build_model(name, NUM_CLASSES, image_size=size, **kwargs, **extra)
    with torch.no_grad():
        assert (model.eval().features(torch.rand(2, 3, size, size)) >= 0).all()


def test_preact_backdoorbench_layout_has_no_final_bn() -> None:
    """BackdoorBench's PreAct-ResNet-18: layer4's output is its last block's output (conv2 + shortcut, signed);
    ``final_bn=True`` appends BN + ReLU (2·512 more parameters at full width)."""
    model, x = _build("preact_resnet18")
    model.eval()
    assert [type(m).__name__ for m in model.stages.layer4] == ["PreActBlock", "PreActBlock"]
    seen = {}
    handle = model.stages.layer4[1].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        _, acts = model.forward_with(x, ["layer4"])
    handle.remove()
    torch.testing.assert_close(acts["layer4"], seen["out"])
    assert (acts["layer4"] < 0).any()
    full = build_model("preact_resnet18", 10, final_bn=True)
    assert sum(p.numel() for p in full.parameters()) == FULL_SIZE["preact_resnet18"][1] + 1024


def test_normalisation_stats() -> None:
    model = build_model("small_half", NUM_CLASSES, in_channels=1, mean=0.1307, std=(0.3081,))
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.1307])
    default = build_model("small_half", NUM_CLASSES)
    assert default.normalize.std.flatten().tolist() == pytest.approx([0.25] * 3)
    with pytest.raises(ValueError, match="channels"):
        build_model("small_half", NUM_CLASSES, mean=(0.5, 0.5))


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="known models: .*resnet18"):
        build_model("resnet1000", NUM_CLASSES)


def test_measure_throughput_leaves_model_untouched() -> None:
    model = build_model("small_half", NUM_CLASSES, widths=(8, 16, 16))
    before = [p.detach().clone() for p in model.parameters()]
    ips = measure_throughput(model, batch_size=4, image_size=16, steps=1, warmup=1)
    assert ips > 0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_staged_forward(name: str) -> None:
    size = 64 if name == "resnet50" else 32
    model = build_model(name, 10, image_size=size).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        logits, acts = model.forward_with(x, model.layer_names)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(model.head(model.features(x)), logits)
        for layer, h in acts.items():
            torch.testing.assert_close(model.forward_from(h, layer), logits)


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "small_half"])
def test_forward_with_submodule_path_is_the_raw_last_conv(name: str) -> None:
    """PGBD's layer (REFERENCE: PreAct-RN18 ``layer4.1.conv2``): a dotted submodule path gives that module's raw
    output, differentiable w.r.t. the parameters before it, and no hook is left behind."""
    model, x = _build(name)
    model.eval()
    path = model.last_conv_name()
    conv = dict(model.named_modules())[path]
    assert isinstance(conv, nn.Conv2d)
    if name != "small_half":
        assert path == "stages.layer4.1.conv2"
    seen = {}
    handle = conv.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    logits, acts = model.forward_with(x, [path, "layer4" if name != "small_half" else "block3"])
    handle.remove()
    torch.testing.assert_close(acts[path], seen["out"])
    torch.testing.assert_close(logits, model(x))
    (g,) = torch.autograd.grad(acts[path].sum(), _first_conv(model).weight)
    assert g.abs().sum() > 0
    assert not conv._forward_hooks
    with pytest.raises(KeyError, match="unknown layer"):
        model.forward_with(x, ["stages.nope"])
