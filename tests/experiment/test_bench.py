"""bench: a tiny matrix end to end, resumability after an interruption, no duplicated cells,
one shared artefact cache; report: tables, CSV, plots and a self-contained HTML page."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest

from bdseal.cli import main
from bdseal.experiment import bench
from bdseal.experiment import run as run_mod
from bdseal.experiment.bench import BenchSpec, parse_args, run_bench
from bdseal.experiment.report import make_report
from bdseal.experiment.store import ResultStore, cell_hash

TINY = ["+dataset.options.n_train=12", "+dataset.options.n_test=4", "+dataset.options.num_classes=4",
        "+dataset.options.image_size=16", "+model.params.widths=[8,16,16]", "train.epochs=1", "train.batch_size=16",
        "attack.rate=0.2", "device=cpu"]


REAL_RUN = run_mod.run_experiment


def tiny_spec(tmp_path, **kw) -> BenchSpec:
    base = dict(name="t", datasets=["synthetic"], attacks=["none", "badnets"], defenses=["none"], seeds=[0, 1],
                overrides=list(TINY), out=str(tmp_path / "b"), progress=False)
    base.update(kw)
    return BenchSpec(**base)


def count_calls(monkeypatch, fail_at: int | None = None) -> list:
    calls: list = []
    real = REAL_RUN

    def wrapped(cfg):
        calls.append(str(cfg.out))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a cell
        return real(cfg)

    monkeypatch.setattr(run_mod, "run_experiment", wrapped)
    return calls


def test_bench_and_report_end_to_end(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path, attacks=["badnets"])
    calls = count_calls(monkeypatch)
    res = run_bench(spec)
    assert len(res.ran) == 2 and not res.failed and len(calls) == 2
    rows = ResultStore(spec.store_path).rows()
    assert {(r.attack, r.seed) for r in rows} == {("badnets", 0), ("badnets", 1)}
    for r in rows:  # the row holds the full resolved config, its hash and the metrics.json content
        assert r.config_hash == cell_hash(r.config) and r.config["dataset"]["options"]["n_train"] == 12
        assert (tmp_path / "b" / "runs" / r.config_hash / "metrics.json").exists()
        assert r.run_dir.endswith(r.config_hash) and "clean_acc" in r.metrics
    # one artefact cache for the whole matrix: the poisoned sets of both seeds live in <out>/cache
    assert len(list((tmp_path / "b" / "cache" / "poisoned").glob("*.safetensors"))) == 2

    rep = make_report(tmp_path / "b")
    md = rep["markdown"].read_text()
    assert "synthetic: ACC / ASR (%) per attack × defense" in md and "Average" in md and "±" in md
    acc_asr = list(csv.reader(open(rep["out"] / "tables" / "synthetic_acc_asr.csv")))
    assert acc_asr[0] == ["Attack", "none ACC", "none ASR"] and [r[0] for r in acc_asr[1:]] == ["badnets", "Average"]
    summary = list(csv.DictReader(open(rep["summary_csv"])))
    acc = [s for s in summary if s["attack"] == "badnets" and s["metric"] == "acc"][0]
    accs = [r.metrics["clean_acc"] for r in rows if r.attack == "badnets"]
    assert float(acc["mean"]) == pytest.approx(sum(accs) / 2) and acc["n"] == "2"
    assert {p.name for p in rep["plots"]} >= {"synthetic_acc_asr_scatter.png", "synthetic_acc_bars.png", "synthetic_asr_bars.png"}
    page = rep["html"].read_text()
    assert page.count("data:image/png;base64,") == len(rep["plots"]) and "<table>" in page and "src=\"plots/" not in page


def test_interrupted_bench_resumes_without_recomputing(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path, attacks=["badnets"], seeds=[0, 1])
    calls = count_calls(monkeypatch, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_bench(spec)
    assert len(ResultStore(spec.store_path).rows()) == 1  # the interrupted cell left no row
    interrupted = calls[1]
    (tmp_path / "b" / "runs" / Path(interrupted).name).mkdir(parents=True)
    (tmp_path / "b" / "runs" / Path(interrupted).name / "config.yaml").write_text("half-written")
    calls = count_calls(monkeypatch)  # no more interruptions
    res = run_bench(spec)
    assert calls == [interrupted] and len(res.skipped) == 1 and len(res.ran) == 1  # only the unfinished cell
    assert (Path(interrupted) / "metrics.json").exists()  # its half-written run dir was redone, not refused
    calls.clear()
    res = run_bench(spec)
    assert calls == [] and len(res.skipped) == 2  # a finished matrix does nothing


def test_identical_cells_run_once_and_missing_names_are_skipped(tmp_path, monkeypatch):
    # seeds [0, 0] and an unknown defense: one cell, one skip notice
    spec = tiny_spec(tmp_path, attacks=["badnets"], seeds=[0, 0], defenses=["none", "no_such_defense"])
    calls = count_calls(monkeypatch)
    res = run_bench(spec)
    assert len(calls) == 1 and res.missing == ["defense=no_such_defense"]
    with pytest.raises(ValueError, match="no_such_defense"):
        run_bench(tiny_spec(tmp_path, defenses=["no_such_defense"], skip_missing=False))


def test_prune_moves_rows_of_an_outdated_config_and_keeps_the_rest(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path, attacks=["badnets"], seeds=[0, 1])
    count_calls(monkeypatch)
    run_bench(spec)
    run_bench(tiny_spec(tmp_path, attacks=["none"], seeds=[0]))  # a cell outside the matrix below
    newer = tiny_spec(tmp_path, attacks=["badnets"], seeds=[0, 1], overrides=[*TINY, "train.epochs=2"])
    assert not bench.prune_stale(tiny_spec(tmp_path, attacks=["badnets"], seeds=[0, 1]))  # current: nothing moves
    moved = bench.prune_stale(newer)
    assert sorted((r.attack, r.seed) for r in moved) == [("badnets", 0), ("badnets", 1)]
    kept = ResultStore(spec.store_path).rows()
    assert [(r.attack, r.seed) for r in kept] == [("none", 0)]  # not a cell of `newer`: left alone
    stale = ResultStore(tmp_path / "b" / bench.STALE_NAME)
    assert sorted(r.config_hash for r in stale.rows()) == sorted(r.config_hash for r in moved)
    calls = count_calls(monkeypatch)
    assert len(run_bench(newer).ran) == 2 and len(calls) == 2  # the new config's cells run


def test_parse_args_config_lists_and_cell_overrides():
    spec, opts = parse_args(["bench=demo", "attacks=[badnets,blend]", "seeds=[3]", "train.epochs=1", "dry_run=true"])
    assert spec.name == "demo" and spec.attacks == ["badnets", "blend"] and spec.seeds == [3]
    assert spec.late_overrides == ["train.epochs=1"] and opts == {"dry_run": True}
    assert spec.overrides == ["dataset.train_per_class=60", "train.epochs=3"]  # demo.yaml's own
    with pytest.raises(ValueError, match="unknown bench config"):
        parse_args(["bench=nope"])
    with pytest.raises(ValueError, match="use seeds="):
        parse_args(["seed=3"])
    spec, _ = parse_args(["bench=cifar_cpu"])
    assert spec.attacks_by_defense["gssd"][:3] == ["badnets", "blend", "wanet"]
    # the command line's cell overrides come after a label's own; a label's list can be replaced by a dotted key
    spec, _ = parse_args(["bench=pgrl_cifar", "attacks=[badnets-0.05]", "defenses=[pgrl]", "defense.n_strong=1",
                          "defense_overrides.pgrl=[defense.train.epochs=4]"])
    (cell,) = bench.plan_cells(spec)
    assert cell.overrides[-2:] == ("defense.train.epochs=4", "defense.n_strong=1") and spec.defense_overrides["lcv"][0] == "defense.train.epochs=12"


def test_cli_bench_report_and_ingest(tmp_path, capsys):
    out = tmp_path / "c"
    args = [f"out={out}", "datasets=[synthetic]", "attacks=[badnets]", "defenses=[none]", "seeds=[0]", "progress=false", *TINY]
    assert main(["bench", *args]) == 0
    assert "ran 1" in capsys.readouterr().out
    assert main(["bench", *args]) == 0
    assert "ran 0, already done 1" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.html").exists()
    # a run made outside the bench (e.g. a Slurm job of `bdseal run -m`) is ingested into a store
    assert main(["bench", f"out={tmp_path / 'other'}", f"ingest={out / 'runs'}"]) == 0
    with sqlite3.connect(tmp_path / "other" / bench.STORE_NAME) as con:
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1


def test_slurm_example_launcher_config_composes():
    """The shipped cluster example selects Hydra's submitit Slurm launcher (no Slurm needed)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    with initialize_config_module("bdseal.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+cluster=slurm_example", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.array_parallelism == 32
    assert cfg.dataset.name == "digits" and cfg.defense.name == "none"  # the cell config is untouched


