"""report on a hand-made store (no training): aggregation over seeds, Γ and detection tables, HTML,
and the docs/BENCHMARKS.md generator."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bdseal.experiment.report import Stat, aggregate, build_tables, fmt, make_report, post_hoc_labels, target_found
from bdseal.experiment.store import ResultStore, Row, cell_hash, ingest_run_dirs

ROOT = Path(__file__).resolve().parents[2]


def benchmarks_script():  # type: ignore[no-untyped-def]
    """``scripts/benchmarks.py`` (not a package module) loaded as a module."""
    spec = importlib.util.spec_from_file_location("benchmarks", ROOT / "scripts" / "benchmarks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_row(attack: str, defense: str, seed: int, acc: float, asr: float | None, defense_name: str | None = None,
             mode: str | None = None, **extra) -> Row:
    """A store row; ``attack`` / ``defense`` are the labels, ``defense_name`` the config's defense (a variant)."""
    cfg = {"dataset": {"name": "cifar10", "train_per_class": 200, "test_per_class": 200},
           "attack": {"name": attack, "rate": 0.1, "mode": mode},
           "defense": {"name": defense_name or defense}, "seed": seed, "model": {"name": "small_half"}, "defender": {"holdout": 0.05},
           "train": {"epochs": 8, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "augment": "crop_flip"},
           "device": "cpu"}
    metrics = {"dataset": "cifar10", "model": "small_half", "attack": attack, "defense": defense_name or defense,
               "seed": seed, "clean_acc": acc, "asr": asr, "time_s": 10.0 + seed, "n_train": 1900, **extra}
    return Row(cell_hash(cfg), "cifar10", "small_half", attack, defense, seed, cfg, metrics)


@pytest.fixture
def store(tmp_path) -> Path:
    s = ResultStore(tmp_path / "results.sqlite")
    for seed, (a0, a1) in enumerate([(0.90, 0.80), (0.92, 0.84)]):
        s.add(fake_row("badnets", "none", seed, a0, 1.0))
        s.add(fake_row("none", "none", seed, a0 + 0.01, None))
        s.add(fake_row("badnets", "gssd", seed, a1, 0.02 * (seed + 1), dem=0.9 + 0.02 * seed,
                       baseline={"clean_acc": a0, "asr": 1.0}, detection={"tpr": 0.9, "fpr": 0.05 + 0.01 * seed, "auroc": 0.97},
                       relabel_acc=0.8))
    return tmp_path


def test_store_is_atomic_and_refuses_duplicates(store):
    s = ResultStore(store / "results.sqlite")
    assert len(s) == 6
    with pytest.raises(Exception, match="UNIQUE"):
        s.add(fake_row("badnets", "none", 0, 0.5, 1.0))
    assert len(s) == 6 and s.rows()[0].metrics["clean_acc"] in (0.90, 0.92, 0.80, 0.84, 0.91, 0.93)


def test_aggregate_mean_std_and_format(store):
    agg = aggregate(ResultStore(store / "results.sqlite").rows())
    acc = agg[("cifar10", "badnets", "gssd")]["acc"]
    assert acc.mean == pytest.approx(0.82) and acc.std == pytest.approx(0.028284, rel=1e-4) and acc.n == 2
    assert "asr" not in agg[("cifar10", "none", "none")]  # null ASR of a clean run is not a number
    assert fmt(acc, "acc") == "82.0 ± 2.8" and fmt(Stat(0.9, 0.0, 1), "dem") == "0.90" and fmt(None, "acc") == "–"


