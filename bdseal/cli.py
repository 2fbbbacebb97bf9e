"""``bdseal`` command line: thin — parse, then call ``bdseal.experiment``.

    bdseal demo                       the quick start: an attack, defenses against it, one comparison table
    bdseal run [key=value ...]        one cell (Hydra overrides; ``-m`` sweeps, launcher plugins)
    bdseal poison [key=value ...]     export a poisoned dataset (.npz + manifest) for other toolkits
    bdseal list                       datasets, models, attacks, defenses (threat model), bench configs
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable

SUBCOMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {}
# Commands that answer ``--help`` themselves (Hydra's app help for ``run``; ``probe`` prints its module doc).
HELP_HANDLED_BY_COMMAND = frozenset({"run", "poison", "probe"})


def subcommand(name: str, help_: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    def deco(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        SUBCOMMANDS[name] = (help_, fn)
        return fn

    return deco


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")


def hydra_main(task: Callable, argv: list[str], config_name: str = "config") -> int:
    """Run ``task(cfg)`` as a Hydra app over ``argv`` (overrides, ``-m``, ``--cfg job``...)."""
    import hydra
    from omegaconf import DictConfig

    from bdseal.errors import BdsealError
    from bdseal.registry import preload_plugins

    caught: list[BaseException] = []
    preload_plugins(argv)  # plugins=[...]: their attacks/defenses/... become selectable config choices
    check_overrides_compose(argv, config_name)

    @hydra.main(config_path="conf", config_name=config_name, version_base="1.3")
    def _app(cfg: DictConfig) -> None:
        _setup_logging()
        try:
            task(cfg)
        except (BdsealError, KeyboardInterrupt) as e:  # reported by main() as one line, not by Hydra
            caught.append(e)
            if isinstance(e, KeyboardInterrupt):
                raise

    saved = sys.argv
    sys.argv = [f"bdseal {config_name}", *argv]
    try:
        _app()
    except KeyboardInterrupt:
        raise
    finally:
        sys.argv = saved
    if caught:
        raise caught[0]
    return 0


def check_overrides_compose(argv: list[str], config_name: str = "config") -> None:
    """Compose the config once before Hydra runs, so that a bad override (``model=nope``, a typo'd key, a
    malformed value) is a one-line :class:`bdseal.errors.ConfigError` (exit 2) instead of Hydra's multi-line
    report. Sweeps, flags (``-m``, ``--cfg``) and ``hydra.*`` overrides are left to Hydra itself."""
    if any(a.startswith("-") for a in argv):
        return
    from bdseal.experiment.config import compose_config

    compose_config([a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))], config_name)


def sweep_job_dir() -> str | None:
    """In a ``bdseal run -m`` sweep, the job's own folder ``<hydra.sweep.dir>/<job num>`` (the run dir of a cell
    without ``out=``, so a sweep leaves no empty job folders); ``None`` outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return str(HydraConfig.get().runtime.output_dir)


@subcommand("run", "run one experiment cell: bdseal run dataset=digits attack=badnets defense=none seed=0 out=DIR")
def cmd_run(argv: list[str]) -> int:
    import json

    from bdseal.experiment.run import run_experiment
    from bdseal.metrics import clean_json

    def task(cfg):  # type: ignore[no-untyped-def]
        if cfg.out is None:
            cfg.out = sweep_job_dir()
        metrics = run_experiment(cfg)
        shown = {k: metrics[k] for k in ("dataset", "attack", "defense", "clean_acc", "asr", "time_s") if k in metrics}
        for extra in ("baseline", "dem", "detection", "relabel_acc"):
            if extra in metrics:
                shown[extra] = metrics[extra]
        print(json.dumps(clean_json(shown), indent=1, default=str, allow_nan=False))  # NaN (no ASR, ...) -> null
        print(f"results in {metrics['run_dir']}/metrics.json")

    return hydra_main(task, argv)


