"""TrojanNN trigger (Liu et al., NDSS 2018), as BackdoorBench uses it; config key ``trojan``.

REFERENCE.md ("Other attacks"): a trigger optimised inside an Apple-logo mask in the lower right to
drive two neurons of a clean model to 100, then stamped on images. Poisoned-label, all-to-one; the rate
is a fraction of the whole training set (PGBD's BackdoorBench preset: target 0, 1%).

Implementation (choices marked *):

- *Mask*: an apple silhouette drawn procedurally (no logo file): body = union of two overlapping
  discs, a disc-shaped bite out of the right side, a stalk and an elliptic leaf. It fills a
  ``size``×``size`` box (default 10 px of a 32 px image, scaled with the image) ``margin`` px from the
  bottom-right corner.
- *Neurons*: the clean surrogate's penultimate embedding (globally pooled output of its last conv
  stage) feeds the linear head; like TrojanNN, we pick the ``num_neurons`` = 2 units with the largest
  total connection weight Σ_k |W_head[k, j]| to the next layer.
- *Optimisation*: t = sigmoid(θ) (pixels stay in [0, 1]); minimise
  mean over a batch of clean images of Σ_j (f_j((1 − m)·x + m·t) − 100)² with Adam (lr 0.1,
  ``opt_steps`` steps). *TrojanNN optimises on a blank input; we optimise on clean training images
  (``opt_images`` of them, drawn by the seed) so the trigger works on real backgrounds.
- Stamp: x' = (1 − m)·x + m·t at train and test time.
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


def apple_mask(size: int) -> torch.Tensor:
    """(size, size) 0/1 apple-logo-like silhouette (body, bite on the right, stalk, leaf)."""
    if size < 5:
        raise AttackConfigError(f"trojan: the apple mask needs at least 5x5 pixels, got {size}")
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in (0, 1)
    yy, xx = torch.meshgrid(c, c, indexing="ij")

    def disc(cy: float, cx: float, r: float) -> torch.Tensor:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    body = disc(0.62, 0.36, 0.32) | disc(0.62, 0.64, 0.32)
    body &= yy >= 0.28
    bite = disc(0.55, 1.02, 0.2)
    stalk = (xx - 0.5).abs() <= 0.06
    stalk &= (yy >= 0.12) & (yy <= 0.34)
    leaf = ((yy - 0.14) / 0.08) ** 2 + ((xx - 0.66) / 0.16) ** 2 <= 1
    return ((body & ~bite) | stalk | leaf).float()


def select_neurons(head: torch.nn.Linear, k: int) -> torch.Tensor:
    """Indices of the ``k`` input units of ``head`` with the largest Σ_out |W| (TrojanNN's choice)."""
    return head.weight.detach().abs().sum(dim=0).topk(k).indices.sort().values


def optimise_trigger(
    model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, neurons: torch.Tensor, init: torch.Tensor,
    *, value: float = 100.0, steps: int = 200, lr: float = 0.1, progress: bool = False,
) -> torch.Tensor:
    """Trigger t = sigmoid(θ)·m minimising mean_x Σ_j (f_j((1 − m)·x + m·t) − value)² over the
    penultimate units ``neurons`` of ``model.features``; θ starts at ``init`` (C, H, W), Adam(lr)."""
    dev = x.device
    mask, neurons = mask.to(dev), neurons.to(dev)
    theta = init.clone().to(dev).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    goal = torch.full((len(x), len(neurons)), float(value), device=dev)
    for _ in tqdm(range(steps), desc="trojan trigger", disable=not progress, leave=False):
        xt = x * (1 - mask) + torch.sigmoid(theta) * mask
        loss = F.mse_loss(model.features(xt)[:, neurons].float(), goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (torch.sigmoid(theta.detach()) * mask).cpu()


@register_attack
class Trojan(Attack):
    """TrojanNN watermark: Apple-logo mask, trigger optimised to fire two surrogate neurons."""

    name = "trojan"

    def __init__(
        self,
        seed: int = 0,
        size: int = 10,
        margin: int = 1,
        reference_size: int = 32,
        num_neurons: int = 2,
        neuron_value: float = 100.0,
        opt_steps: int = 200,
        opt_lr: float = 0.1,
        opt_images: int = 128,
        surrogate_arch: str = "small_half",
        surrogate_epochs: int = 20,
        surrogate_model: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(seed, size=size, margin=margin, num_neurons=num_neurons, neuron_value=neuron_value,
                         opt_steps=opt_steps, opt_lr=opt_lr, opt_images=opt_images,
                         surrogate_arch=surrogate_arch, surrogate_epochs=surrogate_epochs,
                         surrogate_model=dict(surrogate_model or {}))
        if size < 5 or margin < 0:
            raise AttackConfigError(f"trojan: need size >= 5 and margin >= 0, got {size}, {margin}")
        if num_neurons < 1 or opt_steps < 0 or opt_images < 1:
            raise AttackConfigError("trojan: num_neurons and opt_images must be >= 1, opt_steps >= 0")
        self.size, self.margin, self.reference_size = int(size), int(margin), int(reference_size)
        self.num_neurons, self.neuron_value = int(num_neurons), float(neuron_value)
        self.opt_steps, self.opt_lr, self.opt_images = int(opt_steps), float(opt_lr), int(opt_images)
        self.surrogate_arch, self.surrogate_epochs = surrogate_arch, int(surrogate_epochs)
        self.trigger: torch.Tensor | None = None  # (C, H, W) in [0, 1], set by fit
        self.neurons: torch.Tensor | None = None

    def _geometry(self, h: int, w: int) -> tuple[int, int, int]:
        scale = max(1, round(min(h, w) / self.reference_size))
        s, m = self.size * scale, self.margin * scale
        return h - s - m, w - s - m, s

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        _, h, w = image_shape
        r, c, s = self._geometry(h, w)
        if r < 0 or c < 0:
            raise AttackConfigError(f"trojan: a {s}px mask with margin does not fit a {h}x{w} image")

    def mask(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        """(1, H, W) 0/1 Apple-logo mask in the lower right."""
        self.check_image(image_shape)
        _, h, w = image_shape
        r, c, s = self._geometry(h, w)
        base = apple_mask(self.size)
        scale = s // self.size
        m = torch.zeros(1, h, w)
        m[0, r : r + s, c : c + s] = base.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        return m

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Select the two neurons of the clean surrogate and optimise the trigger inside the mask."""
        model = train_surrogate(train, ctx, arch=self.surrogate_arch, epochs=self.surrogate_epochs,
                                model_kw=self.params["surrogate_model"])
        if not hasattr(model, "head") or not hasattr(model, "features"):
            raise AttackConfigError("trojan: the surrogate must be a StagedClassifier (features + linear head)")
        self.neurons = select_neurons(model.head, self.num_neurons).cpu()
        g = torch.Generator().manual_seed(self.seed + 4099)
        pick = torch.randperm(len(train), generator=g)[: self.opt_images]
        x = train.x[pick.to(train.x.device)].to(ctx.device).float().div_(255)
        init = torch.rand(train.image_shape, generator=g) * 2 - 1
        self.trigger = optimise_trigger(
            model, x, self.mask(train.image_shape), self.neurons, init, value=self.neuron_value,
            steps=self.opt_steps, lr=self.opt_lr, progress=ctx.progress,
        )

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.trigger is None:
            raise RuntimeError("trojan: call fit() before applying the trigger")
        if tuple(self.trigger.shape) != tuple(x.shape[1:]):
            raise AttackConfigError(f"trojan: trigger fitted for {tuple(self.trigger.shape)}, images are {tuple(x.shape[1:])}")
        m = self.mask(tuple(x.shape[1:])).to(x.device)
        return x * (1 - m) + self.trigger.to(x.device) * m

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params, "neurons": None if self.neurons is None else self.neurons.tolist()}
