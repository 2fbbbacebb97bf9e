"""The one supervised training loop.

Data stays as uint8 tensors on the training device; each step gathers a batch, converts it to float,
runs the batched on-device augmentation and a forward/backward pass (AMP bf16 + channels_last on
CUDA). Defenses customise it through ``loss_fn(model, batch)`` (per-sample weights, extra views,
auxiliary losses), ``extra_params`` (trainable non-model tensors, e.g. VIBE's prior) and ``hooks``
(E-steps, weight updates, prototype refreshes). No per-sample Python loops.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdseal.data.augment import build_augment
from bdseal.errors import ConfigError, TrainingDivergedError
from bdseal.io import CorruptFileError, load_tree, save_tree
from bdseal.train.schedule import lr_multiplier


class BudgetExhausted(BaseException):
    """Raised by :func:`fit` at an epoch end once the time window set by :func:`window` has run out (the
    epoch's checkpoint is written first). A ``BaseException`` so per-cell ``except Exception`` handlers
    (``keep_going``) let it through: the cell stays undone and resumes in the next window."""


_WINDOW: dict[str, Any] = {"dir": None, "deadline": None}


@contextmanager
def window(checkpoint_dir: str | Path | None, deadline: float | None) -> Iterator[None]:
    """Inside the block, every plain :func:`fit` (no hooks, no custom loss: nothing outside the model
    and optimiser to restore) without its own ``checkpoint`` checkpoints each epoch under
    ``checkpoint_dir`` (keyed by its data, config, seed and initial weights) and resumes from it; every
    fit raises :class:`BudgetExhausted` at the first epoch end past ``deadline`` (``time.time()``)."""
    old = dict(_WINDOW)
    _WINDOW.update(dir=None if checkpoint_dir is None else Path(checkpoint_dir), deadline=deadline)
    try:
        yield
    finally:
        _WINDOW.update(old)


def _auto_checkpoint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None,
                     cfg: "TrainConfig", seed: int, desc: str) -> Path | None:
    from bdseal.cache import fingerprint

    if _WINDOW["dir"] is None:
        return None
    init = {k: v.detach().cpu().reshape(-1) for k, v in model.state_dict().items()}
    key = fingerprint({"x": x, "y": y, "w": weights if weights is not None else 0, "init": fingerprint(init),
                       "cfg": {k: v for k, v in asdict(cfg).items() if k != "progress"}, "seed": seed, "desc": desc})
    return Path(_WINDOW["dir"]) / f"fit-{desc}-{key}.safetensors"


@dataclass
class TrainConfig:
    """Optimiser, schedule and augmentation of one training run (epochs or an iteration budget)."""

    epochs: int = 10
    steps: int | None = None  # iteration budget; overrides epochs when set
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[int] = field(default_factory=list)  # epochs, for step
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    augment: str = "crop_flip"
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True
    drop_last: bool = False
    train_mode: bool = True  # False keeps BN statistics and dropout frozen (PGBD fine-tunes in eval mode)
    progress: bool = True
    # fast-recipe options (conf/train/fast.yaml); all off by default
    lookahead_every: int = 0  # Lookahead (Zhang et al. 2019): every k steps slow += alpha (fast - slow), fast = slow
    lookahead_alpha: float = 0.5  # the model keeps the slow weights at the end
    whiten_stem: bool = False  # first conv = frozen PCA-whitening filters of training patches (airbench)
    tta_flip: bool = False  # evaluation averages the logits of the image and its mirror (read by predict)
    compile: bool = False  # torch.compile the training forward/backward (CUDA; first steps compile)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def __post_init__(self) -> None:
        """Reject values that cannot train (they would give an untrained or NaN model, not an error)."""
        for name in ("epochs", "batch_size"):
            _check_number(name, getattr(self, name), int, minimum=1 if name == "batch_size" or self.steps is None else 0)
        if self.steps is not None:
            _check_number("steps", self.steps, int, minimum=1)
        _check_number("lr", self.lr, float, minimum=0.0, strict=True)
        for name in ("momentum", "weight_decay", "gamma", "warmup_epochs", "min_lr_ratio", "label_smoothing"):
            _check_number(name, getattr(self, name), float, minimum=0.0)

    def replace(self, **kw: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**asdict(self), **kw})


def _check_number(name: str, value: Any, kind: type, *, minimum: float, strict: bool = False) -> None:
    """A training option of type ``kind`` (int, or float that also admits ints) and at least ``minimum``
    (above it when ``strict``); :class:`ConfigError` naming the option otherwise."""
    ok_type = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok_type:
        raise ConfigError(f"training option {name}={value!r} must be {'an integer' if kind is int else 'a number'}; "
                          f"set {name}= to a {'whole ' if kind is int else ''}number (e.g. train.{name}=...)")
    bad = not math.isfinite(value) or value < minimum or (strict and value == minimum)
    if bad:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"training option {name}={value!r} must be finite and {bound}; fix {name} (e.g. train.{name}=...)")


@dataclass
class Batch:
    """One training step's data. ``x``: augmented float images; ``raw``: the uint8 images."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor  # positions in the training tensors given to ``fit``
    weight: torch.Tensor | None
    raw: torch.Tensor


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    last_loss: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)


