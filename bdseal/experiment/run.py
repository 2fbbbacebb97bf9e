"""One experiment cell: load data, hold out the defender's clean pool, poison, defend, evaluate.

This is the only place where the ``PoisonedSet`` is split into the ``DefenderView`` a defense sees and
the ``Oracle`` that only ``bdseal.metrics`` reads.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bdseal import metrics as M
from bdseal.attacks import AttackContext, Oracle, PoisonedSet, build_attack, poison_dataset
from bdseal.attacks.base import resolve_cover_rate
from bdseal.attacks.patterns import pattern_label
from bdseal.cache import ArtifactCache, dataset_fingerprint, fingerprint
from bdseal.data import DataError, DataSplits, ImageDataset, load_dataset, per_class_subset, split_holdout, stratified_subsample
from bdseal.defenses import DefenderView, DefenseResult, RunContext, get_defense
from bdseal.errors import BdsealError, ConfigError, TrainingDivergedError
from bdseal.experiment.validate import check_per_class, validate_run_config
from bdseal.io import CorruptFileError, atomic_write_json, load_model_state, save_model
from bdseal.models import build_model
from bdseal.provenance import provenance
from bdseal.registry import load_plugins
from bdseal.train import TrainConfig, fit, predict

log = logging.getLogger("bdseal")


class RunDirError(BdsealError, FileExistsError):
    """The run directory holds results the user did not ask to overwrite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")
    return dev


def device_description(dev: torch.device) -> str:
    """What ran the cell, for metrics.json: ``cpu (N threads)`` or ``cuda:I (GPU name)``, plus torch's version."""
    if dev.type == "cuda":
        name = f"{dev.type}:{dev.index if dev.index is not None else torch.cuda.current_device()} ({torch.cuda.get_device_name(dev)})"
    else:
        name = f"{dev.type} ({torch.get_num_threads()} threads)"
    return f"{name}, torch {torch.__version__}"


def prepare_run_dir(cfg: DictConfig) -> Path:
    """``out`` or ``runs/<time>-<cell>``, checked but not created; refuses a non-empty directory unless
    ``overwrite=true``. The run is written to a staging sibling first (:func:`staged_run_dir`)."""
    if cfg.out:
        out = Path(str(cfg.out))
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        out = Path("runs") / f"{stamp}-{cfg.dataset.name}-{cfg.attack.name}-{cfg.defense.name}-s{cfg.seed}"
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {out} is a file; choose another out=")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise RunDirError(f"run directory {out} is not empty; pass overwrite=true or choose another out=")
    return out


FAILED_SUFFIX = ".failed"


# files of a failed run that a rerun into the same directory resumes from
RESUMABLE = ("*.ckpt", "pgrl_resume_e*.safetensors")


