"""Backbones and their cached features: the one entry point GSSD, VIBE and DBD share.

``backbone_features(view, cfg, ctx)`` gives float32 CPU (N, D) features of the un-augmented training
images; ``load_backbone(view, cfg, ctx)`` gives the encoder itself. Pre-trained weights are cached
with ``ctx.cache`` keyed by the defender's data fingerprint, the *full* backbone config (defaults
filled in, so changing any hyperparameter, e.g. ``epochs``, changes the key) and ``ctx.seed``;
features are cached under the same key. ``cfg["kind"]``:

* ``simclr`` / ``byol`` — self-supervised pre-training on the poisoned, unlabeled images
  (:mod:`bdseal.ssl.simclr`, :mod:`bdseal.ssl.byol`, loop in :mod:`bdseal.ssl.loop`); resumable: every
  ``checkpoint_every`` epochs a checkpoint is written next to the cache entry (kind ``ssl_checkpoint``, same
  key parts) and a re-run picks it up, so a long pre-training can be spread over several jobs; the finished
  backbone's key does not depend on ``checkpoint_every`` or on how many pieces produced it;
* ``foundation`` — a frozen local HuggingFace checkpoint (:mod:`bdseal.ssl.foundation`);
* ``supervised`` — plain supervised training on the observed labels with ``bdseal.train.fit``
  (GSSD's Table 3 ablation); ``train`` overrides the run's recipe, ``epochs`` overrides its epochs.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from bdseal.errors import ConfigError
from bdseal.defenses.base import DefenderView, RunContext
from bdseal.models import build_model
from bdseal.ssl.byol import BYOL
from bdseal.ssl.foundation import FoundationEncoder, load_foundation
from bdseal.ssl.loop import CHECKPOINT_KIND, SSLTrainConfig, pretrain
from bdseal.ssl.simclr import SimCLR
from bdseal.train.loop import batched_eval, fit

_LOOP_KEYS = {f.name for f in fields(SSLTrainConfig)} - {"progress"}
_ARCH = {"arch": "resnet18", "arch_params": {}}

DEFAULTS: dict[str, dict[str, Any]] = {
    # GSSD facts [V]: ResNet-18, projector 512→512→128 without BN, τ 0.5, batch 256, Adam 3e-4 without weight
    # decay, strong jitter. The paper trains 100 epochs; the CPU default is a few.
    "simclr": {**_ARCH, "epochs": 5, "batch_size": 256, "optimizer": "adam", "lr": 3e-4, "weight_decay": 0.0,
               "schedule": "constant", "warmup_epochs": 0.0, "temperature": 0.5, "proj_hidden": 512, "proj_dim": 128,
               "proj_bn": False, "checkpoint_every": 1,
               "crop_scale": [0.08, 1.0], "jitter": [0.8, 0.8, 0.8, 0.2], "p_jitter": 0.8, "p_gray": 0.2,
               "momentum": 0.9, "amp": True, "channels_last": True},
    # BYOL in solo-learn's spirit; Adam (LARS is not in torch) with a cosine schedule and warm-up.
    "byol": {**_ARCH, "epochs": 5, "batch_size": 256, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-5,
             "schedule": "cosine", "warmup_epochs": 1.0, "proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096,
             "ema_base": 0.99, "crop_scale": [0.08, 1.0], "jitter": [0.4, 0.4, 0.2, 0.1], "p_jitter": 0.8,
             "p_gray": 0.2, "momentum": 0.9, "amp": True, "channels_last": True, "checkpoint_every": 1},
    "foundation": {"checkpoint": None, "image_size": 224},
    "supervised": {**_ARCH, "epochs": None, "train": {}},
}


def resolve_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The backbone config with its kind's defaults filled in; unknown keys are an error."""
    kind = cfg.get("kind")
    if kind not in DEFAULTS:
        raise ConfigError(f"unknown backbone kind {kind!r}; choose one of {sorted(DEFAULTS)}")
    unknown = set(cfg) - set(DEFAULTS[kind]) - {"kind"}
    if unknown:
        raise ConfigError(f"backbone kind {kind!r}: unknown option(s) {sorted(unknown)}; accepted: {sorted(DEFAULTS[kind])}")
    out = {"kind": kind, **copy.deepcopy(DEFAULTS[kind]), **copy.deepcopy(dict(cfg))}
    if kind == "foundation" and not out["checkpoint"]:
        raise ConfigError("backbone kind 'foundation' needs checkpoint=<local HuggingFace checkpoint directory>")
    return out


def _encoder(view: DefenderView, cfg: dict[str, Any]) -> nn.Module:
    c, h, _ = view.train.image_shape
    mean, std = view.train.channel_stats()
    return build_model(cfg["arch"], view.num_classes, in_channels=c, image_size=h, mean=mean, std=std,
                       **dict(cfg.get("arch_params") or {}))


