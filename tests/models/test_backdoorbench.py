"""BackdoorBench checkpoints: hand-built state dicts in BackdoorBench's key names (read from their
``models/preact_resnet.py`` and torchvision's ResNet-18) load into bdseal models, and the loaded model
computes what their forward pass computes (written here functionally from the same reading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bdseal.models import load_backdoorbench
from bdseal.models.backdoorbench import NORMALIZATION
from bdseal.models.preact import PreActResNet

W = 8  # layer1 width (64 in the real nets); keeps the test fast


def _bn_keys(prefix: str, c: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(c, generator=g), f"{prefix}.bias": 0.1 * torch.randn(c, generator=g),
            f"{prefix}.running_mean": 0.1 * torch.randn(c, generator=g),
            f"{prefix}.running_var": 1 + 0.1 * torch.rand(c, generator=g),
            f"{prefix}.num_batches_tracked": torch.tensor(7)}


def _conv(o: int, i: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(o, i, k, k, generator=g) * (2.0 / (i * k * k)) ** 0.5


def preact_state(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """BackdoorBench PreActResNet18 key names: conv1, layerI.J.{bn1,conv1,bn2,conv2,shortcut.0}, linear."""
    g = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": _conv(W, 3, 3, g)}
    cin = W
    for i in range(1, 5):
        planes = W * 2 ** (i - 1)
        for j in range(2):
            p = f"layer{i}.{j}"
            sd.update(_bn_keys(f"{p}.bn1", cin, g))
            sd[f"{p}.conv1.weight"] = _conv(planes, cin, 3, g)
            sd.update(_bn_keys(f"{p}.bn2", planes, g))
            sd[f"{p}.conv2.weight"] = _conv(planes, planes, 3, g)
            if j == 0 and i > 1:
                sd[f"{p}.shortcut.0.weight"] = _conv(planes, cin, 1, g)
            cin = planes
    sd["linear.weight"] = 0.1 * torch.randn(num_classes, cin, generator=g)
    sd["linear.bias"] = 0.1 * torch.randn(num_classes, generator=g)
    return sd


def resnet18_state(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision resnet18 key names (BackdoorBench's ``resnet18``): conv1, bn1, layerI.J.{conv1,bn1,conv2,bn2,
    downsample.0,downsample.1}, fc."""
    g = torch.Generator().manual_seed(seed)
    sd = {"conv1.weight": _conv(W, 3, 7, g), **_bn_keys("bn1", W, g)}
    cin = W
    for i in range(1, 5):
        planes = W * 2 ** (i - 1)
        for j in range(2):
            p = f"layer{i}.{j}"
            sd[f"{p}.conv1.weight"] = _conv(planes, cin, 3, g)
            sd.update(_bn_keys(f"{p}.bn1", planes, g))
            sd[f"{p}.conv2.weight"] = _conv(planes, planes, 3, g)
            sd.update(_bn_keys(f"{p}.bn2", planes, g))
            if j == 0 and i > 1:
                sd[f"{p}.downsample.0.weight"] = _conv(planes, cin, 1, g)
                sd.update(_bn_keys(f"{p}.downsample.1", planes, g))
            cin = planes
    sd["fc.weight"] = 0.1 * torch.randn(num_classes, cin, generator=g)
    sd["fc.bias"] = 0.1 * torch.randn(num_classes, generator=g)
    return sd


def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def preact_reference(x: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Their forward (eval): conv1 → 4×2 pre-activation blocks (out += shortcut) → avgpool → linear; no final BN."""
    h = F.conv2d(x, sd["conv1.weight"], padding=1)
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"layer{i}.{j}", 2 if (j == 0 and i > 1) else 1
            out = F.relu(_bn(h, sd, f"{p}.bn1"))
            short = F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride) if f"{p}.shortcut.0.weight" in sd else h
            out = F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            out = F.conv2d(F.relu(_bn(out, sd, f"{p}.bn2")), sd[f"{p}.conv2.weight"], padding=1)
            h = out + short
    return F.linear(h.mean(dim=(2, 3)), sd["linear.weight"], sd["linear.bias"])


def resnet18_reference(x: torch.Tensor, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """torchvision ResNet-18 forward (eval): 7x7/2 conv, BN, ReLU, 3x3/2 max-pool, 4×2 basic blocks, avgpool, fc."""
    h = F.max_pool2d(F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")), 3, 2, 1)
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"layer{i}.{j}", 2 if (j == 0 and i > 1) else 1
            out = F.relu(_bn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), sd, f"{p}.bn1"))
            out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            short = (_bn(F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=stride), sd, f"{p}.downsample.1")
                     if f"{p}.downsample.0.weight" in sd else h)
            h = F.relu(out + short)
    return F.linear(h.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def test_preact_state_dict_in_their_key_names_loads_and_computes_their_forward() -> None:
    sd = preact_state()
    model = load_backdoorbench(sd, "preactresnet18")  # CIFAR-10 normalisation by default
    assert isinstance(model, PreActResNet) and not model.final_bn
    assert torch.equal(model.stages.layer2[0].shortcut.weight, sd["layer2.0.shortcut.0.weight"])
    assert torch.equal(model.head.bias, sd["linear.bias"])
    x = torch.rand(3, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), preact_reference((x - mean) / std, sd), rtol=1e-4, atol=1e-4)


def test_resnet18_state_dict_in_torchvision_key_names_loads_and_computes_their_forward() -> None:
    sd = resnet18_state(num_classes=43)
    model = load_backdoorbench({f"module.{k}": v for k, v in sd.items()}, dataset="gtsrb")  # DataParallel prefix, arch inferred
    assert model.head.out_features == 43
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resnet18_reference(x, sd), rtol=1e-4, atol=1e-4)


def test_files_and_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = preact_state()
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": sd}, tmp_path / "attack_result.pt")
    a = load_backdoorbench(tmp_path / "m.safetensors")
    b = load_backdoorbench(str(tmp_path / "attack_result.pt"), "preactresnet18")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        load_backdoorbench({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        load_backdoorbench({k: v for k, v in sd.items() if k != "layer4.1.conv2.weight"})
    with pytest.raises(ValueError, match="normalisation for dataset 'svhn'"):
        load_backdoorbench(sd, dataset="svhn")
    with pytest.raises(FileNotFoundError):
        load_backdoorbench(tmp_path / "nope.pt")