def test_report_tables_dem_detection_html(store):
    rep = make_report(store, out=store / "rep")
    names = [t.name for t in rep["tables"]]
    assert names == ["cifar10_acc_asr", "cifar10_backdoored_vs_defended", "cifar10_dem", "cifar10_detection", "cifar10_time",
                     "cifar10_time_x_none"]
    acc_asr = rep["tables"][0]
    assert acc_asr.header == ["Attack", "none ACC", "none ASR", "gssd ACC", "gssd ASR"]
    assert acc_asr.rows[0] == ["none", "92.0 ± 1.4", "–", "–", "–"]
    assert acc_asr.rows[1] == ["badnets", "91.0 ± 1.4", "100.0 ± 0.0", "82.0 ± 2.8", "3.0 ± 1.4"]
    assert acc_asr.rows[2] == ["Average", "91.5", "100.0", "82.0", "3.0"]  # ASR average leaves out attack=none
    mb = rep["tables"][1]
    assert mb.header == ["Attack", "Defense", "M_B ACC", "M_B ASR", "M_C ACC", "M_C ASR", "Γ"]
    assert mb.rows == [["badnets", "gssd", "91.0 ± 1.4", "100.0 ± 0.0", "82.0 ± 2.8", "3.0 ± 1.4", "0.91 ± 0.01"]]
    dem = rep["tables"][2]
    assert dem.rows == [["badnets", "0.91 ± 0.01"], ["Average", "0.91"]]
    det = rep["tables"][3]
    assert det.header[2:5] == ["TPR", "FPR", "AUROC"] and det.rows == [["badnets", "gssd", "90.0 ± 0.0", "5.5 ± 0.7", "97.0 ± 0.0", "80.0 ± 0.0"]]
    assert (store / "rep" / "plots" / "cifar10_dem_bars.png").exists()
    assert rep["tables"][5].rows == [["badnets", "1.00 ± 0.00"], ["Average", "1.00"]]  # same fake time as none
    page = (store / "rep" / "report.html").read_text()
    assert page.count("<table>") == 6 and page.count("data:image/png;base64,") == 4


def test_report_columns_of_the_paper_tables(tmp_path):
    """The columns the per-paper scripts had: poison counts, target found, M_B/M_C with † for a post-hoc
    defense variant label, wall time as a multiple of defense=none per seed."""
    s = ResultStore(tmp_path / "results.sqlite")
    pois = {"poison_rate": 0.01, "n_poison": 19, "n_cover": 0, "target": 0}
    for seed in (0, 1):
        s.add(fake_row("badnets", "none", seed, 0.9, 1.0, **pois, time_s=10.0 * (seed + 1)))
        s.add(fake_row("badnets_a2a", "none", seed, 0.9, 0.8, mode="all_to_all", **pois, time_s=10.0))
        # PGBD with the target inferred by Neural Cleanse: right on seed 0, wrong on seed 1; 3x / 2x none
        s.add(fake_row("badnets", "pgbd_nc", seed, 0.85, 0.05, defense_name="pgbd", **pois, time_s=30.0 * (seed + 1) * (1 - seed / 3),
                       baseline={"clean_acc": 0.9, "asr": 1.0}, dem=0.93, extras={"target_used": seed, "target_source": "neural_cleanse"}))
        s.add(fake_row("badnets_a2a", "pgbd_nc", seed, 0.85, 0.3, defense_name="pgbd", mode="all_to_all", **pois, time_s=20.0,
                       baseline={"clean_acc": 0.9, "asr": 0.8}, extras={"target_used": 0}))
    s.add(fake_row("badnets", "gssd", 0, 0.8, 0.0, **pois, time_s=50.0, extras={"detected_targets": [0, 3]},
                   detection={"tpr": 1.0, "fpr": 0.1, "auroc": 0.99, "flagged_poison": 12, "poison_kept": 2,
                              "removal_tpr": 1 - 2 / 19, "uncertain": 40, "uncertain_poison": 5}))
    s.add(fake_row("badnets", "st_pgbd", 0, 0.8, 0.0, **pois, extras={"neural_cleanse": {"inferred_target": 4}}))
    rows = s.rows()
    assert post_hoc_labels(rows) >= {"pgbd_nc", "st_pgbd"} and "gssd" not in post_hoc_labels(rows)
    found = {(r.attack, r.defense, r.seed): target_found(r) for r in rows}
    assert found[("badnets", "pgbd_nc", 0)] == 1.0 and found[("badnets", "pgbd_nc", 1)] == 0.0
    assert found[("badnets", "gssd", 0)] == 1.0 and found[("badnets", "st_pgbd", 0)] == 0.0
    assert found[("badnets_a2a", "pgbd_nc", 0)] is None and found[("badnets", "none", 0)] is None  # no single target / no claim
    agg = aggregate(rows)
    assert agg[("cifar10", "badnets", "pgbd_nc")]["time_x_none"].mean == pytest.approx(2.5)  # per-seed ratios 3 and 2
    assert agg[("cifar10", "badnets", "st_pgbd")]["time_x_none"].mean == pytest.approx(1.0)  # 10 s vs none's 10 s on seed 0
    assert "time_x_none" not in agg[("cifar10", "badnets", "none")]
    tables = {t.name: t for t in build_tables(agg, post_hoc_labels(rows))}
    assert tables["cifar10_poison"].rows == [["badnets", "1.00 ± 0.00", "19", "0"], ["badnets_a2a", "1.00 ± 0.00", "19", "0"]]
    assert ["badnets", "pgbd_nc †", "90.0 ± 0.0", "100.0 ± 0.0", "85.0 ± 0.0", "5.0 ± 0.0", "0.93 ± 0.00"] in tables["cifar10_backdoored_vs_defended"].rows
    det = tables["cifar10_detection"]
    assert det.header[6:] == ["target found", "removal TPR", "#poison flagged", "#poison kept", "#uncertain", "#poison uncertain"]
    assert ["badnets", "gssd", "100.0", "10.0", "99.0", "–", "yes", "89.5", "12", "2", "40", "5"] in det.rows
    assert ["badnets", "pgbd_nc", "–", "–", "–", "–", "1/2"] + ["–"] * 5 in det.rows
    assert ["badnets", "st_pgbd", "–", "–", "–", "–", "no"] + ["–"] * 5 in det.rows
    rel = tables["cifar10_time_x_none"]
    assert rel.header == ["Attack", "gssd", "pgbd_nc", "st_pgbd"]
    assert rel.rows[0] == ["badnets", "5.00", "2.50 ± 0.71", "1.00"] and rel.rows[1] == ["badnets_a2a", "–", "2.00 ± 0.00", "–"]


