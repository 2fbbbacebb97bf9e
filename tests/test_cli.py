"""``bdseal <command> --help`` prints the command's usage and runs nothing."""

from __future__ import annotations

import pytest

from bdseal.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("cmd", ["bench", "report", "bench-speed", "list"])
def test_subcommand_help_prints_usage_and_does_nothing(cmd: str, capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bdseal {cmd}: {SUBCOMMANDS[cmd][0]}")
    assert list(tmp_path.iterdir()) == []  # no store, report or speed file written


def test_bench_speed_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-speed", "-h"]) == 0
    out = capsys.readouterr().out
    for option in ("part=", "loop.batch_size=", "out="):
        assert option in out


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "expected"), [
    ("model=nope", "Available options in 'model': densenet121,"),
    ("defense.nonsense=3", "Could not override 'defense.nonsense'"),
    ("seed=[1", "no viable alternative"),
])
def test_bad_override_is_one_line_error_before_any_work(override: str, expected: str, capsys: pytest.CaptureFixture[str],
                                                         tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bdseal: error: bad override: ") and expected in err
    assert err.count("\n") == 1 and "HYDRA_FULL_ERROR" not in err and "search path" not in err
    assert list(tmp_path.iterdir()) == []


TINY_RUN = ["train.epochs=1", "dataset.train_per_class=12", "dataset.test_per_class=5", "progress=false",
            "figures.enabled=false", "cache=false"]


def test_run_console_output_is_strict_json(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    """attack=none has no ASR (NaN in memory): the console block must still parse as JSON, with null."""
    import json

    assert main(["run", "attack=none", f"out={tmp_path / 'r'}", *TINY_RUN]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{"): out.rindex("}") + 1])
    assert shown["asr"] is None and shown["attack"] == "none"


def test_sweep_writes_one_run_dir_per_job_and_no_empty_folders(tmp_path, monkeypatch) -> None:
    """``run -m`` without out=: each cell's run dir is its job folder multirun/<time>/<job num>/."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-m", "attack=none", "seed=0,1", *TINY_RUN]) == 0
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job in ("0", "1"):
        assert {p.name for p in (sweep / job).iterdir()} >= {"metrics.json", "config.yaml", "model.safetensors"}
    assert not (tmp_path / "runs").exists()
    empty = [p for p in tmp_path.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert empty == []
