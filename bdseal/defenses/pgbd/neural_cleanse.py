"""Neural Cleanse (Wang et al., S&P 2019): per-class trigger reverse engineering + MAD outlier test.

For every class y a mask m_y ∈ [0,1]^{1×H×W} and a pattern p_y ∈ [0,1]^{C×H×W} (both through a sigmoid
of free parameters) are optimised on the clean subset so that x' = (1 − m)·x + m·p is classified as y,
with the NC objective CE(f(x'), y) + cost_y·‖m_y‖₁. The cost starts at ``init_cost`` and follows NC's
schedule: after ``patience`` steps with attack success ≥ ``threshold`` it is multiplied by 1.5, after
``patience`` steps below it divided by 1.5^1.5. The smallest-norm mask reaching the threshold is kept.
NC's early stop is optional (``early_stop_patience`` steps without the best norm falling below
``early_stop_threshold`` × its reference, once the cost has gone both up and down; read back every
``check_every`` steps). On CUDA the forward/backward runs under bf16 autocast in channels_last.

All classes are optimised together (a (K·B) batch per step, chunked by ``class_chunk``): no per-class
Python loop over training steps. The anomaly index of class c is (median(l) − l_c) / (1.4826·MAD(l))
over the L1 norms l; the class with the largest index is the inferred target, flagged when > 2.
The PGBD seed infers t with NC; REFERENCE notes the authors synthesise ST-PGBD's trigger with
PixelBackdoor — we use this Neural Cleanse trigger for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdseal.errors import ConfigError


@dataclass
class NCConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3
    threshold: float = 0.99
    patience: int = 5
    class_chunk: int = 10
    flag_threshold: float = 2.0
    amp: bool = True  # bf16 autocast + channels_last on CUDA (no effect on the CPU)
    # NC's early stop: a chunk stops once each of its classes has seen its cost both raised and lowered
    # and its best norm has not fallen below early_stop_threshold x its last reference for
    # early_stop_patience steps (0 = off: all ``steps`` run); read back every check_every steps.
    early_stop_patience: int = 0
    early_stop_threshold: float = 0.99
    check_every: int = 10

    @classmethod
    def from_dict(cls, d: dict | None) -> "NCConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown neural_cleanse option(s) {sorted(unknown)}")
        return cls(**d)


@dataclass
class NCResult:
    masks: torch.Tensor  # (K, 1, H, W) in [0, 1]
    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    norms: torch.Tensor  # (K,) L1 norms of the kept masks
    success: torch.Tensor  # (K,) attack success of the kept triggers on the clean subset
    anomaly: torch.Tensor  # (K,) anomaly index (higher = smaller mask than the others)
    target: int  # argmax anomaly
    flagged: bool  # anomaly[target] > flag threshold
    extras: dict = field(default_factory=dict)

    def apply(self, x01: torch.Tensor, cls: int) -> torch.Tensor:
        """x' = (1 − m)·x + m·p with the trigger reverse-engineered for class ``cls``."""
        m = self.masks[cls].to(x01.device)
        p = self.patterns[cls].to(x01.device)
        return (1 - m) * x01 + m * p


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """MAD anomaly index (median − l) / (1.4826·median|l − median|); large = abnormally small norm."""
    med = norms.median()
    mad = 1.4826 * (norms - med).abs().median()
    return (med - norms) / mad.clamp_min(1e-12)


