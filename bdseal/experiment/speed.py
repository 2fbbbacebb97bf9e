"""``bdseal bench-speed``: measured in one process on one machine,

(a) the training loop's overhead: images/s of :func:`bdseal.train.fit` against a bare loop of the same
    model, batch size, optimiser, autocast and memory format (``forward -> cross-entropy -> zero_grad ->
    backward -> step`` on one pre-made float batch). ``fit`` runs with ``augment=none`` for the ratio, so
    what is measured is the loop's own machinery (batch gather, uint8->float, lr schedule, loss read-out,
    progress bar, hooks); ``fit`` with the recipe's ``crop_flip`` is reported next to it. Goal:
    ``overhead = bare images/s ÷ fit images/s ≤ 1.1``. Each timing is the best of ``repeats`` runs
    (the two loops alternate) to resist noise from other processes; ``overhead_median`` (ratio of the
    median times) is reported beside it, as one fast outlier repeat moves a best-of ratio.
(b) each registered defense's wall time as a multiple of plain training (``defense=none``) on the same
    data: whole cells through ``run_experiment`` with one shared, fresh artefact cache, the poisoned set
    and the backdoored baseline (input of post-hoc defenses) computed beforehand so neither is
    charged to any defense; non-post-hoc defenses run with ``baseline=false``. Defenses without a config
    in ``bdseal/conf/defense/`` are skipped (the registry tells which exist).
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bdseal.errors import ConfigError
from bdseal.models import build_model
from bdseal.train import TrainConfig, fit

log = logging.getLogger("bdseal.speed")

# Tiny-scale default for the defense timings: digits, 60 images/class, 3 epochs (a few seconds per cell).
DEFAULT_CELL = ("dataset=digits", "attack=badnets", "dataset.train_per_class=60", "train.epochs=3")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device)}
    if hasattr(os, "getloadavg"):  # other jobs on the machine inflate CPU timings; recorded so readers can tell
        info["load_avg_1min"] = os.getloadavg()[0]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """The same autocast as ``fit``: bf16 on CUDA, off on CPU."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


