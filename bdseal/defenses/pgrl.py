"""PGRL — Prototype-Guided Robust Learning (seed ``pgrl_paper.txt``), and its ablation rows LCV and WCE.

Sources: the seed (Eqs. 1–3, Sec. 4, Sec. 5 "Defense Settings") and REFERENCE.md's PGRL section, which
records the authors' code ([V]). Where the two disagree REFERENCE.md is followed:

- LCV pseudo-labels: the seed says "majority voting" over the n augmented views; the authors' code
  *averages the Sinkhorn plans* of the views and takes the argmax (REFERENCE.md). ``vote: average`` is
  the default; ``vote: majority`` implements the seed's wording (ties broken by the averaged plan).
- Sinkhorn: SwAV style, ε = 0.05, exactly 3 iterations, no convergence test (REFERENCE.md).
- WCE loss: *sums* (not means) CE over D_v and over the trusted samples × views (REFERENCE.md).
- Detection rule for TPR/FPR: flagged ⇔ not label-consistent (REFERENCE.md; the issue also counted
  negative weights — available as ``flag_rule: either``). WCE alone has no LCV, so there the
  reference rule falls back to "negative final weight".
- Learning-rate schedule: cosine 0.01 → 0.0001 as the seed says (their code runs constant; set
  ``train.schedule=constant`` to follow the code).

The defender sees only the (possibly poisoned) training set with observed labels and the clean set
D_v (``clean_per_class`` per class, the threat model's grant). Nothing here reads ground truth.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdseal.data.augment import build_augment
from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.io import save_tensors
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
    Maps float images in [0, 1] to logits, so metrics use it like any classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, hidden_dim: int = 256, sphere_dim: int = 128,
                 feature_relu: bool = True) -> None:
        super().__init__()
        if not hasattr(backbone, "features") or not hasattr(backbone, "feature_dim"):
            raise TypeError("PGRL needs a bdseal StagedClassifier backbone (with .features and .feature_dim)")
        self.backbone = backbone
        self.feature_relu = feature_relu
        self.projector = nn.Sequential(nn.Linear(backbone.feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, sphere_dim))
        self.classifier = nn.Linear(sphere_dim, num_classes)
        self.backbone.head.requires_grad_(False)  # unused: the classifier sits on the sphere

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone.features(x)
        return F.relu(h) if self.feature_relu else h

    def sphere(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(h).float(), dim=1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sphere vectors, logits) of a batch."""
        z = self.sphere(self.features(x))
        return z, self.classifier(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[1]


# ---------------------------------------------------------------------------------------------
# LCV: Sinkhorn pseudo-labels against prototypes (Eq. 1)
# ---------------------------------------------------------------------------------------------


def lcv_plans(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
              col_marginal: torch.Tensor | None = None) -> torch.Tensor:
    """Per-view SwAV-style Sinkhorn plans (V, B, K), each row a distribution over classes.

    ``scores`` (V, B, K): cosines between each view's sphere vectors and the prototypes. Each view is
    solved separately (REFERENCE.md: ε = 0.05, exactly ``iterations`` iterations, uniform class
    marginal or ``col_marginal``). SwAV's loop normalises classes first, then samples; ``bdseal.ot``
    does samples first. To reproduce SwAV's order exactly with :func:`bdseal.ot.sinkhorn_log`, the
    first class normalisation is applied to the scores up front, ``iterations − 1`` iterations run in
    ``sinkhorn_log`` and the last sample normalisation is the row softmax. (With only 3 iterations the
    order matters: it changes how balanced the assignment is.)"""
    if scores.ndim == 2:
        scores = scores[None]
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    k = scores.shape[2]
    log_b = (torch.full((k,), 1.0 / k, dtype=torch.float64, device=scores.device) if col_marginal is None
             else col_marginal.to(device=scores.device, dtype=torch.float64)).clamp_min(1e-300).log()
    plans = []
    for v in range(scores.shape[0]):  # V = 6 views: loop over views, not samples
        s = scores[v].detach().double() / epsilon
        s = s - torch.logsumexp(s, dim=0, keepdim=True) + log_b  # SwAV's first (class) normalisation
        res = sinkhorn_log(s * epsilon, epsilon, col_marginal=col_marginal, max_iter=iterations - 1, tol=None)
        plans.append(torch.softmax(res.log_plan.double(), dim=1))
    return torch.stack(plans).float()


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
    raise ValueError(f"unknown vote {vote!r}; use 'average' or 'majority'")


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
        raise ValueError(f"tau must be in [0, 1], got {tau}")
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


def umap_reduce(x: np.ndarray, dim: int = 10, n_neighbors: int = 15, seed: int | None = 0, n_epochs: int | None = None) -> np.ndarray:
    """UMAP (umap-learn) of ``x`` to ``dim`` dimensions, given an exact kNN graph from ``torch.cdist``
    (``precomputed_knn``), which skips pynndescent's JIT compile. Too few points for UMAP
    (≤ dim + 2): returned unchanged."""
    n = x.shape[0]
    if n <= dim + 2:
        return x.astype(np.float32)
    from bdseal.knn import umap_embed

    return umap_embed(x, dim, n_neighbors, seed, n_epochs, init="spectral" if n > dim + 10 else "random")


def wce_log_density(feats: torch.Tensor, labels: torch.Tensor, clean_feats: torch.Tensor, clean_labels: torch.Tensor,
                    num_classes: int, dim: int = 10, n_neighbors: int = 15, seed: int | None = 0, n_epochs: int | None = None,
                    progress: bool = False) -> torch.Tensor:
    """Per-sample log density (N,) under its *labelled* class's clean features (REFERENCE.md): per
    class c, UMAP of D_v[c] ∪ {x : y = c} to ``dim``-d, then max over D_v[c] of N(·; ·, I).
    ``seed=None``: multi-threaded, non-reproducible UMAP (see :func:`bdseal.knn.umap_embed`)."""
    out = torch.full((len(feats),), -float("inf"), dtype=torch.float64)
    for c in tqdm(range(num_classes), desc="pgrl weights", leave=False, disable=not progress):
        idx = torch.nonzero(labels == c).flatten()
        anchors = clean_feats[clean_labels == c]
        if len(idx) == 0:
            continue
        if len(anchors) == 0:
            raise ValueError(f"PGRL: the clean set has no sample of class {c}")
        both = torch.cat([anchors, feats[idx]]).float().cpu().numpy()
        red = torch.from_numpy(umap_reduce(both, dim, n_neighbors, None if seed is None else seed + c, n_epochs))
        out[idx] = gaussian_max_log_density(red[len(anchors):], red[: len(anchors)])
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
    """Defense options (``conf/defense/{pgrl,lcv,wce}.yaml``); defaults = REFERENCE.md [V]."""

    lcv: bool = True
    wce: bool = True
    clean_per_class: int = 10
    sphere_dim: int = 128
    hidden_dim: int = 256
    feature_relu: bool = True
    n_weak: int = 2
    n_strong: int = 4
    weak_augment: str = "crop_flip"
    strong_augment: str = "randaugment"
    strong_ops: int = 3
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    marginal: str = "uniform"  # uniform | observed
    vote: str = "average"  # average (authors' code) | majority (seed's wording)
    warmup_epochs: int = 5
    weight_start: int = 10
    weight_every: int = 5
    tau: float = 0.9
    momentum: float = 0.5
    umap_dim: int = 10
    umap_neighbors: int = 15
    umap_epochs: int | None = None
    umap_parallel: bool = False  # True: multi-threaded UMAP, faster on many cores but not bit-reproducible
    loss_reduction: str = "sum"
    flag_rule: str = "reference"  # reference | inconsistent | negative_weight | either
    score: str = "auto"  # auto | weight | lcv
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PGRLConfig":
        d = {k: v for k, v in d.items() if k not in ("name", "clean_fraction")}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PGRL option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        if cfg.n_weak + cfg.n_strong < 1:
            raise ValueError("PGRL needs at least one augmented view (n_weak + n_strong >= 1)")
        if cfg.marginal not in ("uniform", "observed"):
            raise ValueError(f"marginal must be 'uniform' or 'observed', got {cfg.marginal!r}")
        if cfg.flag_rule not in ("reference", "inconsistent", "negative_weight", "either"):
            raise ValueError(f"unknown flag_rule {cfg.flag_rule!r}")
        return cfg


class PGRLTrainer(TrainHooks):
    """Holds the per-sample state (weights, label consistency) and provides fit's ``loss_fn`` and hooks.

    Every step: D_v (one strong view) + the batch's n views go through the model together; D_v gives
    the prototypes (normalised class means of its sphere vectors, ``bdseal.prototypes.class_means``);
    LCV marks the trusted samples; the WCE loss is summed. Warm-up epochs train on D_v only
    (the authors' code: one D_v step per training step). Weights are refreshed at the start of epochs
    ``weight_start, weight_start + weight_every, ...`` over the whole un-augmented training set."""

    def __init__(self, model: SphereClassifier, view: DefenderView, cfg: PGRLConfig, ctx: RunContext) -> None:
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
        self.epoch = 0
        self.trusted_per_epoch: list[int] = []
        self.weight_epochs: list[int] = []
        self._trusted_now = 0
        self.col_marginal = None
        if cfg.marginal == "observed":
            self.col_marginal = torch.bincount(view.y, minlength=self.k).double() / n
        self.gen = torch.Generator(device=dev).manual_seed(ctx.seed + 7919)
        self.weak = build_augment(cfg.weak_augment)
        self.strong = build_augment(cfg.strong_augment, num_ops=cfg.strong_ops) if cfg.strong_augment == "randaugment" \
            else build_augment(cfg.strong_augment)

    # ---- hooks
    def on_epoch_start(self, state: TrainState) -> None:
        self.epoch = state.epoch
        self._trusted_now = 0
        c = self.cfg
        if c.wce and self.epoch >= c.weight_start and (self.epoch - c.weight_start) % max(1, c.weight_every) == 0:
            self.refresh_weights()

    def on_epoch_end(self, state: TrainState) -> None:
        if self.epoch >= self.cfg.warmup_epochs:
            self.trusted_per_epoch.append(int(self._trusted_now))

    # ---- weights
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return batched_eval(self.model.features, self.model, x, device=self.ctx.device, amp=False)

    def refresh_weights(self) -> None:
        """WCE weights: UMAP + Gaussian density (log space), Eq. 3, momentum (REFERENCE.md)."""
        c = self.cfg
        logd = wce_log_density(self._features(self.x_train), self.y_train.cpu(), self._features(self.xv.cpu()),
                               self.yv.cpu(), self.k, c.umap_dim, c.umap_neighbors,
                               None if c.umap_parallel else self.ctx.seed + 1000 * self.epoch,
                               c.umap_epochs, self.ctx.progress)
        fresh = fresh_weights(logd, c.tau).to(self.weights.device)
        self.weights = c.momentum * fresh + (1.0 - c.momentum) * self.weights
        self.weight_epochs.append(self.epoch)

    # ---- loss
    def _views(self, raw: torch.Tensor) -> torch.Tensor:
        xf = raw.float().div(255)
        views = [self.weak(xf, generator=self.gen) for _ in range(self.cfg.n_weak)]
        views += [self.strong(xf, generator=self.gen) for _ in range(self.cfg.n_strong)]
        return torch.cat(views)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Σ CE(D_v) + Σ_{trusted i, views} w̃_i·CE (REFERENCE.md); D_v only during warm-up."""
        c = self.cfg
        xv = self.strong(self.xv.float().div(255), generator=self.gen)
        if self.epoch < c.warmup_epochs:
            ce = F.cross_entropy(model(xv).float(), self.yv, reduction="sum")
            return ce if c.loss_reduction == "sum" else ce / len(self.yv)
        nv, b = len(self.yv), len(batch.y)
        views = c.n_weak + c.n_strong
        z, logits = model.embed(torch.cat([xv, self._views(batch.raw)]))
        loss_v = F.cross_entropy(logits[:nv].float(), self.yv, reduction="sum")
        zu, lu = z[nv:], logits[nv:]
        y_rep = batch.y.repeat(views)
        trusted = torch.ones(b, dtype=torch.bool, device=batch.y.device)
        if c.lcv:
            protos = class_means(z[:nv].detach().float(), self.yv, self.k, normalize=True)
            scores = (zu.detach().float() @ protos.T).view(views, b, self.k)
            pseudo, mean_plan = lcv_pseudo_labels(scores, c.epsilon, c.sinkhorn_iters, self.col_marginal, c.vote)
            trusted = pseudo.to(batch.y.device) == batch.y
            self.consistent[batch.index] = trusted
            self.p_label[batch.index] = mean_plan.to(self.p_label.device).gather(1, batch.y[:, None].to(self.p_label.device)).squeeze(1)
        self._trusted_now += int(trusted.sum())
        w = self.weights[batch.index] if c.wce else torch.ones(b, device=batch.y.device)
        keep = trusted.repeat(views)
        loss_u = wce_loss(lu[keep], y_rep[keep], w.repeat(views)[keep], "sum")
        total = loss_v + loss_u
        return total if c.loss_reduction == "sum" else total / (nv + int(keep.sum()))

    # ---- outputs
    def flagged(self) -> torch.Tensor:
        rule = self.cfg.flag_rule
        if rule == "reference":
            rule = "inconsistent" if self.cfg.lcv else "negative_weight"
        neg = self.weights < 0
        incons = ~self.consistent
        return {"inconsistent": incons, "negative_weight": neg, "either": incons | neg}[rule].cpu()

    def scores(self) -> torch.Tensor:
        """Suspicion (higher = more suspicious): −final weight (WCE/PGRL), or 1 − averaged LCV plan
        probability of the observed label (LCV alone, or ``score: lcv``)."""
        use = self.cfg.score
        if use == "auto":
            use = "weight" if self.cfg.wce else "lcv"
        if use == "weight":
            return (-self.weights).float().cpu()
        if use == "lcv":
            return (1.0 - self.p_label).float().cpu()
        raise ValueError(f"unknown score {use!r}; use auto, weight or lcv")

    def extras(self) -> dict[str, Any]:
        w = self.weights.float().cpu()
        hist = torch.histc(w, bins=20, min=-1.0, max=1.0)
        return {
            "variant": "pgrl" if self.cfg.lcv and self.cfg.wce else ("lcv" if self.cfg.lcv else "wce"),
            "trusted_per_epoch": self.trusted_per_epoch,
            "final_consistent": int(self.consistent.sum()),
            "weight_epochs": self.weight_epochs,
            "weights": {"n_negative": int((w < 0).sum()), "n_one": int((w >= 1 - 1e-6).sum()),
                        "mean": float(w.mean()), "min": float(w.min()), "max": float(w.max()),
                        "hist_edges": [-1.0, 1.0], "hist_counts": [int(v) for v in hist.tolist()]},
            "flag_rule": self.cfg.flag_rule,
        }


def run_pgrl(view: DefenderView, cfg: dict[str, Any], ctx: RunContext, *, lcv: bool, wce: bool) -> DefenseResult:
    """Train the sphere classifier with LCV and/or WCE; return the model, flags, scores and extras."""
    pc = PGRLConfig.from_dict({**cfg, "lcv": lcv, "wce": wce})
    backbone = ctx.build_model()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed + 1)
        model = SphereClassifier(backbone, view.num_classes, pc.hidden_dim, pc.sphere_dim, pc.feature_relu)
    trainer = PGRLTrainer(model, view, pc, ctx)
    train_cfg = ctx.train_cfg.replace(**pc.train)
    fit(model, view.x, view.y, train_cfg, device=ctx.device, loss_fn=trainer.loss, hooks=trainer, seed=ctx.seed,
        desc=trainer.extras()["variant"])
    if ctx.run_dir is not None:
        save_tensors(Path(ctx.run_dir) / "pgrl_state.safetensors", {"weights": trainer.weights, "consistent": trainer.consistent},
                     {"kind": "pgrl_state"})
    return DefenseResult(model.eval(), scores=trainer.scores(), flagged=trainer.flagged(), extras=trainer.extras())


@register_defense("pgrl", needs_clean=True)
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """PGRL = LCV + WCE (seed Sec. 4)."""
    return run_pgrl(view, cfg, ctx, lcv=True, wce=True)


@register_defense("lcv", needs_clean=True)
def defend_lcv(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """LCV alone: trusted samples with plain CE (w = 1), seed footnote 3."""
    return run_pgrl(view, cfg, ctx, lcv=True, wce=False)


@register_defense("wce", needs_clean=True)
def defend_wce(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """WCE alone: the whole batch (all samples trusted) with the weighted loss."""
    return run_pgrl(view, cfg, ctx, lcv=False, wce=True)


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
