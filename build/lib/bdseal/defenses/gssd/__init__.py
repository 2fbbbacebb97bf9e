"""GSSD (generative self-supervised defense): per-class normalizing flows on self-supervised features.

Modules: :mod:`.flows` (K batched coupling flows), :mod:`.scores` (S_ND, v_y histogram rule, S_D, σ),
:mod:`.split` (D̂_P / D̂_U / D̂_C), :mod:`.defense` (the ``gssd`` entry point), :mod:`.plots` (figures).
"""

from bdseal.defenses.gssd.defense import defend

__all__ = ["defend"]