@contextmanager
def staged_run_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``final``; on success it replaces ``final`` (an old run
    there is removed only now), on failure ``final`` is untouched and the staging directory is kept as
    ``<final>.failed`` (its config.yaml and error.txt, for diagnosis; it never blocks a rerun). Resume
    checkpoints a failed run left (``RESUMABLE``: fit's ``*.ckpt``, PGRL's per-epoch state) move into the new
    staging directory, so an interrupted run continues where it stopped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    failed_before = final.with_name(final.name + FAILED_SUFFIX)
    for pattern in RESUMABLE:
        for f in sorted(failed_before.glob(pattern)) if failed_before.is_dir() else []:
            f.rename(stage / f.name)
    try:
        yield stage
    except BaseException as e:
        failed = final.with_name(final.name + FAILED_SUFFIX)
        shutil.rmtree(failed, ignore_errors=True)
        with contextlib.suppress(OSError):
            (stage / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
            stage.rename(failed)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(old / "run")
    stage.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(final.with_name(final.name + FAILED_SUFFIX), ignore_errors=True)


def plain(node: Any) -> Any:
    """A config node as plain Python containers (``{}`` for null)."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def load_data(cfg: DictConfig) -> DataSplits:
    """The dataset, optionally reduced to ``train_per_class`` / ``test_per_class`` images per class."""
    d = cfg.dataset
    splits = load_dataset(d.name, root=d.get("root"), **plain(d.get("options")))
    if d.get("train_per_class") is not None:
        check_per_class("dataset.train_per_class", d.train_per_class, splits.train.y.bincount(minlength=splits.num_classes), splits.train.classes)
        splits = DataSplits(splits.name, stratified_subsample(splits.train, d.train_per_class, seed=0), splits.test)
    if d.get("test_per_class") is not None:
        check_per_class("dataset.test_per_class", d.test_per_class, splits.test.y.bincount(minlength=splits.num_classes), splits.test.classes)
        splits = DataSplits(splits.name, splits.train, stratified_subsample(splits.test, d.test_per_class, seed=0))
    return splits


def defender_split(cfg: DictConfig, train: ImageDataset, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(training pool, the defender's clean pool): ``defender.holdout`` of each class held out before
    poisoning, at least ``defender.min_per_class`` images of a class."""
    d = cfg.defender
    kept, held, _, _ = split_holdout(train, float(d.holdout), seed=seed, min_per_class=int(d.get("min_per_class") or 0))
    return kept, held


def attack_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The poisoning policy of ``cfg.attack``; ``cover_rate`` None (config null) = the attack's default."""
    a = cfg.attack
    cover = a.get("cover_rate")
    return {
        "rate": float(a.rate), "target": int(a.target), "mode": a.get("mode"), "cover_rate": None if cover is None else float(cover),
        "rate_of": a.get("rate_of"), "source_classes": list(a.source_classes) if a.get("source_classes") else None,
    }


def poison(cfg: DictConfig, train: ImageDataset, test: ImageDataset, device: torch.device, cache: ArtifactCache, seed: int) -> PoisonedSet:
    """The poisoned set, cached by (clean data, attack and its parameters, policy with the resolved
    cover rate, seed)."""
    a = cfg.attack
    params = plain(a.get("params"))
    if a.name == "none":
        return clean_set(train, test)
    attack = build_attack(a.name, seed=seed, **params)
    policy = attack_kwargs(cfg)
    policy["cover_rate"] = resolve_cover_rate(attack, policy["rate"], policy["cover_rate"])  # null -> attack default
    parts = {"train": dataset_fingerprint(train), "test": dataset_fingerprint(test),
             "attack": a.name, "params": params, "policy": policy, "seed": seed}

    def compute() -> PoisonedSet:
        return poison_dataset(train, test, attack, seed=seed, ctx=AttackContext(device, seed, cache, cfg.progress), **policy)

    return cache.get_or_compute("poisoned", parts, compute)


def clean_set(train: ImageDataset, test: ImageDataset) -> PoisonedSet:
    """``attack=none``: the clean data with an all-false oracle and no triggered test set."""
    from bdseal.attacks.plan import PoisonPlan

    n, k = len(train), train.num_classes
    empty = torch.empty(0, dtype=torch.long)
    oracle = Oracle(torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), train.y.cpu().clone(),
                    torch.full((k,), -1, dtype=torch.long), {"name": "none"})
    plan = PoisonPlan(empty, empty, empty, oracle.target_map, "none", 0.0, "dataset")
    no_trigger = ImageDataset(test.x[:0], test.y[:0], list(test.classes))
    return PoisonedSet(train, oracle, test, no_trigger, test.y[:0].cpu(), plan)


def evaluate(model: torch.nn.Module, ps: PoisonedSet, device: torch.device, tta_flip: bool = False) -> dict[str, float]:
    """Clean accuracy on the clean test set (all of it, and without the target classes' images:
    ``clean_acc_nontarget``, PGBD's CA); ASR and robust accuracy (RA: true class) on the triggered
    non-target test images (NaN without an attack). ``tta_flip``: the fast recipe's test-time flip."""
    pred = predict(model, ps.test_clean.x, device=device, tta_flip=tta_flip)
    out = {"clean_acc": M.accuracy(pred, ps.test_clean.y),
           "clean_acc_nontarget": M.nontarget_accuracy(pred, ps.test_clean.y, ps.oracle.target_classes)}
    out["asr"] = out["ra"] = float("nan")
    if len(ps.test_triggered):
        pred = predict(model, ps.test_triggered.x, device=device, tta_flip=tta_flip)
        out["asr"] = M.attack_success_rate(pred, ps.test_triggered.y)
        out["ra"] = M.robust_accuracy(pred, ps.test_triggered_true)
    return out


