"""TrojanNN trigger (Liu et al., NDSS 2018), as BackdoorBench runs it (``attack/trojannn.py``);
config key ``trojan``. Poisoned-label, all-to-one; the rate is a fraction of the whole training set
(PGBD's BackdoorBench preset: target 0, 1%).

Recipe (REFERENCE.md "Attacks: differences found..." [V], BackdoorBench):

- *Mask*: an Apple-logo-like silhouette in the box rows 16–29, cols 17–28 of a 32×32 image (where
  BackdoorBench's resized ``apple4.png`` lies). No logo file is shipped: ``apple_mask`` draws it
  procedurally (body of two overlapping discs, a bite on the right, a stalk and a leaf). Other image
  sizes resize the 32×32 mask by nearest neighbour.
- *Neurons*: the attacker's clean surrogate; the ``num_neurons`` = 2 input units of its linear head
  with the largest Σ_k |W_head[k, j]| (BackdoorBench's "most connected" neurons of the chosen layer).
- *Optimisation* on a **blank input**: start from the white apple x₀ = m (1 inside, 0 outside), then
  ``opt_steps`` = 1000 signed steps x ← clip(x₀ + clip(x − α·sign(∇ₓL) − x₀, −ε, ε), 0, 1) with
  α = 0.1, ε = 0.3 and L = Σ_j (f_j(m·x) − 100)² (BackdoorBench's ``pgd_with_mask_to_selected_neuron``);
  the trigger is t = m·x, so its pixels stay in [0.7, 1] inside the apple and 0 outside.
- *Application*: **additive**, x' = clip(x + t, 0, 1), at train and test time. BackdoorBench computes
  ``(t + x).astype(uint8)`` before clipping, so sums above 255 wrap around modulo 256 (a bug: bright
  pixels under the apple turn dark); we clip instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bdseal.attacks.base import Attack, AttackContext, register_attack
from bdseal.attacks.plan import AttackConfigError, PoisonPlan
from bdseal.attacks.surrogate import train_surrogate
from bdseal.data.dataset import ImageDataset


def apple_mask(h: int = 14, w: int = 12) -> torch.Tensor:
    """(h, w) 0/1 Apple-logo-like silhouette filling its box: leaf and stalk at the top, a body of two
    overlapping discs below, a round bite out of the right side."""
    if h < 5 or w < 5:
        raise AttackConfigError(f"trojan: the apple mask needs at least 5x5 pixels, got {h}x{w}")
    yy, xx = torch.meshgrid((torch.arange(h, dtype=torch.float32) + 0.5) / h,
                            (torch.arange(w, dtype=torch.float32) + 0.5) / w, indexing="ij")

    def disc(cy: float, cx: float, ry: float, rx: float) -> torch.Tensor:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    body = disc(0.6, 0.33, 0.4, 0.33) | disc(0.6, 0.67, 0.4, 0.33)
    body &= yy >= 0.2
    bite = disc(0.55, 1.08, 0.15, 0.2)
    stalk = ((xx - 0.52).abs() <= 0.06) & (yy >= 0.17) & (yy <= 0.32)
    leaf = disc(0.11, 0.66, 0.09, 0.2)
    return ((body & ~bite) | stalk | leaf).float()


def select_neurons(head: torch.nn.Linear, k: int) -> torch.Tensor:
    """Indices of the ``k`` input units of ``head`` with the largest Σ_out |W| (TrojanNN's choice)."""
    return head.weight.detach().abs().sum(dim=0).topk(k).indices.sort().values


def optimise_trigger(
    model: torch.nn.Module, mask: torch.Tensor, neurons: torch.Tensor, channels: int, *,
    value: float = 100.0, steps: int = 1000, alpha: float = 0.1, eps: float = 0.3, progress: bool = False,
) -> torch.Tensor:
    """(C, H, W) trigger t = m·x from BackdoorBench's signed steps on a blank input (module docstring):
    x₀ = m, x ← clip(x₀ + clip(x − α·sign(∇L) − x₀, ±ε), 0, 1), L = Σ_j (f_j(m·x) − value)² over the
    penultimate units ``neurons`` of ``model.features``."""
    dev = next(model.parameters()).device
    m = mask.to(dev).expand(channels, -1, -1)[None]
    neurons = neurons.to(dev)
    x0 = m.clone()
    x = x0.clone()
    for _ in tqdm(range(steps), desc="trojan trigger", disable=not progress, leave=False):
        x.requires_grad_(True)
        loss = ((model.features(x * m)[:, neurons].float() - value) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = (x0 + (x - alpha * grad.sign() - x0).clamp(-eps, eps)).clamp(0, 1)
    return (x.detach() * m)[0].cpu()


@register_attack
class Trojan(Attack):
    """TrojanNN watermark: Apple-logo mask, trigger optimised to fire two surrogate neurons, added."""

    name = "trojan"

    def __init__(
        self,
        seed: int = 0,
        box: tuple[int, int, int, int] | list[int] = (16, 17, 14, 12),
        reference_size: int = 32,
        num_neurons: int = 2,
        neuron_value: float = 100.0,
        opt_steps: int = 1000,
        opt_alpha: float = 0.1,
        opt_eps: float = 0.3,
        surrogate_arch: str = "small_half",
        surrogate_epochs: int = 20,
        surrogate_model: dict[str, Any] | None = None,
    ) -> None:
        box = [int(v) for v in box]
        super().__init__(seed, box=box, num_neurons=num_neurons, neuron_value=neuron_value,
                         opt_steps=opt_steps, opt_alpha=opt_alpha, opt_eps=opt_eps,
                         surrogate_arch=surrogate_arch, surrogate_epochs=surrogate_epochs,
                         surrogate_model=dict(surrogate_model or {}))
        if len(box) != 4 or min(box) < 0 or box[2] < 5 or box[3] < 5:
            raise AttackConfigError(f"trojan: box must be [row, col, height, width] with height, width >= 5, got {box}")
        if num_neurons < 1 or opt_steps < 0 or opt_alpha <= 0 or opt_eps <= 0:
            raise AttackConfigError("trojan: num_neurons must be >= 1, opt_steps >= 0, opt_alpha and opt_eps > 0")
        self.box, self.reference_size = box, int(reference_size)
        self.num_neurons, self.neuron_value = int(num_neurons), float(neuron_value)
        self.opt_steps, self.opt_alpha, self.opt_eps = int(opt_steps), float(opt_alpha), float(opt_eps)
        self.surrogate_arch, self.surrogate_epochs = surrogate_arch, int(surrogate_epochs)
        self.trigger: torch.Tensor | None = None  # (C, H, W) in [0, 1], set by fit
        self.neurons: torch.Tensor | None = None

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        _, h, w = image_shape
        r, c, bh, bw = self.box
        if r + bh > self.reference_size or c + bw > self.reference_size:
            raise AttackConfigError(f"trojan: the {bh}x{bw} apple box at ({r},{c}) does not fit the "
                                    f"{self.reference_size}x{self.reference_size} reference image")
        if min(h, w) < 8:
            raise AttackConfigError(f"trojan: the apple mask does not fit a {h}x{w} image (need at least 8x8)")

    def mask(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """(1, H, W) 0/1 Apple-logo mask: rows 16–29, cols 17–28 of the 32×32 reference, resized to the
        image by nearest neighbour (exact 2×, 7× ... repeats for 64, 224 px)."""
        self.check_image(image_shape)
        _, h, w = image_shape
        r, c, bh, bw = self.box
        ref = torch.zeros(1, 1, self.reference_size, self.reference_size)
        ref[0, 0, r : r + bh, c : c + bw] = apple_mask(bh, bw)
        return F.interpolate(ref, size=(h, w), mode="nearest")[0]

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Select the neurons of the clean surrogate and optimise the trigger on the blank input."""
        model = train_surrogate(train, ctx, arch=self.surrogate_arch, epochs=self.surrogate_epochs,
                                model_kw=self.params["surrogate_model"])
        if not hasattr(model, "head") or not hasattr(model, "features"):
            raise AttackConfigError("trojan: the surrogate must be a StagedClassifier (features + linear head)")
        self.neurons = select_neurons(model.head, self.num_neurons).cpu()
        self.trigger = optimise_trigger(
            model, self.mask(train.image_shape), self.neurons, train.image_shape[0], value=self.neuron_value,
            steps=self.opt_steps, alpha=self.opt_alpha, eps=self.opt_eps, progress=ctx.progress,
        )

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        """x' = clip(x + t, 0, 1) (additive, as BackdoorBench, without its uint8 wrap-around)."""
        if self.trigger is None:
            raise RuntimeError("trojan: call fit() before applying the trigger")
        if tuple(self.trigger.shape) != tuple(x.shape[1:]):
            raise AttackConfigError(f"trojan: trigger fitted for {tuple(self.trigger.shape)}, images are {tuple(x.shape[1:])}")
        return (x + self.trigger.to(x.device, x.dtype)).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params, "neurons": None if self.neurons is None else self.neurons.tolist()}
