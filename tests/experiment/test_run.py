import json

import pytest

from bdseal.cli import main
from bdseal.experiment.config import compose_config
from bdseal.experiment.run import RunDirError, run_experiment
from tests.helpers import assert_oracle_blind

FAST = ["train.epochs=2", "dataset.train_per_class=30"]


def test_bdseal_run_end_to_end_learns_backdoor(tmp_path, capsys):
    """The default cell (digits, small net, BadNets 10%) through the CLI: the backdoor is learned."""
    out = tmp_path / "run"
    assert main(["run", f"out={out}", "progress=false"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("dataset", "model", "attack", "defense", "seed", "poison_rate", "target", "clean_acc", "asr", "time_s"):
        assert key in m
    assert m["dataset"] == "digits" and m["defense"] == "none" and 0.09 < m["poison_rate"] < 0.11
    assert m["clean_acc"] > 0.85 and m["asr"] > 0.9
    assert (out / "config.yaml").exists() and (out / "model.pt").exists()
    assert "results in" in capsys.readouterr().out


def test_refuses_to_overwrite_a_nonempty_run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="overwrite=true"):
        run_experiment(compose_config([f"out={out}"]))
    assert (out / "metrics.json").read_text() == "{}"


def test_clean_run_without_attack(tmp_path):
    m = run_experiment(compose_config([*FAST, "attack=none", f"out={tmp_path / 'r'}", "progress=false"]))
    assert m["asr"] != m["asr"] and m["n_poison"] == 0  # NaN ASR in memory, null in JSON
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["asr"] is None


def test_none_defense_is_blind_to_the_oracle(tmp_path, monkeypatch):
    assert_oracle_blind(tmp_path, FAST, monkeypatch)


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown defense"):
        cfg = compose_config([*FAST, f"out={tmp_path / 'x'}"])
        cfg.defense.name = "bogus"
        run_experiment(cfg)


def test_backdoored_ckpt_is_loaded_as_the_baseline(tmp_path):
    # M_B from a 1-epoch run; this run's own recipe (2 epochs) would give a different model
    first = run_experiment(compose_config([*FAST, "train.epochs=1", f"out={tmp_path / 'a'}", "progress=false"]))
    again = run_experiment(compose_config([*FAST, f"out={tmp_path / 'b'}", "progress=false", "baseline=true",
                                           f"backdoored_ckpt={tmp_path / 'a'}"]))
    assert again["baseline"]["clean_acc"] == first["clean_acc"] and again["baseline"]["asr"] == first["asr"]
    with pytest.raises(FileNotFoundError, match="backdoored_ckpt"):
        run_experiment(compose_config([*FAST, f"out={tmp_path / 'c'}", f"backdoored_ckpt={tmp_path / 'missing'}"]))
