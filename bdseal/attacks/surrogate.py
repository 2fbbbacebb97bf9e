"""A clean surrogate classifier trained by the attacker on its own clean data.

Several attacks need a benign model before they can build their trigger: LC's PGD perturbations
(Turner et al. 2019: "a surrogate trained on clean data", REFERENCE.md), TrojanNN's neuron selection and
trigger optimisation (Liu et al. 2018; BackdoorBench uses a clean model), Lotus's perceptual features
for partitioning (Cheng et al. 2024). ``train_surrogate`` trains one with the project's single training
loop (``bdseal.train.fit``) and caches the weights in ``ctx.cache`` keyed by the data fingerprint,
architecture, recipe and seed, so every attack (and every helper, e.g. generator attacks) shares it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bdseal.errors import ConfigError
from bdseal.cache import fingerprint
from bdseal.data.dataset import ImageDataset
from bdseal.models import build_model
from bdseal.train import TrainConfig, fit

# CPU-scale recipe of conf/train/default.yaml (SGD 0.05, Nesterov, cosine, 1 warm-up epoch, crop+flip).
SURROGATE_RECIPE: dict[str, Any] = {
    "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1, "augment": "crop_flip",
}


def build_surrogate(train: ImageDataset, arch: str = "small_half", **model_kw: Any) -> nn.Module:
    """An untrained ``arch`` for ``train``'s shape, normalised with the data's channel statistics."""
    c, h, _ = train.image_shape
    mean, std = train.channel_stats()
    return build_model(arch, train.num_classes, in_channels=c, image_size=h, mean=mean, std=std, **model_kw)


def train_surrogate(
    train: ImageDataset,
    ctx: Any,
    arch: str = "small_half",
    epochs: int = 20,
    model_kw: dict[str, Any] | None = None,
    **train_kw: Any,
) -> nn.Module:
    """Train (or load from ``ctx.cache``) a clean ``arch`` classifier on ``train``; returned in eval
    mode on ``ctx.device``. ``train_kw`` override :data:`SURROGATE_RECIPE` (any ``TrainConfig`` field).

    ``ctx`` is an ``AttackContext`` (device, seed, cache, progress); the cache key holds the data
    fingerprint, ``arch``, ``model_kw``, ``epochs``, the recipe and the seed.
    """
    if epochs < 1:
        raise ConfigError(f"surrogate epochs must be >= 1, got {epochs}")
    model_kw = dict(model_kw or {})
    recipe = {**SURROGATE_RECIPE, **train_kw, "epochs": int(epochs)}
    cfg = TrainConfig.from_dict({**recipe, "progress": bool(ctx.progress)})
    seed = int(ctx.seed)

    def make() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_surrogate(train, arch, **model_kw)

    def compute() -> dict[str, torch.Tensor]:
        model = make()
        fit(model, train.x, train.y, cfg, device=ctx.device, seed=seed, desc=f"surrogate {arch}")
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    parts = {"data": fingerprint({"x": train.x, "y": train.y}), "arch": arch, "model_kw": model_kw,
             "recipe": recipe, "seed": seed}
    state = ctx.cache.get_or_compute("surrogate", parts, compute) if ctx.cache is not None else compute()
    model = make()
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(ctx.device).eval()
