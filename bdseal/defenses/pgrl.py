"""PGRL — Prototype-Guided Robust Learning (seed ``pgrl_paper.txt``), and its ablation rows LCV and WCE.

Sources: the seed (Eqs. 1–3, Sec. 4, Sec. 5 "Defense Settings") and REFERENCE.md's PGRL section, which
records the authors' code ([V]). Where the two disagree REFERENCE.md is followed:

- LCV pseudo-labels: the seed says "majority voting" over the n augmented views; the authors' code
  *averages the Sinkhorn plans* of the views and takes the argmax (REFERENCE.md). ``vote: average`` is
  the default; ``vote: majority`` implements the seed's wording (ties broken by the averaged plan).
- Sinkhorn: SwAV style, ε = 0.05, exactly 3 iterations, no convergence test (REFERENCE.md).
- WCE loss: *sums* (not means) CE over D_v and over the trusted samples × views (REFERENCE.md).
- Detection rule for TPR/FPR: flagged ⇔ not label-consistent (REFERENCE.md; also counting
  negative weights is ``flag_rule: either``). WCE alone has no LCV, so there the
  reference rule falls back to "negative final weight".
- Learning-rate schedule: cosine 0.01 → 0.0001 as the seed says (their code runs constant; set
  ``train.schedule=constant`` to follow the code).
- From the authors' code (REFERENCE.md, corrected): D_v is *weakly* augmented and counts twice in the loss
  after warm-up; WCE weights come from the train-mode view-0 features collected during training; crops use
  reflect padding and RandAugment draws each op's parameter from the Table 10 ranges; 64×64 input and the
  2×2-pooled (2048-d) feature are options (``input_size``, ``feature_grid``). Warm-up and weight refreshes
  are scheduled in optimizer steps. Every difference to their code is tabulated in docs/pgrl.md.

The defender sees only the (possibly poisoned) training set with observed labels and the clean set
D_v (``clean_per_class`` per class, the threat model's grant). Nothing here reads ground truth.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdseal.errors import ConfigError
from bdseal.data.augment import build_augment
from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.io import load_tree, save_tensors, save_tree
from bdseal.ot import sinkhorn_log
from bdseal.plotting import pyplot, save_figure
from bdseal.prototypes import class_means
from bdseal.train.loop import Batch, TrainHooks, TrainState, batched_eval, fit

# ---------------------------------------------------------------------------------------------
# model: g (features, ReLU) -> s (FC-ReLU-FC, L2-normalised sphere) -> linear classifier
# ---------------------------------------------------------------------------------------------


class SphereClassifier(nn.Module):
    """The seed's f = c ∘ s ∘ g on top of any ``StagedClassifier`` backbone (its ``features`` is g).

    ``feature_relu`` applies a ReLU to the backbone features (the seed's g ends with a ReLU; for
    ReLU backbones it is a no-op, for GELU ones such as ``small`` it enforces the seed's form).
    ``input_size``: images are resized (bilinear) to this side before the backbone (the authors resize
    CIFAR to 64×64, REFERENCE.md); ``feature_grid``: the last feature map is average-pooled to a
    ``grid × grid`` map and flattened (authors: 2 → 2×2×512 = 2048-d on ResNet-18) instead of the
    backbone's global pool. Maps float images in [0, 1] to logits, so metrics use it like any classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, hidden_dim: int = 256, sphere_dim: int = 128,
                 feature_relu: bool = True, input_size: int | None = None, feature_grid: int = 1) -> None:
        super().__init__()
        if not hasattr(backbone, "features") or not hasattr(backbone, "feature_dim"):
            raise TypeError("PGRL needs a bdseal StagedClassifier backbone (with .features and .feature_dim)")
        if feature_grid < 1:
            raise ConfigError(f"feature_grid must be >= 1, got {feature_grid}")
        self.backbone = backbone
        self.feature_relu = feature_relu
        self.input_size = input_size
        self.feature_grid = int(feature_grid)
        self.feature_dim = backbone.feature_dim * self.feature_grid ** 2
        self.projector = nn.Sequential(nn.Linear(self.feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, sphere_dim))
        self.classifier = nn.Linear(sphere_dim, num_classes)
        self.backbone.head.requires_grad_(False)  # unused: the classifier sits on the sphere

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Images at the model's input side (no-op without ``input_size``)."""
        s = self.input_size
        if s is None or tuple(x.shape[-2:]) == (s, s):
            return x
        return F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resize(x)
        if self.feature_grid == 1:
            h = self.backbone.features(x)
        else:
            h = self.backbone.normalize(x)
            for stage in self.backbone.stages.values():
                h = stage(h)
            if h.ndim != 4 or h.shape[1] != self.backbone.feature_dim:
                raise ConfigError(f"feature_grid={self.feature_grid} needs a (B, {self.backbone.feature_dim}, H, W) last "
                                 f"feature map, got {tuple(h.shape)}")
            h = F.adaptive_avg_pool2d(h, self.feature_grid).flatten(1)
        return F.relu(h) if self.feature_relu else h

    def sphere(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(h).float(), dim=1)

    def embed_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(backbone features g, sphere vectors, logits) of a batch."""
        h = self.features(x)
        z = self.sphere(h)
        return h, z, self.classifier(z)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sphere vectors, logits) of a batch."""
        return self.embed_all(x)[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[1]


# ---------------------------------------------------------------------------------------------
# LCV: Sinkhorn pseudo-labels against prototypes (Eq. 1)
# ---------------------------------------------------------------------------------------------


def lcv_plans(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
              col_marginal: torch.Tensor | None = None) -> torch.Tensor:
    """Per-view SwAV Sinkhorn plans (V, B, K), each row a distribution over classes.

    ``scores`` (V, B, K) or (B, K): cosines between each view's sphere vectors and the prototypes. Each
    view is its own transport problem over the batch (the authors' per-batch, per-view Sinkhorn;
    REFERENCE.md: ε = 0.05, exactly ``iterations`` iterations, uniform class marginal or ``col_marginal``).
    SwAV's order, in log space and batched over the views (one tensor op per half-iteration, float32, no
    host sync): class normalisation to b_k, then sample normalisation to 1/B; the final ×B makes every
    row a distribution. It is the same fixed-iteration scaling as :func:`bdseal.ot.sinkhorn_log`
    (which does samples first and one problem at a time); the test pins it to SwAV's loop."""
    if scores.ndim == 2:
        scores = scores[None]
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    k = scores.shape[2]
    log_b = (torch.full((k,), -math.log(k), device=scores.device) if col_marginal is None
             else col_marginal.to(device=scores.device, dtype=torch.float32).clamp_min(1e-30).log())
    logq = scores.detach().float() / epsilon
    for _ in range(iterations):
        logq = logq - torch.logsumexp(logq, dim=1, keepdim=True) + log_b  # each class gets mass b_k
        logq = logq - torch.logsumexp(logq, dim=2, keepdim=True)  # each sample a distribution (×B folded in)
    return logq.exp()


def vote_labels(plans: torch.Tensor, vote: str = "average") -> torch.Tensor:
    """Pseudo-labels (B,) from per-view plans (V, B, K).

    ``average``: argmax of the view-averaged plan (the authors' code, REFERENCE.md).
    ``majority``: the most frequent per-view argmax (the seed's "majority voting"); ties go to the
    class with the larger averaged plan (0.5·p < 1 cannot overturn a one-vote difference)."""
    mean = plans.mean(0)
    if vote == "average":
        return mean.argmax(1)
    if vote == "majority":
        k = plans.shape[2]
        counts = F.one_hot(plans.argmax(2), k).sum(0).float()
        return (counts + 0.5 * mean / mean.sum(1, keepdim=True).clamp_min(1e-12)).argmax(1)
    raise ConfigError(f"unknown vote {vote!r}; use 'average' or 'majority'")


def lcv_pseudo_labels(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
                      col_marginal: torch.Tensor | None = None, vote: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
    """LCV pseudo-labels (B,) and the view-averaged plan (B, K) from cosine scores (V, B, K)."""
    plans = lcv_plans(scores, epsilon, iterations, col_marginal)
    return vote_labels(plans, vote), plans.mean(0)


# ---------------------------------------------------------------------------------------------
# WCE: densities under D_v (UMAP + unit-covariance Gaussians), Eq. 3 normalisation, Eq. 2 loss
# ---------------------------------------------------------------------------------------------


def normalize_weights(density: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """Eq. 3 as the authors' code does it (REFERENCE.md): densities above the ⌊τN⌋-th largest get
    weight 1; the others (≤ that cut-off) are min-max rescaled to [−1, 1]. Scale-invariant, so the
    densities may be given up to a positive factor (we pass exp(log p − max log p))."""
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"tau must be in [0, 1], got {tau}")
    d = density.double().flatten()
    n = d.numel()
    if n == 0:
        return d.float()
    cutoff = torch.sort(d, descending=True).values[min(int(math.floor(tau * n)), n - 1)]
    low = d <= cutoff
    w = torch.ones_like(d)
    lo_vals = d[low]
    w[low] = 2.0 * (lo_vals - lo_vals.min()) / (lo_vals.max() - lo_vals.min() + 1e-10) - 1.0
    return w.float()


def gaussian_max_log_density(points: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """log max_j N(x; a_j, I) for each row x of ``points`` (log space, exact)."""
    d = points.shape[1]
    sq = torch.cdist(points.double(), anchors.double()).pow(2).min(dim=1).values
    return -0.5 * sq - 0.5 * d * math.log(2 * math.pi)


def _umap_init(n: int, dim: int) -> str:
    return "spectral" if n > dim + 10 else "random"


def umap_reduce(x: np.ndarray, dim: int = 10, n_neighbors: int = 15, seed: int | None = 0, n_epochs: int | None = None) -> np.ndarray:
    """UMAP (umap-learn) of ``x`` to ``dim`` dimensions, given an exact kNN graph from ``torch.cdist``
    (``precomputed_knn``), which skips pynndescent's JIT compile. Too few points for UMAP
    (≤ dim + 2): returned unchanged."""
    n = x.shape[0]
    if n <= dim + 2:
        return x.astype(np.float32)
    from bdseal.knn import umap_embed

    return umap_embed(x, dim, n_neighbors, seed, n_epochs, init=_umap_init(n, dim))


def wce_log_density(feats: torch.Tensor, labels: torch.Tensor, clean_feats: torch.Tensor, clean_labels: torch.Tensor,
                    num_classes: int, dim: int = 10, n_neighbors: int = 15, seed: int | None = 0, n_epochs: int | None = None,
                    progress: bool = False, workers: int | None = 1) -> torch.Tensor:
    """Per-sample log density (N,) under its *labelled* class's clean features (REFERENCE.md): per
    class c, UMAP of D_v[c] ∪ {x : y = c} to ``dim``-d, then max over D_v[c] of N(·; ·, I).
    The per-class UMAPs run in up to ``workers`` processes (``None``: every allowed core), each seeded
    with ``seed + c``, so the result does not depend on ``workers``. ``seed=None``: multi-threaded,
    non-reproducible UMAP (see :func:`bdseal.knn.umap_embed`)."""
    from bdseal.knn import umap_embed_many

    out = torch.full((len(feats),), -float("inf"), dtype=torch.float64)
    jobs: list[tuple[int, torch.Tensor, int]] = []  # (class, sample indices, number of anchors)
    arrays: list[np.ndarray] = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        anchors = clean_feats[clean_labels == c]
        if len(idx) == 0:
            continue
        if len(anchors) == 0:
            raise ConfigError(f"PGRL: the clean set has no sample of class {c}")
        both = torch.cat([anchors, feats[idx]]).float().cpu().numpy()
        if len(both) <= dim + 2:  # too few points for UMAP: densities in the raw space
            out[idx] = gaussian_max_log_density(torch.from_numpy(both[len(anchors):]), torch.from_numpy(both[: len(anchors)]))
            continue
        jobs.append((c, idx, len(anchors)))
        arrays.append(both)
    if progress and jobs:
        log_msg = f"pgrl weights: {len(jobs)} per-class UMAPs of {max(len(a) for a in arrays)} points at most"
        tqdm.write(log_msg)
    reduced = umap_embed_many(arrays, dim, n_neighbors, [None if seed is None else seed + c for c, _, _ in jobs], n_epochs,
                              [_umap_init(len(a), dim) for a in arrays], workers=workers)
    for (c, idx, na), red in zip(jobs, reduced):
        red_t = torch.from_numpy(red)
        out[idx] = gaussian_max_log_density(red_t[na:], red_t[:na])
    return out


def fresh_weights(log_density: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 3 on densities given in log space (shifted by the max so exp never underflows the top)."""
    finite = torch.isfinite(log_density)
    shifted = torch.where(finite, log_density - log_density[finite].max(), torch.full_like(log_density, -1e30))
    return normalize_weights(shifted.exp(), tau)


def wce_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Eq. 2 (REFERENCE.md form): Σ w̃·CE with w̃ = 0 where w < 0 *and* the view is already
    misclassified ("stop unlearning", keeps the loss bounded), else w̃ = w. Inputs are per view-sample."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    stop = (weights < 0) & (logits.detach().argmax(1) != labels)
    wt = torch.where(stop, torch.zeros_like(weights), weights)
    total = (wt * ce).sum()
    return total if reduction == "sum" else total / max(1, ce.numel())


# ---------------------------------------------------------------------------------------------
# the training procedure
# ---------------------------------------------------------------------------------------------


@dataclass
class PGRLConfig:
    """Defense options (``conf/defense/{pgrl,lcv,wce,pgrl_recipe}.yaml``); defaults = REFERENCE.md [V]."""

    lcv: bool = True
    wce: bool = True
    clean_per_class: int = 10
    sphere_dim: int = 128
    hidden_dim: int = 256
    feature_relu: bool = True
    input_size: int | None = None  # authors: CIFAR resized to 64
    feature_grid: int = 1  # authors: 2 (2×2 average pool of the last map: 2048-d on ResNet-18)
    n_weak: int = 2
    n_strong: int = 4
    weak_augment: str = "crop_flip"
    strong_augment: str = "randaugment"
    strong_ops: int = 3
    weak_augment_args: dict[str, Any] = field(default_factory=dict)  # e.g. padding_mode: reflect
    strong_augment_args: dict[str, Any] = field(default_factory=dict)
    dv_augment: str = "weak"  # weak (authors' code) | strong | none: the view of D_v that makes prototypes and CE
    dv_copies: int = 2  # after warm-up D_v enters the loss this many times (authors: anchor + weight-estimation copy)
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    marginal: str = "uniform"  # uniform | observed
    vote: str = "average"  # average (authors' code) | majority (seed's wording)
    warmup_epochs: int = 5
    weight_start: int = 10
    weight_every: int = 5
    warmup_steps: int | None = None  # the same three in optimizer steps; null = the epoch values × steps per epoch
    weight_start_step: int | None = None
    weight_every_steps: int | None = None
    weight_features: str = "epoch"  # epoch: train-mode view-0 activations collected during the epoch (authors) | eval
    tau: float = 0.9
    momentum: float = 0.5
    umap_dim: int = 10
    umap_neighbors: int = 15
    umap_epochs: int | None = None  # null = umap-learn's default capped at bdseal.knn.UMAP_MAX_EPOCHS
    umap_parallel: bool = False  # True: multi-threaded unseeded UMAP (not bit-reproducible)
    umap_workers: int | None = None  # processes for the per-class UMAPs; null = every allowed core (deterministic)
    epoch_eval: bool = True  # log clean accuracy / ASR after every epoch through the runner's callback
    checkpoint: bool = False  # save model/optimizer/PGRL state to the run dir each epoch; a rerun into it resumes
    loss_reduction: str = "sum"
    flag_rule: str = "reference"  # reference | inconsistent | negative_weight | either
    score: str = "auto"  # auto | weight | lcv
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PGRLConfig":
        d = {k: v for k, v in d.items() if k not in ("name", "clean_fraction")}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown PGRL option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        if cfg.n_weak + cfg.n_strong < 1:
            raise ConfigError("PGRL needs at least one augmented view (n_weak + n_strong >= 1)")
        if cfg.marginal not in ("uniform", "observed"):
            raise ConfigError(f"marginal must be 'uniform' or 'observed', got {cfg.marginal!r}")
        if cfg.flag_rule not in ("reference", "inconsistent", "negative_weight", "either"):
            raise ConfigError(f"unknown flag_rule {cfg.flag_rule!r}")
        if cfg.dv_augment not in ("weak", "strong", "none"):
            raise ConfigError(f"defense.dv_augment must be weak, strong or none, got {cfg.dv_augment!r}")
        if cfg.weight_features not in ("epoch", "eval"):
            raise ConfigError(f"defense.weight_features must be 'epoch' or 'eval', got {cfg.weight_features!r}")
        if cfg.dv_copies < 1:
            raise ConfigError(f"defense.dv_copies must be >= 1, got {cfg.dv_copies}")
        return cfg

    def schedule_steps(self, steps_per_epoch: int) -> tuple[int, int, int]:
        """(warm-up steps, first weight refresh step, steps between refreshes): the ``*_step(s)`` options
        where set, else the epoch options × ``steps_per_epoch``. The authors' loop counts warm-up in steps
        (``batch_id < 5 · len(loader)``) and refreshes at the end of epochs 10, 15, ... (REFERENCE.md)."""
        s = max(1, int(steps_per_epoch))
        warm = self.warmup_steps if self.warmup_steps is not None else self.warmup_epochs * s
        start = self.weight_start_step if self.weight_start_step is not None else self.weight_start * s
        every = self.weight_every_steps if self.weight_every_steps is not None else self.weight_every * s
        return int(warm), int(start), max(1, int(every))


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps per epoch of ``bdseal.train.fit`` (single process)."""
    return max(1, n // batch_size if drop_last and n >= batch_size else -(-n // batch_size))


class PGRLTrainer(TrainHooks):
    """Holds the per-sample state (weights, label consistency) and provides fit's ``loss_fn`` and hooks.

    Every step after warm-up: D_v (one weak view, REFERENCE.md) + the batch's n views go through the model
    together; D_v gives the prototypes (normalised class means of its sphere vectors,
    ``bdseal.prototypes.class_means``) and its CE counts ``dv_copies`` times; LCV marks the trusted samples;
    the WCE loss is summed. Warm-up steps train on D_v only (the authors' loop: one D_v step per training
    step). The train-mode backbone features of view 0 are kept per sample during training; the weights are
    refreshed from them at the end of the first epoch that reaches the refresh step (authors: end of epochs
    10, 15, ...). No host synchronisation inside a step (the trusted count stays on the device)."""

    def __init__(self, model: SphereClassifier, view: DefenderView, cfg: PGRLConfig, ctx: RunContext,
                 steps_per_epoch: int = 1) -> None:
        self.model, self.cfg, self.ctx = model, cfg, ctx
        dev = ctx.device
        clean = view.require_clean("pgrl")
        self.k = view.num_classes
        self.x_train, self.y_train = view.x, view.y
        self.xv, self.yv = clean.x.to(dev), clean.y.to(dev)
        n = len(view.y)
        self.weights = torch.ones(n, device=dev)
        self.consistent = torch.ones(n, dtype=torch.bool, device=dev)
        self.p_label = torch.ones(n, device=dev)  # averaged LCV plan at the observed label, last visit
        self.warmup_steps, self.next_refresh, self.refresh_every = cfg.schedule_steps(steps_per_epoch)
        self.step = 0
        self.epoch = 0
        self.trusted_per_epoch: list[int] = []
        self.trusted_history: list[torch.Tensor] = []  # per post-warm-up epoch: label-consistent mask (N,)
        self.history_epochs: list[int] = []
        self.per_epoch: list[dict[str, Any]] = []
        self.weight_epochs: list[int] = []
        self.weight_steps: list[int] = []
        self._trusted_now = torch.zeros((), dtype=torch.long, device=dev)
        self._post_warmup_steps = 0
        self.feat_buf: torch.Tensor | None = None  # (N, D) train-mode features of view 0, last visit
        self.seen = torch.zeros(n, dtype=torch.bool, device=dev)
        self.dv_feat: torch.Tensor | None = None
        self.col_marginal = None
        if cfg.marginal == "observed":
            self.col_marginal = torch.bincount(view.y, minlength=self.k).double() / n
        self.gen = torch.Generator(device=dev).manual_seed(ctx.seed + 7919)
        self.weak = build_augment(cfg.weak_augment, **cfg.weak_augment_args)
        strong_kw = dict(cfg.strong_augment_args)
        if cfg.strong_augment == "randaugment":
            strong_kw.setdefault("num_ops", cfg.strong_ops)
        self.strong = build_augment(cfg.strong_augment, **strong_kw)
        self.dv_aug = {"weak": self.weak, "strong": self.strong, "none": build_augment("none")}[cfg.dv_augment]
        self.ckpt_dir = Path(ctx.run_dir) if cfg.checkpoint and ctx.run_dir is not None else None
        self._started = False

    # ---- resumable state (``checkpoint: true``)
    _RESUME_KEYS = ("weights", "consistent", "p_label", "next_refresh", "trusted_per_epoch", "trusted_history",
                    "history_epochs", "per_epoch", "weight_epochs", "weight_steps", "dv_feat")

    def _state_path(self, epoch: int) -> Path:
        assert self.ckpt_dir is not None
        return self.ckpt_dir / f"pgrl_resume_e{epoch}.safetensors"

    def save_state(self, epoch: int) -> None:
        """PGRL's per-sample state at the start of ``epoch`` (atomic write); the file of the epoch before
        is kept, so a stop between this save and fit's own checkpoint still resumes consistently."""
        state = {k: getattr(self, k) for k in self._RESUME_KEYS}
        state["trusted_history"] = [t.cpu() for t in self.trusted_history]
        state["gen"] = self.gen.get_state().cpu()
        path = self._state_path(epoch)
        save_tree(path, state, {"kind": "pgrl_resume"})  # atomic, safetensors + JSON
        for old in self.ckpt_dir.glob("pgrl_resume_e*.safetensors"):
            if old.name not in (path.name, self._state_path(epoch - 1).name):
                old.unlink(missing_ok=True)

    def load_state(self, epoch: int) -> None:
        path = self._state_path(epoch)
        if not path.exists():
            raise FileNotFoundError(f"PGRL resume: training restarts at epoch {epoch} from {self.ckpt_dir / 'pgrl_fit.ckpt'} "
                                    f"but {path.name} is missing; delete pgrl_fit.ckpt in that run dir to start over")
        state, _ = load_tree(path)
        dev = self.weights.device
        for k in self._RESUME_KEYS:
            v = state[k]
            setattr(self, k, v.to(dev) if isinstance(v, torch.Tensor) and k != "trusted_history" else v)
        self.gen.set_state(state["gen"].to(self.gen.get_state().device))

    @property
    def in_warmup(self) -> bool:
        return self.step < self.warmup_steps

    # ---- hooks
    def on_epoch_start(self, state: TrainState) -> None:
        if self.ckpt_dir is not None:
            if state.epoch > 0 and not self._started:
                self.load_state(state.epoch)  # fit resumed from its checkpoint: restore PGRL's state of that epoch
            self.save_state(state.epoch)
        self._started = True
        self.epoch, self.step = state.epoch, state.step
        self._trusted_now.zero_()
        self._post_warmup_steps = 0
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, state: TrainState) -> None:
        self.step = state.step

    def on_epoch_end(self, state: TrainState) -> None:
        self.step = state.step
        rec: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step}
        if self._post_warmup_steps > 0:  # int() syncs once per epoch, which also closes the epoch's timing
            self.trusted_per_epoch.append(int(self._trusted_now))
            rec["trusted"] = self.trusted_per_epoch[-1]
            if self.cfg.lcv:
                self.trusted_history.append(self.consistent.detach().cpu().clone())
                self.history_epochs.append(state.epoch + 1)
        else:
            self._sync()
        rec["train_s"] = round(time.perf_counter() - self._t0, 3)  # the epoch's steps (+ trusted-mask copy), wall
        rec["train_cpu_s"] = round(time.process_time() - self._c0, 3)  # the same in this process's CPU time
        c = self.cfg
        if c.wce and self.step >= self.next_refresh and self._post_warmup_steps > 0:
            t, tc = time.perf_counter(), time.process_time()
            self.refresh_weights()
            rec["refresh_s"] = round(time.perf_counter() - t, 3)
            rec["refresh_cpu_s"] = round(time.process_time() - tc, 3)  # worker processes' CPU not included
            self.weight_epochs.append(state.epoch + 1)
            self.weight_steps.append(state.step)
            while self.next_refresh <= self.step:
                self.next_refresh += self.refresh_every
        evaluate = getattr(self.ctx, "epoch_eval", None)
        if c.epoch_eval and evaluate is not None:
            was, t = self.model.training, time.perf_counter()
            rec.update({k: float(v) for k, v in evaluate(self.model).items()})
            self.model.train(was)
            rec["eval_s"] = round(time.perf_counter() - t, 3)
        self.per_epoch.append(rec)

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    # ---- weights
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return batched_eval(self.model.features, self.model, x, device=self.ctx.device, amp=False)

    def refresh_weights(self) -> None:
        """WCE weights: UMAP + Gaussian density (log space), Eq. 3, momentum (REFERENCE.md). Features: the
        train-mode view-0 activations collected while training (``weight_features: epoch``; samples not
        visited since warm-up get an eval-mode pass) with D_v's from the last step, or an eval-mode pass
        over the un-augmented images (``eval``)."""
        c = self.cfg
        if c.weight_features == "epoch" and self.feat_buf is not None and self.dv_feat is not None:
            feats = self.feat_buf.clone()
            if not bool(self.seen.all()):
                miss = torch.nonzero(~self.seen).flatten()
                feats[miss] = self._features(self.x_train[miss.cpu()]).to(feats.device)
            feats, clean = feats.cpu(), self.dv_feat.float().cpu()
        else:
            feats, clean = self._features(self.x_train), self._features(self.xv.cpu())
        logd = wce_log_density(feats, self.y_train.cpu(), clean, self.yv.cpu(), self.k, c.umap_dim, c.umap_neighbors,
                               None if c.umap_parallel else self.ctx.seed + 1000 * self.epoch, c.umap_epochs,
                               self.ctx.progress, workers=c.umap_workers)
        fresh = fresh_weights(logd, c.tau).to(self.weights.device)
        self.weights = c.momentum * fresh + (1.0 - c.momentum) * self.weights

    # ---- loss
    def _prep(self, raw: torch.Tensor) -> torch.Tensor:
        return self.model.resize(raw.float().div(255))

    def _views(self, raw: torch.Tensor) -> torch.Tensor:
        xf = self._prep(raw)
        views = [self.weak(xf, generator=self.gen) for _ in range(self.cfg.n_weak)]
        views += [self.strong(xf, generator=self.gen) for _ in range(self.cfg.n_strong)]
        return torch.cat(views)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``dv_copies``·Σ CE(D_v) + Σ_{trusted i, views} w̃_i·CE (REFERENCE.md); during warm-up Σ CE(D_v) alone.
        The authors forward the same augmented D_v batch twice (identical inputs); scaling its CE by
        ``dv_copies`` gives the same gradient without the second forward (only BatchNorm's batch statistics
        weigh D_v once instead of twice)."""
        c = self.cfg
        xv = self.dv_aug(self._prep(self.xv), generator=self.gen)
        if self.in_warmup:  # the authors' warm-up step: one copy of D_v
            ce = F.cross_entropy(model(xv).float(), self.yv, reduction="sum")
            return ce if c.loss_reduction == "sum" else ce / len(self.yv)
        self._post_warmup_steps += 1
        nv, b = len(self.yv), len(batch.y)
        views = c.n_weak + c.n_strong
        h, z, logits = model.embed_all(torch.cat([xv, self._views(batch.raw)]))
        self._keep_features(h, nv, b, batch.index)
        loss_v = c.dv_copies * F.cross_entropy(logits[:nv].float(), self.yv, reduction="sum")
        zu, lu = z[nv:], logits[nv:]
        y_rep = batch.y.repeat(views)
        w = self.weights[batch.index] if c.wce else torch.ones(b, device=batch.y.device)
        if c.lcv:
            protos = class_means(z[:nv].detach().float(), self.yv, self.k, normalize=True)
            scores = (zu.detach().float() @ protos.T).view(views, b, self.k)
            pseudo, mean_plan = lcv_pseudo_labels(scores, c.epsilon, c.sinkhorn_iters, self.col_marginal, c.vote)
            trusted = pseudo.to(batch.y.device) == batch.y
            self.consistent[batch.index] = trusted
            self.p_label[batch.index] = mean_plan.to(self.p_label.device).gather(1, batch.y[:, None].to(self.p_label.device)).squeeze(1)
            self._trusted_now += trusted.sum()
            w = w * trusted  # untrusted samples: weight 0 in every view (no boolean indexing: no host sync)
        else:
            self._trusted_now += b
        loss_u = wce_loss(lu, y_rep, w.repeat(views), "sum")
        total = loss_v + loss_u
        if c.loss_reduction == "sum":
            return total
        return total / (c.dv_copies * nv + views * (w != 0).sum().clamp_min(1))

    def _keep_features(self, h: torch.Tensor, nv: int, b: int, index: torch.Tensor) -> None:
        """Store the train-mode features of view 0 (per sample) and of D_v (last step) for the WCE weights."""
        if not self.cfg.wce or self.cfg.weight_features != "epoch":
            return
        h = h.detach().float()
        if self.feat_buf is None:
            self.feat_buf = torch.zeros(len(self.y_train), h.shape[1], device=h.device)
        self.feat_buf[index] = h[nv : nv + b]
        self.seen[index] = True
        self.dv_feat = h[:nv]

    # ---- outputs
    def flagged(self) -> torch.Tensor | None:
        rule = self.cfg.flag_rule
        if not (self.cfg.lcv or self.cfg.wce):
            return None  # the no-filtering control flags nothing and scores nothing
        if rule == "reference":
            rule = "inconsistent" if self.cfg.lcv else "negative_weight"
        neg = self.weights < 0
        incons = ~self.consistent
        return {"inconsistent": incons, "negative_weight": neg, "either": incons | neg}[rule].cpu()

    def scores(self) -> torch.Tensor | None:
        """Suspicion (higher = more suspicious): −final weight (WCE/PGRL), or 1 − averaged LCV plan
        probability of the observed label (LCV alone, or ``score: lcv``)."""
        if not (self.cfg.lcv or self.cfg.wce):
            return None
        use = self.cfg.score
        if use == "auto":
            use = "weight" if self.cfg.wce else "lcv"
        if use == "weight":
            return (-self.weights).float().cpu()
        if use == "lcv":
            return (1.0 - self.p_label).float().cpu()
        raise ConfigError(f"unknown score {use!r}; use auto, weight or lcv")

    def variant(self) -> str:
        c = self.cfg
        return {(True, True): "pgrl", (True, False): "lcv", (False, True): "wce", (False, False): "pgrl_recipe"}[(c.lcv, c.wce)]

    def extras(self) -> dict[str, Any]:
        w = self.weights.float().cpu()
        hist = torch.histc(w, bins=20, min=-1.0, max=1.0)
        return {
            "variant": self.variant(),
            "trusted_per_epoch": self.trusted_per_epoch,
            "per_epoch": self.per_epoch,
            "final_consistent": int(self.consistent.sum()),
            "weight_epochs": self.weight_epochs,
            "weight_steps": self.weight_steps,
            "schedule_steps": {"warmup": self.warmup_steps, "refresh_every": self.refresh_every},
            "weights": {"n_negative": int((w < 0).sum()), "n_one": int((w >= 1 - 1e-6).sum()),
                        "mean": float(w.mean()), "min": float(w.min()), "max": float(w.max()),
                        "hist_edges": [-1.0, 1.0], "hist_counts": [int(v) for v in hist.tolist()]},
            "flag_rule": self.cfg.flag_rule,
        }

    def state(self) -> dict[str, Any]:
        """What ``pgrl_state.safetensors`` holds: final weights, consistency, and the label-consistent mask after each
        post-warm-up epoch (the experiment layer scores it against the oracle)."""
        hist = torch.stack(self.trusted_history) if self.trusted_history else torch.zeros(0, len(self.weights), dtype=torch.bool)
        return {"weights": self.weights.cpu(), "consistent": self.consistent.cpu(), "trusted_history": hist,
                "history_epochs": torch.tensor(self.history_epochs, dtype=torch.long)}


def run_pgrl(view: DefenderView, cfg: dict[str, Any], ctx: RunContext, *, lcv: bool, wce: bool) -> DefenseResult:
    """Train the sphere classifier with LCV and/or WCE; return the model, flags, scores and extras."""
    pc = PGRLConfig.from_dict({**cfg, "lcv": lcv, "wce": wce})
    backbone = ctx.build_model()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed + 1)
        model = SphereClassifier(backbone, view.num_classes, pc.hidden_dim, pc.sphere_dim, pc.feature_relu,
                                 pc.input_size, pc.feature_grid)
    train_cfg = ctx.train_cfg.replace(**pc.train)
    trainer = PGRLTrainer(model, view, pc, ctx, steps_per_epoch(len(view.y), train_cfg.batch_size, train_cfg.drop_last))
    ckpt = Path(ctx.run_dir) / "pgrl_fit.ckpt" if trainer.ckpt_dir is not None else None
    fit(model, view.x, view.y, train_cfg, device=ctx.device, loss_fn=trainer.loss, hooks=trainer, seed=ctx.seed,
        desc=trainer.variant(), checkpoint=ckpt, resume=ckpt is not None)
    if ckpt is not None:  # finished: a later run into this dir starts over instead of "resuming" a finished fit
        ckpt.unlink(missing_ok=True)
        for f in Path(ctx.run_dir).glob("pgrl_resume_e*.safetensors"):
            f.unlink(missing_ok=True)
    if ctx.run_dir is not None:
        save_tensors(Path(ctx.run_dir) / "pgrl_state.safetensors", trainer.state(), {"kind": "pgrl_state"})
    return DefenseResult(model.eval(), scores=trainer.scores(), flagged=trainer.flagged(), extras=trainer.extras())


@register_defense("pgrl", needs_clean=True, check=PGRLConfig.from_dict)
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """PGRL = LCV + WCE (seed Sec. 4)."""
    return run_pgrl(view, cfg, ctx, lcv=True, wce=True)


@register_defense("lcv", needs_clean=True, check=PGRLConfig.from_dict)
def defend_lcv(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """LCV alone: trusted samples with plain CE (w = 1), seed footnote 3."""
    return run_pgrl(view, cfg, ctx, lcv=True, wce=False)


@register_defense("wce", needs_clean=True, check=PGRLConfig.from_dict)
def defend_wce(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """WCE alone: the whole batch (all samples trusted) with the weighted loss."""
    return run_pgrl(view, cfg, ctx, lcv=False, wce=True)


@register_defense("pgrl_recipe", needs_clean=True, check=PGRLConfig.from_dict, control_for=("pgrl", "lcv", "wce"))
def defend_recipe(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """Control: PGRL's recipe (sphere model, D_v warm-up and loss, views, optimizer) with no filtering —
    every sample trusted, w = 1. Separates the recipe's own accuracy cost from LCV's and WCE's."""
    return run_pgrl(view, cfg, ctx, lcv=False, wce=False)


def plot_per_epoch(per_epoch: list[dict[str, Any]], n_train: int, path: str | Path = "pgrl_per_epoch.png") -> Path:
    """Per-epoch curves: trusted-set fraction, fraction of the trusted set that is clean (oracle), clean
    accuracy and ASR (the runner's callback); missing series are skipped."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    series = [("trusted", "trusted / N", lambda v: v / max(1, n_train)), ("trusted_clean_frac", "clean share of trusted", None),
              ("clean_acc", "clean accuracy (test)", None), ("asr", "ASR (test)", None)]
    for key, label, fn in series:
        pts = [(r["epoch"], r[key]) for r in per_epoch if r.get(key) is not None and r[key] == r[key]]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [fn(y) if fn else y for y in ys], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_weight_distribution(weights: torch.Tensor, poison_mask: torch.Tensor | None = None,
                             path: str | Path = "pgrl_weights.png", bins: int = 40) -> Path:
    """Histogram of final WCE weights; with a ground-truth mask (supplied by the experiment layer,
    never by the defense) clean and poisoned samples are drawn separately, as the seed's figure."""
    plt = pyplot()

    w = torch.as_tensor(weights).float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    edges = np.linspace(-1.0, 1.0, bins + 1)
    if poison_mask is None:
        ax.hist(w, bins=edges, color="tab:blue", alpha=0.8, label="all samples")
    else:
        m = torch.as_tensor(poison_mask).bool().cpu().numpy()
        ax.hist(w[~m], bins=edges, color="tab:blue", alpha=0.6, label=f"clean ({int((~m).sum())})")
        ax.hist(w[m], bins=edges, color="tab:red", alpha=0.6, label=f"poisoned ({int(m.sum())})")
    ax.set_yscale("log")
    ax.set_xlabel("final WCE weight")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
