"""Any classifier ``nn.Module`` seen through the interface bdseal's defenses use.

Defenses need four things of a model (DESIGN.md "models"): logits from float images in [0, 1];
``features(x)``, the penultimate embedding that the linear ``head`` maps to logits (PGRL's backbone g,
VIBE, Trojan's neuron choice); ``forward_with(x, layers)``, logits plus the outputs of named layers
(PGBD's activation space, NAD's attention maps); and default layer choices (``last_conv_name()`` for PGBD,
``layer_names`` for NAD). :class:`~bdseal.models.base.StagedClassifier` has them by construction;
:class:`WrappedClassifier` provides them for any other module through ``named_modules()`` and forward
hooks, so the module itself is never changed:

- ``head``: the dotted name of the final ``nn.Linear``; default: the last ``nn.Linear`` registered.
  ``features(x)`` is that layer's input (captured with a forward pre-hook).
- ``layers``: the named layers for NAD-style defenses; default: the children that hold convolutions, found
  by descending through single containers (torchvision-style ResNets give ``conv1, layer1..layer4``).
- PGBD's layer: the last ``nn.Conv2d`` registered (the raw last-conv output, REFERENCE "PGBD"), or the
  ``layer=`` a user names.

The wrapped module must take float images in [0, 1] (pass ``mean``/``std`` to normalise them first) and
end with its head: :meth:`WrappedClassifier.check` verifies ``head(features(x)) == model(x)`` on a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bdseal.models.base import Normalize

_INTERFACE = ("forward_with", "features", "feature_dim", "head", "layer_names", "last_conv_name")


class ModelInterfaceError(ValueError):
    """A model cannot be used by a defense; the message names the missing piece and the option to set."""


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(x, nn.modules.conv._ConvNd) for x in m.modules())


def default_layers(model: nn.Module, exclude: str = "") -> list[str]:
    """Dotted names of the children that hold convolutions, descending through single containers.

    ``nn.Sequential(features=..., classifier=...)`` descends into ``features``; a torchvision-style ResNet
    gives ``conv1, layer1, ..., layer4``. Empty when the model has no convolution."""
    prefix, node = "", model
    while True:
        kids = [(n, c) for n, c in node.named_children() if f"{prefix}{n}" != exclude and _has_conv(c)]
        if len(kids) == 1 and any(True for _ in kids[0][1].children()):
            prefix, node = f"{prefix}{kids[0][0]}.", kids[0][1]
            continue
        return [f"{prefix}{n}" for n, _ in kids]


class WrappedClassifier(nn.Module):
    """``WrappedClassifier(model, head=None, layers=None, mean=None, std=None)``: see the module doc.

    The wrapped module is ``.model``; state-dict keys get the prefix ``model.`` (``unwrap`` returns it)."""

    def __init__(self, model: nn.Module, *, head: str | None = None, layers: Sequence[str] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ModelInterfaceError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        modules = dict(model.named_modules())
        if head is None:  # no Linear: fine for defenses that never ask for the head (ft, nad, pgbd)
            head = next((n for n, m in reversed(modules.items()) if isinstance(m, nn.Linear)), None)
        elif head not in modules or head == "":
            raise ModelInterfaceError(f"head={head!r} is not a submodule of {type(model).__name__}; modules: {_some(modules)}")
        self._head_name = head
        names = list(layers) if layers is not None else default_layers(model, exclude=head or "")
        missing = [n for n in names if n not in modules or n == ""]
        if missing:
            raise ModelInterfaceError(f"layers {missing} are not submodules of {type(model).__name__}; modules: {_some(modules)}")
        self._layers = names
        if (mean is None) != (std is None):
            raise ModelInterfaceError("pass both mean and std (or neither)")
        self.normalize: nn.Module = Normalize(mean, std) if mean is not None and std is not None else nn.Identity()

    # -- the interface --------------------------------------------------------------------------
    @property
    def head_name(self) -> str:
        """Dotted name of the classifier head (the last ``nn.Linear`` unless ``head=`` named one)."""
        if self._head_name is None:
            raise ModelInterfaceError(
                f"{type(self.model).__name__} has no nn.Linear classifier head; pass head=<name of the module that "
                f"maps features to logits> (modules: {_some(dict(self.model.named_modules()))})")
        return self._head_name

    @property
    def head(self) -> nn.Module:
        """The classifier head (the wrapped model's own module, not a copy)."""
        return self.model.get_submodule(self.head_name)

    @property
    def feature_dim(self) -> int:
        head = self.head
        if not isinstance(head, nn.Linear):
            raise ModelInterfaceError(f"head {self.head_name!r} is a {type(head).__name__}, not nn.Linear: its input "
                                      "size (feature_dim) is unknown; pass head=<name of the final nn.Linear>")
        return int(head.in_features)

    @property
    def num_classes(self) -> int:
        head = self.head
        if not isinstance(head, nn.Linear):
            raise ModelInterfaceError(f"head {self.head_name!r} is not nn.Linear; pass head=<name of the final nn.Linear>")
        return int(head.out_features)

    @property
    def layer_names(self) -> list[str]:
        if not self._layers:
            raise ModelInterfaceError(f"{type(self.model).__name__} has no convolutional layers to name by default; pass "
                                      "layers=[...] (dotted names from named_modules()) or the defense's layer option")
        return list(self._layers)

    def last_conv_name(self) -> str:
        """Dotted name of the last ``nn.Conv2d`` registered outside the head (PGBD's default layer)."""
        convs = [n for n, m in self.model.named_modules()
                 if isinstance(m, nn.Conv2d) and not (self._head_name and n.startswith(f"{self._head_name}."))]
        if not convs:
            raise ModelInterfaceError(f"{type(self.model).__name__} has no nn.Conv2d; name the activation layer with "
                                      "layer=<dotted name from named_modules()> (defense option)")
        return convs[-1]

    def block_output_name(self) -> str:
        """The last block of the last named layer (PGBD's block-output activation, REFERENCE "PGBD"): the
        layer itself when its direct children include a convolution or it has none."""
        last = self.layer_names[-1]
        children = list(self.model.get_submodule(last).named_children())
        if not children or any(isinstance(m, nn.Conv2d) for _, m in children):
            return last
        blocks = [n for n, m in children if _has_conv(m)]
        return f"{last}.{blocks[-1]}" if blocks else last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))

    def forward_with(self, x: torch.Tensor, layers: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the outputs of the named submodules (captured by forward hooks, kept in the graph)."""
        acts: dict[str, torch.Tensor] = {}
        handles = [self._module(n).register_forward_hook(_store(acts, n)) for n in layers]
        try:
            logits = self(x)
        finally:
            for h in handles:
                h.remove()
        return logits, acts

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input, flattened to (B, feature_dim)."""
        return self._head_io(x)[0]

    def check(self, x: torch.Tensor) -> None:
        """Raise :class:`ModelInterfaceError` unless ``head(features(x))`` reproduces the logits on ``x``
        (float images in [0, 1]), i.e. the head is the model's last operation. A model without an
        ``nn.Linear`` (and no ``head=``) has nothing to check: defenses that need a head say so when they ask."""
        if self._head_name is None:
            return
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                feats, logits = self._head_io(x)
                again = self.head(feats)
        finally:
            self.train(was)
        if logits.ndim != 2 or again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-4, atol=1e-5):
            raise ModelInterfaceError(
                f"{type(self.model).__name__}'s output is not head({self.head_name!r}) applied to its input: the model "
                "must return the logits of its final linear layer; pass head=<name of that layer>")

    # -- helpers ---------------------------------------------------------------------------------
    def _module(self, name: str) -> nn.Module:
        try:
            if name == "":
                raise AttributeError(name)
            return self.model.get_submodule(name)
        except AttributeError:
            raise ModelInterfaceError(f"layer {name!r} is not a submodule of {type(self.model).__name__}; "
                                      f"modules: {_some(dict(self.model.named_modules()))}") from None

    def _head_io(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []

        def pre(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen.append(inputs[0])

        handle = self.head.register_forward_pre_hook(pre)
        try:
            logits = self(x)
        finally:
            handle.remove()
        if not seen:
            raise ModelInterfaceError(f"head {self.head_name!r} did not run in {type(self.model).__name__}.forward; "
                                      "pass head=<name of the final nn.Linear>")
        return seen[-1].flatten(1), logits


def _store(acts: dict[str, torch.Tensor], name: str):
    def hook(_m: nn.Module, _inputs: tuple[Any, ...], output: Any) -> None:
        acts[name] = output
    return hook


def _some(modules: dict[str, nn.Module], n: int = 12) -> str:
    names = [k for k in modules if k]
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` already offers the defense interface (a StagedClassifier or a wrapper)."""
    return all(hasattr(type(model), a) or hasattr(model, a) for a in _INTERFACE)


def as_classifier(model: nn.Module, *, head: str | None = None, layers: Sequence[str] | None = None) -> nn.Module:
    """``model`` itself when it has the defense interface, else a :class:`WrappedClassifier` around it."""
    if isinstance(model, WrappedClassifier):
        if head is None and layers is None:
            return model
        rewrapped = WrappedClassifier(model.model, head=head or model._head_name,
                                      layers=layers if layers is not None else model._layers)
        rewrapped.normalize = model.normalize
        return rewrapped
    if is_classifier(model):  # a StagedClassifier names any submodule in forward_with already
        return model
    return WrappedClassifier(model, head=head, layers=layers)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a :class:`WrappedClassifier` (other models unchanged)."""
    return model.model if isinstance(model, WrappedClassifier) and isinstance(model.normalize, nn.Identity) else model
