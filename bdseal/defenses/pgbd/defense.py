"""PGBD entry points: ``pgbd``, ``pgbd_paper``, ``pgbd_lambda0``, ``nt_pgbd``, ``st_pgbd`` (seed
``pgbd_paper.txt``; REFERENCE.md "PGBD").

Post-hoc threat model: the defender holds the backdoored model M_B and the clean subset D_S (the held-out
pool, 5% of the training split by default) and fine-tunes M_B into M_C with L = CE + λ·L_s (Eq. 4),
λ = 10, SGD lr 1e-4 / momentum 0.9 / weight decay 1e-4, 35 epochs, batch 16, no lr decay, no augmentation
of D_S, fp32 (no bf16 autocast, also for the double backward of L_s), the model kept in **eval mode**.

Presets (``bdseal/conf/defense/``), all running :func:`sanitise`:

- ``pgbd`` — **the authors' code defaults** (REFERENCE, their entry point ``get_arguments_2_preact``):
  activation = the output of the last residual block (after the add); the large-model mapping on, with E/D
  with bias receiving one Adam step per epoch (five in all: near-random); no prototype refresh.
- ``pgbd_paper`` — **the paper as written**: V_c = P_t − P_c without mapping, prototypes refreshed every 5
  epochs as P ← α·P_new + (1 − α)·P_old with α = 0.75.
- ``pgbd_lambda0`` — the λ = 0 control: the same fine-tuning (lr 1e-4, eval mode, D_S, budget) with CE only.
- ``nt_pgbd``: no target; the assumed target cycles through the classes every ``cycle_every`` epochs,
  t = cands[(t0 + ⌊e/k⌋) mod |cands|] (the paper: every 3 epochs on CIFAR-10), optionally over only the
  top-``candidates_topk`` Neural Cleanse classes.
- ``st_pgbd``: synthetic PAVs V_c^s = P'_c − P_c with P'_c the prototypes of D_S with the synthesised
  trigger applied. The authors used PixelBackdoor (REFERENCE); we use our Neural Cleanse trigger.

``fit`` calls ``model.train()`` once before its epoch loop, so the hook puts the model back in eval mode at
the start of every epoch. Prototype refresh (``update_every`` > 0): ``refresh: replace`` (the authors'
``--update_pav``; the mapping is then refitted from scratch) or ``refresh: weighted`` (α-weighting: their
``--weight_proto``, and the paper's text).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.errors import ConfigError
from bdseal.cache import fingerprint
from bdseal.data.dataset import ImageDataset
from bdseal.defenses.base import DefenderView, DefenseResult, RunContext, register_defense
from bdseal.defenses.pgbd import mapping as mp
from bdseal.defenses.pgbd.neural_cleanse import NCConfig, NCResult, neural_cleanse
from bdseal.defenses.pgbd.pav import (SPACES, class_prototypes, layer_activations, resolve_layer, sanitisation_terms,
                                      target_map, to_space)
from bdseal.prototypes import momentum_update
from bdseal.train.loop import Batch, TrainHooks, TrainState, fit


REFRESH_MODES = ("replace", "weighted")


def check_options(cfg: dict[str, Any]) -> None:
    """Config-only checks of PGBD's options (run before Neural Cleanse or any training)."""
    refresh = str(cfg.get("refresh", "replace"))
    if refresh not in REFRESH_MODES:
        raise ConfigError(f"defense.refresh must be one of {REFRESH_MODES}, got {refresh!r}")
    if int(cfg.get("cycle_every", 1)) < 1:
        raise ConfigError(f"defense.cycle_every must be >= 1, got {cfg.get('cycle_every')}")
    mapping = dict(cfg.get("mapping") or {})
    if mapping.get("enabled"):
        check_mapping_teacher(mapping)
    if str(cfg.get("space", "flatten")) not in SPACES:
        raise ConfigError(f"defense.space must be one of {SPACES}, got {cfg.get('space')!r}")


