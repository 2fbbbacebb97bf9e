"""Label-consistent backdoor (Turner, Tsipras & Madry 2019), config key ``lc``.

Clean-label: only target-class training images are poisoned and keep their labels
(``default_mode = clean_label``); the rate is a fraction of the *target class*
(``default_rate_of = target_class``; GSSD/VIBE preset: 25%, REFERENCE.md table).

Recipe (REFERENCE.md "LC" row, GSSD/VIBE's setting, which follows Turner et al.):

1. The attacker trains a benign surrogate on its clean data itself (:func:`train_surrogate`).
2. Each poisoned image is made hard to classify by untargeted L∞ PGD against the surrogate that
   *maximises* the loss of its true label: ε = 16/255, step 1.5/255, 30 steps, projected onto the
   ε-ball and [0, 1]. No random start (chosen: Turner et al. start PGD from the image itself).
3. A 3×3 pattern is stamped in all four corners, mirrored so the four copies are symmetric about the
   image centre (Turner et al.'s four-corner trigger; bottom-right copy [[0,0,1],[0,1,0],[1,0,1]]).
   The pattern is scaled with the image by nearest upsampling; ``amplitude`` < 1 gives Turner's
   reduced-visibility variant (pixels move toward the pattern by that fraction).

At test time (ASR) only the four-corner pattern is applied, at full strength. Because ε·255 is an
integer and clean images are uint8, rounding the PGD images to uint8 keeps ‖δ‖∞ ≤ ε exactly.
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

BOTTOM_RIGHT = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def four_corner_trigger(image_shape: tuple[int, int, int], size: int = 3, reference_size: int = 32,
                        pattern: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, W) 0/1 mask and (C, H, W) pattern of the mirrored four-corner trigger.

    ``size`` is the side in pixels of a ``reference_size`` image, scaled by nearest upsampling."""
    ch, h, w = image_shape
    base = BOTTOM_RIGHT if pattern is None else pattern
    if base.shape != (size, size):
        base = F.interpolate(base[None, None], size=(size, size), mode="nearest")[0, 0]
    scale = max(1, round(min(h, w) / reference_size))
    s = size * scale
    if 2 * s > min(h, w):
        raise AttackConfigError(f"lc: four {s}px corner patches do not fit a {h}x{w} image")
    br = base.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    mask = torch.zeros(1, h, w)
    pat = torch.zeros(ch, h, w)
    for flip_r in (False, True):
        for flip_c in (False, True):
            p = br.flip(0) if flip_r else br
            p = p.flip(1) if flip_c else p
            r0 = 0 if flip_r else h - s  # flipped rows = top corners
            c0 = 0 if flip_c else w - s
            mask[:, r0 : r0 + s, c0 : c0 + s] = 1
            pat[:, r0 : r0 + s, c0 : c0 + s] = p
    return mask, pat


def pgd_untargeted(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
                   steps: int) -> torch.Tensor:
    """L∞ PGD maximising CE(model(x + δ), y), ‖δ‖∞ ≤ eps, x + δ ∈ [0, 1]; starts at δ = 0."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 1)
    return adv.detach()


@register_attack
class LabelConsistent(Attack):
    """Turner et al. 2019 label-consistent attack: PGD-hardened target-class images + four-corner
    3×3 trigger. ``eps``/``step`` are in 1/255 units."""

    name = "lc"
    default_mode = "clean_label"
    default_rate_of = "target_class"

    def __init__(
        self,
        seed: int = 0,
        eps: float = 16.0,
        step: float = 1.5,
        steps: int = 30,
        size: int = 3,
        amplitude: float = 1.0,
        surrogate_arch: str = "small_half",
        surrogate_epochs: int = 20,
        surrogate_model: dict[str, Any] | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__(seed, eps=eps, step=step, steps=steps, size=size, amplitude=amplitude,
                         surrogate_arch=surrogate_arch, surrogate_epochs=surrogate_epochs,
                         surrogate_model=dict(surrogate_model or {}))
        if not 0 < eps <= 255 or step <= 0 or steps < 0:
            raise AttackConfigError(f"lc: need 0 < eps <= 255, step > 0, steps >= 0 (got {eps}, {step}, {steps})")
        if not 0 < amplitude <= 1:
            raise AttackConfigError(f"lc: amplitude must be in (0, 1], got {amplitude}")
        if size < 1:
            raise AttackConfigError(f"lc: corner patch size must be >= 1, got {size}")
        self.eps, self.step, self.steps = eps / 255.0, step / 255.0, int(steps)
        self.size, self.amplitude = int(size), float(amplitude)
        self.surrogate_arch, self.surrogate_epochs, self.batch_size = surrogate_arch, int(surrogate_epochs), batch_size
        self._idx: torch.Tensor | None = None  # sorted training indices with a PGD image
        self._adv: torch.Tensor | None = None  # their PGD images, float [0, 1]

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        four_corner_trigger(image_shape, self.size)

    def fit(self, train: ImageDataset, plan: PoisonPlan, ctx: AttackContext) -> None:
        """Train the clean surrogate and precompute the PGD images of the poisoned samples."""
        if plan.mode != "clean_label":
            raise AttackConfigError(f"lc is a clean-label attack; got mode {plan.mode!r}")
        model = train_surrogate(train, ctx, arch=self.surrogate_arch, epochs=self.surrogate_epochs,
                                model_kw=self.params["surrogate_model"])
        idx = plan.poison_idx.cpu()
        x = train.x[idx.to(train.x.device)]
        y = train.y[idx.to(train.y.device)]
        out = []
        for s in tqdm(range(0, len(x), self.batch_size), desc="lc PGD", disable=not ctx.progress, leave=False):
            xb = x[s : s + self.batch_size].to(ctx.device).float().div_(255)
            yb = y[s : s + self.batch_size].to(ctx.device)
            out.append(pgd_untargeted(model, xb, yb, self.eps, self.step, self.steps).cpu())
        self._idx = idx
        self._adv = torch.cat(out) if out else torch.empty(0, *train.image_shape)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        mask, pat = four_corner_trigger(tuple(x.shape[1:]), self.size)
        m = (mask * self.amplitude).to(x.device)
        return x * (1 - m) + pat.to(x.device) * m

    def adversarial(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """PGD images of training ``index`` (all must be poisoned samples seen by ``fit``)."""
        if self._idx is None or self._adv is None:
            raise RuntimeError("lc: call fit() before applying the training trigger")
        index = index.cpu()
        pos = torch.searchsorted(self._idx, index).clamp_max(max(len(self._idx) - 1, 0))
        if len(self._idx) == 0 or not torch.equal(self._idx[pos], index):
            raise AttackConfigError("lc: training trigger asked for samples without a PGD image (not poisoned)")
        return self._adv[pos].to(device)

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        if phase == "train":
            if index is None:
                raise AttackConfigError("lc: the training trigger needs the samples' indices")
            x = self.adversarial(index, x.device)
        return self._stamp(x)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}
