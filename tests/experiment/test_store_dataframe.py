"""ResultStore.to_dataframe and the provenance every result carries."""

from __future__ import annotations

from pathlib import Path

import pytest

import bdseal
from bdseal.experiment.store import ResultStore, Row, flatten
from bdseal.provenance import METRICS_SCHEMA_VERSION, provenance


def test_to_dataframe_flattens_nested_metrics(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    store = ResultStore(tmp_path / "results.sqlite")
    for seed, asr in ((0, 0.5), (1, 0.25)):
        store.add(Row(f"h{seed}", "digits", "small", "badnets", "pgrl", seed, {"seed": seed},
                      {"clean_acc": 0.9, "asr": asr, "baseline": {"asr": 1.0}, "detection": {"auroc": 0.75}, "hist": [1, 2]}))
    df = store.to_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df) == 2
    assert {"config_hash", "dataset", "defense", "seed", "asr", "baseline.asr", "detection.auroc"} <= set(df.columns)
    assert df.sort_values("seed")["asr"].tolist() == [0.5, 0.25] and df["hist"].iloc[0] == [1, 2]
    assert list(ResultStore(tmp_path / "empty.sqlite").to_dataframe().columns)[:2] == ["config_hash", "dataset"]


def test_flatten() -> None:
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == {"a": 1, "b.c": 2, "b.d.e": 3}


def test_provenance_fields() -> None:
    p = provenance(device="cpu")
    assert p["schema_version"] == METRICS_SCHEMA_VERSION and p["bdseal_version"] == bdseal.__version__
    assert p["torch_version"] and p["device"] == "cpu"
    assert p["git_commit"] is None or len(p["git_commit"].split("+")[0]) == 40
