"""Linear-probe evaluation of a backbone (an evaluation tool, not a defense).

``bdseal probe dataset=digits attack=badnets ssl.kind=simclr ssl.epochs=5`` (backbone ``ssl.arch``: default
``small_half`` on a CPU, ``resnet18`` on a GPU) builds the run's poisoned
training set exactly as ``bdseal run`` does, pre-trains (or loads from cache) the backbone on the
poisoned images as a defense would, then fits a logistic regression (scikit-learn, on standardised
features) on the features of the *clean* training pool with its labels and reports its accuracy on the
clean test split. Keys ``ssl.*`` are the backbone config (:mod:`bdseal.ssl.features`); every other
``key=value`` is a normal run override. It lives above the defender wall: it reads clean labels on
purpose, and imports ``bdseal.experiment`` lazily (it is a CLI tool, not library code).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch
import yaml


def linear_probe(features_train: torch.Tensor, y_train: torch.Tensor, features_test: torch.Tensor,
                 y_test: torch.Tensor, max_iter: int = 2000, C: float = 1.0) -> float:
    """Test accuracy of a multinomial logistic regression fitted on standardised training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=C))
    clf.fit(np.asarray(features_train, dtype=np.float64), np.asarray(y_train))
    return float((clf.predict(np.asarray(features_test, dtype=np.float64)) == np.asarray(y_test)).mean())


def split_argv(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``ssl.key=value`` pairs (values parsed as YAML) and the remaining run overrides."""
    ssl: dict[str, Any] = {}
    rest: list[str] = []
    for a in argv:
        if a.startswith("ssl.") and "=" in a:
            k, v = a[4:].split("=", 1)
            ssl[k] = yaml.safe_load(v)
        else:
            rest.append(a)
    ssl.setdefault("kind", "simclr")
    return ssl, rest


def default_arch(device: torch.device) -> str:
    """The backbone when ``ssl.arch`` is not given: ``small_half`` on a CPU (minutes), ``resnet18`` on a GPU."""
    return "resnet18" if device.type == "cuda" else "small_half"


def probe_main(argv: list[str]) -> int:
    """CLI entry: print and return 0 with a JSON line {"probe_acc": ..., ...}; 2 on a usage error."""
    from bdseal.cache import ArtifactCache
    from bdseal.defenses.base import DefenderView, RunContext
    from bdseal.experiment.config import compose_config
    from bdseal.experiment.run import defender_split, load_data, plain, poison, resolve_device
    from bdseal.ssl.features import extract_features, load_backbone, resolve_cfg
    from bdseal.train import TrainConfig

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    ssl_cfg, overrides = split_argv(argv)
    cfg = compose_config(overrides)
    device, seed = resolve_device(cfg.device), int(cfg.seed)
    ssl_cfg.setdefault("arch", default_arch(device))
    try:
        ssl_cfg = resolve_cfg(ssl_cfg)
    except ValueError as e:
        print(f"bdseal probe: {e}", file=sys.stderr)
        return 2
    cache = ArtifactCache(cfg.cache_dir, enabled=bool(cfg.cache))
    splits = load_data(cfg)
    pool, _ = defender_split(cfg, splits.train, seed)
    ps = poison(cfg, pool, splits.test, device, cache, seed)
    train_cfg = TrainConfig.from_dict({**plain(cfg.train), "progress": bool(cfg.progress)})
    ctx = RunContext(device=device, seed=seed, build_model=lambda num_classes=None: None, train_cfg=train_cfg,
                     cache=cache, progress=bool(cfg.progress), log=lambda m: print(m, file=sys.stderr))
    encoder = load_backbone(DefenderView(train=ps.train), ssl_cfg, ctx)
    f_tr = extract_features(encoder, pool.x, device)
    f_te = extract_features(encoder, splits.test.x, device)
    acc = linear_probe(f_tr, pool.y, f_te, splits.test.y)
    print(json.dumps({"probe_acc": acc, "dataset": cfg.dataset.name, "attack": cfg.attack.name,
                      "backbone": ssl_cfg, "n_train": len(pool), "n_test": len(splits.test)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(probe_main(sys.argv[1:]))