def check_mapping_teacher(mapping: dict[str, Any]) -> None:
    """The large-model mapping needs a teacher: a bdseal.ssl backbone config or a local foundation checkpoint."""
    if not mapping.get("teacher") and not mapping.get("teacher_checkpoint"):
        raise ConfigError("defense.mapping.enabled needs defense.mapping.teacher (a bdseal.ssl backbone config, "
                          "e.g. {kind: simclr, arch: small_half}) or defense.mapping.teacher_checkpoint (a local "
                          "foundation checkpoint); or set defense.mapping.enabled=false")


def nt_schedule(epochs: int, candidates: list[int], every: int = 1, t0: int = 0) -> list[int]:
    """NT-PGBD's assumed target per epoch: candidates[(t0 + ⌊e / every⌋) mod |candidates|]."""
    if not candidates:
        raise ConfigError("NT-PGBD needs at least one candidate target class")
    if every < 1:
        raise ConfigError(f"cycle_every must be >= 1, got {every}")
    return [candidates[(t0 + e // every) % len(candidates)] for e in range(epochs)]


def run_neural_cleanse(model: nn.Module, clean: ImageDataset, cfg: dict[str, Any], ctx: RunContext) -> NCResult:
    """Neural Cleanse on D_S, cached by (model weights, clean data, NC options, seed)."""
    nc_cfg = NCConfig.from_dict(cfg.get("neural_cleanse"))
    state = {k: v.detach().cpu().reshape(-1) for k, v in model.state_dict().items()}  # 0-dim tensors: see report
    parts = {"model": fingerprint(state), "clean": fingerprint({"x": clean.x, "y": clean.y}),
             "nc": asdict(nc_cfg), "seed": ctx.seed}

    def compute() -> dict[str, Any]:
        r = neural_cleanse(model, clean.x, nc_cfg, device=ctx.device, seed=ctx.seed, progress=ctx.progress)
        return {"masks": r.masks, "patterns": r.patterns, "norms": r.norms, "success": r.success,
                "anomaly": r.anomaly, "target": r.target, "flagged": r.flagged}

    return NCResult(**ctx.cache.get_or_compute("neural_cleanse", parts, compute))


def nc_extras(r: NCResult) -> dict[str, Any]:
    return {"inferred_target": r.target, "anomaly_index": [round(float(a), 4) for a in r.anomaly],
            "target_anomaly_index": float(r.anomaly[r.target]), "flagged": r.flagged,
            "mask_l1": [round(float(n), 3) for n in r.norms], "trigger_success": [round(float(s), 3) for s in r.success]}


@dataclass
class PAVState:
    """What L_s needs at each step; refreshed by the hooks."""

    centres: torch.Tensor  # (K, k, D)
    protos: torch.Tensor  # (K, D)
    V: torch.Tensor  # (K, D)
    active: torch.Tensor  # (K,) bool: classes whose samples contribute to L_s
    shadow_centres: torch.Tensor | None = None  # ST-PGBD: centres of triggered D_S
    shadow: torch.Tensor | None = None  # ST-PGBD: P'_c
    ls_sum: float | torch.Tensor = 0.0  # per-epoch sums, device tensors during the epoch
    ce_sum: float | torch.Tensor = 0.0
    n_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Sanitiser:
    """Builds prototypes and PAVs for one variant and provides the loss and hooks for ``fit``.

    Public for analysis scripts (``scripts/pgbd_grad_ratio.py``): ``state`` holds the current centres,
    prototypes and PAVs, ``clean_acts`` the layer activations of D_S at the latest prototype build."""

    def __init__(self, variant: str, model: nn.Module, clean: ImageDataset, cfg: dict[str, Any], ctx: RunContext,
                 nc: NCResult | None, target: int | None) -> None:
        self.variant, self.model, self.clean, self.ctx = variant, model, clean, ctx
        self.layer = resolve_layer(model, cfg.get("layer"))  # REFERENCE: the block output after the residual add
        self.space = cfg.get("space", "flatten")
        self.k = int(cfg.get("k", 3))
        self.lam = float(cfg.get("lam", 10.0))
        self.alpha = float(cfg.get("alpha", 0.75))
        self.update_every = int(cfg.get("update_every", 0) or 0)  # REFERENCE: refresh off in the authors' code
        self.refresh = str(cfg.get("refresh", "replace"))
        self.mapping_cfg: dict[str, Any] = dict(cfg.get("mapping") or {})
        self.K = clean.num_classes
        self.nc, self.target = nc, target
        self.targets = self._initial_targets(cfg)
        self.mapping: mp.Mapping | None = None
        self.mapping_losses: list[float] = []
        self.mapping_steps = 0
        self.act_shape: tuple[int, ...] = ()
        self.clean_acts = torch.empty(0)
        centres, protos, sc, sp = self._prototypes()
        if self.mapping_cfg.get("enabled"):
            self._fit_mapping()
        self.state = PAVState(centres, protos, torch.zeros_like(protos), torch.ones(self.K, dtype=torch.bool), sc, sp)
        self._refresh_pav()

    # -- targets and PAVs -------------------------------------------------------------------------
    def _initial_targets(self, cfg: dict[str, Any]) -> torch.Tensor:
        if self.variant == "pgbd" and cfg.get("target_map") is not None:
            return target_map(self.K, torch.tensor(list(cfg["target_map"])))
        if self.target is None:
            raise ConfigError(f"{self.variant}: no target class (known or inferred)")
        return target_map(self.K, self.target)

    def set_target(self, t: int) -> None:
        self.targets = target_map(self.K, t)
        self._refresh_pav()

    def _refresh_pav(self) -> None:
        s = self.state
        Q = s.shadow if self.variant == "st_pgbd" else s.protos[self.targets]
        if self.variant == "st_pgbd":
            s.active = torch.arange(self.K) != self.targets  # target-class samples contribute nothing
        else:
            s.active = self.targets != torch.arange(self.K)
        if self.mapping is not None:
            s.V = self.mapping.pav(s.protos, Q, self.act_shape)  # REFERENCE: V_c = E(D(P_c) − D(Q_c))
        else:
            s.V = Q - s.protos  # Eq. 1 (ST: V_c^s = P'_c − P_c)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        acts = layer_activations(self.model, x, self.layer, device=self.ctx.device)
        self.act_shape = tuple(acts.shape[1:])
        return acts

    def _prototypes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        acts = self._features(self.clean.x)
        self.clean_acts = acts
        centres, protos = class_prototypes(to_space(acts, self.space), self.clean.y, self.K, self.k, self.ctx.seed)
        sc = sp = None
        if self.variant == "st_pgbd":
            assert self.nc is not None and self.target is not None
            xt = self.nc.apply(self.clean.x.float().div(255), self.target)
            sacts = layer_activations(self.model, xt, self.layer, device=self.ctx.device)
            sc, sp = class_prototypes(to_space(sacts, self.space), self.clean.y, self.K, self.k, self.ctx.seed)
        return centres, protos, sc, sp

    def update_prototypes(self) -> None:
        """Refresh (REFERENCE): ``replace`` — P ← P_new and, with the mapping on, E/D refitted from scratch;
        ``weighted`` — P ← α·P_new + (1 − α)·P_old (α = 0.75 weights the new prototypes)."""
        c, p, sc, sp = self._prototypes()
        s = self.state
        a = 1.0 if self.refresh == "replace" else self.alpha
        s.centres = momentum_update(s.centres, c, a)
        s.protos = s.centres.mean(1)
        if sc is not None and s.shadow_centres is not None:
            s.shadow_centres = momentum_update(s.shadow_centres, sc, a)
            s.shadow = s.shadow_centres.mean(1)
        if self.mapping is not None and self.refresh == "replace":
            self._fit_mapping()
        self._refresh_pav()

    # -- large-model mapping -----------------------------------------------------------------------
    def _teacher_maps(self, xs: torch.Tensor, channels: int) -> torch.Tensor:
        """PCA-reduced teacher feature maps of ``xs`` (cached): a local foundation checkpoint
        (``mapping.teacher_checkpoint``, the authors' DINO) or a ``bdseal.ssl`` backbone pre-trained on D_S
        (``mapping.teacher``; its weights are cached by ``load_backbone``)."""
        m = self.mapping_cfg
        ckpt, tcfg = m.get("teacher_checkpoint"), dict(m.get("teacher") or {})
        check_mapping_teacher(m)
        parts = {"images": fingerprint(xs), "teacher": str(ckpt) if ckpt else tcfg,
                 "layer": m.get("teacher_layer"), "channels": channels, "seed": self.ctx.seed}

        def compute() -> torch.Tensor:
            if ckpt:
                teacher = mp.load_teacher(str(ckpt), self.ctx.device)
            else:
                from bdseal.ssl.features import load_backbone  # post-hoc: pre-trained on D_S only

                backbone = load_backbone(DefenderView(train=self.clean), tcfg, self.ctx)
                teacher = mp.staged_teacher(backbone, m.get("teacher_layer"))
            return mp.pca_reduce(mp.teacher_features(teacher, xs, self.ctx.device), channels)

        return self.ctx.cache.get_or_compute("pgbd_teacher", parts, compute)

    def _fit_mapping(self) -> None:
        """E/D fitted on the current D_S activations (REFERENCE: one Adam step per epoch in the authors' code)."""
        m = self.mapping_cfg
        if self.space != "flatten" or len(self.act_shape) != 3:
            raise ConfigError("large-model mapping needs space=flatten on a convolutional layer")
        sel = mp.balanced_indices(self.clean.y, int(m.get("images", 150)), seed=self.ctx.seed)
        t = self._teacher_maps(self.clean.x[sel], int(m.get("channels", 64)))
        res = mp.fit_mapping(t, self.clean_acts[sel], epochs=int(m.get("epochs", 5)), lr=float(m.get("lr", 1e-4)),
                             batch_size=int(m.get("batch_size", 16)), step_per=m.get("step_per", "epoch"),
                             bias=bool(m.get("bias", True)), seed=self.ctx.seed, device=self.ctx.device)
        self.mapping, self.mapping_losses, self.mapping_steps = res.mapping, res.losses, res.steps

    # -- fit plumbing -------------------------------------------------------------------------------
    def loss_fn(self, m: nn.Module, batch: Batch) -> torch.Tensor:
        """CE + λ·Σ_batch |cos(∇_a L_p, V_y)| (Eq. 4 with REFERENCE's L_s)."""
        net = getattr(m, "module", m)
        logits, acts = net.forward_with(batch.x, [self.layer])
        feat = to_space(acts[self.layer], self.space)
        ce = F.cross_entropy(logits.float(), batch.y)
        ls = sanitisation_terms(feat, batch.y, self.state.centres, self.state.V, self.state.active).sum()
        self.state.ls_sum = self.state.ls_sum + ls.detach().float()  # stays on the device: read once per epoch
        self.state.ce_sum = self.state.ce_sum + ce.detach().float()
        self.state.n_steps += 1
        return ce + self.lam * ls


class _EvalMode(TrainHooks):
    def on_epoch_start(self, state: TrainState) -> None:
        state.model.eval()  # REFERENCE: model kept in eval mode (BN statistics frozen) during sanitisation


class _Hooks(_EvalMode):
    def __init__(self, san: Sanitiser, schedule: list[int] | None) -> None:
        self.san, self.schedule = san, schedule

    def on_epoch_start(self, state: TrainState) -> None:
        super().on_epoch_start(state)
        if self.schedule is not None:
            self.san.set_target(self.schedule[state.epoch])
        s = self.san.state
        s.ls_sum = s.ce_sum = 0.0
        s.n_steps = 0

    def on_epoch_end(self, state: TrainState) -> None:
        s = self.san.state
        n = max(1, s.n_steps)
        s.history.append({"epoch": state.epoch, "ls": float(s.ls_sum) / n, "ce": float(s.ce_sum) / n})
        every = self.san.update_every
        if every and (state.epoch + 1) % every == 0:
            self.san.update_prototypes()


def ce_only(view: DefenderView, cfg: dict[str, Any], ctx: RunContext, name: str) -> DefenseResult:
    """λ = 0: PGBD's fine-tuning (same D_S, optimiser, budget, eval mode, no augmentation) with CE alone."""
    t_start = time.time()
    model = view.require_model(name).to(ctx.device).eval()
    clean = view.require_clean(name)
    fit(model, clean.x, clean.y, ctx.train_cfg.replace(**cfg.get("train", {})), device=ctx.device, hooks=_EvalMode(),
        seed=ctx.seed, desc=name)
    return DefenseResult(model.eval(), extras={"variant": name, "lam": 0.0, "defense_time_s": time.time() - t_start})


def sanitise(variant: str, view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """Shared body of the variants; λ = 0 runs :func:`ce_only` (no Neural Cleanse, no prototypes)."""
    check_options(cfg)
    if float(cfg.get("lam", 10.0)) == 0.0:
        return ce_only(view, cfg, ctx, variant)
    t_start = time.time()
    model = view.require_model(variant).to(ctx.device).eval()
    clean = view.require_clean(variant)
    extras: dict[str, Any] = {"variant": variant}
    nc: NCResult | None = None
    target: int | None = None
    schedule: list[int] | None = None
    train_cfg = ctx.train_cfg.replace(**cfg.get("train", {}))
    if variant == "nt_pgbd":
        topk = cfg.get("candidates_topk")
        cands = list(range(clean.num_classes))
        if topk:
            nc = run_neural_cleanse(model, clean, cfg, ctx)
            cands = [int(i) for i in torch.argsort(nc.anomaly, descending=True)[: int(topk)]]
        schedule = nt_schedule(train_cfg.epochs, cands, int(cfg.get("cycle_every", 3)), int(cfg.get("t0", 0)))
        target = schedule[0]
        extras["target_schedule"] = schedule
    else:
        needs_nc = variant == "st_pgbd" or (view.known_target is None and cfg.get("target_map") is None)
        if needs_nc:
            nc = run_neural_cleanse(model, clean, cfg, ctx)
        target = view.known_target if view.known_target is not None else (nc.target if nc is not None else None)
        extras["target_source"] = "known" if view.known_target is not None else ("map" if target is None else "neural_cleanse")
        extras["target_used"] = target if cfg.get("target_map") is None else list(cfg["target_map"])
    if nc is not None:
        extras["neural_cleanse"] = nc_extras(nc)
    san = Sanitiser(variant, model, clean, cfg, ctx, nc, target)
    extras["layer"], extras["space"] = san.layer, san.space
    fit(model, clean.x, clean.y, train_cfg, device=ctx.device, loss_fn=san.loss_fn, hooks=_Hooks(san, schedule),
        seed=ctx.seed, desc=variant)
    extras["ls_history"] = [round(h["ls"], 5) for h in san.state.history]
    extras["ce_history"] = [round(h["ce"], 5) for h in san.state.history]
    if san.mapping is not None:
        extras["mapping_losses"] = san.mapping_losses
        extras["mapping_steps"] = san.mapping_steps
    extras["defense_time_s"] = time.time() - t_start
    return DefenseResult(model.eval(), extras=extras)


@register_defense("pgbd", needs_clean=True, post_hoc=True, check=check_options)
def defend_pgbd(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """PGBD with the target known or inferred by Neural Cleanse."""
    return sanitise("pgbd", view, cfg, ctx)


@register_defense("pgbd_paper", needs_clean=True, post_hoc=True, check=check_options)
def defend_pgbd_paper(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """PGBD as the paper is written (preset ``pgbd_paper``: no mapping, α-weighted refresh every 5 epochs)."""
    return sanitise("pgbd", view, cfg, ctx)


@register_defense("pgbd_lambda0", needs_clean=True, post_hoc=True, check=check_options)
def defend_pgbd_lambda0(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """The λ = 0 control of PGBD: CE-only fine-tuning with PGBD's optimiser and budget."""
    return ce_only(view, cfg, ctx, "pgbd_lambda0")


@register_defense("nt_pgbd", needs_clean=True, post_hoc=True, check=check_options)
def defend_nt_pgbd(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """NT-PGBD: no target; cycle the assumed target."""
    return sanitise("nt_pgbd", view, cfg, ctx)


@register_defense("st_pgbd", needs_clean=True, post_hoc=True, check=check_options)
def defend_st_pgbd(view: DefenderView, cfg: dict[str, Any], ctx: RunContext) -> DefenseResult:
    """ST-PGBD: synthetic PAVs from the Neural Cleanse trigger."""
    return sanitise("st_pgbd", view, cfg, ctx)
