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
