"""``gssd``: generative self-supervised defense (seed ``gssd_paper.txt``, Algorithm 1).

1. features of the training images from a frozen backbone (``bdseal.ssl.backbone_features``; SimCLR by
   default, Table 3 ablation via ``backbone.kind``), standardised per dimension over the training set;
2. one normalizing flow per observed class (:mod:`.flows`, Eq. 1), all trained jointly, batched;
3. target classes: disruptive test first (Eq. 3-4 histogram rule), then the non-disruptive test on the
   remaining classes (Eq. 2; ``nd_rule``: ``absolute`` β_ND — the paper's rule [V] — or a relative rule,
   robust z or leave-one-out z of S_ND across classes, or ``either`` = absolute or robust);
4. poisoning score π = −log σ_y (Eq. 5-6), split into D̂_P / D̂_U / D̂_C (:mod:`.split`);
5. retrain a fresh model on D̂_C with the run's recipe, fine-tune on D̂'_P relabelled by Eq. 7
   (or the Table 4 variants, ``retrain``).

Source precedence: REFERENCE.md's GSSD facts (the authors' Appendix E values and code) over the seed text.
Unlike the authors' released retraining script, nothing here ever uses which samples are truly poisoned: the
split is computed from features and observed labels only. The result carries the split (``flagged`` = D̂_P,
``kept`` = D̂_C) so that the metrics — not the defense — count the poisons in each part.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from bdseal.errors import ConfigError
from bdseal.cache import fingerprint
from bdseal.io import save_tree
from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.defenses.gssd import scores as S
from bdseal.defenses.gssd.flows import FlowConfig, fit_class_flows
from bdseal.defenses.gssd.split import Split, split_dataset
from bdseal.train.loop import fit

DEFAULTS: dict[str, Any] = {
    "backbone": {"kind": "simclr"},
    "flow": {},
    "standardise": True,
    "min_class_size": 8,
    "nd_rule": "absolute",  # the paper's rule [V] | robust | loo | either (= absolute or robust)
    "beta_nd": 0.6,
    "robust_z": 3.5,
    "loo_z": 2.0,
    "detect_disruptive": True,
    "beta_d": 0.05,
    "lam": 0.75,
    "d_rule": "absolute",  # absolute (λ as given) | relative (λ_y = quantile d_quantile of the class's v)
    "d_quantile": 0.5,
    "bins": 30,
    "alpha_c": 0.3,
    "alpha_p": 0.15,
    "retrain": "clean_then_finetune",  # | original_then_finetune | clean_plus_relabelled
    "train": {},
    "finetune": {"epochs": 2, "lr": 1e-4, "schedule": "constant", "warmup_epochs": 0},
    "plots": True,
    "umap": False,
    "save_scores": True,
}
RETRAIN_MODES = ("clean_then_finetune", "original_then_finetune", "clean_plus_relabelled")
ND_RULES = ("absolute", "robust", "loo", "either")
D_RULES = ("absolute", "relative")


def resolve(cfg: dict[str, Any]) -> dict[str, Any]:
    """The defense config with defaults filled in; unknown keys and bad choices are errors."""
    c = {k: v for k, v in dict(cfg).items() if k != "name"}
    unknown = set(c) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"gssd: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **c}
    out["finetune"] = {**DEFAULTS["finetune"], **dict(c.get("finetune") or {})}
    if out["retrain"] not in RETRAIN_MODES:
        raise ConfigError(f"gssd: retrain={out['retrain']!r}; choose one of {RETRAIN_MODES}")
    if out["nd_rule"] not in ND_RULES:
        raise ConfigError(f"gssd: nd_rule={out['nd_rule']!r}; choose one of {ND_RULES}")
    if out["d_rule"] not in D_RULES:
        raise ConfigError(f"gssd: d_rule={out['d_rule']!r}; choose one of {D_RULES}")
    return out


def class_log_densities(z: torch.Tensor, labels: torch.Tensor, classes: list[int], flow_cfg: FlowConfig, *,
                        seed: int, device: torch.device, progress: bool) -> tuple[torch.Tensor, list[float]]:
    """(N, K) per-dimension log-densities of every sample under every class flow (Eq. 1 flows)."""
    flow, nll = fit_class_flows(z.to(device), labels.to(device), classes, flow_cfg, seed=seed, device=device,
                                progress=progress)
    return flow.log_prob_all(z.to(device), chunk=flow_cfg.chunk).cpu(), nll


def analyse(logp: torch.Tensor, labels: torch.Tensor, classes: list[int], c: dict[str, Any]) -> dict[str, Any]:
    """Target-class identification and per-sample scores from the (N, K) log-density matrix (pure).

    Returns S_ND, its robust z, histogram results, flagged ND / D classes (observed class ids), the margin
    s (Eq. 5), π = −log σ (Eq. 6) and the Eq. 7 relabel target of every sample. Samples of classes without
    a flow get s = NaN and π = min π − 1 (unscored = least suspicious).
    """
    col = S.class_columns(labels, classes)
    own, foreign, foreign_col = S.own_and_foreign(logp, col)
    snd = S.s_nd(logp, col)
    rz = S.robust_z(snd)
    lz = S.loo_z(snd)
    hist = []
    for k in range(len(classes)):  # one histogram per class (K small): no per-sample loop
        v = S.v_scores(foreign[col == k])
        lam = c["lam"] if c["d_rule"] == "absolute" else float(torch.quantile(v.double(), c["d_quantile"]))
        hist.append(S.histogram_rule(v, lam, int(c["bins"]), c["beta_d"]))
    d_flag = torch.tensor([h.flagged for h in hist], dtype=torch.bool) if c["detect_disruptive"] else torch.zeros(len(classes), dtype=torch.bool)
    absolute = S.nd_flags_absolute(snd, c["beta_nd"])
    robust = rz > c["robust_z"]
    loo = lz > c["loo_z"]
    nd_flag = {"absolute": absolute, "robust": robust, "loo": loo, "either": absolute | robust}[c["nd_rule"]] & ~d_flag
    s = S.margin(own, foreign)
    disruptive = torch.zeros(len(labels), dtype=torch.bool)
    disruptive[col >= 0] = d_flag[col[col >= 0]]
    pi = S.poisoning_score(s, disruptive)
    scored = ~torch.isnan(pi)
    if (~scored).any():
        pi = torch.where(scored, pi, (pi[scored].min() - 1.0) if scored.any() else torch.zeros_like(pi))
    cls = torch.as_tensor(classes, dtype=torch.long)
    return {
        "snd": snd, "robust_z": rz, "loo_z": lz, "hist": hist, "nd_abs": absolute, "nd_robust": robust,
        "nd": [int(cls[k]) for k in nd_flag.nonzero().squeeze(1).tolist()],
        "d": [int(cls[k]) for k in d_flag.nonzero().squeeze(1).tolist()],
        "s": s, "pi": pi, "relabel_to": cls[foreign_col], "foreign": foreign,
    }


def retrain(view: DefenderView, split: Split, c: dict[str, Any], ctx: RunContext) -> tuple[torch.nn.Module, dict[str, Any], torch.Tensor]:
    """Algorithm 1 lines 6-8 (or a Table 4 variant): fit a fresh model, then fine-tune on D̂'_P. Also returns
    the mask of samples trained on under their observed labels (D̂_C; everything for ``original_then_finetune``)."""
    tc = ctx.train_cfg.replace(**dict(c.get("train") or {}))
    ft = tc.replace(**c["finetune"])
    rel = split.relabels >= 0
    x, y = view.x, view.y.clone()
    y_rel = y.clone()
    y_rel[rel] = split.relabels[rel].to(y.dtype)
    mode = c["retrain"]
    if mode == "clean_then_finetune":
        keep = split.clean
    elif mode == "original_then_finetune":
        keep = torch.ones_like(split.clean)
    else:
        keep = split.clean | rel
    model = ctx.build_model()
    idx = keep.nonzero().squeeze(1).cpu()
    labels = y if mode == "original_then_finetune" else y_rel  # "original": the data as observed
    fit(model, x[idx], labels[idx], tc, device=ctx.device, seed=ctx.seed, desc="gssd retrain")
    info: dict[str, Any] = {"retrain": mode, "n_train": len(idx), "finetuned_on": 0}
    if mode != "clean_plus_relabelled" and rel.any():
        ridx = rel.nonzero().squeeze(1).cpu()
        fit(model, x[ridx], y_rel[ridx], ft, device=ctx.device, seed=ctx.seed + 1, desc="gssd fine-tune")
        info["finetuned_on"] = len(ridx)
    return model, info, split.clean.clone() if mode != "original_then_finetune" else torch.ones_like(split.clean)


@dataclass
class Detection:
    """The detection stage's outputs: ``analysis`` (see :func:`analyse`), the classes that got a flow, the
    too-small classes skipped, the flows' final training NLL and the backbone features."""

    analysis: dict[str, Any]
    classes: list[int]
    skipped: list[int]
    nll: list[float]
    features: torch.Tensor