def train_baseline(cfg: DictConfig, ctx: RunContext, view_train: ImageDataset) -> torch.nn.Module:
    """The no-defense model on the poisoned data (the backdoored model M_B), cached by everything
    that produced it."""
    parts = {"data": dataset_fingerprint(view_train), "model": plain(cfg.model),
             "train": asdict(ctx.train_cfg), "seed": ctx.seed}

    def compute() -> dict[str, torch.Tensor]:
        model = ctx.build_model()
        fit(model, view_train.x, view_train.y, ctx.train_cfg, device=ctx.device, seed=ctx.seed, desc="baseline")
        return {k: v.cpu() for k, v in model.state_dict().items()}

    model = ctx.build_model()
    model.load_state_dict(ctx.cache.get_or_compute("baseline", parts, compute))
    return model.to(ctx.device).eval()


def load_backdoored(path: str, make_model: Any, device: torch.device) -> torch.nn.Module:
    """M_B from a file for the run's ``model=`` choice: a run dir (its ``model.safetensors``), a
    ``.safetensors`` file, or a legacy ``.pt`` state dict read with ``torch.load(weights_only=True)``
    (:func:`bdseal.io.load_model_state`; nothing is unpickled)."""
    p = Path(path)
    try:
        state, _ = load_model_state(p)
    except FileNotFoundError:
        raise ConfigError(f"backdoored_ckpt={path}: no such file or run directory (with model.safetensors); fix the path") from None
    except CorruptFileError as e:
        raise CorruptFileError(f"backdoored_ckpt: {e}") from None
    model = make_model()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(f"backdoored_ckpt={path} does not fit model={type(model).__name__} ({first}); "
                          "pass the model= the checkpoint was trained with") from None
    return model.to(device).eval()


def model_from_checkpoint(cfg: DictConfig) -> None:
    """With ``backdoored_ckpt``, the model is the checkpoint's: the architecture (and its parameters) its
    metadata records replace ``cfg.model`` (a checkpoint without metadata, e.g. a plain state dict, keeps the
    run's ``model=``)."""
    if not cfg.get("backdoored_ckpt"):
        return
    try:
        _, meta = load_model_state(Path(str(cfg.backdoored_ckpt)))
    except FileNotFoundError:
        raise ConfigError(f"backdoored_ckpt={cfg.backdoored_ckpt}: no such file or run directory (with model.safetensors); "
                          "fix the path") from None
    except CorruptFileError as e:
        raise CorruptFileError(f"backdoored_ckpt: {e}") from None
    arch = meta.get("arch")
    if not isinstance(arch, str):
        return
    params = meta.get("model_params") or {}
    if arch != cfg.model.name or params != (plain(cfg.model.get("params")) or {}):
        log.info("backdoored_ckpt: model=%s %s from the checkpoint's metadata (instead of model=%s)", arch, params or "",
                 cfg.model.name)
    cfg.model = OmegaConf.create({**plain(cfg.model), "name": arch, "params": params})


def defense_config(cfg: DictConfig) -> dict[str, Any]:
    return dict(plain(cfg.defense))


def detection(result: DefenseResult, oracle: Oracle) -> dict[str, float] | None:
    if result.scores is None and result.flagged is None and result.kept is None:
        return None
    return M.detection_metrics(oracle.is_poison, scores=result.scores, flagged=result.flagged, kept=result.kept)


def defender_cache_key(train: ImageDataset, cfg: DictConfig, seed: int) -> str:
    """``RunContext.cache_key``: a hash of what the defender holds (images + observed labels), the dataset
    config and the seed — never of the attack config, which would carry the target across the wall."""
    return fingerprint({"train": dataset_fingerprint(train), "dataset": plain(cfg.dataset), "seed": seed})


@dataclass
class PreparedCell:
    """What every defense of one cell starts from: the poisoned training set (+ oracle), the defender's
    held-out clean pool and the run context (device, seeded model factory, training recipe, cache)."""

    device: torch.device
    seed: int
    poisoned: PoisonedSet
    defender_pool: ImageDataset
    ctx: RunContext


