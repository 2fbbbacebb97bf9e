"""Load BackdoorBench checkpoints (``SCLBD/BackdoorBench``) into bdseal's models.

BackdoorBench trains ``preactresnet18`` (its ``models/preact_resnet.py``) and ``resnet18`` (torchvision's,
ImageNet stem: 7x7/2 conv + max-pool) on inputs normalised by the data pipeline; bdseal's models normalise
inside (``normalize`` buffers), so the loader takes the normalisation BackdoorBench used for the dataset
(``dataset=``, from its ``get_dataset_normalization``) or explicit ``mean``/``std``.

Key names (BackdoorBench → bdseal):

- PreAct-ResNet-18: ``conv1`` → ``stages.stem``; ``layerI.J.{bn1,conv1,bn2,conv2}`` → ``stages.layerI.J.…``;
  ``layerI.J.shortcut.0`` → ``stages.layerI.J.shortcut`` (a bare 1x1 conv here); ``linear`` → ``head``.
  Target model: :func:`bdseal.models.preact.preact_resnet18` (no final BN + ReLU, their layout).
- ResNet-18 (torchvision): ``conv1``/``bn1`` → ``stages.stem.0``/``stages.stem.1``; ``layerI.J.{conv1,bn1,conv2,bn2}``
  unchanged under ``stages.``; ``layerI.J.downsample.{0,1}`` → ``stages.layerI.J.shortcut.{0,1}``; ``fc`` →
  ``head``. Target model: :class:`bdseal.models.resnet.ResNet` with the ImageNet stem.

Files are read without unpickling arbitrary objects: ``.safetensors``, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from bdseal.errors import ConfigError

from .base import StagedClassifier
from .preact import preact_resnet18
from .resnet import BasicBlock, ResNet

# BackdoorBench's utils/aggregate_block/dataset_and_transform_generate.py::get_dataset_normalization.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

ARCHS = {"preactresnet18": "preact_resnet18", "preact_resnet18": "preact_resnet18", "resnet18": "resnet18"}

_PREACT_RULES = [
    (re.compile(r"^conv1\.(.+)$"), r"stages.stem.\1"),
    (re.compile(r"^(layer\d+\.\d+)\.shortcut\.0\.(.+)$"), r"stages.\1.shortcut.\2"),
    (re.compile(r"^(layer\d+\.\d+\..+)$"), r"stages.\1"),
    (re.compile(r"^linear\.(.+)$"), r"head.\1"),
]
_RESNET_RULES = [
    (re.compile(r"^conv1\.(.+)$"), r"stages.stem.0.\1"),
    (re.compile(r"^bn1\.(.+)$"), r"stages.stem.1.\1"),
    (re.compile(r"^(layer\d+\.\d+)\.downsample\.(\d)\.(.+)$"), r"stages.\1.shortcut.\2.\3"),
    (re.compile(r"^(layer\d+\.\d+\..+)$"), r"stages.\1"),
    (re.compile(r"^fc\.(.+)$"), r"head.\1"),
]


def _read(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat state dict from a dict, a ``.safetensors`` file or a weights-only torch file; BackdoorBench's
    ``attack_result.pt`` / ``defense_result.pt`` keep the weights under ``"model"``."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"BackdoorBench checkpoint {p} does not exist")
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unpickling refusal gets the same advice
                raise ConfigError(f"{p} cannot be read as weights only ({type(e).__name__}); save its 'model' state "
                                 "dict with safetensors.torch.save_file and load that file instead") from e
    if isinstance(state.get("model"), Mapping):
        state = dict(state["model"])
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError("BackdoorBench checkpoint: expected a state dict of tensors (or one under 'model')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _infer_arch(state: Mapping[str, torch.Tensor]) -> str:
    if "linear.weight" in state:
        return "preact_resnet18"
    if "fc.weight" in state:
        return "resnet18"
    raise ConfigError("cannot tell the architecture from the key names (no 'linear.weight' or 'fc.weight'); "
                     "pass arch='preactresnet18' or arch='resnet18'")


def rename_backdoorbench_keys(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """BackdoorBench key names → bdseal key names for ``arch`` (see the module docstring)."""
    rules = _PREACT_RULES if ARCHS[arch] == "preact_resnet18" else _RESNET_RULES
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, repl in rules:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            raise ConfigError(f"BackdoorBench {arch}: unexpected key {key!r}")
    return out


def load_backdoorbench(
    source: str | Path | Mapping[str, torch.Tensor],
    arch: str | None = None,
    *,
    dataset: str | None = "cifar10",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> StagedClassifier:
    """A bdseal model (eval mode, CPU) holding a BackdoorBench ``preactresnet18`` or ``resnet18`` checkpoint.

    ``source``: a state dict in BackdoorBench's key names, or a file (``.safetensors``; ``.pt`` read with
    ``weights_only=True``). ``arch``: ``preactresnet18`` / ``resnet18`` (None = from the key names). The
    input normalisation is BackdoorBench's for ``dataset`` unless ``mean``/``std`` are given."""
    state = _read(source)
    arch = arch or _infer_arch(state)
    if arch not in ARCHS:
        raise ConfigError(f"unknown BackdoorBench arch {arch!r}; choose one of {sorted(ARCHS)}")
    renamed = rename_backdoorbench_keys(state, arch)
    if mean is None or std is None:
        if dataset not in NORMALIZATION:
            raise ConfigError(f"no BackdoorBench normalisation for dataset {dataset!r}; pass mean= and std= "
                             f"or one of {sorted(NORMALIZATION)}")
        mean, std = NORMALIZATION[dataset]
    head = renamed["head.weight"]
    stem = renamed["stages.stem.weight" if ARCHS[arch] == "preact_resnet18" else "stages.stem.0.weight"]
    num_classes, width, in_ch = head.shape[0], stem.shape[0], stem.shape[1]
    mean_t, std_t = tuple(mean) * (in_ch if len(mean) == 1 else 1), tuple(std) * (in_ch if len(std) == 1 else 1)
    if ARCHS[arch] == "preact_resnet18":
        model: StagedClassifier = preact_resnet18(num_classes, in_ch, mean_t, std_t, width=width)
    else:
        model = ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_ch, width, True, mean_t, std_t)
    own = model.state_dict()
    renamed.update({k: own[k] for k in ("normalize.mean", "normalize.std")})
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise ConfigError(f"BackdoorBench {arch} checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    bad = [k for k in own if own[k].shape != renamed[k].shape]
    if bad:
        raise ConfigError(f"BackdoorBench {arch} checkpoint: shape mismatch at {bad[:5]} (a different depth or width?)")
    model.load_state_dict(renamed)
    return model.eval()