def detect(view: DefenderView, c: dict[str, Any], ctx: RunContext) -> Detection:
    """Algorithm 1 up to the scores: backbone features → per-class flows (cached) → :func:`analyse`. ``c`` is a
    :func:`resolve`-d config. Also the whole of ``scripts/gssd_null.py`` (validation runs of the rules)."""
    from bdseal.ssl import backbone_features  # imported lazily: bdseal.ssl imports bdseal.defenses.base

    labels = view.y.long().cpu()
    feats = backbone_features(view, dict(c["backbone"]), ctx).float()
    z = S.standardise(feats) if c["standardise"] else feats
    counts = torch.bincount(labels, minlength=view.num_classes)
    classes = [k for k in range(view.num_classes) if counts[k] >= c["min_class_size"]]
    skipped = [k for k in range(view.num_classes) if 0 < counts[k] < c["min_class_size"]]
    if skipped:
        msg = f"gssd: classes {skipped} have fewer than {c['min_class_size']} samples: no flow, treated as clean"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        ctx.log(msg)
    if len(classes) < 2:
        raise ConfigError(f"gssd needs at least two classes with >= {c['min_class_size']} samples, got {classes}")
    flow_cfg = FlowConfig(**dict(c["flow"]))
    parts = {"features": fingerprint({"f": feats}), "standardise": c["standardise"], "classes": classes,
             "labels": fingerprint({"y": labels}), "flow": vars(flow_cfg), "seed": ctx.seed}

    def compute() -> dict[str, Any]:
        logp, nll = class_log_densities(z, labels, classes, flow_cfg, seed=ctx.seed, device=ctx.device, progress=ctx.progress)
        return {"logp": logp, "nll": nll}

    dens = ctx.cache.get_or_compute("gssd_logp", parts, compute)
    return Detection(analyse(dens["logp"], labels, classes, c), classes, skipped, dens["nll"], feats)


