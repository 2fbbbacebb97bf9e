"""Model zoo: every model is a :class:`StagedClassifier` built by :func:`build_model` from its name.

=================== ========================================= ============ ==========================
name                stages                                    feature_dim  extra kwargs
=================== ========================================= ============ ==========================
``resnet18``        stem, layer1..layer4                      512          ``width`` (64)
``preact_resnet18`` stem, layer1..layer4                      512          ``width`` (64)
``vgg16``           block1..block5                            512          ``width_mult`` (1.0)
``densenet121``     stem, dense1..dense4                      1024         ``growth`` (32)
``resnet50``        stem, layer1..layer4                      2048         ``width`` (64)
``small``           stem, block1..block3                      256          see :class:`SmallCNN`
``small_half``      stem, block1..block3                      128          see :class:`SmallCNN`
=================== ========================================= ============ ==========================

Inputs are images in [0, 1]; each model normalises with ``mean``/``std`` (default 0.5 / 0.25 per
channel, i.e. [0, 1] -> [-2, 2]).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from .base import Normalize, StagedClassifier
from .densenet import DenseNet, densenet121
from .preact import PreActResNet, preact_resnet18
from .resnet import ResNet, resnet18, resnet50
from .small import SmallCNN, small, small_half
from .vgg import VGG, vgg16
from .wrap import ModelInterfaceError, WrappedClassifier, as_classifier, is_classifier, unwrap

from bdseal.errors import ConfigError

DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.25

# Uniform builder signature: (num_classes, in_channels, image_size, mean, std, **kwargs).
ModelBuilder = Callable[..., StagedClassifier]


def _size_agnostic(fn: Callable[..., StagedClassifier]) -> ModelBuilder:
    """Adapt a ``fn(num_classes, in_channels, mean, std, **kw)`` builder that ignores image size."""

    def build(
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        **kwargs: Any,
    ) -> StagedClassifier:
        return fn(num_classes, in_channels, mean, std, **kwargs)

    build.__doc__ = fn.__doc__
    return build


MODELS: dict[str, ModelBuilder] = {
    "resnet18": _size_agnostic(resnet18),
    "preact_resnet18": _size_agnostic(preact_resnet18),
    "vgg16": _size_agnostic(vgg16),
    "densenet121": _size_agnostic(densenet121),
    "resnet50": resnet50,  # picks its stem from image_size
    "small": _size_agnostic(small),
    "small_half": _size_agnostic(small_half),
}


def register_model(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model builder under ``name`` (plugins). The builder is called with those of
    ``num_classes, in_channels, image_size, mean, std`` (+ the config's ``model.params``) that its signature
    accepts; a plain ``nn.Module`` it returns is wrapped (:class:`WrappedClassifier`), normalising inputs
    with the data's ``mean``/``std`` when the builder does not take them."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in MODELS and getattr(MODELS[name], "__wrapped__", None) is not fn:
            raise ValueError(f"model {name!r} registered twice")
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

        def build(num_classes: int, in_channels: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                  **kwargs: Any) -> Any:
            given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "mean": mean, "std": std}
            model = fn(**{k: v for k, v in given.items() if takes_all or k in params}, **kwargs)
            if is_classifier(model):
                return model
            normalise = not (takes_all or "mean" in params)
            return WrappedClassifier(model, mean=mean if normalise else None, std=std if normalise else None)

        build.__wrapped__ = fn  # type: ignore[attr-defined]
        build.__doc__ = fn.__doc__
        MODELS[name] = build
        return fn

    return deco


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    from bdseal.registry import load_entry_point_plugins

    load_entry_point_plugins()
    return list(MODELS)


def _stats(
    values: Sequence[float] | float | None, default: float, channels: int, what: str
) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if isinstance(values, (int, float)):
        return (float(values),) * channels
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} entries but the images have {channels} channels")
    return values


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    **kwargs: Any,
) -> StagedClassifier:
    """Build model ``name`` for ``num_classes`` classes and (in_channels, image_size) images in [0, 1].

    ``mean``/``std`` are per-channel normalisation stats (a scalar or 1-tuple is broadcast);
    ``kwargs`` go to the architecture (e.g. ``width=16`` for a thin ResNet-18).
    """
    if name not in MODELS:
        list_models()  # loads entry-point plugins
    try:
        builder = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    mean_t = _stats(mean, DEFAULT_MEAN, in_channels, "mean")
    std_t = _stats(std, DEFAULT_STD, in_channels, "std")
    model = builder(num_classes, in_channels, image_size, mean_t, std_t, **kwargs)
    return model if is_classifier(model) else WrappedClassifier(model)


__all__ = [
    "MODELS",
    "DenseNet",
    "ModelInterfaceError",
    "WrappedClassifier",
    "as_classifier",
    "is_classifier",
    "register_model",
    "unwrap",
    "Normalize",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "StagedClassifier",
    "VGG",
    "build_model",
    "densenet121",
    "list_models",
    "preact_resnet18",
    "resnet18",
    "resnet50",
    "small",
    "small_half",
    "vgg16",
]