def test_ingest_and_benchmarks_script(store, tmp_path):
    # a finished run dir (as `bdseal run -m` writes it) is ingested once
    from omegaconf import OmegaConf

    run = tmp_path / "multirun" / "0"
    run.mkdir(parents=True)
    r = fake_row("blend", "none", 0, 0.88, 0.97)
    OmegaConf.save(OmegaConf.create({**r.config, "out": str(run), "progress": False}), run / "config.yaml")
    (run / "metrics.json").write_text(json.dumps(r.metrics))
    s = ResultStore(store / "results.sqlite")
    assert ingest_run_dirs(s, [tmp_path / "multirun"]) == 1 and ingest_run_dirs(s, [tmp_path / "multirun"]) == 0
    assert [x for x in s.rows() if x.attack == "blend"][0].config_hash == r.config_hash  # out/progress not hashed

    mod = benchmarks_script()
    speed = {"machine": {"platform": "p", "torch": "t", "device": "cpu", "cpu_threads": 2, "cpu_count": 2},
             "loop": {"model": "small_half", "params": {}, "batch_size": 16, "steps": 3, "image_size": 16, "repeats": 1,
                      "bare_images_per_s": 110.0, "fit_images_per_s": 100.0, "fit_crop_flip_images_per_s": 90.0,
                      "overhead": 1.1, "overhead_with_crop_flip": 1.22, "goal": 1.1},
             "defense_times": {"cell": ["dataset=digits"], "plain_training_s": 10.0, "skipped": {"vibe": "not registered"},
                               "defenses": {"pgrl": {"seconds": 12.0, "x_plain_training": 1.2, "post_hoc": False}}}}
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    out = tmp_path / "BENCHMARKS.md"
    assert mod.main(["--store", str(store), "--speed", str(tmp_path / "speed.json"), "--out", str(out), "--command", "bdseal bench X"]) == 0
    text = out.read_text()
    assert "Reduced scale, CPU" in text and "bdseal bench X" in text and "200 training images per class" in text
    assert "GSSD paper, Table 1" in text and "| badnets | 94.90 | 100.00 | 91.70 | 0.14 | 91.0 ± 1.4 | 100.0 ± 0.0 | 82.0 ± 2.8 | 3.0 ± 1.4 |" in text
    assert "| pgrl | 12.0 | 1.20 | 1.16 (PGRL Table 3) |" in text and "`vibe` (not registered)" in text


