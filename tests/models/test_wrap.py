"""WrappedClassifier: any nn.Module through the interface defenses use."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from bdseal.defenses import DefenderView
from bdseal.data import ImageDataset
from bdseal.models import MODELS, build_model, register_model
from bdseal.models.wrap import ModelInterfaceError, WrappedClassifier, as_classifier, default_layers, unwrap


class ResNetLike(nn.Module):
    """torchvision's layout: conv1, bn1, relu, layer1..3, avgpool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(h), 1))


def test_defaults_for_a_torchvision_style_layout() -> None:
    m = WrappedClassifier(ResNetLike())
    assert m.head_name == "fc" and m.feature_dim == 8 and m.num_classes == 5
    assert m.layer_names == ["conv1", "layer1", "layer2", "layer3"]
    assert m.last_conv_name() == "layer3.0" and m.block_output_name() == "layer3"
    x = torch.rand(2, 3, 8, 8)
    net = m.model.eval()
    expected = torch.flatten(net.avgpool(net.layer3(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(x))))))), 1)
    assert torch.allclose(m.eval().features(x), expected)
    logits, acts = m.forward_with(x, ["layer2", "layer3.0"])
    assert torch.allclose(logits, net(x)) and acts["layer2"].shape == (2, 8, 4, 4) and acts["layer3.0"].shape == (2, 8, 4, 4)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in net.modules())  # hooks removed
    m.check(x)


def test_descends_into_a_single_feature_container() -> None:
    seq = nn.Sequential(OrderedDict(features=nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(),
                                                          nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                    classifier=nn.Linear(2, 3)))
    assert default_layers(seq, exclude="classifier") == ["features.0", "features.2"]
    assert WrappedClassifier(seq).head_name == "classifier"


def test_errors_name_the_missing_piece() -> None:
    headless = WrappedClassifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    headless.check(torch.rand(1, 3, 8, 8))  # nothing to check; ft/nad/pgbd need no head
    assert headless.last_conv_name() == "0" and headless.forward_with(torch.rand(1, 3, 8, 8), ["0"])[1]["0"].shape == (1, 4, 6, 6)
    with pytest.raises(ModelInterfaceError, match="no nn.Linear classifier head; pass head="):
        headless.features(torch.rand(1, 3, 8, 8))
    with pytest.raises(ModelInterfaceError, match="head='nope' is not a submodule"):
        WrappedClassifier(ResNetLike(), head="nope")
    with pytest.raises(ModelInterfaceError, match=r"layers \['layer9'\]"):
        WrappedClassifier(ResNetLike(), layers=["layer9"])
    mlp = WrappedClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ModelInterfaceError, match="no nn.Conv2d; name the activation layer with layer="):
        mlp.last_conv_name()
    with pytest.raises(ModelInterfaceError, match="pass layers="):
        mlp.layer_names

    class HeadNotLast(ResNetLike):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    with pytest.raises(ModelInterfaceError, match="not head\\('fc'\\)"):
        WrappedClassifier(HeadNotLast()).check(torch.rand(2, 3, 8, 8))


def test_as_classifier_keeps_bdseal_models_and_unwrap_returns_the_users() -> None:
    staged = build_model("small_half", 10)
    assert as_classifier(staged) is staged
    user = ResNetLike()
    wrapped = as_classifier(user)
    assert isinstance(wrapped, WrappedClassifier) and unwrap(wrapped) is user
    assert as_classifier(wrapped) is wrapped
    view = DefenderView(ImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1])), backdoored_model=user)
    got = view.require_model("test")
    assert isinstance(got, WrappedClassifier) and got.model is user  # shares the parameters


def test_registered_plain_module_is_wrapped_with_the_data_normalisation() -> None:
    @register_model("test_wrap_resnetlike")
    def build(num_classes: int) -> nn.Module:
        return ResNetLike()

    try:
        m = build_model("test_wrap_resnetlike", 5, mean=0.5, std=0.25)
        assert isinstance(m, WrappedClassifier)
        x = torch.rand(2, 3, 8, 8)
        m.eval()
        assert torch.allclose(m(x), m.model((x - 0.5) / 0.25))
        assert unwrap(m) is m  # the normalisation is part of the model: not unwrapped
    finally:
        MODELS.pop("test_wrap_resnetlike", None)


def test_block_output_is_the_last_block_of_the_last_layer() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x)

    net = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), layer1=nn.Sequential(Block(), Block()),
                                    pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 2)))
    m = WrappedClassifier(net)
    assert m.layer_names == ["stem", "layer1"] and m.block_output_name() == "layer1.1"
    assert m.last_conv_name() == "layer1.1.conv"