def _ssl_method(encoder: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    d = int(encoder.feature_dim)
    if cfg["kind"] == "simclr":
        return SimCLR(encoder, d, cfg["proj_hidden"], cfg["proj_dim"], cfg["temperature"], proj_bn=bool(cfg["proj_bn"]))
    return BYOL(encoder, d, cfg["proj_hidden"], cfg["proj_dim"], cfg["pred_hidden"], cfg["ema_base"])


def _supervised_recipe(cfg: dict[str, Any], ctx: RunContext):
    tc = ctx.train_cfg.replace(**dict(cfg.get("train") or {}))
    return tc.replace(epochs=int(cfg["epochs"])) if cfg.get("epochs") is not None else tc


# options that change how a backbone is produced, not what it is: left out of its cache key
_NOT_IN_KEY = ("checkpoint_every",)


def _cache_parts(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    parts = {"data": view.data_fingerprint(), "backbone": {k: v for k, v in cfg.items() if k not in _NOT_IN_KEY}}
    if cfg["kind"] != "foundation":  # a frozen checkpoint's features do not depend on the run's seed: shared by seeds
        parts["seed"] = ctx.seed
    if cfg["kind"] == "supervised":
        parts["recipe"] = asdict(_supervised_recipe(cfg, ctx).replace(progress=True))
    return parts


def load_backbone(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> nn.Module:
    """The pre-trained encoder on ``ctx.device`` in eval mode: a ``StagedClassifier`` (``features`` =
    embedding; its ``head`` is untrained for SSL kinds) or a frozen :class:`FoundationEncoder`.
    Weights of trained kinds are cached (state dict) so several defenses reuse one pre-training."""
    cfg = resolve_cfg(cfg)
    if cfg["kind"] == "foundation":
        return load_foundation(cfg["checkpoint"], ctx.device, image_size=cfg["image_size"])
    parts = _cache_parts(view, cfg, ctx)

    def compute() -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            encoder = _encoder(view, cfg)
        if cfg["kind"] == "supervised":
            fit(encoder, view.x, view.y, _supervised_recipe(cfg, ctx).replace(progress=ctx.progress),
                device=ctx.device, seed=ctx.seed, desc="supervised backbone")
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed)
                method = _ssl_method(encoder, cfg)
            loop_cfg = SSLTrainConfig(**{k: cfg[k] for k in _LOOP_KEYS if k in cfg}, progress=ctx.progress)
            ckpt = ctx.cache.path(CHECKPOINT_KIND, parts) if ctx.cache.enabled else None
            hist = pretrain(method, view.x, loop_cfg, device=ctx.device, seed=ctx.seed, desc=cfg["kind"], checkpoint=ckpt,
                            checkpoint_every=int(cfg["checkpoint_every"]), log=ctx.log)
            ctx.log(f"{cfg['kind']} pre-training: loss per epoch {[round(v, 4) for v in hist]}")
            if ckpt is not None:
                ckpt.unlink(missing_ok=True)  # the finished backbone goes to the cache under the same parts
        return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}

    state = ctx.cache.get_or_compute("ssl_backbone", parts, compute)
    encoder = _encoder(view, cfg)
    encoder.load_state_dict(state)
    return encoder.to(ctx.device).eval()


@torch.no_grad()
def extract_features(encoder: nn.Module, x_uint8: torch.Tensor, device: torch.device | str = "cpu",
                     batch_size: int = 512) -> torch.Tensor:
    """``encoder.features`` of uint8 images (N, C, H, W), no augmentation, eval mode, batched on
    ``device`` (bf16 autocast on CUDA); float32 CPU (N, D). Works for StagedClassifier and
    :class:`FoundationEncoder` encoders."""
    if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4:
        raise ValueError(f"extract_features needs uint8 images (N, C, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    return batched_eval(encoder.features, encoder, x_uint8, device=device, batch_size=batch_size)


def backbone_features(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> torch.Tensor:
    """float32 CPU (N, D) features of the un-augmented training images ``view.x``, cached by the data
    fingerprint, the full backbone config and the seed."""
    full = resolve_cfg(cfg)
    parts = _cache_parts(view, full, ctx)
    if full["kind"] == "foundation":
        parts["checkpoint_files"] = _checkpoint_stamp(full["checkpoint"])

    def compute() -> torch.Tensor:
        return extract_features(load_backbone(view, full, ctx), view.x, ctx.device)

    return ctx.cache.get_or_compute("ssl_features", parts, compute)


def _checkpoint_stamp(path: str) -> dict[str, Any]:
    """Names, sizes and mtimes of a checkpoint directory's files: a changed checkpoint changes the key."""
    from pathlib import Path

    p = Path(path)
    return {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in sorted(p.iterdir()) if f.is_file()} if p.is_dir() else {}


__all__ = ["DEFAULTS", "FoundationEncoder", "backbone_features", "extract_features", "load_backbone", "resolve_cfg"]