def test_benchmarks_script_merges_stores(store, tmp_path):
    """--store is repeatable: rows of several bench stores are merged, a shared cell counted once, and each
    scale gets its own line."""
    other = ResultStore(tmp_path / "other" / "results.sqlite")
    other.add(fake_row("badnets", "none", 0, 0.90, 1.0))  # the same cell as in `store`
    r = fake_row("badnets", "pgrl", 0, 0.7, 0.1, time_s=21.0)
    r.config["dataset"]["train_per_class"] = 100
    other.add(Row(cell_hash(r.config), r.dataset, r.model, r.attack, r.defense, r.seed, r.config, r.metrics))
    mod = benchmarks_script()
    rows = mod.load_rows([store, tmp_path / "other"])
    assert len(rows) == 7 and sum(x.defense == "none" and x.attack == "badnets" for x in rows) == 2
    out = tmp_path / "B.md"
    assert mod.main(["--store", str(store), "--store", str(tmp_path / "other"), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"--store {store} --store {tmp_path / 'other'}" in text and "these stores" in text
    assert "(defenses pgrl): 100 training images per class" in text and "(defenses gssd, none): 200 training images" in text
    # pgrl ran at another scale than every defense=none cell: its own row label, and no ratio for it
    assert "| Attack | gssd |\n|---|---|\n| badnets [200/cls 8ep small_half] | 1.00 ± 0.00 |" in text
    assert "| badnets [100/cls 8ep small_half] | – | – | 21.0 |" in text


def test_aggregate_never_averages_across_settings():
    """Two runs of one (dataset, attack, defense) label at different scales (merged stores) are kept apart;
    two seeds of one setting are averaged."""
    from bdseal.experiment.report import aggregate
    from bdseal.experiment.store import Row

    def row(seed, per_class, acc):
        cfg = {"seed": seed, "out": f"r{seed}{per_class}", "dataset": {"name": "cifar10", "train_per_class": per_class,
               "root": f"/x{seed}"}, "train": {"epochs": 8}, "attack": {"name": "badnets"}, "defense": {"name": "none"}}
        return Row(f"h{seed}{per_class}", "cifar10", "small_half", "badnets", "none", seed, cfg,
                   {"clean_acc": acc, "asr": 1.0})

    agg = aggregate([row(0, 200, 0.4), row(1, 200, 0.6), row(0, 500, 0.9)])
    assert set(agg) == {("cifar10", "badnets [200/cls 8ep small_half]", "none"),
                        ("cifar10", "badnets [500/cls 8ep small_half]", "none")}
    small = agg[("cifar10", "badnets [200/cls 8ep small_half]", "none")]["acc"]
    assert small.n == 2 and abs(small.mean - 0.5) < 1e-9
    assert agg[("cifar10", "badnets [500/cls 8ep small_half]", "none")]["acc"].n == 1
    one = aggregate([row(0, 200, 0.4), row(1, 200, 0.6)])
    assert set(one) == {("cifar10", "badnets", "none")}


def test_a_defense_never_shares_a_row_with_another_scales_none():
    """Merged stores: ``none`` at 500/class (an attack table) and PGBD at 300/class (its own matrix, with its
    M_B) must not form one row; a defense at the same data setting as ``none`` (other defense options, other
    ``baseline``) does share it."""
    from bdseal.experiment.report import aggregate
    from bdseal.experiment.store import Row

    def row(defense, per_class, acc, **defense_cfg):
        cfg = {"seed": 0, "dataset": {"name": "cifar10", "train_per_class": per_class}, "train": {"epochs": 15},
               "attack": {"name": "trojan"}, "defense": {"name": defense, **defense_cfg},
               "baseline": "auto" if defense != "none" else False, "defender": {"holdout": 0.05, "target_known": False}}
        return Row(f"{defense}{per_class}", "cifar10", "small_half", "trojan", defense, 0, cfg, {"clean_acc": acc, "asr": 0.5})

    mixed = aggregate([row("none", 500, 0.66), row("pgbd", 300, 0.18, lam=10)])
    assert set(mixed) == {("cifar10", "trojan [500/cls 15ep small_half]", "none"),
                          ("cifar10", "trojan [300/cls 15ep small_half]", "pgbd")}
    same = aggregate([row("none", 300, 0.61), row("pgbd", 300, 0.18, lam=10)])
    assert set(same) == {("cifar10", "trojan", "none"), ("cifar10", "trojan", "pgbd")}


def test_benchmarks_speed_header_reports_machine_load():
    """A speed file records the load average; the header says whether other jobs were running (old files
    without it are labelled shared)."""
    mod = benchmarks_script()
    assert "shared with other jobs" in mod.machine_load({"cpu_count": 2})
    quiet = mod.machine_load({"cpu_count": 2, "load_avg_1min": 0.4})
    assert "0.40" in quiet and "noisy" not in quiet
    assert "other jobs were running" in mod.machine_load({"cpu_count": 2, "load_avg_1min": 3.0})


def test_report_vibe_e_step_table(tmp_path):
    """VIBE's last E-step diagnostics (``extras.final_e_step``) get their own table, mean ± std over seeds."""
    s = ResultStore(tmp_path / "results.sqlite")
    for seed, p in enumerate((0.8, 0.9)):
        s.add(fake_row("badnets", "vibe_ss_a", seed, 0.7, 0.1,
                       extras={"final_e_step": {"p_keep": p, "mu_z_norm": 0.6, "agree_observed": 0.9}}))
    s.add(fake_row("badnets", "none", 0, 0.9, 1.0))
    tables = {t.name: t for t in build_tables(aggregate(s.rows()), post_hoc_labels(s.rows()))}
    assert tables["cifar10_e_step"].rows == [["badnets", "vibe_ss_a", "85.0 ± 7.1", "0.60 ± 0.00", "90.0 ± 0.0"]]


def test_report_flags_unlearned_attacks_and_chance_accuracy_and_states_scale(tmp_path):
    """A blend the undefended model did not learn (ASR 30%) and a defense at chance accuracy (12% of 10 classes)
    are listed as not results; the page states the scale and explains every metric in one line."""
    s = ResultStore(tmp_path / "results.sqlite")
    for seed in (0, 1):
        s.add(fake_row("badnets", "none", seed, 0.90, 1.0, num_classes=10))
        s.add(fake_row("blend", "none", seed, 0.90, 0.30, num_classes=10))
        s.add(fake_row("badnets", "pgrl", seed, 0.12, 0.0, num_classes=10))
        s.add(fake_row("badnets", "gssd", seed, 0.88, 0.01, num_classes=10))
    rep = make_report(tmp_path, out=tmp_path / "rep")
    assert len(rep["flags"]) == 2
    assert rep["flags"][0].startswith("cifar10 / badnets / pgrl: clean ACC 12.0% is near chance (10% for 10 classes)")
    assert rep["flags"][1].startswith("cifar10 / blend (cartoon): the attack was not learned (ASR of the undefended model 30.0% < 50%)")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**Scale.** cifar10: 1900 training images, model small_half, 8 epochs" in md
    assert "- ⚠ cifar10 / blend (cartoon): the attack was not learned" in md
    from bdseal.experiment.report import METRIC_NOTES

    for name, text in METRIC_NOTES:
        assert f"- {name}: {text}" in md
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "near chance" in page and "<b>Scale.</b>" in page


def test_report_flags_an_attack_the_control_recipe_did_not_learn(tmp_path):
    """The plain recipe learns BadNets (ASR 97%) but PGRL's recipe without filtering does not (10%): the
    PGRL-family ASRs on it are flagged as no evidence of removal. Where the control learns the attack (Freq,
    100%), or where no control ran (Blend), nothing is flagged."""
    s = ResultStore(tmp_path / "results.sqlite")
    for attack, none_asr, recipe_asr in (("badnets", 0.97, 0.10), ("freq", 0.90, 1.0)):
        s.add(fake_row(attack, "none", 0, 0.77, none_asr, num_classes=10))
        s.add(fake_row(attack, "pgrl_recipe", 0, 0.72, recipe_asr, num_classes=10))
        s.add(fake_row(attack, "pgrl", 0, 0.60, 0.04, num_classes=10))
        s.add(fake_row(attack, "wce", 0, 0.70, 0.06, num_classes=10))
    s.add(fake_row("blend", "none", 0, 0.77, 0.95, num_classes=10))
    s.add(fake_row("blend", "pgrl", 0, 0.60, 0.04, num_classes=10))
    rep = make_report(tmp_path, out=tmp_path / "rep")
    assert rep["flags"] == [
        "cifar10 / badnets / pgrl_recipe: the control did not learn the attack (ASR 10.0% < 50%, undefended 97.0%); "
        "the ASR of pgrl, wce on this attack is not evidence of removal (their detection still is)"]


def test_acc_and_asr_plots_use_the_full_percent_axis(tmp_path, monkeypatch):
    """ACC 90-95% must not be drawn on a 89-96 axis (a small drop would look like a collapse)."""
    from bdseal.experiment import plots

    captured = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: captured.append(fig.axes[0].get_ylim()) or real(fig, path))
    agg = {("d", "badnets", "none"): {"acc": Stat(0.95, 0.0, 1), "asr": Stat(0.99, 0.0, 1), "dem": Stat(0.5, 0.0, 1)},
           ("d", "badnets", "ft"): {"acc": Stat(0.90, 0.0, 1), "asr": Stat(0.02, 0.0, 1), "dem": Stat(0.9, 0.0, 1)}}
    plots.make_plots(agg, tmp_path)
    scatter, acc, asr, dem = captured
    assert scatter[0] <= 0 and scatter[1] >= 100 and acc == (0.0, 103.0) and asr == (0.0, 103.0)
    assert dem[1] < 2  # Γ keeps its own scale
