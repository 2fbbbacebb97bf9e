"""The Python API: poison your own tensors, train and defend any ``nn.Module``, evaluate (docs/api.md).

    ps = bdseal.poison(images, labels, attack="badnets", rate=0.1, target=0, seed=0)
    backdoored = bdseal.train_model(net, ps, epochs=10)        # a trained copy of ``net``
    res = bdseal.defend(ps, "pgbd", backdoored, layer="conv2")  # post-hoc: repairs a copy of the model
    res = bdseal.defend(ps, "pgrl", net)                        # training defense: ``net`` is the initial network
    bdseal.evaluate(res.model, ps, result=res)                  # clean_acc, asr, ra, detection, relabel_acc

The defender/oracle wall holds here as in ``bdseal run``: :func:`defend` turns a :class:`PoisonedData` into
:class:`DefenderData` (training images, observed labels, the clean pool, the target only when
``target_known=True``) before anything else, so a defense never receives the oracle; only
:func:`evaluate` reads it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from bdseal.errors import ConfigError
from bdseal.attacks import AttackContext, PoisonedSet, build_and_poison
from bdseal.cache import ArtifactCache, dataset_fingerprint, fingerprint
from bdseal.data import DataError, ImageDataset, make_dataset, split_holdout
from bdseal.defenses import DefenderView, DefenseResult, RunContext, get_defense
from bdseal.experiment.export import DefenderData, PoisonedData, load_poisoned, save_poisoned
from bdseal.experiment.run import _clean_subset, clean_set, detection, resolve_device
from bdseal.experiment.run import evaluate as _evaluate
from bdseal.experiment.validate import _group_yaml, check_defense_keys, defense_defaults
from bdseal.metrics import relabel_accuracy
from bdseal.models.wrap import ModelInterfaceError, WrappedClassifier, as_classifier, unwrap
from bdseal.train import TrainConfig, fit

log = logging.getLogger("bdseal")

ArrayLike = torch.Tensor | np.ndarray


def _dataset(images: ArrayLike, labels: ArrayLike | Sequence[int], classes: Sequence[str] | None, what: str) -> ImageDataset:
    return make_dataset(images, labels, classes, what=what)


def poison(
    images: ArrayLike,
    labels: ArrayLike | Sequence[int],
    attack: str = "badnets",
    *,
    rate: float = 0.1,
    target: int = 0,
    seed: int = 0,
    test: tuple[ArrayLike, ArrayLike] | None = None,
    test_fraction: float = 0.2,
    holdout: float = 0.05,
    classes: Sequence[str] | None = None,
    mode: str | None = None,
    cover_rate: float | None = None,
    rate_of: str | None = None,
    source_classes: list[int] | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **params: Any,
) -> PoisonedData:
    """Poison user images (uint8 ``(N, C, H, W)`` or ``(N, H, W, C)``, tensors or arrays; labels ``(N,)``).

    ``test``: a separate ``(images, labels)`` test split; else ``test_fraction`` of each class is held out
    as the test split. ``holdout`` of each class of the training split is kept clean for the defender
    before poisoning (as ``bdseal run``'s ``defender.holdout``). ``params`` go to the attack (e.g.
    ``size=4`` for BadNets; ``docs/attacks.md``). Same arguments ⇒ the same indices and pixels."""
    if test is None:
        full = _dataset(images, labels, classes, "poison(images, labels)")
        train, test_ds, _, _ = split_holdout(full, float(test_fraction), seed=seed)
        if not len(test_ds):
            raise DataError("poison: test_fraction=0 leaves no test images; pass test=(images, labels) or a fraction > 0")
    else:
        ys = np.concatenate([np.asarray(torch.as_tensor(labels).cpu()).ravel(), np.asarray(torch.as_tensor(test[1]).cpu()).ravel()])
        names = list(classes) if classes is not None else [str(i) for i in range(int(ys.max()) + 1)]
        train = _dataset(images, labels, names, "poison(images, labels)")
        test_ds = _dataset(test[0], test[1], names, "poison(test=...)")
    train, pool, _, _ = split_holdout(train, float(holdout), seed=seed)
    policy = {"rate": float(rate), "target": int(target), "mode": mode, "cover_rate": cover_rate, "rate_of": rate_of,
              "source_classes": source_classes}
    info: dict[str, Any] = {"attack": {"name": attack, "params": dict(params)}, "policy": policy, "seed": int(seed),
                            "holdout": float(holdout)}
    if attack == "none":
        ps = clean_set(train, test_ds)
    else:
        ctx = AttackContext(torch.device(device), seed, ArtifactCache(cache_dir, enabled=cache_dir is not None), progress)
        ps = build_and_poison(train, test_ds, attack, seed=seed, ctx=ctx, **policy, **params)  # type: ignore[arg-type]
    return PoisonedData(ps.train, ps.oracle, ps.test_clean, ps.test_triggered, ps.test_triggered_true, ps.plan,
                        clean_pool=pool, info=info)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def default_recipe(**overrides: Any) -> TrainConfig:
    """``bdseal run``'s training recipe (``conf/train/default.yaml``) with ``overrides`` (``epochs=5``...)."""
    return TrainConfig.from_dict(_merge(_group_yaml("train", "default") or {}, overrides))