@subcommand("poison", "write a poisoned dataset (.npz + JSON manifest + triggered test set): bdseal poison attack=badnets out=DIR")
def cmd_poison(argv: list[str]) -> int:
    from bdseal.experiment.export import poison_main

    def task(cfg):  # type: ignore[no-untyped-def]
        manifest = poison_main(cfg)
        print(f"poisoned set in {manifest.parent}: poisoned.npz, triggered_test.npz, manifest.json "
              f"(train on it: bdseal run dataset=npz dataset.root={manifest.parent} attack=none)")

    return hydra_main(task, argv)


@subcommand("list", "datasets, models, attacks (+ each paper's presets), defenses with their threat model, bench configs")
def cmd_list(argv: list[str]) -> int:
    from bdseal.experiment.catalog import render
    from bdseal.registry import load_plugins, plugin_overrides

    load_plugins(plugin_overrides(argv))

    print(render(), end="")
    return 0


@subcommand("demo", "the quick start: poison digits, train undefended and defended, print the comparison: bdseal demo [out=DIR]")
def cmd_demo(argv: list[str]) -> int:
    """Options as for ``bdseal bench`` (out=DIR, defenses=[...], cell overrides); runs the first attack and seed of
    bench=demo into its store (bench/demo), prints the table and writes the HTML report (bench/demo/report/)."""
    from bdseal.experiment.demo import main as demo_main

    _setup_logging()
    return demo_main(argv)


@subcommand("probe", "linear-probe a self-supervised backbone: bdseal probe dataset=digits ssl.kind=simclr ssl.epochs=5")
def cmd_probe(argv: list[str]) -> int:
    from bdseal.ssl.probe import probe_main

    _setup_logging()
    return probe_main(argv)


@subcommand("bench", "run a matrix, resumable: bdseal bench bench=demo attacks=[none,badnets] seeds=[0,1] [dry_run=true] [ingest=DIR] [prune=true]")
def cmd_bench(argv: list[str]) -> int:
    """Options: bench=NAME (bdseal/conf/bench/NAME.yaml or a YAML path); matrix lists datasets=/attacks=/
    defenses=/seeds=, out=DIR, keep_going=true, defense_overrides.NAME=[...] (likewise dataset_/attack_);
    every other key=value is a Hydra override of all cells; jobs=N runs N workers of the command at once
    (one machine / GPU; cells taken through the store's claims). Commands: dry_run=true (list the cells),
    ingest=DIR (add finished run dirs to the store), prune=true (move rows of outdated configs to
    stale.sqlite). Cells whose results are in the store are skipped."""
    from bdseal.experiment import bench

    _setup_logging()
    jobs = [a for a in argv if a.startswith("jobs=")]
    if jobs:  # jobs=N: N workers of this same command share the store through its claims
        argv = [a for a in argv if not a.startswith("jobs=")]
        from bdseal.experiment.parallel import run_jobs

        return run_jobs(argv, int(jobs[-1].partition("=")[2]))
    spec, options = bench.parse_args(argv)
    if options.get("ingest"):
        roots = options["ingest"] if isinstance(options["ingest"], list) else [options["ingest"]]
        refused: list[str] = []
        print(f"ingested {bench.ingest(spec, [str(r) for r in roots], refused)} finished run dirs into {spec.store_path}")
        for why in refused:
            print(f"  refused: {why}")
        return 1 if refused else 0
    if options.get("prune"):
        moved = bench.prune_stale(spec)
        print(f"moved {len(moved)} rows of this matrix's cells with an outdated config to {spec.out}/{bench.STALE_NAME}")
        return 0
    res = bench.run_bench(spec, dry_run=bool(options.get("dry_run")))
    print(f"bench {spec.name}: ran {len(res.ran)}, already done {len(res.skipped)}, failed {len(res.failed)}; store {res.store}")
    for name in res.missing:
        print(f"  skipped (not available): {name}")
    for label in res.elsewhere:
        print(f"  running in another bench process: {label}")
    for label, err in res.failed:
        print(f"  FAILED {label}: {err}")
    return 1 if res.failed else 0


