"""The one self-supervised pre-training loop, shared by SimCLR and BYOL.

It cannot reuse ``bdseal.train.fit`` (no labels, two augmented views per image), so it is kept
small: uint8 images resident on the device, two batched on-device SimCLR views per step
(``bdseal.data.augment.simclr_augment``), the method object supplies the loss and an optional
post-step update (BYOL's EMA), optimiser + schedule from ``bdseal.train.schedule``, bf16 autocast and
channels_last on CUDA, a tqdm bar and a deterministic seed.

Resumable: with ``checkpoint`` the method, optimiser, epoch/step/loss history and every random stream
(batch order, augmentation, global RNGs) are saved through :mod:`bdseal.io` (safetensors + JSON, atomic,
never unpickled) every ``checkpoint_every`` epochs, and an existing checkpoint is resumed — a run cut
into pieces ends with the same weights as an uninterrupted one (``tests/ssl/test_ssl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from bdseal.errors import ConfigError
from bdseal.data.augment import simclr_augment
from bdseal.io import CorruptFileError, load_tree, save_tree
from bdseal.train.loop import rng_states, restore_rng_states, seed_everything
from bdseal.train.schedule import lr_multiplier


class SSLMethod(Protocol):
    """What the loop needs from a method: trainable modules, a two-view loss, a post-step update."""

    encoder: nn.Module

    def parameters(self) -> Any: ...

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor: ...

    def after_step(self, step: int, total: int) -> None: ...


@dataclass
class SSLTrainConfig:
    """Optimiser, schedule and view augmentation of one pre-training run."""

    epochs: int = 5
    batch_size: int = 256
    optimizer: str = "adam"  # adam | sgd | adamw
    lr: float = 3e-4
    momentum: float = 0.9
    weight_decay: float = 1e-6
    schedule: str = "constant"  # constant | cosine
    warmup_epochs: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    amp: bool = True
    channels_last: bool = True
    progress: bool = True


def _optimizer(params: Any, cfg: SSLTrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown SSL optimizer {cfg.optimizer!r}; choose adam, adamw or sgd")


def make_views(raw: torch.Tensor, cfg: SSLTrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent SimCLR-augmented float views of a uint8 batch."""
    x = raw.float().div_(255)
    kw = dict(scale=tuple(cfg.crop_scale), jitter=tuple(cfg.jitter), p_jitter=cfg.p_jitter, p_gray=cfg.p_gray, generator=gen)
    return simclr_augment(x, **kw), simclr_augment(x, **kw)


CHECKPOINT_KIND = "ssl_checkpoint"


def save_checkpoint(path: str | Path, method: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                    history: list[float], gen: torch.Generator, aug_gen: torch.Generator) -> None:
    """Everything :func:`pretrain` needs to continue after ``epoch`` epochs (atomic, no pickle)."""
    save_tree(path, {"method": method.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
                     "history": history, "generator": gen.get_state(), "rng": rng_states(aug_gen)}, {"kind": CHECKPOINT_KIND})


def load_checkpoint(path: str | Path, method: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                    aug_gen: torch.Generator) -> tuple[int, int, list[float]]:
    """Restore a :func:`save_checkpoint` file in place; returns (epochs done, steps done, loss history)."""
    ck, meta = load_tree(path)
    if meta.get("kind") != CHECKPOINT_KIND or not isinstance(ck, dict):
        raise CorruptFileError(f"{path} is not a bdseal SSL pre-training checkpoint; delete it to start over")
    method.load_state_dict(ck["method"])
    opt.load_state_dict(ck["optimizer"])
    gen.set_state(ck["generator"])
    restore_rng_states(ck["rng"], aug_gen)
    return int(ck["epoch"]), int(ck["step"]), [float(v) for v in ck["history"]]


def pretrain(method: nn.Module, x: torch.Tensor, cfg: SSLTrainConfig, *, device: torch.device | str = "cpu",
             seed: int = 0, desc: str = "ssl", checkpoint: str | Path | None = None, checkpoint_every: int = 1,
             log: Any = None) -> list[float]:
    """Train ``method`` (an ``nn.Module`` following :class:`SSLMethod`) on uint8 images ``x``; returns
    the mean loss of every epoch. Batches of fewer than 2 images are skipped (contrastive losses need
    pairs), so the last partial batch is dropped when it would be a singleton. ``checkpoint``: resume
    from this file when it exists, save to it every ``checkpoint_every`` epochs (see module doc)."""
    device = torch.device(device)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"pretrain needs uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError("self-supervised pre-training needs at least 2 images")
    seed_everything(seed)
    x = x.to(device)
    method.to(device).train()
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg)
    bs = min(cfg.batch_size, len(x))
    spe = len(x) // bs  # drop the last partial batch: BN and NT-Xent want full batches
    total = cfg.epochs * spe
    mult = lr_multiplier(cfg.schedule, total, spe, warmup_steps=int(cfg.warmup_epochs * spe))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    use_amp = cfg.amp and device.type == "cuda"
    history: list[float] = []
    step = start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start, step, history = load_checkpoint(checkpoint, method, opt, gen, aug_gen)
        if log is not None:
            log(f"{desc}: resuming pre-training from {checkpoint} after epoch {start} of {cfg.epochs}")
    bar = tqdm(total=total, initial=step, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)
    for epoch in range(start, cfg.epochs):
        perm = torch.randperm(len(x), generator=gen).to(device)
        run = torch.zeros((), device=device)  # summed on the device: one read-back per epoch
        for s in range(spe):
            v1, v2 = make_views(x[perm[s * bs:(s + 1) * bs]], cfg, aug_gen)
            if cfg.channels_last:
                v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * mult(step)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = method.loss(v1, v2)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            method.after_step(step, total)
            step += 1
            run += loss.detach().float()
            bar.update(1)
            if cfg.progress and step % 25 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        history.append(float(run) / max(1, spe))
        if checkpoint is not None and (epoch + 1) % max(1, checkpoint_every) == 0 and epoch + 1 < cfg.epochs:
            save_checkpoint(checkpoint, method, opt, epoch + 1, step, history, gen, aug_gen)
    bar.close()
    method.eval()
    return history
