"""COMBAT: clean-label backdoor with an alternately trained trigger generator (Huynh et al., AAAI
2024, "COMBAT: Alternated Training for Effective Clean-Label Backdoor Attack").

Defaults from the authors' release (``VinAIResearch/COMBAT`` config and ``train_generator.py``, read
for facts, REFERENCE.md [V]): noise strength 0.08 on the [−1, 1] image scale (PGRL used 1.0), 50% of
the target class poisoned (``pc`` 0.5), DCT low-pass keeping the top-left 65% of the coefficients
(``ratio`` 0.65), Gaussian blur post-transform (kernel 3, σ ∈ (0.1, 1.0)), L2 weight 0.02, clean-model
weight 0.8, SGD(lr 0.01, momentum 0.9, Nesterov, wd 5e-4) for both nets, 200 epochs.

Trigger of an image x ∈ [0, 1] (η = strength, on the [−1, 1] scale, i.e. η/2 on [0, 1]):
    n(x)  = clamp(LowPass_ratio(tanh(G(x))), −1, 1)
    x'    = Blur_σ(clamp(x + (η/2)·n(x), 0, 1))
Alternated training on the attacker's data, every step:
  C-step: the surrogate C is trained on a batch in which each target-class image is triggered with
          probability ``pc`` (labels unchanged = clean-label), all others clean.
  G-step: G is trained so that triggered images of *every* class are classified as the target by C,
          while staying close to x (L2, weight 0.02) and still classified correctly by a fixed
          pre-trained clean model (weight 0.8): L = CE(C(x'), t) + 0.02·MSE(x', x) + 0.8·CE(F(x'), y).
The poisoned training set then holds ``rate`` of the target class (default 0.5, ``rate_of:
target_class``) with x' and their (correct) labels; ASR test images get x' too.

Documented choices where the release leaves freedom: G's output squashed by tanh and the low-passed
noise clamped to [−1, 1] so ‖x' − blur-free x‖∞ ≤ η/2 always holds [I]; the blur uses a fixed
σ = ``blur_sigma`` (0.55, the middle of the authors' random range) so the poisoned set is
deterministic; the clean model F is the shared attacker surrogate (``bdseal.attacks.surrogate``,
``clean_epochs`` epochs); the L2 term is measured on the [−1, 1] scale like the authors'; the
authors' random crop/rotation post-transform is the toolkit's ``augment`` (crop_flip).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bdseal.attacks.base import Attack, AttackContext, register_attack
from bdseal.attacks.nets import (
    UNet, batched_eval, cached_state, dct_low_pass, gaussian_blur, index_batches, init_module, to_cpu_state,
)
from bdseal.attacks.plan import AttackConfigError, PoisonPlan
from bdseal.attacks.surrogate import build_surrogate, train_surrogate
from bdseal.cache import fingerprint
from bdseal.data.augment import build_augment
from bdseal.data.dataset import ImageDataset

VERSION = 1


class NoiseGenerator(nn.Module):
    """x -> raw noise in [−1, 1] (tanh of a U-Net), before the low-pass filter."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = UNet(channels, channels, width=width, depth=depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x - 0.5))