def _train_split(data: PoisonedData | DefenderData | ImageDataset | tuple[ArrayLike, ArrayLike]) -> ImageDataset:
    if isinstance(data, (PoisonedSet, DefenderData)):
        return data.train
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return _dataset(data[0], data[1], None, "train(data=(images, labels))")
    raise TypeError(f"expected PoisonedData, DefenderData, ImageDataset or (images, labels), got {type(data).__name__}")


def train_model(model: nn.Module, data: PoisonedData | DefenderData | ImageDataset | tuple[ArrayLike, ArrayLike], *,
          device: str = "auto", seed: int = 0, progress: bool = False, **recipe: Any) -> nn.Module:
    """A trained copy of ``model`` (``model`` itself is untouched) on the training split with observed labels
    — on a :class:`PoisonedData` this is the backdoored model. ``recipe``: :class:`~bdseal.train.TrainConfig`
    fields over ``bdseal run``'s default recipe (``epochs=10, lr=0.05``...)."""
    ds = _train_split(data)
    net = copy.deepcopy(model)
    dev = resolve_device(device)
    _check_model(net, ds)
    fit(net, ds.x, ds.y, default_recipe(progress=progress, **recipe), device=dev, seed=seed, desc="train")
    return net.eval()


def _check_model(model: nn.Module, ds: ImageDataset) -> None:
    """Fail before any training when the model cannot take these images or has the wrong number of outputs."""
    x = ds.x[:2].float().div(255)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(dev))
    except Exception as e:  # noqa: BLE001 - any failure here means the model does not fit the data
        raise ModelInterfaceError(f"the model cannot take images of shape {tuple(ds.x.shape[1:])} (float in [0, 1]): "
                                  f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was)
    if out.ndim != 2 or out.shape[1] != ds.num_classes:
        raise ModelInterfaceError(f"the model returns shape {tuple(out.shape)} but the data has {ds.num_classes} classes: "
                                  f"it must return (batch, {ds.num_classes}) logits")
    if isinstance(model, WrappedClassifier):
        model.check(x.to(dev))


def defend(
    data: PoisonedData | DefenderData,
    defense: str,
    model: nn.Module | Callable[[], nn.Module],
    *,
    device: str = "auto",
    seed: int = 0,
    target_known: bool = False,
    head: str | None = None,
    layers: Sequence[str] | None = None,
    recipe: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **overrides: Any,
) -> DefenseResult:
    """Run ``defense`` and return its :class:`~bdseal.defenses.DefenseResult` (``model``, ``scores``, ``flagged``,
    ``relabels``, ``extras``).

    ``model``: what the defense starts from — the **backdoored model** for post-hoc defenses (``pgbd``,
    ``nt_pgbd``, ``st_pgbd``, ``nad``, ``ft``; a copy is repaired) and the **untrained network** for
    defenses that train (``pgrl``, ``vibe``, ``gssd``, ``none``...; each fresh model is a copy of it, or
    ``model()`` when a factory is given). Any ``nn.Module`` mapping float images in [0, 1] to logits works
    (``bdseal.models.wrap``): ``head`` names its final ``nn.Linear``, ``layers`` its layers for NAD.
    ``overrides`` are defense options over ``bdseal/conf/defense/<name>.yaml`` (``layer="block2.0"`` for PGBD,
    ``layers=[...]`` for NAD, ``train={"epochs": 5}``, ``clean_per_class=10``...). ``recipe`` overrides the
    training recipe of defenses that train from scratch. ``data`` is reduced to :class:`DefenderData`
    first: the defense never sees the oracle."""
    spec = get_defense(defense)
    seen = data.defender_data(target_known) if isinstance(data, PoisonedData) else data
    if not isinstance(seen, DefenderData):
        raise TypeError(f"defend: data must be PoisonedData or DefenderData, got {type(data).__name__}")
    cfg = _merge(defense_defaults(defense) or {"name": defense}, overrides)
    check_defense_keys(OmegaConf.create({"defense": cfg}))  # a misspelt option is an error, not ignored
    spec.check_options(cfg)  # a bad choice too, before any work
    dev = resolve_device(device)

    def fresh(num_classes: int | None = None) -> nn.Module:
        net = model() if callable(model) and not isinstance(model, nn.Module) else copy.deepcopy(model)
        wrapped = as_classifier(net, head=head, layers=layers)
        if num_classes is not None and num_classes != seen.train.num_classes:
            raise ModelInterfaceError(f"{defense} asked for a model with {num_classes} classes; a user model has a fixed "
                                      f"head ({seen.train.num_classes} classes): pass a factory model=lambda: ...")
        return wrapped

    first = fresh()
    _check_model(first, seen.train)
    clean = None
    if spec.needs_clean:
        if seen.clean_pool is None:
            raise DataError(f"{defense} needs the defender's clean pool: poison(..., holdout=0.05) keeps one")
        try:
            clean = _clean_subset(seen.clean_pool, OmegaConf.create({"defense": cfg, "defender": {"holdout": "poison(holdout=)"}}), seed)
        except DataError as e:
            raise DataError(f"{defense}: {e}".replace("defender.holdout", "poison(holdout=)")) from e
    ctx = RunContext(device=dev, seed=seed, build_model=fresh, train_cfg=default_recipe(progress=progress, **dict(recipe or {})),
                     cache=ArtifactCache(cache_dir, enabled=cache_dir is not None), run_dir=None, progress=progress,
                     log=log.info,
                     cache_key=fingerprint({"train": dataset_fingerprint(seen.train), "seed": seed}))
    view = DefenderView(train=seen.train, clean=clean, backdoored_model=first.to(dev).eval() if spec.post_hoc else None,
                        known_target=seen.known_target)
    result = spec.fn(view, cfg, ctx)
    result.model = unwrap(result.model)
    return result


