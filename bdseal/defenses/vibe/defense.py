"""``vibe``: VIBE — variational EM over latent clean labels (seed ``vibe_readme.md``, ICCV 2025).

Facts from REFERENCE.md: prior log_softmax(c·π); FM-A
freezes μ_y; the first E-step uses a uniform p(y|l); E-steps at iterations 0, T, 2T, …; Leiden filter
for SS variants only; SS backbones are fine-tuned, FM backbones frozen (cached features).

Variants (config keys; the four named presets set them): ``backbone`` ss | fm, ``corruption``
x ("-F", the authors' ``mixxcond``) | class ("-A"), ``freeze`` (default: false for ss, true for fm).

Two M-step paths, one EM:
* fine-tuned backbone — ``bdseal.train.fit`` on the images with a ``loss_fn`` (the M-step NLL),
  ``extra_params`` (π with its own lr) and a ``TrainHooks.on_step_end`` that runs the E-step every T
  iterations;
* frozen backbone (FM, or ``freeze=true``) — a small SGD loop on the cached feature matrix: ``fit``
  takes uint8 images and would re-run the frozen encoder (a ViT-g at 224 px for FM) on every batch,
  while the features never change, so the loop indexes the (N, D) matrix directly.

Outputs: ``relabels`` = final pseudo-labels of every sample (a final E-step after training; samples
removed by the Leiden filter get argmax of the model posterior p(l|x, y)); ``flagged`` = pseudo-label
≠ observed label, or removed by the filter; ``scores`` = 1 − q(l = observed label | x, y), q the
row-normalised final transport plan (1 for removed samples). ``extras["e_steps"]`` logs, per E-step,
the agreement of pseudo-labels with the *observed* labels, the fraction changed since the previous
E-step and Sinkhorn's iterations/error. The returned model maps [0, 1] images to ln p(l|x).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bdseal.errors import ConfigError
from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.defenses.vibe.em import corruption_diagnostics, e_step, joint_log_probs, observed_agreement
from bdseal.defenses.vibe.leiden_filter import leiden_filter
from bdseal.defenses.vibe.model import Prior, VIBEClassifier, VIBEHead
from bdseal.prototypes import class_means
from bdseal.ssl import backbone_features, extract_features, load_backbone
from bdseal.train.loop import Batch, TrainHooks, TrainState, fit

DEFAULTS: dict[str, Any] = {
    "backbone": "ss", "corruption": "x", "freeze": None, "freeze_mu_y": None, "leiden": None, "normalize_features": None,
    "ssl": {"kind": "simclr", "arch": "small_half", "epochs": 10, "proj_bn": True, "weight_decay": 1e-6},
    "fm": {"kind": "foundation", "checkpoint": None, "image_size": 224},
    "kappa": 10.0, "nu": None, "prior_scale": 0.02, "lam": 25.0,
    "iterations": 30000, "e_step_every": None, "lr": None, "prior_lr": 0.1, "batch_size": None,
    "momentum": 0.9, "weight_decay": 5e-4, "augment": "crop_flip",
    "sinkhorn_max_iter": 1000, "sinkhorn_tol": 1e-6,
    "leiden_k": 50, "leiden_resolutions": [0.1, 3.0, 50], "leiden_delta": 0.275,
}
# Per-backbone defaults [V]: SS lr 1e-3, batch 256, T 1000; FM lr 1e-2, batch 1024, T 500.
BACKBONE_DEFAULTS = {"ss": {"lr": 1e-3, "batch_size": 256, "e_step_every": 1000},
                     "fm": {"lr": 1e-2, "batch_size": 1024, "e_step_every": 500}}
# Whether SS variants L2-normalise features by default (FM always do, as the authors' code effectively
# does). On for SS too — a departure from the authors' SS code — because it was better on every seed of the
# digits comparison in docs/vibe.md ("Feature scale"): clean accuracy +4-6 points, SS-F FPR 0.09 -> 0.01.
SS_NORMALIZE_DEFAULT = True
PRESETS = {"vibe_ss_f": {"backbone": "ss", "corruption": "x"}, "vibe_ss_a": {"backbone": "ss", "corruption": "class"},
           "vibe_fm_f": {"backbone": "fm", "corruption": "x"}, "vibe_fm_a": {"backbone": "fm", "corruption": "class"}}


def resolve(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in; auto values (None) resolved per variant; unknown keys are an error."""
    cfg = {k: v for k, v in dict(cfg).items() if k not in ("name", "clean_per_class", "clean_fraction")}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"vibe: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    c = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(cfg)}
    if c["backbone"] not in BACKBONE_DEFAULTS:
        raise ConfigError(f"vibe: backbone must be 'ss' or 'fm', got {c['backbone']!r}")
    for k, v in BACKBONE_DEFAULTS[c["backbone"]].items():
        if c[k] is None:
            c[k] = v
    fm = c["backbone"] == "fm"
    c["freeze"] = fm if c["freeze"] is None else bool(c["freeze"])
    if fm and not c["freeze"]:
        raise ConfigError("vibe: foundation backbones are frozen (freeze=false is not supported for backbone=fm)")
    if c["corruption"] not in ("x", "class"):
        raise ConfigError(f"vibe: corruption must be 'x' (VIBE-*-F) or 'class' (VIBE-*-A), got {c['corruption']!r}")
    c["freeze_mu_y"] = (fm and c["corruption"] == "class") if c["freeze_mu_y"] is None else bool(c["freeze_mu_y"])
    c["leiden"] = (not fm) if c["leiden"] is None else bool(c["leiden"])
    nf = c["normalize_features"]
    c["normalize_features"] = (fm or SS_NORMALIZE_DEFAULT) if nf is None else bool(nf)
    return c


