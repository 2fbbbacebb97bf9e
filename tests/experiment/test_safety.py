"""Safe and atomic by construction (docs/safety.md): no code runs from a file, no fake result from a
degenerate setting, no half-written run directory, one-line errors, benches that share a store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdseal.cli import main
from bdseal.errors import BdsealError, ConfigError, TrainingDivergedError
from bdseal.experiment import run as run_mod
from bdseal.experiment.bench import BenchSpec, run_bench
from bdseal.experiment.config import compose_config
from bdseal.experiment.run import run_experiment
from bdseal.experiment.store import ResultStore, Row, ingest_run_dirs
from bdseal.io import CorruptFileError
from tests.test_io import write_evil_pickle

TINY = ["dataset=synthetic", "+dataset.options.num_classes=4", "+dataset.options.n_train=12", "+dataset.options.n_test=4",
        "+dataset.options.image_size=16", "+model.params.widths=[8,16,16]", "train.epochs=1", "train.batch_size=16",
        "attack.rate=0.2", "device=cpu", "progress=false", "figures.enabled=false"]


def _run(tmp_path: Path, *over: str, name: str = "r") -> dict:
    return run_experiment(compose_config([*TINY, f"out={tmp_path / name}", f"cache_dir={tmp_path / 'cache'}", *over]))


# --- no code runs from a file -------------------------------------------------------------------------


def test_malicious_pickle_as_backdoored_ckpt_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = write_evil_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(CorruptFileError, match="does not unpickle"):
        _run(tmp_path, "defense=ft", f"backdoored_ckpt={evil}")
    assert not marker.exists()
    assert not (tmp_path / "r").exists()
    assert main(["run", *TINY, "defense=ft", f"backdoored_ckpt={evil}", f"out={tmp_path / 'cli'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bdseal: error: backdoored_ckpt:") and "Traceback" not in "\n".join(err)
    assert not marker.exists()


def test_corrupted_cached_poisoned_set_is_recomputed_and_the_rerun_succeeds(tmp_path, caplog):
    first = _run(tmp_path, name="a")
    entries = list((tmp_path / "cache" / "poisoned").glob("*.safetensors"))
    assert len(entries) == 1
    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the images
    entries[0].write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="bdseal"):
        again = _run(tmp_path, name="b")
    assert any(str(entries[0]) in r.getMessage() for r in caplog.records)
    assert again["asr"] == first["asr"] and again["clean_acc"] == first["clean_acc"]
    entries[0].write_bytes(bytes(data[:100]))  # truncated
    assert _run(tmp_path, name="c")["asr"] == first["asr"]


# --- no fake results ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["train.epochs=0", "train.lr=1e6"])
def test_degenerate_training_exits_non_zero_without_metrics(tmp_path, capsys, bad):
    out = tmp_path / "r"
    over = ["train.epochs=3"] if bad == "train.lr=1e6" else []
    assert main(["run", *TINY, *over, bad, f"out={out}", "cache=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bdseal: error:")
    assert ("epochs=0" in err) if bad == "train.epochs=0" else ("non-finite" in err and "lr=1e+06" in err and "epoch" in err)
    assert not out.exists() and not list(tmp_path.rglob("metrics.json"))


def test_validation_before_work_names_the_key(tmp_path, monkeypatch):
    def no_data(*a, **k):  # validation must fail before any data is loaded
        raise AssertionError("data was loaded")

    monkeypatch.setattr(run_mod, "load_dataset", no_data)
    cases = [("train.batch_size=0", "batch_size=0"), ("dataset.train_per_class=0", "dataset.train_per_class=0"),
             ("seed=abc", "seed='abc'"), ("attack.rate=abc", "attack.rate='abc'"),
             ("defender.target_known=true attack=none", "target_known"), ("+defense.bogus=1", "unknown key defense.bogus"),
             ("defense=pgrl +defense.clean_per_klass=3", "valid keys under defense: .*clean_per_class"),
             ("defense=pgrl +defense.train.epochz=3", "unknown key defense.train.epochz"),
             ("defense=pgrl defense.epsilon=abc", r"defense.epsilon='abc' must be a number"),
             ("defense=pgrl defense.train.lr=abc", r"defense.train.lr='abc' must be a number"),
             ("defense=gssd defense.flow.epochs=abc", r"defense.flow.epochs='abc' must be a number"),
             ("defense=vibe_ss_a +defense.ssl.bogus=1", r"unknown key defense.ssl.bogus; valid keys under defense.ssl: .*arch_params"),
             ("defense=gssd defense.nd_rule=bogus", r"nd_rule='bogus'; choose one of"),
             ("defense=pgrl defense.marginal=bogus", r"marginal must be 'uniform' or 'observed'"),
             ("defense=pgbd defense.refresh=bogus", r"defense.refresh must be one of"),
             ("defense=vibe_ss_a defense.corruption=y", r"corruption must be 'x'"),
             (f"backdoored_ckpt={tmp_path / 'missing.pt'}", "backdoored_ckpt")]
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            _run(tmp_path, *over.split())
    assert not (tmp_path / "r").exists()


def test_per_class_size_above_the_available_count_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"train_per_class=13 but class .* has only 12 images"):
        _run(tmp_path, "dataset.train_per_class=13")


def test_clean_pool_too_small_fails_before_any_training(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained before checking the clean pool")

    monkeypatch.setattr(run_mod, "train_baseline", no_training)
    with pytest.raises(BdsealError, match="defense.clean_per_class=1000"):
        _run(tmp_path, "defense=pgrl", "defense.clean_per_class=1000")


# --- atomic run directories ---------------------------------------------------------------------------------


def test_failed_overwrite_keeps_the_old_run_and_a_failed_run_blocks_nothing(tmp_path):
    good = _run(tmp_path)
    out = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TrainingDivergedError):
        _run(tmp_path, "overwrite=true", "train.lr=1e6", "train.epochs=3")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old config, metrics and model intact
    assert "TrainingDivergedError" in (tmp_path / "r.failed" / "error.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    # a failed first run leaves nothing at out=, so the same out= works without overwrite
    with pytest.raises(TrainingDivergedError):
        _run(tmp_path, "train.lr=1e6", "train.epochs=3", name="fresh")
    assert not (tmp_path / "fresh").exists()
    assert _run(tmp_path, name="fresh")["asr"] == good["asr"]
    assert not (tmp_path / "fresh.failed").exists()  # a success clears the old failure
    m = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    assert m["run_dir"] == str(tmp_path / "fresh") and (tmp_path / "fresh" / "model.safetensors").exists()


def test_successful_overwrite_replaces_the_old_run(tmp_path):
    _run(tmp_path)
    (tmp_path / "r" / "stray.txt").write_text("old")
    m = _run(tmp_path, "overwrite=true", "seed=1")
    assert not (tmp_path / "r" / "stray.txt").exists() and json.loads((tmp_path / "r" / "metrics.json").read_text())["seed"] == 1
    assert m["seed"] == 1


def test_ingest_refuses_a_run_dir_whose_config_and_metrics_disagree(tmp_path, capsys):
    _run(tmp_path, name="runs/a")
    _run(tmp_path, "seed=1", name="runs/b")
    met = json.loads((tmp_path / "runs" / "b" / "metrics.json").read_text())
    (tmp_path / "runs" / "b" / "metrics.json").write_text(json.dumps({**met, "seed": 0}))  # metrics of another cell
    refused: list[str] = []
    assert ingest_run_dirs(ResultStore(tmp_path / "s.sqlite"), [tmp_path / "runs"], refused) == 1
    assert len(refused) == 1 and "disagree" in refused[0] and "seed" in refused[0]
    assert main(["bench", f"out={tmp_path / 'bench2'}", f"ingest={tmp_path / 'runs'}"]) == 1
    assert "refused" in capsys.readouterr().out


# --- errors for people ----------------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BDSEAL_DEBUG", None)
    cmd = [sys.executable, "-m", "bdseal", "run", *TINY, "seed=abc", f"out={tmp_path / 'x'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "bdseal: error: seed='abc' must be a whole number >= 0; set seed=<integer>"
    p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "BDSEAL_DEBUG": "1"}, timeout=300)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "run_experiment", interrupted)
    monkeypatch.delenv("BDSEAL_DEBUG", raising=False)
    assert main(["run", *TINY]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["bdseal: interrupted (Ctrl-C); the unfinished run wrote no results"]


# --- benches sharing one store ------------------------------------------------------------------------------


def _fake_run(log: Path):
    def run(cfg):
        with open(log, "a") as f:
            f.write(f"{Path(str(cfg.out)).name} {os.getpid()}\n")
        time.sleep(0.3)
        return {"clean_acc": 1.0, "asr": 0.0}

    return run


def _bench_worker(spec: BenchSpec, log: str) -> None:
    run_mod.run_experiment = _fake_run(Path(log))  # in the forked child only
    run_bench(spec)


def test_two_benches_on_one_store_run_every_cell_exactly_once(tmp_path):
    spec = BenchSpec(name="t", datasets=["synthetic"], attacks=["none", "badnets", "blend"], defenses=["none"], seeds=[0, 1],
                     overrides=list(TINY), out=str(tmp_path / "b"), progress=False)
    log = tmp_path / "calls.log"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_bench_worker, args=(spec, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    calls = log.read_text().split("\n")[:-1]
    hashes = [c.split()[0] for c in calls]
    assert len(hashes) == 6 and len(set(hashes)) == 6  # every cell once
    assert len(ResultStore(spec.store_path)) == 6
    with sqlite3.connect(spec.store_path) as con:
        assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


def test_a_crashed_claimants_cell_becomes_runnable_again(tmp_path):
    store = ResultStore(tmp_path / "s.sqlite")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host, now = socket.gethostname(), time.time()
    with sqlite3.connect(store.path) as con:
        con.executemany("INSERT INTO claims VALUES (?, ?, ?, ?, ?)", [
            ("dead_pid", "other", host, dead.pid, now),                 # same host, process gone
            ("stale_remote", "other", "elsewhere", 1, now - 3600),      # other host, no heartbeat for an hour
            ("live_remote", "other", "elsewhere", 1, now),              # other host, fresh heartbeat
            ("live_local", "other", host, os.getpid(), now)])           # this (live) process under another owner
    assert store.claim("dead_pid", "me") and store.claim("stale_remote", "me")
    assert not store.claim("live_remote", "me") and not store.claim("live_local", "me")
    store.finish(Row("dead_pid", "d", "m", "a", "none", 0, {}, {}), "me")
    assert not store.claim("dead_pid", "you")  # finished: never claimed again
    assert store.claim("fresh", "me") and not store.claim("fresh", "you")


def test_bench_override_typos_are_refused_before_any_cell_runs(tmp_path, monkeypatch):
    from bdseal.experiment.bench import parse_args

    with pytest.raises(ConfigError, match=r"defense_overrides.pgrll names no defense .* \['none', 'pgrl'\]"):
        parse_args(["defenses=[none,pgrl]", "defense_overrides.pgrll=[defense.clean_per_class=5]"])
    spec, _ = parse_args(["datasets=[synthetic]", "attacks=[badnets]", "defenses=[none,pgrl]", "seeds=[0]",
                          "defense_overrides.pgrl=[+defense.clean_per_klass=5]", f"out={tmp_path / 'b'}", "progress=false", *TINY[1:]])
    monkeypatch.setattr(run_mod, "run_experiment", lambda cfg: pytest.fail("a cell ran before validation"))
    with pytest.raises(ConfigError, match=r"synthetic/badnets/pgrl/s0: unknown key defense.clean_per_klass"):
        run_bench(spec)
