"""Adap-Blend and Adap-Patch (Qi, Xie, Li, Mahloujifar & Mittal, ICLR 2023, "Revisiting the
assumption of latent separability for backdoor defenses").

Both are poisoned-label all-to-one attacks that add **cover samples** (triggered, correctly labelled)
and use a weaker or partial trigger at training time than at test time, so that poisoned and clean
samples are not separable in latent space. Defaults: poison 1% + cover 1% of the **whole training
set** (GSSD paper; victims from non-target classes, covers from the remaining samples), set in the
configs through ``attack.rate`` / ``attack.cover_rate``.

Adap-Blend (authors' toolbox ``vtu81/backdoor-toolbox``, REFERENCE.md): the blend pattern is cut into
``pieces`` = 16 cells (4×4 grid); every poisoned or cover sample blends only the pattern restricted
to a random half of the cells (``masked_pieces`` = 8 masked), x' = x + α·m·(pattern − x), with train
α = 0.15; at test time the whole pattern is blended with α = 0.2. Cover samples use the same partial
trigger. The masked cells are drawn per sample from (seed, sample index), so the poisoned set is
reproducible bit for bit. PGRL preset: α = 0.2 at train and test, covers = poison count. The
pattern is our Hello-Kitty-like ``kitty`` (the toolbox blends ``hellokitty_32.png``) or a user image.
For sizes not divisible by the grid, cell boundaries are ⌊r·g/H⌋ (every pixel belongs to a cell).

Adap-Patch (toolbox config for CIFAR-10): four patch triggers blended with α = 0.5 / 0.2 / 0.5 / 0.3
at training time, each poisoned (and each cover) sample carrying exactly one of them — the toolbox
gives each trigger a quarter of the poison list and a quarter of the cover list, in index order, and
so do we (``fit`` sees the plan). At test time the triggers are combined at full strength (α = 1;
``test_triggers`` picks which, default all four — the toolbox's CIFAR-10 test uses two of its
images, one a moved variant, at α = 1). The toolbox's PNG logos (phoenix, firefox, BadNet patch,
Trojan square) are replaced by four procedurally drawn corner triggers
(``bdseal.attacks.patterns.adaptive_patch_triggers``), upsampled by nearest neighbour with the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bdseal.attacks.base import Attack, AttackContext, register_attack
from bdseal.attacks.patterns import adaptive_patch_triggers, check_pattern_spec, hash_uniform
from bdseal.attacks.plan import AttackConfigError, PoisonPlan
from bdseal.attacks.triggers.blend import PatternMixin, check_alpha
from bdseal.data.dataset import ImageDataset


def piece_ids(h: int, w: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H, W) id of the grid cell (row-major, 0..grid²−1) each pixel belongs to."""
    r = torch.arange(h, device=device) * grid // h
    c = torch.arange(w, device=device) * grid // w
    return r[:, None] * grid + c[None, :]