class TrainHooks:
    """Override what you need; every hook gets the live ``TrainState``."""

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...


LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def weighted_cross_entropy(model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy, weighted per sample when ``batch.weight`` is set."""
    losses = F.cross_entropy(model(batch.x), batch.y, reduction="none", label_smoothing=label_smoothing)
    if batch.weight is None:
        return losses.mean()
    return (losses * batch.weight).sum() / batch.weight.numel()


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _optimizer(params: list[Any], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adam or adamw")


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    weights: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    extra_params: Sequence[dict[str, Any]] = (),
    hooks: TrainHooks | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
) -> TrainState:
    """Train ``model`` in place on uint8 images ``x`` (N, C, H, W) and labels ``y``.

    ``weights`` (N,) are per-sample loss weights read every step (a hook may change them in place).
    ``extra_params`` are extra optimiser param groups. ``checkpoint``: saved after every epoch;
    with ``resume`` an existing checkpoint is loaded and training continues after its epoch.
    Under ``torchrun`` (torch.distributed initialised) the model is wrapped in DDP and each rank
    takes a disjoint shard of every epoch's permutation.
    """
    device = torch.device(device)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"fit needs uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("fit got an empty training set")
    if checkpoint is None and hooks is None and loss_fn is None and not extra_params:
        checkpoint = _auto_checkpoint(model, x, y, weights, cfg, seed, desc)
        resume = resume or checkpoint is not None
    seed_everything(seed)
    rank, world = _distributed()
    x, y = x.to(device), y.to(device)
    w = None if weights is None else weights.to(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.whiten_stem:
        whiten_first_conv(model, x)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [{"params": [p for p in model.parameters() if p.requires_grad]}, *extra_params]
    optimizer = _optimizer(params, cfg)
    lookahead = Lookahead(model, cfg.lookahead_every, cfg.lookahead_alpha) if cfg.lookahead_every > 0 else None
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    per_rank = len(x) // world
    bs = cfg.batch_size
    steps_per_epoch = max(1, per_rank // bs if cfg.drop_last and per_rank >= bs else -(-per_rank // bs))
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    epochs = -(-total // steps_per_epoch)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    mult = lr_multiplier(cfg.schedule, total, steps_per_epoch, cfg.milestones, cfg.gamma,
                         int(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio)
    augment = build_augment(cfg.augment)
    loss_fn = loss_fn or (lambda m, b: weighted_cross_entropy(m, b, cfg.label_smoothing))
    hooks = hooks or TrainHooks()
    state = TrainState(model, optimizer, total_steps=total)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    extra = [p for g in extra_params for p in g["params"]]
    start_epoch = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        start_epoch = _load_checkpoint(checkpoint, state, gen, aug_gen, extra, lookahead)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    bar = tqdm(total=total, initial=state.step, desc=desc, disable=not cfg.progress or rank != 0,
               leave=False, dynamic_ncols=True)
    train_model.train(cfg.train_mode)
    for epoch in range(start_epoch, epochs):
        state.epoch = epoch
        hooks.on_epoch_start(state)
        perm = torch.randperm(len(x), generator=gen).to(device)
        perm = perm[rank * per_rank : (rank + 1) * per_rank]
        epoch_loss = torch.zeros((), device=device)
        n_batches = 0
        for s in range(steps_per_epoch):
            if state.step >= total:
                break
            idx = perm[s * bs : (s + 1) * bs]
            raw = x[idx]
            xb = augment(raw.float().div_(255), generator=aug_gen)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            batch = Batch(xb, y[idx], idx, None if w is None else w[idx], raw)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * mult(state.step)
            with _autocast(device, cfg.amp):
                loss = loss_fn(train_model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            state.step += 1
            if lookahead is not None:
                lookahead.step(state.step)
            epoch_loss += loss.detach()  # stays on the device: no host sync per step
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), state.step - 1, first_bad)
            n_batches += 1
            bar.update(1)
            if state.step % 25 == 0:
                state.last_loss = float(loss.detach())
                _raise_if_diverged(first_bad, state, epoch, cfg, desc)
                bar.set_postfix(epoch=epoch, loss=f"{state.last_loss:.3f}", refresh=False)
            hooks.on_step_end(state)
        state.last_loss = float(epoch_loss) / max(1, n_batches)
        _raise_if_diverged(first_bad, state, epoch, cfg, desc)
        state.history.append({"epoch": epoch, "loss": state.last_loss})
        hooks.on_epoch_end(state)
        if checkpoint is not None and rank == 0:
            _save_checkpoint(checkpoint, state, gen, aug_gen, extra, epoch + 1, lookahead)
        if _WINDOW["deadline"] is not None and time.time() > _WINDOW["deadline"] and state.step < total:
            bar.close()
            raise BudgetExhausted(f"{desc}: time window over after epoch {epoch + 1}/{epochs}")
    bar.close()
    if lookahead is not None:
        lookahead.finish()
    model.eval()
    return state


class Lookahead:
    """Lookahead over the model's parameters and float buffers (BN statistics), as airbench's
    lookahead-EMA: every ``every`` steps ``slow += alpha (fast - slow)`` and the model is reset to
    ``slow``; :meth:`finish` leaves the slow weights in the model. All on the device, no syncs."""

    def __init__(self, model: nn.Module, every: int, alpha: float) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"lookahead_alpha must be in (0, 1], got {alpha}")
        self.every, self.alpha = int(every), float(alpha)
        self.fast = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
        self.fast = [t.data if isinstance(t, nn.Parameter) else t for t in self.fast]
        self.slow = [t.detach().clone() for t in self.fast]

    @torch.no_grad()
    def step(self, step: int) -> None:
        if step % self.every == 0:
            torch._foreach_lerp_(self.slow, self.fast, self.alpha)
            torch._foreach_copy_(self.fast, self.slow)

    @torch.no_grad()
    def finish(self) -> None:
        torch._foreach_copy_(self.fast, self.slow)


@torch.no_grad()
def whiten_first_conv(model: nn.Module, x: torch.Tensor, n_images: int = 5000, eps: float = 5e-4) -> None:
    """airbench's whitened stem for any model: the first ``Conv2d`` (bias-free, k x k) gets, in channel
    pairs (+w, -w), the PCA-whitening filters ``v / sqrt(lambda + eps)`` of the k x k patches of up to
    ``n_images`` training images (after the model's own input normalisation), largest variance first,
    and is frozen. Channels beyond twice the patch dimension keep their initialisation."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.groups != 1 or conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError("whiten_stem needs a model whose first layer is a plain square Conv2d")
    k = conv.kernel_size[0]
    xs = x[:n_images].to(conv.weight.device).float().div(255)
    norm = getattr(model, "normalize", None)
    if isinstance(norm, nn.Module):
        xs = norm(xs)
    patches = F.unfold(xs, k).transpose(1, 2).reshape(-1, conv.in_channels * k * k).double()
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    evals, evecs = torch.linalg.eigh(cov)
    order = evals.argsort(descending=True)
    filt = (evecs[:, order] / (evals[order].clamp_min(0) + eps).sqrt()).T  # (D, D), rows = filters
    n = min(conv.out_channels // 2, filt.shape[0])
    w = filt[:n].reshape(n, conv.in_channels, k, k).to(conv.weight)
    conv.weight[: 2 * n] = torch.cat([w, -w]).view(2, n, *w.shape[1:]).transpose(0, 1).reshape(2 * n, *w.shape[1:])
    conv.weight.requires_grad_(False)


def _raise_if_diverged(first_bad: torch.Tensor, state: TrainState, epoch: int, cfg: TrainConfig, desc: str) -> None:
    """Stop with :class:`TrainingDivergedError` once any loss so far was NaN/inf (one host sync, at points
    where the loop syncs anyway), so no NaN model reaches evaluation."""
    bad = int(first_bad)
    if bad >= 0 or not math.isfinite(state.last_loss):
        step = bad if bad >= 0 else state.step - 1
        raise TrainingDivergedError(
            f"{desc}: the training loss became non-finite at epoch {epoch}, step {step} (lr={cfg.lr:g}, "
            f"optimizer={cfg.optimizer}); the learning rate is most likely too high: lower it (train.lr or the defense's lr)")


def rng_states(aug_gen: torch.Generator) -> dict[str, Any]:
    """Every random stream a training step reads: the augmentation generator, torch's global CPU/CUDA
    generators (dropout, hooks), numpy's and Python's."""
    np_state = np.random.get_state()
    return {"augment": aug_gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
            "numpy": {"keys": np_state[1], "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": list(_flatten_py_state(random.getstate()))}


def _flatten_py_state(st: tuple) -> list:
    return [st[0], list(st[1]), st[2]]


def restore_rng_states(r: dict[str, Any], aug_gen: torch.Generator) -> None:
    """Inverse of :func:`rng_states`: a resumed run draws the same numbers as an uninterrupted one."""
    aug_gen.set_state(r["augment"])
    torch.set_rng_state(r["torch"])
    if r["cuda"]:
        torch.cuda.set_rng_state_all(list(r["cuda"]))
    n = r["numpy"]
    np.random.set_state(("MT19937", n["keys"], n["pos"], n["has_gauss"], n["gauss"]))
    v, internal, gauss = r["python"]
    random.setstate((v, tuple(internal), gauss))


def _save_checkpoint(path: str | Path, state: TrainState, gen: torch.Generator, aug_gen: torch.Generator,
                     extra: list[torch.Tensor], next_epoch: int, lookahead: "Lookahead | None" = None) -> None:
    """Atomic resume checkpoint through :mod:`bdseal.io` (safetensors + JSON, no pickle): model, optimiser,
    extra trainable tensors, epoch/step/history and every RNG state, so a resumed run equals an
    uninterrupted one."""
    save_tree(path, {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                     "extra": [p.detach() for p in extra], "epoch": next_epoch, "step": state.step,
                     "history": state.history, "generator": gen.get_state(), "rng": rng_states(aug_gen),
                     "lookahead": [] if lookahead is None else list(lookahead.slow)},
              {"kind": "train_checkpoint"})


def _load_checkpoint(path: str | Path, state: TrainState, gen: torch.Generator, aug_gen: torch.Generator,
                     extra: list[torch.Tensor], lookahead: "Lookahead | None" = None) -> int:
    ck, meta = load_tree(path)
    if meta.get("kind") != "train_checkpoint" or not isinstance(ck, dict):
        raise CorruptFileError(f"{path} is not a bdseal training checkpoint; delete it or pass another checkpoint path")
    state.model.load_state_dict(ck["model"])
    if lookahead is not None and ck.get("lookahead"):
        torch._foreach_copy_(lookahead.slow, [t.to(lookahead.slow[0].device) for t in ck["lookahead"]])
    state.optimizer.load_state_dict(ck["optimizer"])
    with torch.no_grad():
        for p, v in zip(extra, ck["extra"]):
            p.copy_(v)
    state.step, state.history = ck["step"], ck["history"]
    gen.set_state(ck["generator"])
    restore_rng_states(ck["rng"], aug_gen)
    return int(ck["epoch"])


@torch.no_grad()
def batched_eval(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor, *,
                 device: torch.device | str = "cpu", batch_size: int = 512, amp: bool = True,
                 tta_flip: bool = False) -> torch.Tensor:
    """``fn(batch)`` over images ``x`` (uint8, or float in [0, 1]) with ``model`` in eval mode, batched on
    ``device`` (bf16 autocast on CUDA when ``amp``); float32 CPU outputs concatenated along dim 0. The one
    inference loop behind predictions, SSL features, PGRL features and PGBD activations."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    out = []
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device)
            xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
            with _autocast(device, amp):
                yb = fn(xb).float()
                if tta_flip:  # test-time flip: mean of the image's and its mirror's outputs
                    yb = (yb + fn(xb.flip(-1)).float()) / 2
                out.append(yb.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def predict_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu", batch_size: int = 512,
                   tta_flip: bool = False) -> torch.Tensor:
    """Logits (N, K) of uint8 images, in eval mode, batched on ``device``; returned on CPU.
    ``tta_flip`` averages with the horizontally mirrored images' logits (the fast recipe's test-time flip)."""
    return batched_eval(model, model, x, device=device, batch_size=batch_size, tta_flip=tta_flip)


def predict(model: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu", batch_size: int = 512,
            tta_flip: bool = False) -> torch.Tensor:
    """Predicted labels (N,) of uint8 images."""
    return predict_logits(model, x, device=device, batch_size=batch_size, tta_flip=tta_flip).argmax(dim=1)
