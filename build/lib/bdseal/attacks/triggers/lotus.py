"""Lotus (Cheng et al., CVPR 2024): source-specific backdoor with partitioned triggers; key ``lotus``.

Facts (REFERENCE.md "Other attacks", the paper and the authors' public trigger code, read for facts):

- Source-specific (``default_mode = source_specific``): victims come from the source class (0 by
  default) and are relabelled to the target (9 by default); set in conf/attack/lotus.yaml.
- A secret partition function splits the source class into ``num_partitions`` = 4 partitions by
  k-means on *perceptual features*. *Chosen*: the L2-normalised penultimate features of the clean
  surrogate (:func:`train_surrogate`), k-means from :mod:`bdseal.prototypes` fitted on all source-class
  training images; test images get the partition of their nearest centre.
- Partition j's trigger is one solid coloured square of side ⌊H/5⌋, ⌊H/16⌋ from the border, at its
  own position (authors' layout: 0 top-left (0.9,0.1,0.1), 1 bottom-right (0.1,0.9,0.1), 2 top-right
  (0.1,0.1,0.9), 3 bottom-left (0.9,0.9,0.1); positions 4–7 at the edge midpoints exist for up to 8
  partitions). A poisoned sample of partition j gets square j and the target label.
- Trigger focusing (authors' code): *negative* samples keep the source label: "individual" negatives
  carry a single square of another partition, "combination" negatives carry their own square plus one
  other. In bdseal these negatives are the plan's **cover** samples. *Chosen*: covers are drawn from
  the not-poisoned source-class images (the authors derive negatives from victim-class images), half
  "individual" and half "combination" (``comb_fraction``), combination partner drawn by the seed.
  The default cover count equals the poison count: ``default_cover_rate(rate)`` = rate, used when the
  config's ``cover_rate`` is null; an explicit ``cover_rate`` wins.
- Rate (*chosen*, the paper's exact rate was not recoverable from our copy): 2% of the whole training
  set (= 20% of the source class on a balanced 10-class set) poisoned + 2% covers.
- At test time (ASR) each source-class image gets the square of its partition; the full trigger set is
  applied per partition, never mixed.

Lotus declares ``cover_pool = "source"``, so :func:`~bdseal.attacks.plan.make_plan` itself draws the
covers (seeded, right after the victims) among the not-poisoned source-class samples; ``fit`` only
checks that the plan's covers are such samples and draws their trigger combinations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bdseal.attacks.base import Attack, AttackContext, register_attack
from bdseal.attacks.plan import AttackConfigError, PoisonPlan
from bdseal.attacks.surrogate import train_surrogate
from bdseal.data.dataset import ImageDataset
from bdseal.prototypes import kmeans

COLOURS = torch.tensor([
    [0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1],
    [0.9, 0.1, 0.9], [0.1, 0.9, 0.9], [0.1, 0.1, 0.1], [0.9, 0.9, 0.9],
])
MAX_PARTITIONS = len(COLOURS)


def square_geometry(h: int, w: int) -> list[tuple[int, int, int]]:
    """(row, col, side) of the 8 trigger squares: side ⌊H/5⌋, inset ⌊H/16⌋ (authors' layout)."""
    s, pad, half = h // 5, h // 16, h // 2
    mid = half - s // 2
    return [(pad, pad, s), (h - s - pad, w - s - pad, s), (pad, w - s - pad, s), (h - s - pad, pad, s),
            (mid, pad, s), (pad, w // 2 - s // 2, s), (h - s - pad, w // 2 - s // 2, s), (mid, w - s - pad, s)]


def square_triggers(image_shape: tuple[int, int, int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (n, 1, H, W) and colour patterns (n, C, H, W) of the first ``n`` squares."""
    ch, h, w = image_shape
    if h < 8 or w < 8:
        raise AttackConfigError(f"lotus: images of {h}x{w} are too small for H/5 squares (need >= 8x8)")
    masks = torch.zeros(n, 1, h, w)
    for j, (r, c, s) in enumerate(square_geometry(h, w)[:n]):
        masks[j, :, r : r + s, c : c + s] = 1
    colours = COLOURS[:n] if ch == 3 else COLOURS[:n].mean(dim=1, keepdim=True).expand(n, ch)
    return masks, masks * colours[:, :, None, None]


def stamp_combination(x: torch.Tensor, bits: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Stamp, on each image, the squares whose bit is set in ``bits`` (B,) (squares never overlap)."""
    sel = ((bits[:, None] >> torch.arange(len(masks), device=bits.device)) & 1).to(x.dtype)  # (B, n)
    m = torch.einsum("bn,nchw->bchw", sel, masks.to(x))
    p = torch.einsum("bn,nchw->bchw", sel, patterns.to(x))
    return x * (1 - m) + p


@register_attack
class Lotus(Attack):
    """Lotus partitioned triggers with trigger-focusing covers."""

    name = "lotus"
    default_mode = "source_specific"
    cover_pool = "source"  # trigger-focusing negatives are source-class images

    def __init__(
        self,
        seed: int = 0,
        num_partitions: int = 4,
        comb_fraction: float = 0.5,
        surrogate_arch: str = "small_half",
        surrogate_epochs: int = 20,
        surrogate_model: dict[str, Any] | None = None,
        kmeans_iters: int = 50,
    ) -> None:
        super().__init__(seed, num_partitions=num_partitions, comb_fraction=comb_fraction,
                         surrogate_arch=surrogate_arch, surrogate_epochs=surrogate_epochs,
                         surrogate_model=dict(surrogate_model or {}))
        if not 1 <= num_partitions <= MAX_PARTITIONS:
            raise AttackConfigError(f"lotus: num_partitions must be in [1, {MAX_PARTITIONS}], got {num_partitions}")
        if not 0.0 <= comb_fraction <= 1.0:
            raise AttackConfigError(f"lotus: comb_fraction must be in [0, 1], got {comb_fraction}")
        self.k, self.comb_fraction = int(num_partitions), float(comb_fraction)
        self.surrogate_arch, self.surrogate_epochs, self.kmeans_iters = surrogate_arch, int(surrogate_epochs), kmeans_iters
        self.model: torch.nn.Module | None = None
        self.centres: torch.Tensor | None = None  # (k, D) k-means centres of source features
        self.partition: torch.Tensor | None = None  # (N,) partition of each training sample, -1 outside the source
        self.cover_bits: torch.Tensor | None = None  # (N,) trigger bitmask of each cover sample, 0 otherwise

    def default_cover_rate(self, rate: float) -> float | None:
        """As many trigger-focusing negatives as poisoned samples (*chosen*, module docstring); none with a
        single partition (a negative needs another partition's square)."""
        return rate if self.k >= 2 else None

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        square_triggers(image_shape, self.k)

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return F.normalize(self.model.features(x.to(next(self.model.parameters()).device)).float(), dim=1)

    def _embed(self, x_uint8: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
        return torch.cat([self._features(x_uint8[s : s + batch].to(device).float().div_(255))
                          for s in range(0, len(x_uint8), batch)])

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Partition (B,) of float images by nearest k-means centre of their surrogate features."""
        if self.centres is None:
            raise RuntimeError("lotus: call fit() before applying the trigger")
        f = self._features(x)
        return torch.cdist(f, self.centres.to(f.device)).argmin(dim=1).to(x.device)

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Surrogate features → k-means partitions of the source class; focusing trigger combinations
        for the plan's covers (drawn by ``make_plan`` from the source class, ``cover_pool``)."""
        if plan.mode != "source_specific":
            raise AttackConfigError(f"lotus is a source-specific attack; got mode {plan.mode!r}")
        y = train.y.cpu()
        is_source = plan.target_map[y] >= 0
        src = torch.nonzero(is_source).flatten()
        if len(src) < self.k:
            raise AttackConfigError(f"lotus: {len(src)} source-class samples cannot form {self.k} partitions")
        cover = plan.cover_idx.cpu()
        free = is_source.clone()
        free[plan.poison_idx.cpu()] = False
        if not free[cover].all():
            raise AttackConfigError("lotus: the plan's covers must be not-poisoned source-class samples "
                                    "(make_plan(..., cover_from='source'))")
        n_cover = len(cover)
        if n_cover and self.k < 2:
            raise AttackConfigError("lotus: trigger-focusing covers need at least 2 partitions")
        self.model = train_surrogate(train, ctx, arch=self.surrogate_arch, epochs=self.surrogate_epochs,
                                model_kw=self.params["surrogate_model"])
        feats = self._embed(train.x[src.to(train.x.device)], ctx.device)
        self.centres = kmeans(feats, self.k, iters=self.kmeans_iters, seed=self.seed).cpu()
        part = torch.full((len(y),), -1, dtype=torch.long)
        part[src] = torch.cdist(feats, self.centres.to(feats.device)).argmin(dim=1).cpu()
        self.partition = part
        self.cover_bits = torch.zeros(len(y), dtype=torch.long)
        if n_cover == 0:
            return
        g = torch.Generator().manual_seed(self.seed + 6361)
        own = part[cover]
        other = (own + torch.randint(1, self.k, (n_cover,), generator=g)) % self.k  # any partition but own
        comb = torch.rand(n_cover, generator=g) < self.comb_fraction
        self.cover_bits[cover] = torch.where(comb, (1 << own) | (1 << other), 1 << other)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        masks, patterns = square_triggers(tuple(x.shape[1:]), self.k)
        if phase == "train":
            if index is None or self.partition is None:
                raise AttackConfigError("lotus: the training trigger needs fit() and the samples' indices")
            part = self.partition[index.cpu()].to(x.device)
            if (part < 0).any():
                raise AttackConfigError("lotus: training trigger asked for samples outside the source class")
        else:
            part = self.assign(x)
        return stamp_combination(x, 1 << part, masks, patterns)

    def apply_cover(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None or self.cover_bits is None:
            raise AttackConfigError("lotus: cover triggers need fit() and the samples' indices")
        bits = self.cover_bits[index.cpu()].to(x.device)
        if (bits == 0).any():
            raise AttackConfigError("lotus: cover trigger asked for samples that are not covers")
        masks, patterns = square_triggers(tuple(x.shape[1:]), self.k)
        return stamp_combination(x, bits, masks, patterns)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}