def _check_index(name: str, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        raise AttackConfigError(f"{name} training triggers are per sample: apply(..., index=) needs the training indices")
    return index


@register_attack
class AdaptiveBlend(PatternMixin, Attack):
    """Partitioned blend trigger: ``alpha`` (train, 0.15), ``test_alpha`` (0.2), ``pieces`` (16, a
    square number), ``masked_pieces`` (8), ``pattern`` (``kitty`` | ``noise`` | image path)."""

    name = "adap_blend"

    def __init__(
        self, seed: int = 0, alpha: float = 0.15, test_alpha: float = 0.2, pieces: int = 16, masked_pieces: int = 8,
        pattern: str = "kitty",
    ) -> None:
        super().__init__(seed, alpha=alpha, test_alpha=test_alpha, pieces=pieces, masked_pieces=masked_pieces, pattern=pattern)
        self.alpha = check_alpha("adap_blend alpha", alpha)
        self.test_alpha = check_alpha("adap_blend test_alpha", test_alpha)
        grid = round(int(pieces) ** 0.5)
        if int(pieces) < 1 or grid * grid != int(pieces):
            raise AttackConfigError(f"adap_blend pieces must be a square number (4x4 = 16), got {pieces}")
        if not 0 <= int(masked_pieces) < int(pieces):
            raise AttackConfigError(f"adap_blend masked_pieces must be in [0, {pieces}), got {masked_pieces}")
        check_pattern_spec(pattern)
        self.pieces, self.grid, self.masked_pieces = int(pieces), grid, int(masked_pieces)
        self.pattern_spec = str(pattern)

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        _, h, w = image_shape
        if h < self.grid or w < self.grid:
            raise AttackConfigError(f"adap_blend grid {self.grid}x{self.grid} does not fit a {h}x{w} image")

    def kept_pieces(self, index: torch.Tensor) -> torch.Tensor:
        """(B, pieces) bool: True for the cells whose trigger is kept (``masked_pieces`` are dropped),
        chosen from (seed, index) — a uniform random subset per sample."""
        u = hash_uniform(self.seed + 17, index, self.pieces)
        order = u.argsort(dim=1)
        kept = torch.ones_like(u, dtype=torch.bool)
        kept.scatter_(1, order[:, : self.masked_pieces], False)
        return kept

    def sample_masks(self, index: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, 1, H, W) per-sample 0/1 trigger masks."""
        ids = piece_ids(h, w, self.grid, index.device)
        return self.kept_pieces(index)[:, ids].unsqueeze(1).float()

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        pattern = self.pattern_for(tuple(x.shape[1:]), x.device)
        if phase == "test":
            return x + self.test_alpha * (pattern - x)
        m = self.sample_masks(_check_index(self.name, index).to(x.device), x.shape[2], x.shape[3]).to(x.dtype)
        return x + self.alpha * m * (pattern - x)


@register_attack
class AdaptivePatch(Attack):
    """k = 4 patch triggers: ``train_alphas`` ([.5, .2, .5, .3]), ``test_triggers`` (indices combined
    at test, default all), ``test_alphas`` (default 1 each)."""

    name = "adap_patch"

    def __init__(
        self, seed: int = 0, train_alphas: Sequence[float] = (0.5, 0.2, 0.5, 0.3),
        test_triggers: Sequence[int] | None = None, test_alphas: Sequence[float] | None = None,
    ) -> None:
        train_alphas = [check_alpha("adap_patch train alpha", a) for a in train_alphas]
        if len(train_alphas) != 4:
            raise AttackConfigError(f"adap_patch has 4 triggers; train_alphas has {len(train_alphas)} values")
        test_triggers = list(range(4)) if test_triggers is None else [int(t) for t in test_triggers]
        if not test_triggers or any(not 0 <= t < 4 for t in test_triggers):
            raise AttackConfigError(f"adap_patch test_triggers must be indices in [0, 4), got {test_triggers}")
        test_alphas = [1.0] * len(test_triggers) if test_alphas is None else [check_alpha("adap_patch test alpha", a) for a in test_alphas]
        if len(test_alphas) != len(test_triggers):
            raise AttackConfigError("adap_patch test_alphas must have one value per test trigger")
        super().__init__(seed, train_alphas=train_alphas, test_triggers=test_triggers, test_alphas=test_alphas)
        self.train_alphas, self.test_triggers, self.test_alphas = train_alphas, test_triggers, test_alphas
        self.assignment: torch.Tensor | None = None  # (N,) trigger id per training index, -1 = none
        self._cache: dict = {}

    def triggers(self, shape: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(shape), str(device))
        if key not in self._cache:
            c, h, w = shape
            marks, masks = adaptive_patch_triggers(c, h, w)
            self._cache[key] = (marks.to(device), masks.to(device))
        return self._cache[key]

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        _, h, w = image_shape
        if h < 16 or w < 16:
            raise AttackConfigError(f"adap_patch corner triggers need images of at least 16x16 pixels, got {h}x{w}")

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Toolbox assignment: the j-th quarter of the (sorted) poison list gets trigger j, and
        likewise for the cover list."""
        a = torch.full((len(train),), -1, dtype=torch.long)
        for idx in (plan.poison_idx, plan.cover_idx):
            idx = idx.sort().values.cpu()
            a[idx] = torch.arange(len(idx)) * 4 // max(len(idx), 1)
        self.assignment = a

    def trigger_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Trigger id per training index (the fitted assignment; ``index % 4`` before ``fit``)."""
        if self.assignment is None:
            return index % 4
        ids = self.assignment.to(index.device)[index]
        return torch.where(ids >= 0, ids, index % 4)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        marks, masks = self.triggers(tuple(x.shape[1:]), x.device)
        marks, masks = marks.to(x.dtype), masks.to(x.dtype)
        if phase == "test":
            for t, a in zip(self.test_triggers, self.test_alphas):
                x = x + a * masks[t] * (marks[t] - x)
            return x
        ids = self.trigger_ids(_check_index(self.name, index).to(x.device))
        alphas = torch.tensor(self.train_alphas, dtype=x.dtype, device=x.device)[ids].view(-1, 1, 1, 1)
        return x + alphas * masks[ids] * (marks[ids] - x)