def neural_cleanse(model: nn.Module, x: torch.Tensor, cfg: NCConfig, *, device: torch.device | str = "cpu",
                   seed: int = 0, classes: list[int] | None = None, progress: bool = False) -> NCResult:
    """Reverse-engineer a trigger for every class of ``model`` from uint8 images ``x`` (N, C, H, W)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.to(device).float().div_(255)
    n, c, h, w = x.shape
    k = int(model.num_classes)
    classes = list(range(k)) if classes is None else classes
    g = torch.Generator(device="cpu").manual_seed(seed)
    masks, patterns, norms, succ, steps = [], [], [], [], []
    try:
        for s in range(0, len(classes), cfg.class_chunk):
            chunk = torch.tensor(classes[s : s + cfg.class_chunk], device=device)
            m, p, l1, sr, ran = _reverse_chunk(model, x, chunk, cfg, g, progress)
            masks.append(m), patterns.append(p), norms.append(l1), succ.append(sr), steps.append(ran)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    masks_t, pats_t = torch.cat(masks).cpu(), torch.cat(patterns).cpu()
    norms_t, succ_t = torch.cat(norms).cpu(), torch.cat(succ).cpu()
    anom = anomaly_index(norms_t)
    best = int(anom.argmax())
    target = classes[best]
    full_masks = torch.zeros(k, 1, h, w)
    full_pats = torch.zeros(k, c, h, w)
    full_norms = torch.full((k,), float("nan"))
    full_succ = torch.full((k,), float("nan"))
    full_anom = torch.full((k,), float("nan"))
    idx = torch.tensor(classes)
    full_masks[idx], full_pats[idx], full_norms[idx], full_succ[idx], full_anom[idx] = masks_t, pats_t, norms_t, succ_t, anom
    return NCResult(full_masks, full_pats, full_norms, full_succ, full_anom, target,
                    bool(anom[best] > cfg.flag_threshold), extras={"steps": steps})


def _reverse_chunk(model: nn.Module, x: torch.Tensor, chunk: torch.Tensor, cfg: NCConfig, g: torch.Generator,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Optimise masks/patterns of the classes in ``chunk`` jointly; returns the kept ones and the
    number of steps run."""
    device = x.device
    kc = len(chunk)
    n, c, h, w = x.shape
    init = torch.randn(kc, 1, h, w, generator=g).to(device) * 0.1
    m_raw = (init - 2.0).requires_grad_(True)  # small initial masks
    p_raw = (torch.randn(kc, c, h, w, generator=g).to(device) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=cfg.lr, betas=(0.5, 0.9))
    cost = torch.full((kc,), cfg.init_cost, device=device)
    up = torch.zeros(kc, device=device)
    down = torch.zeros(kc, device=device)
    best_norm = torch.full((kc,), float("inf"), device=device)
    best_m = torch.sigmoid(m_raw).detach().clone()
    best_p = torch.sigmoid(p_raw).detach().clone()
    best_sr = torch.zeros(kc, device=device)
    bs = min(cfg.batch_size, n)
    # all batch indices drawn up front (same CPU stream as per-step draws), one copy to the device
    all_idx = torch.randint(n, (cfg.steps, bs), generator=g).to(device)
    cuda = device.type == "cuda" and cfg.amp
    fmt = torch.channels_last if cuda else torch.contiguous_format
    if cuda:
        model.to(memory_format=torch.channels_last)
    went_up = torch.zeros(kc, dtype=torch.bool, device=device)
    went_down = torch.zeros(kc, dtype=torch.bool, device=device)
    ref_norm = torch.full((kc,), float("inf"), device=device)
    stale = torch.zeros(kc, device=device)
    sr = torch.zeros(kc, device=device)
    step = -1
    for step in tqdm(range(cfg.steps), desc="neural cleanse", disable=not progress, leave=False):
        xb = x[all_idx[step]]  # (B, C, H, W)
        m = torch.sigmoid(m_raw)
        p = torch.sigmoid(p_raw)
        xt = (1 - m[:, None]) * xb[None] + m[:, None] * p[:, None]  # (kc, B, C, H, W)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(xt.flatten(0, 1).contiguous(memory_format=fmt))
        logits = out.float().view(kc, bs, -1)
        yt = chunk[:, None].expand(kc, bs)
        ce = F.cross_entropy(logits.flatten(0, 1), yt.flatten(), reduction="none").view(kc, bs).mean(1)
        l1 = m.flatten(1).sum(1)
        loss = (ce + cost * l1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sr = (logits.argmax(2) == yt).float().mean(1)
            ok = sr >= cfg.threshold
            better = ok & (l1 < best_norm)
            best_norm = torch.where(better, l1, best_norm)
            sel = better.view(-1, 1, 1, 1)
            best_m = torch.where(sel, m, best_m)
            best_p = torch.where(sel, p, best_p)
            best_sr = torch.where(better, sr, best_sr)
            up = torch.where(ok, up + 1, torch.zeros_like(up))
            down = torch.where(ok, torch.zeros_like(down), down + 1)
            raise_cost = up >= cfg.patience
            lower_cost = down >= cfg.patience
            cost = torch.where(raise_cost, cost * 1.5, cost)
            cost = torch.where(lower_cost, cost / 1.5**1.5, cost)
            up = torch.where(raise_cost, torch.zeros_like(up), up)
            down = torch.where(lower_cost, torch.zeros_like(down), down)
            if cfg.early_stop_patience > 0:
                went_up |= raise_cost
                went_down |= lower_cost
                improved = best_norm < cfg.early_stop_threshold * ref_norm
                ref_norm = torch.where(improved, best_norm, ref_norm)
                stale = torch.where(improved | ~(went_up & went_down), torch.zeros_like(stale), stale + 1)
                if (step + 1) % cfg.check_every == 0 and bool((stale >= cfg.early_stop_patience).all()):
                    break
    with torch.no_grad():  # classes that never reached the threshold keep their final trigger
        never = torch.isinf(best_norm)
        m, p = torch.sigmoid(m_raw), torch.sigmoid(p_raw)
        best_m = torch.where(never.view(-1, 1, 1, 1), m, best_m)
        best_p = torch.where(never.view(-1, 1, 1, 1), p, best_p)
        best_norm = torch.where(never, m.flatten(1).sum(1), best_norm)
        best_sr = torch.where(never, sr, best_sr)
    return best_m.detach().float(), best_p.detach().float(), best_norm.detach(), best_sr.detach(), step + 1
