"""The one supervised training loop every defense uses (``fit``) and batched inference (``predict``)."""

from bdseal.train.loop import Batch, TrainConfig, TrainHooks, TrainState, batched_eval, fit, predict, predict_logits, seed_everything

__all__ = ["Batch", "TrainConfig", "TrainHooks", "TrainState", "batched_eval", "fit", "predict", "predict_logits", "seed_everything"]
