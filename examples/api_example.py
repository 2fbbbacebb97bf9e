"""bdseal from Python on your own model and tensors: poison -> train (backdoored) -> defend -> evaluate.

    python examples/api_example.py            # ~1-2 min on a laptop CPU
    python examples/api_example.py --fast     # a few seconds: tiny budgets (what the test suite runs)

The images here are scikit-learn's digits (bundled with bdseal's dependencies), turned into a plain
uint8 NumPy array (N, H, W, C) to stand for "your data"; the network is an ordinary ``nn.Module`` that bdseal
has never seen. Every defense takes it as is: PGBD and NAD find its layers through ``named_modules()``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import nn

import bdseal


class MyNet(nn.Module):
    """Any classifier: float images in [0, 1] -> logits; its last layer is a Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.block3(self.block2(self.block1(x)))).flatten(1))


def my_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images as uint8 (N, 32, 32, 3) and int64 labels: stands for the user's own arrays."""
    from bdseal.data import load_dataset

    d = load_dataset("digits").train
    return d.x[:n].permute(0, 2, 3, 1).numpy(), d.y[:n].numpy()


def main(fast: bool = False) -> dict[str, dict[str, object]]:
    images, labels = my_data(600 if fast else 1797)
    epochs, small = (8, 2) if fast else (20, 10)
    # 1. Poison: 10% BadNets to class 0; 20% of each class held out as the test split, 5% kept clean for the defender.
    ps = bdseal.poison(images, labels, attack="badnets", rate=0.1, target=0, seed=0, size=4)
    # 2. The backdoored model: a trained copy of MyNet (digits: no flips, so no augmentation).
    torch.manual_seed(0)
    net = MyNet()
    backdoored = bdseal.train_model(net, ps, epochs=epochs, batch_size=32, augment="none")
    results: dict[str, dict[str, object]] = {"none": bdseal.evaluate(backdoored, ps)}
    # 3. Post-hoc defenses repair a copy of the backdoored model with the clean pool.
    post_hoc = {
        "ft": {"train": {"epochs": small, "augment": "none"}},
        "nad": {"train": {"epochs": small, "augment": "none"}, "teacher_train": {"epochs": small, "augment": "none"}},
        "pgbd": {"layer": "block3.0", "train": {"epochs": small}, "neural_cleanse": {"steps": 20 if fast else 300}},
    }
    for name, options in post_hoc.items():
        res = bdseal.defend(ps, name, backdoored, **options)
        results[name] = bdseal.evaluate(res.model, ps, result=res)
    # 4. A defense that trains from scratch starts from the untrained network.
    res = bdseal.defend(ps, "pgrl", MyNet(), clean_per_class=2,
                        train={"epochs": 3 if fast else 30, "batch_size": 64}, warmup_epochs=1,
                        weight_start=99 if fast else 5)  # fast: no WCE weight refresh (UMAP) within 3 epochs
    results["pgrl"] = bdseal.evaluate(res.model, ps, result=res)
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="tiny budgets (seconds)")
    for defense, metrics in main(ap.parse_args().fast).items():
        print(f"{defense:5s}", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()}))