def prepare_cell(cfg: DictConfig, run_dir: Path | None = None) -> PreparedCell:
    """Data → defender hold-out (before poisoning) → poisoning (cached) → model factory and ``RunContext``:
    the steps ``run_experiment`` and the detection-only scripts share."""
    device = resolve_device(cfg.device)
    seed = int(cfg.seed)
    cache = ArtifactCache(cfg.cache_dir, enabled=bool(cfg.cache))
    splits = load_data(cfg)
    train_pool, defender_pool = defender_split(cfg, splits.train, seed)
    ps = poison(cfg, train_pool, splits.test, device, cache, seed)
    mean, std = ps.train.channel_stats()
    c, h, _ = ps.train.image_shape
    model_params = plain(cfg.model.get("params"))

    def make_model(num_classes: int | None = None) -> torch.nn.Module:
        """A fresh model, initialised deterministically from the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(cfg.model.name, num_classes or ps.train.num_classes, in_channels=c, image_size=h,
                               mean=mean, std=std, **model_params)

    train_cfg = TrainConfig.from_dict({**plain(cfg.train), "progress": bool(cfg.progress)})
    ctx = RunContext(device=device, seed=seed, build_model=make_model, train_cfg=train_cfg, cache=cache, run_dir=run_dir,
                     progress=bool(cfg.progress), log=log.info,
                     cache_key=defender_cache_key(ps.train, cfg, seed))
    return PreparedCell(device, seed, ps, defender_pool, ctx)


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run one cell and write ``metrics.json``, ``config.yaml`` and ``model.safetensors`` (+ ``model.json``)
    to the run dir. The config is validated first; the directory appears only when the run succeeded
    (:func:`staged_run_dir`)."""
    t0 = time.time()
    load_plugins(cfg.get("plugins"))
    validate_run_config(cfg)
    model_from_checkpoint(cfg)
    final = prepare_run_dir(cfg)
    with staged_run_dir(final) as out:
        metrics = _run_cell(cfg, out, t0)
        metrics["run_dir"] = str(final)
        atomic_write_json(out / "metrics.json", M.clean_json(metrics))
    return metrics


