"""K per-class normalizing flows held in one module with batched (per-class) weights (GSSD Eq. 1).

Architecture (REFERENCE.md, GSSD "Flows" [V]): per class, 2 steps of ActNorm (data-dependent init) +
affine coupling (MLP ``D/2 -> hidden -> D`` with ReLU, last layer zero-initialised, log-scale bounded by
``tanh``), the halves swapped between steps, a standard normal base; log-likelihoods are reported **per
dimension** (divided by D). Training: Adam 1e-3, 50 epochs, batch 16, maximum likelihood (Eq. 1).

Every weight tensor carries a leading class axis ``K``; a training step draws one mini-batch per class,
stacks them to ``(K, B, D)`` and runs all flows with ``torch.bmm``. The K losses touch disjoint
parameters and Adam is element-wise, so joint training equals K separate trainings (tested); a class
that has finished its own step budget is frozen (its parameters are restored after every later step).
``log_prob_all`` evaluates every sample under every flow in one batched pass: ``(N, K)``.

Why not zuko/FrEIA: neither offers K independent parameter sets evaluated in one batched kernel (a
conditional flow shares weights across classes, which is not the paper's per-class density), so the
small coupling flow is written here (about 100 lines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from bdseal.errors import TrainingDivergedError

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class FlowConfig:
    """Flow architecture and training recipe (defaults: REFERENCE.md, GSSD Appendix E values)."""

    steps: int = 2
    hidden: int | None = None  # None -> D // 2 (the authors' inflate_coef 1: 256 for 512-d features)
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    chunk: int = 4096  # samples per chunk in log_prob_all


class BatchedCouplingFlow(nn.Module):
    """K independent ActNorm + affine-coupling flows on ``dim``-d vectors, weights stacked on axis 0."""

    def __init__(self, num_flows: int, dim: int, steps: int = 2, hidden: int | None = None, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs at least 2 feature dimensions, got {dim}")
        self.num_flows, self.dim, self.steps = num_flows, dim, steps
        self.d1 = dim - dim // 2  # conditioning half of step 0 (the first chunk, as torch.chunk splits)
        self.d2 = dim - self.d1
        h = hidden or max(1, dim // 2)
        self.hidden = h
        k = num_flows
        self.an_shift = nn.Parameter(torch.zeros(steps, k, dim))
        self.an_logs = nn.Parameter(torch.zeros(steps, k, dim))
        self.register_buffer("an_ready", torch.zeros(k, dtype=torch.bool))
        w1, b1, w2, b2 = [], [], [], []
        for s in range(steps):
            # after an odd number of swaps the conditioning half has the other size
            din, dout = self._halves(s)
            bound = 1.0 / math.sqrt(din)  # nn.Linear's default init range
            w1.append((torch.rand(k, din, h, generator=generator) * 2 - 1) * bound)
            b1.append((torch.rand(k, h, generator=generator) * 2 - 1) * bound)
            w2.append(torch.zeros(k, h, 2 * dout))  # zero-init last layer: identity coupling at start
            b2.append(torch.zeros(k, 2 * dout))
        self.w1 = nn.ParameterList([nn.Parameter(t) for t in w1])
        self.b1 = nn.ParameterList([nn.Parameter(t) for t in b1])
        self.w2 = nn.ParameterList([nn.Parameter(t) for t in w2])
        self.b2 = nn.ParameterList([nn.Parameter(t) for t in b2])

    def _halves(self, step: int) -> tuple[int, int]:
        """(conditioning size, transformed size) at ``step``; halves are swapped between steps."""
        return (self.d1, self.d2) if step % 2 == 0 else (self.d2, self.d1)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, mask: torch.Tensor, which: torch.Tensor) -> None:
        """Glow's data-dependent ActNorm init from the first batch ``x`` (K, B, D) with validity ``mask``
        (K, B), for the flows selected by ``which`` (K,) bool."""
        w = mask.to(x.dtype).unsqueeze(-1)
        n = w.sum(1).clamp_min(2.0)
        z = x
        for s in range(self.steps):
            mean = (z * w).sum(1) / n
            std = (((z - mean[:, None]) ** 2 * w).sum(1) / (n - 1)).sqrt()  # unbiased, like torch.std
            self.an_shift.data[s, which] = mean[which]
            self.an_logs.data[s, which] = torch.log(std + 1e-6)[which]
            z, _ = self._step(z, s)
        self.an_ready[which] = True

    def _step(self, z: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One ActNorm + coupling (+ swap unless last) on (K, B, D); returns (z, log|det|) (K, B)."""
        z = (z - self.an_shift[s][:, None]) * torch.exp(-self.an_logs[s])[:, None]
        logdet = -self.an_logs[s].sum(-1)[:, None].expand(z.shape[0], z.shape[1])
        din, dout = self._halves(s)
        a, b = z[..., :din], z[..., din:]
        hdn = torch.relu(torch.baddbmm(self.b1[s][:, None], a, self.w1[s]))
        out = torch.baddbmm(self.b2[s][:, None], hdn, self.w2[s])
        log_s, t = torch.tanh(out[..., :dout]), out[..., dout:]
        b = torch.exp(log_s) * b + t
        logdet = logdet + log_s.sum(-1)
        z = torch.cat([b, a], -1) if s < self.steps - 1 else torch.cat([a, b], -1)
        return z, logdet

    def log_prob_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-density of ``x`` (K, B, D) under flow k for row k: (K, B)."""
        z, logdet = x, torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        for s in range(self.steps):
            z, ld = self._step(z, s)
            logdet = logdet + ld
        log_pz = -0.5 * (z**2).sum(-1) - 0.5 * self.dim * _LOG_2PI
        return (log_pz + logdet) / self.dim

    @torch.no_grad()
    def log_prob_all(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Per-dimension log-density of every sample under every flow: ``x`` (N, D) -> (N, K)."""
        out = []
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            out.append(self.log_prob_stacked(xb.unsqueeze(0).expand(self.num_flows, -1, -1)).T)
        return torch.cat(out) if out else x.new_zeros(0, self.num_flows)

    def slice(self, k: int) -> "BatchedCouplingFlow":
        """A one-flow copy of flow ``k`` (for tests and inspection)."""
        one = BatchedCouplingFlow(1, self.dim, self.steps, self.hidden)
        with torch.no_grad():
            for name, p in self.named_parameters():
                one.get_parameter(name).copy_(p[:, k:k + 1] if name.startswith("an_") else p[k:k + 1])
            one.an_ready.copy_(self.an_ready[k:k + 1])
        return one


