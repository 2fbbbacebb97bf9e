"""Tiny settings shared by the optimised-trigger attack tests (trojan, lc, lotus)."""

from bdseal.attacks import AttackContext

TINY = {"surrogate_epochs": 2, "surrogate_model": {"widths": [8, 16, 16]}}
CTX = AttackContext(progress=False)
# End-to-end cells (put "attack=NAME" before these): synthetic 4 classes x 60 images of 16x16, small_half, few epochs, tiny surrogate.
E2E = ["dataset=synthetic", "+dataset.options.num_classes=4", "+dataset.options.n_train=60",
       "+dataset.options.n_test=20", "+dataset.options.image_size=16", "train.epochs=6",
       "attack.params.surrogate_epochs=2", "+attack.params.surrogate_model.widths=[8,16,16]"]