@register_attack
class COMBAT(Attack):
    """Clean-label generator trigger; see the module docstring. ``steps`` = alternating C/G steps
    (paper: 200 epochs), ``clean_epochs`` = epochs of the clean model, ``train_fraction`` = fraction of
    target images triggered in C-steps (null: the plan's rate when it is of the target class, else 0.5)."""

    name = "combat"
    default_mode = "clean_label"
    default_rate_of = "target_class"

    def __init__(self, seed: int = 0, strength: float = 0.08, low_pass_ratio: float = 0.65, blur_sigma: float = 0.55,
                 blur_kernel: int = 3, l2_weight: float = 0.02, clean_model_weight: float = 0.8, steps: int = 300,
                 batch_size: int = 128, lr_C: float = 0.01, lr_G: float = 0.01, width: int = 16, depth: int = 2,
                 arch: str = "small_half", clean_epochs: int = 10, train_fraction: float | None = None,
                 augment: str = "crop_flip") -> None:
        super().__init__(seed, strength=strength, low_pass_ratio=low_pass_ratio, blur_sigma=blur_sigma,
                         blur_kernel=blur_kernel, l2_weight=l2_weight, clean_model_weight=clean_model_weight,
                         steps=steps, batch_size=batch_size, lr_C=lr_C, lr_G=lr_G, width=width, depth=depth,
                         arch=arch, clean_epochs=clean_epochs, train_fraction=train_fraction, augment=augment)
        if not 0 < strength <= 2:
            raise AttackConfigError(f"combat strength (on the [-1, 1] scale) must be in (0, 2], got {strength}")
        if not 0 < low_pass_ratio <= 1:
            raise AttackConfigError(f"combat low_pass_ratio must be in (0, 1], got {low_pass_ratio}")
        if blur_sigma < 0 or blur_kernel < 1 or blur_kernel % 2 == 0:
            raise AttackConfigError("combat needs blur_sigma >= 0 and an odd blur_kernel >= 1")
        if steps < 1 or batch_size < 2 or clean_epochs < 1 or min(lr_C, lr_G) <= 0:
            raise AttackConfigError("combat needs steps >= 1, batch_size >= 2, clean_epochs >= 1 and positive lrs")
        if train_fraction is not None and not 0 < train_fraction <= 1:
            raise AttackConfigError(f"combat train_fraction must be in (0, 1] or null, got {train_fraction}")
        self.generator: NoiseGenerator | None = None
        self.classifier: nn.Module | None = None
        self.target: int | None = None

    # -- trigger math ------------------------------------------------------------------------------
    def _noise(self, gen: NoiseGenerator, x: torch.Tensor) -> torch.Tensor:
        return dct_low_pass(gen(x), self.params["low_pass_ratio"]).clamp(-1, 1)

    def _trigger(self, gen: NoiseGenerator, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        xp = (x + p["strength"] / 2 * self._noise(gen, x)).clamp(0, 1)
        return gaussian_blur(xp, p["blur_sigma"], p["blur_kernel"])

    # -- training ------------------------------------------------------------------------------------
    @staticmethod
    def _single_target(plan: PoisonPlan) -> int:
        targets = torch.unique(plan.target_map[plan.target_map >= 0])
        if len(targets) != 1:
            raise AttackConfigError(f"combat needs a single target class (clean_label or all_to_one), got mode {plan.mode!r}")
        return int(targets[0])

    def _fraction(self, plan: PoisonPlan) -> float:
        if self.params["train_fraction"] is not None:
            return float(self.params["train_fraction"])
        return float(plan.rate) if plan.rate_of == "target_class" else 0.5

    def _nets(self, train: ImageDataset) -> tuple[NoiseGenerator, nn.Module]:
        p = self.params
        gen = init_module(lambda: NoiseGenerator(train.image_shape[0], p["width"], p["depth"]), self.seed)
        clf = init_module(lambda: build_surrogate(train, p["arch"]), self.seed + 2)
        return gen, clf

    def _train(self, train: ImageDataset, target: int, frac: float, ctx: AttackContext) -> dict[str, Any]:
        p, device = self.params, ctx.device
        clean = train_surrogate(train, ctx, arch=p["arch"], epochs=p["clean_epochs"])
        gen, clf = self._nets(train)
        gen.to(device), clf.to(device)
        opt_c = torch.optim.SGD(clf.parameters(), lr=p["lr_C"], momentum=0.9, weight_decay=5e-4, nesterov=True)
        opt_g = torch.optim.SGD(gen.parameters(), lr=p["lr_G"], momentum=0.9, weight_decay=5e-4, nesterov=True)
        augment = build_augment(p["augment"])
        g = torch.Generator().manual_seed(self.seed + 53)
        aug_gen = torch.Generator().manual_seed(self.seed + 59)
        y_all = train.y.to(device)
        for idx in tqdm(index_batches(len(train), p["batch_size"], p["steps"], g), total=p["steps"],
                        desc="combat G/C", disable=not ctx.progress, leave=False):
            x = train.x[idx].to(device).float() / 255
            y = y_all[idx.to(device)]
            # C-step: clean-label poisoning of a fraction of the target-class images in the batch.
            gen.eval(), clf.train()
            pick = ((y == target) & (torch.rand(len(y), generator=g) < frac).to(device)).view(-1, 1, 1, 1)
            with torch.no_grad():
                x_c = torch.where(pick, self._trigger(gen, x), x)
            loss_c = F.cross_entropy(clf(augment(x_c, generator=aug_gen)), y)
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            opt_c.step()
            # G-step: every triggered image should go to the target for C, stay close, fool no clean model.
            gen.train(), clf.eval()
            x_bd = self._trigger(gen, x)
            x_aug = augment(x_bd, generator=aug_gen)
            loss_g = (F.cross_entropy(clf(x_aug), torch.full_like(y, target))
                      + p["l2_weight"] * 4 * F.mse_loss(x_bd, x)  # MSE on the [-1, 1] scale
                      + p["clean_model_weight"] * F.cross_entropy(clean(x_aug), y))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
        return {"generator": to_cpu_state(gen), "classifier": to_cpu_state(clf)}

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Train (or load from ``ctx.cache``) the noise generator alternately with a surrogate."""
        target, frac = self._single_target(plan), self._fraction(plan)
        parts = {"attack": self.name, "version": VERSION, "params": self.params, "seed": self.seed,
                 "data": fingerprint({"x": train.x, "y": train.y}), "target": target, "train_fraction": frac}
        state = cached_state(ctx, "combat_generator", parts, lambda: self._train(train, target, frac, ctx))
        gen, clf = self._nets(train)
        gen.load_state_dict(state["generator"])
        clf.load_state_dict(state["classifier"])
        self.generator, self.classifier = gen.to(ctx.device).eval(), clf.to(ctx.device).eval()
        self.target = target

    # -- trigger -------------------------------------------------------------------------------------
    def _need_fit(self, device: torch.device) -> NoiseGenerator:
        if self.generator is None:
            raise RuntimeError("combat: call fit(train, plan, ctx) before applying the trigger")
        return self.generator.to(device)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Low-passed noise n(x) ∈ [−1, 1] of images ``x`` (the perturbation is strength/2 · n on [0, 1])."""
        gen = self._need_fit(x.device)
        return batched_eval(lambda b: self._noise(gen, b), x)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        gen = self._need_fit(x.device)
        return batched_eval(lambda b: self._trigger(gen, b), x)