@register_defense("gssd", check=resolve)
def defend(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """GSSD end to end (Algorithm 1); see the module docstring and docs/gssd.md."""
    c = resolve(cfg)
    labels = view.y.long().cpu()
    det = detect(view, c, ctx)
    a, classes = det.analysis, det.classes
    flagged_classes = sorted(a["nd"] + a["d"])
    if flagged_classes:
        split = split_dataset(labels, a["pi"], a["relabel_to"], a["nd"], a["d"], c["alpha_c"], c["alpha_p"])
        ctx.log(f"gssd: target classes ND={a['nd']} D={a['d']}; split {split.sizes()}")
    else:
        n = len(labels)
        split = Split(torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool),
                      torch.full((n,), -1, dtype=torch.long))
        ctx.log("gssd: no class flagged as poisoned — training normally on the whole training set")
    model, info, kept = retrain(view, split, c, ctx)
    extras = _extras(a, classes, det.skipped, split, c, det.nll, info)
    if ctx.run_dir is not None:
        _save_outputs(ctx, c, a, labels, classes, det.features)
    return DefenseResult(model, scores=a["pi"].float(), flagged=split.poisoned.clone(), relabels=split.relabels.clone(),
                         kept=kept, extras=extras)


def _extras(a: dict[str, Any], classes: list[int], skipped: list[int], split: Split, c: dict[str, Any],
            nll: list[float], info: dict[str, Any]) -> dict[str, Any]:
    r4 = lambda v: None if v != v else round(float(v), 4)  # noqa: E731 - NaN-safe rounding
    return {
        "detected_targets": sorted(a["nd"] + a["d"]),
        "nd_targets": a["nd"], "d_targets": a["d"],
        "no_class_flagged": not (a["nd"] or a["d"]),
        "nd_rule": c["nd_rule"], "d_rule": c["d_rule"], "beta_nd": c["beta_nd"], "robust_z_threshold": c["robust_z"],
        "loo_z_threshold": c["loo_z"],
        "s_nd": {str(k): r4(v) for k, v in zip(classes, a["snd"].tolist())},
        "nd_nll_foreign": {str(k): r4(-v) for k, v in zip(classes, a["snd"].tolist())},
        "s_nd_robust_z": {str(k): r4(v) for k, v in zip(classes, a["robust_z"].tolist())},
        "s_nd_loo_z": {str(k): r4(v) for k, v in zip(classes, a["loo_z"].tolist())},
        "s_d": {str(k): r4(h.s_d) for k, h in zip(classes, a["hist"])},
        "mu": {str(k): r4(h.mu) for k, h in zip(classes, a["hist"])},
        "lam": {str(k): r4(h.lam) for k, h in zip(classes, a["hist"])},
        "flow_train_nll": {str(k): r4(v) for k, v in zip(classes, nll)},
        "unscored_classes": skipped,
        "split": split.sizes(), **info,
    }


