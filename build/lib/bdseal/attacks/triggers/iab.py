"""IAB: input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020, "Input-Aware Dynamic Backdoor
Attack"). Hyperparameters from the authors' release (REFERENCE.md [V]; ``VinAIResearch/
input-aware-backdoor-attack-release`` config): p_attack 0.1, p_cross 0.1, mask_density 0.032,
lambda_div 1, lambda_norm 100, generators Adam(lr 0.01, betas (0.5, 0.9)), classifier SGD(lr 0.01,
momentum 0.9, wd 5e-4), 25 mask-pre-training epochs, 600 joint epochs.

Trigger: a pattern generator G and a mask generator M (encoder-decoder nets) give, for every input x,
    x' = x + M(x) · (G(x) − x),
with pattern G(x) = tanh(·)/(2+ε) + 1/2 ∈ (0, 1) and mask M(x) = tanh(20·m − 10)/(2+ε) + 1/2 (the
authors' soft threshold). Training, as in the paper:
1. M alone is pre-trained with λ_norm·mean(relu(M(x) − density)) + λ_div·L_div (L_div = mean over
   pairs of ||x1 − x2|| / ||M(x1) − M(x2)||), then frozen.
2. G and a classifier C are trained jointly: every batch has p_attack backdoor samples (own trigger,
   attack label), p_cross cross samples (x1 with the mask and pattern of another image x2, true label
   kept) and clean samples; loss = CE(C) + λ_div·L_div(G).

Reading for this toolkit's data-poisoning pipeline [documented choice]: the attacker controls
training in the paper; PGBD's post-hoc setting trains its backdoored model M_B on the attacker's
poisoned data. So ``fit`` runs steps 1-2 on the attacker's training set with the run's surrogate
architecture (``arch``), and the poisoned training set then holds *backdoor samples* (generator applied
to each victim, relabelled to the attack label; rate = fraction of the whole training set, default
0.1 = p_attack) and *cover samples* = cross-trigger samples with their true labels (``cover_rate``,
default 0.1 = p_cross). The jointly-trained classifier stays available as ``self.classifier`` (e.g. to
serve as an attacker-trained M_B later). ASR test images get their own input-aware trigger.
The paper's augmentation (random crop + rotation) is replaced by the toolkit's batched ``augment``
(crop_flip by default), applied before the trigger as in the authors' loader.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdseal.attacks.base import Attack, AttackContext, register_attack
from bdseal.attacks.nets import UNet, batched_eval, cached_state, index_batches, init_module, to_cpu_state
from bdseal.attacks.plan import AttackConfigError, PoisonPlan
from bdseal.attacks.surrogate import build_surrogate
from bdseal.cache import fingerprint
from bdseal.data.augment import build_augment
from bdseal.data.dataset import ImageDataset

VERSION = 1
EPS = 1e-7


class PatternGenerator(nn.Module):
    """x -> pattern in (0, 1) of the same shape."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = UNet(channels, channels, width=width, depth=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x - 0.5)) / (2 + EPS) + 0.5


class MaskGenerator(nn.Module):
    """x -> (B, 1, H, W) soft mask via the authors' threshold tanh(20m − 10)/(2+ε) + 1/2, with
    m = sigmoid(U-Net(x)) ∈ (0, 1) so an untrained mask starts near 1/2 instead of saturated at 0 [I]."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = UNet(channels, 1, width=width, depth=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(20 * torch.sigmoid(self.net(x - 0.5)) - 10) / (2 + EPS) + 0.5


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """IAB's diversity term: mean over pairs of RMS(x1 − x2) / (RMS(g1 − g2) + ε)."""
    dx = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()  # 1e-12: finite gradient at 0
    dg = (g1 - g2).pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()
    return (dx / (dg + EPS)).mean()


def blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x + mask * (pattern - x)