def test_labels_pick_config_options_and_per_label_overrides():
    """A label's ``group=OPTION`` override picks the config option (a variant); its other overrides go
    to that label's cells only; an unknown option is reported under the label."""
    spec = BenchSpec(datasets=["digits"], attacks=["badnets", "badnets_a2a", "bogus"], defenses=["none", "pgbd_known"], seeds=[0],
                     overrides=["train.epochs=1"],
                     attack_overrides={"badnets_a2a": ["attack=pgbd/badnets", "attack.mode=all_to_all"], "bogus": ["attack=pgbd/nope"]},
                     defense_overrides={"pgbd_known": ["defense=pgbd", "defender.target_known=true"]},
                     attacks_by_defense={"pgbd_known": ["badnets_a2a"]})
    missing: list[str] = []
    cells = {(c.attack, c.defense): c for c in bench.plan_cells(spec, missing)}
    assert missing == ["attack=bogus"] and set(cells) == {("badnets", "none"), ("badnets_a2a", "none"), ("badnets_a2a", "pgbd_known")}
    assert cells[("badnets", "none")].overrides == ("dataset=digits", "attack=badnets", "defense=none", "seed=0", "train.epochs=1")
    assert cells[("badnets_a2a", "pgbd_known")].overrides == ("dataset=digits", "attack=pgbd/badnets", "defense=pgbd", "seed=0", "train.epochs=1",
                                                              "attack.mode=all_to_all", "defender.target_known=true")
    cfg, _ = bench.cell_config(cells[("badnets_a2a", "pgbd_known")], spec)
    assert (cfg.attack.name, cfg.attack.mode, cfg.attack.rate, cfg.defense.name, cfg.defender.target_known) == ("badnets", "all_to_all", 0.01, "pgbd", True)
    assert bench.split_choice("attack", "x", ["attack=a", "attack.rate=0.1", "attack=b"]) == ("b", ["attack.rate=0.1"])
    assert bench.available("attack", "pgrl/freq") and not bench.available("attack", "pgrl/nope") and not bench.available("defense", "pgbd/x")


