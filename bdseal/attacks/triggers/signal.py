"""SIG (Barni, Kallas & Tondi 2019, "A new backdoor attack in CNNs by training set corruption
without label poisoning").

Trigger: a horizontal sinusoid added to every row and channel,
x'[c, i, j] = clip(x[c, i, j] + Δ·sin(2π·j·f / W), 0, 1), with Δ on the 0..255 pixel scale
(divided by 255 here because images are in [0, 1]). Defaults: Δ = 20, f = 6 (the
paper's and PGRL's values — PGRL's code computes sin(2π f t) with t = j / W). Clean-label by default
(``default_mode = clean_label``): victims are target-class images whose labels are kept; the rate is
a fraction of the **whole training set** drawn from the target class (PGRL, BackdoorBench); pass
``attack.rate_of=target_class`` to count it within the target class instead. The test-time trigger
equals the training one unless ``test_delta`` is given (Barni et al. also strengthen it at test).
PGBD preset: Δ = 40 (BackdoorBench's ``sig_delta``), f = 6. Works for any size and channel count.
"""

from __future__ import annotations

import math

import torch

from bdseal.attacks.base import Attack, register_attack
from bdseal.attacks.plan import AttackConfigError


def sinusoid(w: int, delta: float, freq: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(W,) Δ/255 · sin(2π j f / W), j = 0..W−1."""
    j = torch.arange(w, device=device, dtype=torch.float64)
    return (delta / 255.0 * torch.sin(2 * math.pi * j * freq / w)).to(dtype)


@register_attack
class Sig(Attack):
    """Sinusoidal signal: ``delta`` (0..255 scale, default 20), ``freq`` (cycles per image width,
    default 6), ``test_delta`` (default: ``delta``)."""

    name = "sig"
    default_mode = "clean_label"
    default_rate_of = "dataset"

    def __init__(self, seed: int = 0, delta: float = 20.0, freq: float = 6.0, test_delta: float | None = None) -> None:
        super().__init__(seed, delta=delta, freq=freq, test_delta=test_delta)
        for nm, v in (("delta", delta), ("test_delta", delta if test_delta is None else test_delta)):
            if not 0.0 < float(v) <= 255.0:
                raise AttackConfigError(f"sig {nm} must be in (0, 255] (pixel scale), got {v}")
        if not float(freq) > 0:
            raise AttackConfigError(f"sig freq must be > 0, got {freq}")
        self.delta, self.freq = float(delta), float(freq)
        self.test_delta = self.delta if test_delta is None else float(test_delta)

    def check_image(self, image_shape: tuple[int, int, int]) -> None:
        w = image_shape[2]
        if self.freq >= w / 2:
            raise AttackConfigError(f"sig freq {self.freq} is at or above the Nyquist limit of a {w}-pixel-wide image")

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        delta = self.test_delta if phase == "test" else self.delta
        return (x + sinusoid(x.shape[-1], delta, self.freq, x.device, x.dtype)).clamp(0, 1)