@register_attack
class IAB(Attack):
    """Input-aware dynamic trigger; see the module docstring. ``mask_steps``/``steps`` are the CPU
    budgets of the two training stages (paper: 25 + 600 epochs), ``arch`` the classifier trained
    jointly, ``width``/``depth`` the generators' U-Nets."""

    name = "iab"
    default_mode = "all_to_one"
    default_rate_of = "dataset"

    def __init__(self, seed: int = 0, mask_density: float = 0.032, lambda_div: float = 1.0,
                 lambda_norm: float = 100.0, p_attack: float = 0.1, p_cross: float = 0.1, mask_steps: int = 100,
                 steps: int = 300, batch_size: int = 64, lr_G: float = 0.01, lr_M: float = 0.01,
                 lr_C: float = 0.01, width: int = 16, depth: int = 2, arch: str = "small_half",
                 augment: str = "crop_flip") -> None:
        super().__init__(seed, mask_density=mask_density, lambda_div=lambda_div, lambda_norm=lambda_norm,
                         p_attack=p_attack, p_cross=p_cross, mask_steps=mask_steps, steps=steps,
                         batch_size=batch_size, lr_G=lr_G, lr_M=lr_M, lr_C=lr_C, width=width, depth=depth,
                         arch=arch, augment=augment)
        if not 0 < mask_density < 1:
            raise AttackConfigError(f"iab mask_density must be in (0, 1), got {mask_density}")
        if not (0 < p_attack < 1 and 0 <= p_cross < 1 and p_attack + p_cross < 1):
            raise AttackConfigError(f"iab needs 0 < p_attack, 0 <= p_cross, p_attack + p_cross < 1; got {p_attack}, {p_cross}")
        if mask_steps < 0 or steps < 1 or batch_size < 4:
            raise AttackConfigError("iab needs mask_steps >= 0, steps >= 1 and batch_size >= 4")
        if min(lr_G, lr_M, lr_C) <= 0 or lambda_div < 0 or lambda_norm < 0:
            raise AttackConfigError("iab learning rates must be > 0 and loss weights >= 0")
        self.generator: PatternGenerator | None = None
        self.mask_net: MaskGenerator | None = None
        self.classifier: nn.Module | None = None
        self._pool: torch.Tensor | None = None
        self._partner: torch.Tensor | None = None

    # -- training ------------------------------------------------------------------------------------
    def _nets(self, train: ImageDataset) -> tuple[PatternGenerator, MaskGenerator, nn.Module]:
        p, c = self.params, train.image_shape[0]
        g = init_module(lambda: PatternGenerator(c, p["width"], p["depth"]), self.seed)
        m = init_module(lambda: MaskGenerator(c, p["width"], p["depth"]), self.seed + 1)
        clf = init_module(lambda: build_surrogate(train, p["arch"]), self.seed + 2)
        return g, m, clf

    def _train_mask(self, m: MaskGenerator, x: torch.Tensor, device: torch.device, progress: bool) -> None:
        p = self.params
        opt = torch.optim.Adam(m.parameters(), lr=p["lr_M"], betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(self.seed + 31)
        m.train()
        pairs = zip(index_batches(len(x), p["batch_size"], p["mask_steps"], g),
                    index_batches(len(x), p["batch_size"], p["mask_steps"], g))
        for i1, i2 in tqdm(pairs, total=p["mask_steps"], desc="iab mask", disable=not progress, leave=False):
            x1, x2 = x[i1].to(device).float() / 255, x[i2].to(device).float() / 255
            m1, m2 = m(x1), m(x2)
            loss = p["lambda_norm"] * F.relu(m1 - p["mask_density"]).mean() + p["lambda_div"] * diversity_loss(x1, x2, m1, m2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        m.eval().requires_grad_(False)

    def _train_joint(self, gen: PatternGenerator, m: MaskGenerator, clf: nn.Module, x: torch.Tensor,
                     y: torch.Tensor, labels_bd: torch.Tensor, device: torch.device, progress: bool) -> None:
        p = self.params
        opt_c = torch.optim.SGD(clf.parameters(), lr=p["lr_C"], momentum=0.9, weight_decay=5e-4)
        opt_g = torch.optim.Adam(gen.parameters(), lr=p["lr_G"], betas=(0.5, 0.9))
        g = torch.Generator().manual_seed(self.seed + 37)
        aug_gen = torch.Generator().manual_seed(self.seed + 41)
        augment = build_augment(p["augment"])
        y, labels_bd = y.to(device), labels_bd.to(device)
        gen.train()
        clf.train()
        pairs = zip(index_batches(len(x), p["batch_size"], p["steps"], g),
                    index_batches(len(x), p["batch_size"], p["steps"], g))
        for i1, i2 in tqdm(pairs, total=p["steps"], desc="iab joint", disable=not progress, leave=False):
            x1 = augment(x[i1].to(device).float() / 255, generator=aug_gen)
            x2 = augment(x[i2].to(device).float() / 255, generator=aug_gen)
            bs = len(i1)
            nb, nc = max(1, int(p["p_attack"] * bs)), int(p["p_cross"] * bs)
            n2 = max(nb, nc)
            pat1, pat2 = gen(x1[:nb]), gen(x2[nb : nb + n2])
            x_bd = blend(x1[:nb], pat1, m(x1[:nb]))
            x_cross = blend(x1[nb : nb + nc], pat2[:nc], m(x2[nb : nb + nc]))
            inputs = torch.cat([x_bd, x_cross, x1[nb + nc :]])
            targets = torch.cat([labels_bd[i1[:nb].to(device)], y[i1[nb:].to(device)]])
            loss = F.cross_entropy(clf(inputs), targets)
            if p["lambda_div"] > 0:
                loss = loss + p["lambda_div"] * diversity_loss(x1[:nb], x2[nb : nb + nb], pat1, pat2[:nb])
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_c.step()
            opt_g.step()

    def _train(self, train: ImageDataset, labels_bd: torch.Tensor, device: torch.device, progress: bool) -> dict[str, Any]:
        gen, m, clf = self._nets(train)
        gen.to(device), m.to(device), clf.to(device)
        self._train_mask(m, train.x, device, progress)
        self._train_joint(gen, m, clf, train.x, train.y, labels_bd, device, progress)
        return {"generator": to_cpu_state(gen), "mask": to_cpu_state(m), "classifier": to_cpu_state(clf)}

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Pre-train the mask generator, then train the pattern generator with a classifier (cached)."""
        tmap = plan.target_map.cpu()
        attack_label = tmap[train.y.cpu()]
        labels_bd = torch.where(attack_label >= 0, attack_label, train.y.cpu())
        parts = {"attack": self.name, "version": VERSION, "params": self.params, "seed": self.seed,
                 "data": fingerprint({"x": train.x, "y": train.y}), "target_map": tmap.tolist()}
        state = cached_state(ctx, "iab_generators", parts, lambda: self._train(train, labels_bd, ctx.device, ctx.progress))
        gen, m, clf = self._nets(train)
        gen.load_state_dict(state["generator"])
        m.load_state_dict(state["mask"])
        clf.load_state_dict(state["classifier"])
        self.generator, self.mask_net = gen.to(ctx.device).eval(), m.to(ctx.device).eval()
        self.classifier = clf.to(ctx.device).eval()
        self._pool = train.x
        n = len(train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 43))
        self._partner = torch.where(perm == torch.arange(n), (perm + 1) % n, perm)  # never the image itself

    # -- trigger -------------------------------------------------------------------------------------
    def _need_fit(self, device: torch.device) -> tuple[PatternGenerator, MaskGenerator]:
        if self.generator is None or self.mask_net is None:
            raise RuntimeError("iab: call fit(train, plan, ctx) before applying the trigger")
        return self.generator.to(device), self.mask_net.to(device)

    def pattern_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input-aware pattern (B, C, H, W) and mask (B, 1, H, W) of images ``x`` in [0, 1]."""
        gen, m = self._need_fit(x.device)
        both = batched_eval(lambda b: torch.cat([gen(b), m(b)], dim=1), x)
        return both[:, :-1], both[:, -1:]

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        pattern, mask = self.pattern_and_mask(x)
        return blend(x, pattern, mask)

    def apply_cover(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-trigger sample: ``x`` with the pattern and mask generated from another training image
        (a fixed seeded derangement of the training indices); the true label is kept by the plan."""
        if index is None or self._pool is None or self._partner is None:
            raise RuntimeError("iab cover samples need fit() first and the training indices of x")
        other = self._pool[self._partner[index.cpu()].to(self._pool.device)].to(x.device).float() / 255
        pattern, mask = self.pattern_and_mask(other)
        return blend(x, pattern, mask)