@pytest.mark.parametrize("name", ["gssd_cifar", "pgbd_cifar", "pgrl_cifar", "vibe_cifar", "attacks_cifar"])
def test_paper_bench_configs_compose(name):
    """Every cell of the per-paper CIFAR-10 matrices composes (Hydra refuses unknown keys), with its variant."""
    spec, _ = parse_args([f"bench={name}"])
    missing: list[str] = []
    cells = bench.plan_cells(spec, missing)
    assert not missing and cells and spec.out == f"bench/{name}"
    composed = {(c.attack, c.defense): bench.cell_config(c, spec) for c in cells}
    cfgs = {k: cfg for k, (cfg, _) in composed.items()}
    assert len({h for _, h in composed.values()}) == len(cells)  # no two labels collapse to one cell
    assert all(c.dataset.name == "cifar10" and c.dataset.root == "../shared/data/cifar10.npz" for c in cfgs.values())
    if name == "pgbd_cifar":
        a2a = cfgs[("badnets_a2a", "nad")]
        assert a2a.attack.preset == "pgbd" and a2a.attack.mode == "all_to_all" and a2a.defense.train.epochs == 5
    if name == "pgrl_cifar":
        c = cfgs[("adap_blend-0.003", "wce")]
        assert (c.attack.rate, c.attack.cover_rate, c.defense.weight_start, c.defense.n_strong, c.baseline) == (0.003, 0.003, 2, 2, False)
        assert cfgs[("freq-0.05", "none")].attack.preset == "pgrl"


def test_variant_labels_reach_the_store_and_report(tmp_path, monkeypatch):
    spec = tiny_spec(tmp_path, attacks=["bn_a2a"], seeds=[0], attack_overrides={"bn_a2a": ["attack=badnets", "attack.mode=all_to_all"]})
    count_calls(monkeypatch)
    assert len(run_bench(spec).ran) == 1
    (row,) = ResultStore(spec.store_path).rows()
    assert row.attack == "bn_a2a" and row.config["attack"]["name"] == "badnets" and row.config["attack"]["mode"] == "all_to_all"
    rep = make_report(tmp_path / "b")
    tables = {t.name: t for t in rep["tables"]}
    assert tables["synthetic_acc_asr"].rows[0][0] == "bn_a2a" and tables["synthetic_poison"].rows[0][:1] == ["bn_a2a"]
