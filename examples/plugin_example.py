"""A one-file bdseal plugin: a dataset, a model, an attack and a defense, run by ``bdseal run``.

    bdseal run plugins=[examples/plugin_example.py] dataset=stripes model=tiny_cnn attack=corner defense=high_loss

A plugin is any module (a ``.py`` path, or a module name importable from the working directory or
``PYTHONPATH``) whose import registers things; list it in ``plugins=[...]``, or ship it in a package with
an entry point so that every ``bdseal`` command loads it::

    [project.entry-points."bdseal.plugins"]
    my_plugin = "my_package.bdseal_plugin"

``register_config`` gives a name its default options, so ``defense=high_loss`` selects them; a name
registered without one gets the group's template (``bdseal/registry.py``, ``CONFIG_TEMPLATES``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdseal import Attack, DefenseResult, register_attack, register_config, register_defense, register_model, register_source
from bdseal.data import DataSplits, make_dataset
from bdseal.train import fit, predict_logits


@register_source("stripes")
def load_stripes(root: str | None = None, num_classes: int = 4, n_train: int = 60, n_test: int = 20,
                 size: int = 16, seed: int = 0) -> DataSplits:
    """``num_classes`` classes of grey stripes (class c: period c + 2) with noise; per-class counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (n_train, n_test):
        y = torch.arange(num_classes).repeat_interleave(n)
        period = (y + 2).view(-1, 1, 1).float()
        rows = torch.arange(size).view(1, -1, 1).float()
        x = 0.5 + 0.4 * torch.sin(2 * torch.pi * rows / period) + 0.1 * torch.randn(len(y), size, size, generator=g)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1)
        out.append(make_dataset(x, y, [f"period{c + 2}" for c in range(num_classes)], what="stripes"))
    return DataSplits("stripes", out[0], out[1])


class TinyCNN(nn.Module):
    """A plain module: bdseal wraps it (normalising inputs with the data's statistics, since it takes none)."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(h.mean(dim=(2, 3)))


@register_model("tiny_cnn")
def build_tiny_cnn(num_classes: int, in_channels: int = 3, width: int = 16) -> nn.Module:
    return TinyCNN(num_classes, in_channels, width)


@register_attack
class Corner(Attack):
    """A white ``size`` x ``size`` square in the top-left corner."""

    name = "corner"

    def __init__(self, seed: int = 0, size: int = 2) -> None:
        super().__init__(seed, size=size)
        self.size = size

    def apply(self, x: torch.Tensor, *, phase: str, index: torch.Tensor | None = None) -> torch.Tensor:
        x = x.clone()
        x[:, :, : self.size, : self.size] = 1.0
        return x


register_config("attack", "corner", rate=0.1, target=0, params={"size": 2})


@register_defense("high_loss")
def high_loss(view: Any, cfg: dict[str, Any], ctx: Any) -> DefenseResult:
    """The small-loss trick of noisy-label learning: after a short training, dirty-label poisons (whose label
    disagrees with their content) still have a high loss. Flag the ``fraction`` of samples with the highest
    loss and retrain from scratch without them. Sees only the DefenderView (images, observed labels)."""
    probe = ctx.build_model()
    fit(probe, view.x, view.y, ctx.train_cfg.replace(epochs=int(cfg["isolate_epochs"])), device=ctx.device,
        seed=ctx.seed, desc="high_loss probe")
    loss = F.cross_entropy(predict_logits(probe, view.x, device=ctx.device), view.y.cpu(), reduction="none")
    n_flag = int(round(float(cfg["fraction"]) * len(loss)))
    flagged = torch.zeros(len(loss), dtype=torch.bool)
    flagged[torch.argsort(loss, descending=True)[:n_flag]] = True
    keep = torch.nonzero(~flagged).flatten()
    model = ctx.build_model()
    fit(model, view.x[keep.to(view.x.device)], view.y[keep.to(view.y.device)], ctx.train_cfg, device=ctx.device,
        seed=ctx.seed, desc="high_loss retrain")
    return DefenseResult(model.eval(), scores=loss, flagged=flagged, extras={"n_flagged": n_flag})


register_config("defense", "high_loss", fraction=0.1, isolate_epochs=1)