def _run_cell(cfg: DictConfig, out: Path, t0: float) -> dict[str, Any]:
    """The body of :func:`run_experiment`, writing into the staging directory ``out``."""
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    cell = prepare_cell(cfg, run_dir=out)
    device, seed, ps, ctx = cell.device, cell.seed, cell.poisoned, cell.ctx
    make_model, defender_pool = ctx.build_model, cell.defender_pool
    spec = get_defense(cfg.defense.name)
    want_baseline = cfg.baseline == "auto" and spec.name != "none" or cfg.baseline is True
    clean = _clean_subset(defender_pool, cfg, seed) if spec.needs_clean else None  # before any training
    baseline_model = None
    if cfg.get("backdoored_ckpt"):
        baseline_model = load_backdoored(str(cfg.backdoored_ckpt), make_model, device)
    elif want_baseline or spec.post_hoc:
        baseline_model = train_baseline(cfg, ctx, ps.train)
    if baseline_model is not None:
        check_finite_model(baseline_model, "the backdoored (baseline) model")
    view = DefenderView(
        train=ps.train,
        clean=clean,
        backdoored_model=copy.deepcopy(baseline_model) if spec.post_hoc else None,
        known_target=int(cfg.attack.target) if cfg.defender.target_known and cfg.attack.name != "none" else None,
    )
    ctx.epoch_eval = lambda model: evaluate(model, ps, device)  # per-epoch logs (test set; defenses only record it)
    log.info("defense %s on %s/%s (%d train, %d poisoned)", spec.name, cfg.dataset.name, cfg.attack.name, len(ps.train), int(ps.oracle.is_poison.sum()))
    if spec.name == "none" and not cfg.get("backdoored_ckpt"):
        # defense=none is the backdoored model M_B itself: the same cached training as the defended cells'
        # baseline (a bench's none row trains it once for every defense of that attack and seed)
        result = DefenseResult(baseline_model if baseline_model is not None else train_baseline(cfg, ctx, ps.train))
    else:
        result = spec.fn(view, defense_config(cfg), ctx)
    check_finite_model(result.model, f"the {spec.name} defense's model")
    metrics: dict[str, Any] = {
        "dataset": cfg.dataset.name, "model": cfg.model.name, "attack": cfg.attack.name, "defense": spec.name,
        "seed": seed, "poison_rate": ps.poison_rate, "target": int(cfg.attack.target) if cfg.attack.name != "none" else None,
        "n_train": len(ps.train), "num_classes": ps.train.num_classes,
        "n_poison": int(ps.oracle.is_poison.sum()), "n_cover": int(ps.oracle.is_cover.sum()),
        **evaluate(result.model, ps, device, ctx.train_cfg.tta_flip),
    }
    if (pattern := pattern_label(cfg.attack)) is not None:
        metrics["attack_pattern"] = pattern  # "cartoon" = the built-in stand-in for the papers' blend photo
    if baseline_model is not None:
        metrics["baseline"] = evaluate(baseline_model, ps, device, ctx.train_cfg.tta_flip)
        b = metrics["baseline"]
        if b["asr"] == b["asr"]:
            metrics["dem"] = M.dem(b["clean_acc"], b["asr"], metrics["clean_acc"], metrics["asr"])
    if (warning := not_learned_warning(cfg, spec.name, metrics)) is not None:
        log.warning(warning)
        metrics["warnings"] = [warning]
    det = detection(result, ps.oracle)
    if det is not None:
        metrics["detection"] = det
    if result.relabels is not None:
        metrics.update(M.relabel_accuracy(result.relabels, ps.oracle.true_labels, ps.oracle.is_poison))
    if result.relabel_history:
        metrics["relabel_history"] = M.relabel_history_metrics(result.relabel_history, ps.train.y, ps.oracle.true_labels,
                                                                ps.oracle.is_poison)
        for row in metrics["relabel_history"]:
            log.info("relabelling round (oracle view) %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if result.extras:
        metrics["extras"] = result.extras
    if (out / "pgrl_state.safetensors").exists():
        from bdseal.experiment.figures import add_oracle_per_epoch

        add_oracle_per_epoch(out, metrics, ps.oracle.is_poison)
    if cfg.figures.enabled:
        from bdseal.experiment.figures import draw_ground_truth_figures

        figs = draw_ground_truth_figures(spec, defense_config(cfg), result, ps, baseline_model, view, ctx, umap=bool(cfg.figures.umap))
        if figs:
            metrics["figures"] = figs
    metrics["time_s"] = time.time() - t0
    metrics.update(provenance(device=device_description(device), input_shape=list(ps.train.image_shape),
                              num_classes=ps.train.num_classes))
    save_model(out, result.model, {"arch": cfg.model.name, "model_params": plain(cfg.model.get("params")),
                                   "dataset": cfg.dataset.name, "attack": cfg.attack.name, "defense": spec.name, "seed": seed})
    return metrics


def not_learned_warning(cfg: DictConfig, defense: str, metrics: dict[str, Any]) -> str | None:
    """The line saying this cell's undefended model did not learn the attack (ASR below
    :data:`bdseal.metrics.NOT_LEARNED_ASR`), so a low ASR of any defense here is not evidence of removal;
    None when it did, when there is no attack or no undefended model in the run."""
    undefended = metrics if defense == "none" else metrics.get("baseline")
    if cfg.attack.name == "none" or undefended is None or not M.attack_not_learned(undefended["asr"]):
        return None
    return (f"the undefended model did not learn {cfg.attack.name} (ASR {100 * undefended['asr']:.1f}% < "
            f"{100 * M.NOT_LEARNED_ASR:.0f}%): no defense's ASR on this cell is evidence of removal; raise "
            f"train.epochs or attack.rate, or try another seed")


def check_finite_model(model: torch.nn.Module, what: str) -> None:
    """Refuse to evaluate a model with NaN/inf weights (it would predict one class: a fake ASR of 1.0)."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingDivergedError(f"{what} has non-finite weights ({', '.join(bad[:3])}); the training diverged: "
                                    "lower the learning rate (train.lr or the defense's lr)")


def _clean_subset(pool: ImageDataset, cfg: DictConfig, seed: int) -> ImageDataset:
    """The defender's clean subset from the held-out pool: ``defense.clean_per_class`` samples per class,
    or ``defense.clean_fraction`` of the pool, or the whole pool."""
    k = cfg.defense.get("clean_per_class")
    frac = cfg.defense.get("clean_fraction")
    if k:
        try:
            return per_class_subset(pool, k=int(k), seed=seed)[0]
        except DataError as e:
            raise DataError(
                f"defense.clean_per_class={k} but the defender's clean pool (defender.holdout={cfg.defender.holdout} of "
                f"the training split, at least defender.min_per_class={cfg.defender.get('min_per_class')} per class) is "
                f"too small ({e}): raise defender.min_per_class or defender.holdout, or lower defense.clean_per_class") from e
    if frac:
        return per_class_subset(pool, fraction=float(frac), seed=seed)[0]
    return pool