class _Trainable(nn.Module):
    """Encoder + head as one module for ``fit`` (the prior is an extra param group with its own lr)."""

    def __init__(self, encoder: nn.Module, head: VIBEHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head


class _EM:
    """Pseudo-labels, the E-step log and the E-step itself over a fixed subset of the training set."""

    def __init__(self, head: VIBEHead, prior: Prior, y: torch.Tensor, c: dict[str, Any], ctx: RunContext) -> None:
        self.head, self.prior, self.y, self.c, self.ctx = head, prior, y, c, ctx
        self.labels = torch.zeros_like(y)
        self.log: list[dict[str, Any]] = []
        self.history: list[tuple[int, torch.Tensor]] = []  # (step, pseudo-labels of the kept samples)
        self.last_plan: torch.Tensor | None = None

    def run(self, v: torch.Tensor, step: int, first: bool = False) -> None:
        """E-step on features ``v`` of the kept samples; labels updated in place."""
        res = e_step(self.head, self.prior, v.to(self.y.device), self.y, self.c["lam"], uniform_corruption=first,
                     max_iter=self.c["sinkhorn_max_iter"], tol=self.c["sinkhorn_tol"])
        new = res.labels.to(self.labels.device)
        changed = round(float((new != self.labels).float().mean()), 6) if self.log else None
        self.labels.copy_(new)
        self.history.append((step, new.to(torch.int32).cpu()))
        self.last_plan = res.log_plan
        diag = corruption_diagnostics(self.head, v.to(self.y.device))
        entry = {"step": step, "agree_observed": round(observed_agreement(new, self.y), 6), "changed": changed,
                 **{k: round(val, 6) for k, val in diag.items()},
                 "sinkhorn_iters": res.iterations, "marginal_error": float(f"{res.marginal_error:.3e}")}
        self.log.append(entry)
        self.ctx.log(f"vibe E-step {entry}")


def _train_finetune(encoder: nn.Module, head: VIBEHead, prior: Prior, x: torch.Tensor, y: torch.Tensor,
                    em: _EM, c: dict[str, Any], ctx: RunContext) -> None:
    """M-steps with ``fit`` on images (backbone fine-tuned), E-steps from a step hook."""
    dev = ctx.device
    tc = ctx.train_cfg.replace(steps=int(c["iterations"]), batch_size=int(c["batch_size"]), optimizer="sgd", lr=float(c["lr"]),
                               momentum=float(c["momentum"]), nesterov=False, weight_decay=float(c["weight_decay"]),
                               schedule="constant", warmup_epochs=0.0, augment=c["augment"], label_smoothing=0.0,
                               progress=ctx.progress)
    every = int(c["e_step_every"])

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        m = getattr(model, "module", model)
        v = m.encoder.features(batch.x)
        return m.head.nll(v, batch.y, em.labels[batch.index], prior.log_prior())

    class Hooks(TrainHooks):
        def on_step_end(self, state: TrainState) -> None:
            if state.step % every == 0 and state.step < state.total_steps:
                em.run(extract_features(encoder, x, dev), state.step)

    fit(_Trainable(encoder, head), x, y, tc, device=dev, loss_fn=loss_fn, hooks=Hooks(), seed=ctx.seed,
        extra_params=[{"params": [prior.pi], "lr": float(c["prior_lr"])}], desc="vibe")


def _train_frozen(head: VIBEHead, prior: Prior, v: torch.Tensor, y: torch.Tensor, em: _EM, c: dict[str, Any],
                  ctx: RunContext) -> None:
    """M-steps on a cached (N, D) feature matrix: minibatch SGD over epoch permutations, no augmentation."""
    dev = ctx.device
    v = v.to(dev)
    opt = torch.optim.SGD([{"params": [p for p in head.parameters() if p.requires_grad]},
                           {"params": [prior.pi], "lr": float(c["prior_lr"])}],
                          lr=float(c["lr"]), momentum=float(c["momentum"]), weight_decay=float(c["weight_decay"]))
    gen = torch.Generator().manual_seed(ctx.seed)
    bs, every, total = min(int(c["batch_size"]), len(v)), int(c["e_step_every"]), int(c["iterations"])
    perm, pos = torch.randperm(len(v), generator=gen), 0
    for step in tqdm(range(1, total + 1), desc="vibe (features)", disable=not ctx.progress, leave=False):
        if pos + bs > len(v):
            perm, pos = torch.randperm(len(v), generator=gen), 0
        idx = perm[pos:pos + bs].to(dev)
        pos += bs
        loss = head.nll(v[idx], y[idx], em.labels[idx], prior.log_prior())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 and step < total:
            em.run(v, step)


@torch.no_grad()
def _final_outputs(head: VIBEHead, prior: Prior, v_all: torch.Tensor, y_all: torch.Tensor, keep: torch.Tensor,
                   em: _EM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relabels, flagged, scores) for every training sample (see module doc)."""
    keep = keep.cpu()
    log_post = torch.log_softmax(joint_log_probs(head, prior, v_all, y_all), dim=1).cpu()
    relabels = log_post.argmax(1)
    relabels[keep] = em.labels.cpu()
    q = torch.log_softmax(em.last_plan.float().cpu(), dim=1).exp()  # row-normalised plan
    scores = torch.ones(len(y_all))
    scores[keep] = 1 - q.gather(1, em.y.cpu().view(-1, 1)).squeeze(1)
    flagged = (relabels != y_all.cpu()) | ~keep
    return relabels, flagged, scores


def _maybe_unit(v: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
    """Features as the head sees them: L2-normalised with ``normalize_features`` (then the initial class
    means have norm ≤ 1, as in the authors' FM runs), else raw."""
    return torch.nn.functional.normalize(v.float(), dim=1) if c["normalize_features"] else v


def run_vibe(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """The whole defense: backbone → (Leiden filter) → EM → defended classifier."""
    c = resolve(cfg)
    dev, k = ctx.device, view.num_classes
    bcfg = c["fm"] if c["backbone"] == "fm" else c["ssl"]
    feats = backbone_features(view, bcfg, ctx)
    encoder = load_backbone(view, bcfg, ctx)
    extras: dict[str, Any] = {"variant": {key: c[key] for key in ("backbone", "corruption", "freeze", "freeze_mu_y", "leiden",
                                                                  "normalize_features")}}
    keep = torch.ones(len(feats), dtype=torch.bool)
    if c["leiden"]:
        lr = leiden_filter(feats, k, k=int(c["leiden_k"]), resolutions=tuple(c["leiden_resolutions"]),
                           delta=float(c["leiden_delta"]), seed=ctx.seed)
        keep = lr.keep
        extras["leiden"] = lr.summary()
        ctx.log(f"vibe Leiden filter: {extras['leiden']}")
    idx = keep.nonzero().squeeze(1)
    y = view.y[idx].to(dev)
    v0 = feats[idx].to(dev)
    head = VIBEHead(class_means(_maybe_unit(v0, c), y, k), c["kappa"], c["nu"], c["corruption"], c["freeze_mu_y"],
                    normalize_input=c["normalize_features"]).to(dev)
    prior = Prior(k, c["prior_scale"], torch.Generator().manual_seed(ctx.seed)).to(dev)
    em = _EM(head, prior, y, c, ctx)
    em.run(v0, 0, first=True)
    if c["freeze"]:
        for p in encoder.parameters():
            p.requires_grad_(False)
        _train_frozen(head, prior, v0, y, em, c, ctx)
        v_all = feats.to(dev)
    else:
        x = view.x[idx]
        _train_finetune(encoder, head, prior, x, y, em, c, ctx)
        v_all = extract_features(encoder, view.x, dev).to(dev)
    em.run(v_all[idx.to(dev)], int(c["iterations"]))  # final E-step with the trained model
    relabels, flagged, scores = _final_outputs(head, prior, v_all, view.y.to(dev), keep, em)
    extras.update(e_steps=em.log, final_e_step=em.log[-1], n_kept=int(keep.sum()), n_flagged=int(flagged.sum()),
                  prior=[round(float(p), 6) for p in prior.log_prior().detach().exp()])
    model = VIBEClassifier(encoder, head, prior).to(dev).eval()
    history = []
    for step, labels in em.history:  # per E-step, over all N samples: −1 for those the filter removed
        full = torch.full((len(keep),), -1, dtype=torch.int32)
        full[keep] = labels
        history.append((step, full))
    return DefenseResult(model, scores=scores, flagged=flagged, relabels=relabels, extras=extras, relabel_history=history)


@register_defense("vibe", check=resolve)
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """VIBE with the variant given by ``backbone`` / ``corruption`` / ``freeze``."""
    return run_vibe(view, cfg, ctx)


def _preset(name: str):
    def fn(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
        return run_vibe(view, {**PRESETS[name], **dict(cfg)}, ctx)

    fn.__name__ = f"defend_{name}"
    fn.__doc__ = f"VIBE preset {name}: {PRESETS[name]} (config keys override)."
    return register_defense(name, check=lambda options: resolve({**PRESETS[name], **dict(options)}))(fn)


for _name in PRESETS:
    _preset(_name)