def _class_batches(n: int, batch: int, epochs: int, gen: torch.Generator) -> torch.Tensor:
    """The index stream of ``epochs`` shuffled passes over ``n`` samples, padded with −1 to whole batches
    per epoch: (steps, batch)."""
    per_epoch = -(-n // batch)
    rows = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        pad = torch.full((per_epoch * batch - n,), -1, dtype=torch.long)
        rows.append(torch.cat([perm, pad]).view(per_epoch, batch))
    return torch.cat(rows)


def train_flows(flow: BatchedCouplingFlow, groups: Sequence[torch.Tensor], seeds: Sequence[int], cfg: FlowConfig,
                *, progress: bool = False, desc: str = "gssd flows") -> list[float]:
    """Maximum-likelihood training (Eq. 1) of flow k on ``groups[k]`` (n_k, D), all flows jointly.

    Flow k sees exactly the batches a separate training with ``torch.Generator().manual_seed(seeds[k])``
    would see (``epochs`` shuffled passes, last batch of each pass partial), for ``epochs·ceil(n_k/B)``
    Adam steps; afterwards it is frozen. Returns the final mean per-dim NLL of each flow's last epoch.
    """
    k = flow.num_flows
    if len(groups) != k or len(seeds) != k:
        raise ValueError(f"{k} flows but {len(groups)} groups / {len(seeds)} seeds")
    device = flow.an_shift.device
    streams = [_class_batches(len(g), cfg.batch_size, cfg.epochs, torch.Generator().manual_seed(int(s)))
               for g, s in zip(groups, seeds)]
    n_steps = torch.tensor([len(s) for s in streams])
    total = int(n_steps.max())
    idx = torch.full((k, total, cfg.batch_size), -1, dtype=torch.long)
    for j, s in enumerate(streams):
        idx[j, : len(s)] = s
    idx = idx.to(device)
    sizes = torch.tensor([len(g) for g in groups], device=device)
    data = torch.zeros(k, int(sizes.max()), flow.dim, device=device)
    for j, g in enumerate(groups):
        data[j, : len(g)] = g.to(device=device, dtype=torch.float32)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr)
    frozen: dict[int, list[torch.Tensor]] = {}
    steps_dev = n_steps.to(device)
    last_epoch_nll = torch.zeros(k, device=device)
    per_epoch = torch.tensor([-(-len(g) // cfg.batch_size) for g in groups], device=device)
    flow.train()
    diverged = torch.zeros(k, dtype=torch.bool, device=device)  # a flow's NLL was ever NaN/inf (no host sync)
    for t in tqdm(range(total), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        it = idx[:, t]  # (K, B)
        mask = it >= 0
        xb = torch.gather(data, 1, it.clamp_min(0)[..., None].expand(-1, -1, flow.dim))
        if t == 0:
            flow.data_init(xb, mask, ~flow.an_ready)
        lp = flow.log_prob_stacked(xb)
        w = mask.float()
        per_flow = -(lp * w).sum(1) / w.sum(1).clamp_min(1.0)  # mean NLL of each flow's own batch
        opt.zero_grad(set_to_none=True)
        per_flow.sum().backward()
        opt.step()
        active = t < steps_dev
        diverged |= active & ~torch.isfinite(per_flow.detach())
        last_epoch_nll += torch.where(active & (t >= steps_dev - per_epoch), per_flow.detach() / per_epoch, 0.0)
        done_now = [j for j in range(k) if int(n_steps[j]) == t + 1]
        for j in done_now:  # flow j has finished its own budget: keep these weights from now on
            frozen[j] = [p.detach()[_axis(name)(j)].clone() for name, p in flow.named_parameters()]
        if frozen:
            with torch.no_grad():
                for j, saved in frozen.items():
                    for (name, p), v in zip(flow.named_parameters(), saved):
                        p[_axis(name)(j)] = v
    flow.eval()
    if bool(diverged.any()):
        bad = diverged.nonzero().flatten().tolist()
        raise TrainingDivergedError(f"GSSD flow(s) {bad} (positions in the class list) produced a non-finite likelihood "
                                    f"(flow lr={cfg.lr:g}); lower defense.flow.lr or check the backbone features for NaN")
    return last_epoch_nll.tolist()


def _axis(name: str):
    """Index selecting flow j of parameter ``name`` (ActNorm tensors carry the step axis first)."""
    if name.startswith("an_"):
        return lambda j: (slice(None), j)
    return lambda j: j


def fit_class_flows(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], cfg: FlowConfig, *,
                    seed: int = 0, device: torch.device | str = "cpu", progress: bool = False
                    ) -> tuple[BatchedCouplingFlow, list[float]]:
    """One flow per class in ``classes`` trained on that class's (standardised) features."""
    gen = torch.Generator().manual_seed(int(seed))
    flow = BatchedCouplingFlow(len(classes), features.shape[1], cfg.steps, cfg.hidden, generator=gen).to(device)
    groups = [features[labels == c] for c in classes]
    seeds = [int(seed) * 1009 + int(c) for c in classes]
    nll = train_flows(flow, groups, seeds, cfg, progress=progress)
    return flow, nll
