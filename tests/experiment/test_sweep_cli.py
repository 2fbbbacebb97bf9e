"""The validation scripts' command line: seeds, overrides after --, and no overwriting of results."""

from __future__ import annotations

import json
import sys

import pytest

from bdseal.experiment.sweep_cli import seed_sweep_args, write_json


def test_parses_seeds_out_and_overrides(monkeypatch, tmp_path):
    out = tmp_path / "sub" / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "--seeds", "3", "4", "--out", str(out), "--", "attack=blend", "seed=9"])
    a = seed_sweep_args("doc", [0])
    assert a.seeds == [3, 4] and a.out == out and a.overrides == ["attack=blend", "seed=9"]
    write_json(a.out, {"k": [1]})
    assert json.loads(out.read_text()) == {"k": [1]}


def test_refuses_an_existing_results_file(monkeypatch, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(out)])
    with pytest.raises(SystemExit, match="exists"):
        seed_sweep_args(None, [0, 1])
    assert out.read_text() == "{}"