def evaluate(model: nn.Module, data: PoisonedSet, *, result: DefenseResult | None = None, device: str = "auto") -> dict[str, Any]:
    """``clean_acc`` (clean test set), ``asr`` and ``ra`` (robust accuracy: triggered non-target test images
    classified as their true class) of ``model``; with ``result``, its detection metrics (TPR/FPR of
    ``flagged``, AUROC of ``scores``) and relabel accuracy against the oracle. Formulas: ``bdseal.metrics``."""
    out: dict[str, Any] = dict(_evaluate(model, data, resolve_device(device)))
    if result is not None:
        det = detection(result, data.oracle)
        if det is not None:
            out["detection"] = det
        if result.relabels is not None:
            out.update(relabel_accuracy(result.relabels, data.oracle.true_labels, data.oracle.is_poison))
    return out


@dataclass
class RunRecord:
    """A finished run directory: resolved ``config``, ``metrics`` and the ``model`` rebuilt from its weights."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    model: nn.Module


def load_run(path: str | Path) -> RunRecord:
    """Read a run directory written by ``bdseal run``: ``config.yaml``, ``metrics.json`` and the weights
    (``model.safetensors``, or a legacy ``model.pt`` read with ``torch.load(weights_only=True)``), loaded
    into the architecture the config names (plugins in its ``plugins`` key are imported first)."""
    import json

    from bdseal.io import load_model_state
    from bdseal.models import build_model
    from bdseal.registry import load_plugins

    p = Path(path)
    for name in ("config.yaml", "metrics.json"):
        if not (p / name).exists():
            raise FileNotFoundError(f"load_run: {p / name} is missing; is {p} a finished bdseal run directory?")
    cfg = OmegaConf.to_container(OmegaConf.load(p / "config.yaml"), resolve=True)
    assert isinstance(cfg, dict)
    metrics = json.loads((p / "metrics.json").read_text())
    load_plugins(cfg.get("plugins"))
    state, _ = load_model_state(p)
    shape = metrics.get("input_shape") or [int(state["normalize.mean"].shape[1]) if "normalize.mean" in state else 3, 32, 32]
    k = metrics.get("num_classes") or (int(state["head.weight"].shape[0]) if "head.weight" in state else None)
    if k is None:
        raise ConfigError(f"load_run: {p}/metrics.json has no num_classes and the weights no head.weight")
    model_cfg = cfg.get("model") or {}
    model = build_model(str(model_cfg.get("name")), int(k), in_channels=int(shape[0]), image_size=int(shape[1]),
                        **dict(model_cfg.get("params") or {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"load_run: the weights in {p} do not fit model={model_cfg.get('name')}: {e}") from e
    return RunRecord(p, cfg, metrics, unwrap(model).eval())