@subcommand("reproduce", "fill a paper's full-scale table within a time budget, resumable: bdseal reproduce pgbd budget_s=540 [out=DIR] [overrides]")
def cmd_reproduce(argv: list[str]) -> int:
    """bdseal reproduce <paper|bench name|YAML> budget_s=SECONDS [out=DIR] [bench keys / cell overrides]:
    runs the next cells of the table (store bench/gpu/<paper>/ unless out=), checkpoints plain training
    runs per epoch, stops at the first epoch end past the budget and lists the cells still missing."""
    from bdseal.experiment import reproduce as rp

    _setup_logging()
    try:
        table, budget, rest = rp.parse_args(argv)
    except ValueError as e:
        print(f"bdseal: {e}", file=sys.stderr)
        return 2
    res = rp.reproduce(table, budget, rest)
    print(f"reproduce {table}: finished {len(res.ran)} cells in this window; store {res.store}")
    if res.interrupted:
        print(f"  stopped by the budget: {res.interrupted} (checkpointed; run the same command again to resume)")
    print(f"  left: {len(res.left)} cells" + "".join(f"\n    {label}" for label in res.left))
    return 0


@subcommand("report", "tables (Markdown, CSV), plots and one HTML page from a results store: bdseal report BENCH_DIR [out=DIR]")
def cmd_report(argv: list[str]) -> int:
    """Options: BENCH_DIR (or a results.sqlite / .jsonl), out=DIR (default BENCH_DIR/report), title=TEXT."""
    from bdseal.experiment.report import make_report

    paths = [a for a in argv if "=" not in a]
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    res = make_report(paths[0] if paths else "bench", out=opts.get("out"), title=opts.get("title"))
    print(f"report of {res['n_runs']} runs: {res['markdown']}, {res['html']}, {res['summary_csv']}, {len(res['plots'])} plots")
    return 0


@subcommand("bench-speed", "training-loop overhead vs a bare loop, and each defense's time vs plain training: bdseal bench-speed [out=FILE.json]")
def cmd_bench_speed(argv: list[str]) -> int:
    """Options: part=all|loop|defenses, device=auto|cpu|cuda, out=FILE.json, defenses=[a,b],
    loop.model= loop.batch_size= loop.n= loop.image_size= loop.epochs= loop.repeats=; any other key=value
    overrides the defense-timing cell (default: digits, BadNets, 60 images per class, 3 epochs)."""
    import json

    from bdseal.experiment import speed

    _setup_logging()
    from bdseal.metrics import clean_json

    res = speed.run_from_args(argv)
    print(json.dumps(clean_json(res), indent=1, default=str, allow_nan=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch a subcommand. bdseal's own errors (:class:`bdseal.errors.BdsealError`) print one line
    ``bdseal: error: ...`` and exit 2; Ctrl-C prints one line and exits 130; ``BDSEAL_DEBUG=1`` or
    ``--debug`` shows the traceback instead."""
    import os

    from bdseal.errors import BdsealError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("BDSEAL_DEBUG", "").lower() not in ("", "0", "false", "no") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("bdseal: interrupted (Ctrl-C); the unfinished run wrote no results", file=sys.stderr)
        return 130
    except BdsealError as e:
        if debug:
            raise
        print(f"bdseal: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        for name, (help_, _) in SUBCOMMANDS.items():
            print(f"  {name:10s} {help_}")
        return 0
    cmd = argv.pop(0) if argv and not ("=" in argv[0] or argv[0].startswith("-")) else "run"
    if cmd not in SUBCOMMANDS:
        print(f"bdseal: error: unknown command {cmd!r}; choose one of {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    help_, fn = SUBCOMMANDS[cmd]
    if cmd not in HELP_HANDLED_BY_COMMAND and any(a in ("-h", "--help") for a in argv):
        print(f"bdseal {cmd}: {help_}")
        if fn.__doc__:
            print(inspect.cleandoc(fn.__doc__))
        return 0
    return fn(argv)


if __name__ == "__main__":
    sys.exit(main())