class _Timer:
    """Seconds between ``start()`` and ``stop()``: CUDA events on a GPU (device time of the queued work,
    one synchronisation at the end), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()  # type: ignore[assignment]

    def stop(self) -> float:
        if self.cuda:
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record()
            t1.synchronize()
            return self.t0.elapsed_time(t1) / 1e3  # type: ignore[union-attr]
        return time.perf_counter() - self.t0  # type: ignore[operator]


def _bare_loop(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, cfg: TrainConfig, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` plain optimisation steps on one fixed batch."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    model.train()
    timer = _Timer(device)
    timer.start()
    for _ in range(steps):
        with _autocast(device, cfg.amp):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timer.stop()


def _fit_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device: torch.device) -> float:
    timer = _Timer(device)
    timer.start()
    fit(model, x, y, cfg, device=device, seed=0)
    return timer.stop()


def loop_overhead(model: str = "small_half", batch_size: int = 128, n: int = 1024, image_size: int = 32, epochs: int = 2,
                  repeats: int = 3, device: str | torch.device = "cpu", num_classes: int = 10,
                  params: dict[str, Any] | None = None, min_steps: int | None = None) -> dict[str, Any]:
    """(a): images/s of ``fit`` (augment none and crop_flip) and of the bare loop, and their ratio.
    ``min_steps`` (default 500 on CUDA, 0 on the CPU) raises ``epochs`` until each timed run has at least
    that many steps, so launch jitter and clock ramp-up average out. ``overhead_paired`` is the median of
    the per-repeat ratios fit ÷ bare (the two run back to back in each repeat, so slow phases of the
    machine hit both); ``bare_spread`` is the bare loop's own (max − min) ÷ median over the repeats — an
    overhead inside that spread is not resolved."""
    dev = torch.device(device)
    if min_steps is None:
        min_steps = 500 if dev.type == "cuda" else 0
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8).to(dev)
    y = torch.randint(0, num_classes, (n,), generator=g).to(dev)
    torch.manual_seed(0)
    net = build_model(model, num_classes, in_channels=3, image_size=image_size, **(params or {}))
    base = TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="cosine", augment="none", progress=False, drop_last=True)
    if n // batch_size < 1:
        raise ValueError(f"loop_overhead: n={n} gives no full batch of {batch_size}")
    epochs = max(epochs, -(-min_steps // (n // batch_size)))
    base = base.replace(epochs=epochs)
    steps = epochs * (n // batch_size)
    images = steps * batch_size
    fmt = torch.channels_last if base.channels_last else torch.contiguous_format  # as fit does
    xb = (x[:batch_size].float() / 255).contiguous(memory_format=fmt)
    yb = y[:batch_size]
    # warm-up: one-time costs (lazy imports, allocator, cuDNN autotune) charged to neither side
    fit(copy.deepcopy(net), x, y, base.replace(steps=2), device=dev, seed=0)
    _bare_loop(copy.deepcopy(net).to(dev).to(memory_format=fmt), xb, yb, base, 2, dev)
    t_fit, t_bare, t_aug = [], [], []
    for _ in range(repeats):
        t_bare.append(_bare_loop(copy.deepcopy(net).to(dev).to(memory_format=fmt), xb, yb, base, steps, dev))
        t_fit.append(_fit_time(copy.deepcopy(net), x, y, base, dev))
        t_aug.append(_fit_time(copy.deepcopy(net), x, y, base.replace(augment="crop_flip"), dev))
    fit_ips, bare_ips, aug_ips = images / min(t_fit), images / min(t_bare), images / min(t_aug)
    return {"model": model, "params": params or {}, "batch_size": batch_size, "n": n, "image_size": image_size, "steps": steps, "repeats": repeats,
            "fit_images_per_s": fit_ips, "bare_images_per_s": bare_ips, "fit_crop_flip_images_per_s": aug_ips,
            "overhead": bare_ips / fit_ips, "overhead_with_crop_flip": bare_ips / aug_ips, "goal": 1.1,
            "overhead_median": statistics.median(t_fit) / statistics.median(t_bare),
            "overhead_paired": statistics.median(f / b for f, b in zip(t_fit, t_bare)),
            "bare_spread": (max(t_bare) - min(t_bare)) / statistics.median(t_bare),
            "timer": "cuda events" if dev.type == "cuda" else "perf_counter",
            "fit_s": t_fit, "bare_s": t_bare, "fit_crop_flip_s": t_aug}


def _has_config(name: str) -> bool:
    return (resources.files("bdseal.conf") / "defense" / f"{name}.yaml").is_file()


def defense_times(defenses: Sequence[str] | None = None, overrides: Sequence[str] = DEFAULT_CELL,
                  device: str = "auto") -> dict[str, Any]:
    """(b): seconds per cell and the multiple of plain training, for each registered defense."""
    from bdseal.defenses import get_defense, list_defenses
    from bdseal.experiment import run as run_mod
    from bdseal.experiment.config import compose_config

    names = list(defenses) if defenses is not None else list_defenses()
    registered = set(list_defenses())
    out: dict[str, Any] = {"cell": list(overrides), "defenses": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="bdseal-speed-") as tmp:
        common = [*overrides, f"cache_dir={tmp}/cache", "progress=false", f"device={device}"]

        def cell(name: str, *extra: str) -> float:
            cfg = compose_config([*common, f"defense={name}", *extra, f"out={tmp}/{name}-{len(os.listdir(tmp))}"])
            t0 = time.perf_counter()
            run_mod.run_experiment(cfg)
            return time.perf_counter() - t0

        cell("none", "baseline=true")  # warm-up: poisoned set + backdoored baseline into the cache
        plain = cell("none", "baseline=false", "cache=false")  # defense=none would load the cached baseline: train it
        out["plain_training_s"] = plain
        for name in names:
            if name not in registered or not _has_config(name):
                out["skipped"][name] = "not registered" if name not in registered else "no conf/defense config"
                continue
            spec = get_defense(name)
            try:
                t = plain if name == "none" else cell(name, "baseline=false" if not spec.post_hoc else "baseline=auto")
            except Exception as e:  # a broken defense is reported, not fatal for the others
                out["skipped"][name] = f"failed: {type(e).__name__}: {e}"
                continue
            out["defenses"][name] = {"seconds": t, "x_plain_training": t / plain, "post_hoc": spec.post_hoc}
            log.info("bench-speed: %s %.1fs = %.2fx plain training", name, t, t / plain)
    return out


def run_speed(part: str = "all", device: str = "auto", loop: dict[str, Any] | None = None,
              defenses: Sequence[str] | None = None, overrides: Sequence[str] = DEFAULT_CELL) -> dict[str, Any]:
    """Both measurements (``part``: all | loop | defenses) in one process."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    res: dict[str, Any] = {"machine": machine_info(dev), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if part in ("all", "loop"):
        res["loop"] = loop_overhead(device=dev, **(loop or {}))
    if part in ("all", "defenses"):
        res["defense_times"] = defense_times(defenses, overrides, device=str(dev))
    return res


_LOOP_KEYS = ("model", "batch_size", "n", "image_size", "epochs", "repeats", "params", "min_steps")


def run_from_args(argv: Sequence[str]) -> dict[str, Any]:
    """``part=all|loop|defenses device=auto out=FILE.json defenses=[a,b] loop.batch_size=64 ...``;
    other ``key=value`` are Hydra overrides of the defense-timing cell (default :data:`DEFAULT_CELL`)."""
    import json

    opts: dict[str, Any] = {}
    cell = list(DEFAULT_CELL)
    for arg in argv:
        key = arg.partition("=")[0]
        if key in ("part", "device", "out", "defenses") or key.startswith("loop."):
            opts = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(opts), OmegaConf.from_dotlist([arg])))  # type: ignore[assignment]
        else:
            cell.append(arg)
    loop = dict(opts.get("loop") or {})
    unknown = set(loop) - set(_LOOP_KEYS)
    if unknown:
        raise ConfigError(f"bench-speed: unknown loop option(s) {sorted(unknown)}; known: {list(_LOOP_KEYS)}")
    res = run_speed(str(opts.get("part", "all")), str(opts.get("device", "auto")), loop, opts.get("defenses"), cell)
    if opts.get("out"):
        from pathlib import Path

        Path(opts["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(opts["out"]).write_text(json.dumps(res, indent=1))
    return res