def _save_outputs(ctx: RunContext, c: dict[str, Any], a: dict[str, Any], labels: torch.Tensor, classes: list[int],
                  feats: torch.Tensor) -> None:
    """Scores for the experiment layer (``gssd_scores.safetensors``) and the defender-side plots (Fig. 2, Fig. 3
    without ground-truth colouring, optional Fig. 1 UMAP without poison marking)."""
    from bdseal.defenses.gssd import plots

    run_dir = ctx.run_dir
    if c["save_scores"]:
        save_tree(run_dir / "gssd_scores.safetensors", {"pi": a["pi"], "s": a["s"], "labels": labels, "classes": classes, "nd": a["nd"],
                                                        "d": a["d"], "relabel_to": a["relabel_to"], "foreign_logp": a["foreign"]},
                  {"kind": "gssd_scores"})
    if not c["plots"]:
        return
    v = a["foreign"].exp()
    col = S.class_columns(labels, classes)
    plots.plot_vy_histograms({k: v[col == j] for j, k in enumerate(classes)}, {k: h.mu for k, h in zip(classes, a["hist"])},
                             lam={k: h.lam for k, h in zip(classes, a["hist"])}, bins=int(c["bins"]), flagged=a["nd"] + a["d"], path=run_dir / "gssd_vy_hist.png")
    for t in a["nd"] + a["d"]:
        m = labels == t
        plots.plot_sigma_distribution(a["pi"][m], None, title=f"class {t}: −log σ (higher = suspicious)",
                                      path=run_dir / f"gssd_sigma_class{t}.png")
    if c["umap"]:
        plots.plot_umap(feats, labels, None, path=run_dir / "gssd_umap.png", seed=ctx.seed)
