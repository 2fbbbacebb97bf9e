"""bdseal.io: safetensors + JSON round trips, verification on load, atomic writes, no unpickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bdseal import io
from bdseal.attacks.plan import PoisonPlan
from bdseal.attacks.poisoned import Oracle
from bdseal.data.dataset import ImageDataset
from bdseal.errors import BdsealError


class _Evil:
    """Unpickling this runs ``os.system`` (creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def write_evil_pickle(path: Path, marker: Path) -> Path:
    """A pickle whose loading creates ``marker`` (shared with the cache / run tests)."""
    torch.save({"model": _Evil(marker)}, path)
    return path


def test_tensors_round_trip_with_meta(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.int64).view(2, 3), "b": torch.rand(4)[1:3], "g": torch.Generator().get_state()}
    io.save_tensors(tmp_path / "x.safetensors", t, {"epoch": 3})
    back, meta = io.load_tensors(tmp_path / "x.safetensors")
    assert meta["epoch"] == 3 and meta["_schema"] == io.SCHEMA_VERSION
    for k in t:
        assert torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype


def test_bit_flip_and_truncation_raise_corrupt_file_error(tmp_path):
    p = io.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1000, dtype=torch.uint8)})
    data = bytearray(p.read_bytes())
    data[-10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(io.CorruptFileError, match="sha256"):
        io.load_tensors(p)
    p.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(io.CorruptFileError, match=str(p)):
        io.load_tensors(p)
    p.write_bytes(b"")
    with pytest.raises(io.CorruptFileError):
        io.load_tensors(p)
    assert issubclass(io.CorruptFileError, BdsealError)


def test_pickle_is_not_a_bdseal_file_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    p = write_evil_pickle(tmp_path / "evil.safetensors", marker)
    with pytest.raises(io.CorruptFileError):
        io.load_tensors(p)
    with pytest.raises(io.CorruptFileError):
        io.load_tree(p)
    p = p.rename(tmp_path / "evil.pt")
    with pytest.raises(io.CorruptFileError, match="does not unpickle"):
        io.load_legacy_pt(p)
    with pytest.raises(io.CorruptFileError):
        io.load_model_state(p)
    with pytest.raises(io.CorruptFileError):
        io.load_model_state(p.rename(tmp_path / "model.bin"))
    assert not marker.exists()


def test_tree_round_trip_of_bdseal_dataclasses(tmp_path):
    ds = ImageDataset(torch.randint(0, 255, (5, 1, 4, 4), dtype=torch.uint8), torch.arange(5), [str(i) for i in range(5)])
    oracle = Oracle(torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool), torch.arange(5),
                    torch.tensor([-1, 0]), {"name": "x", "rate": float("nan")})
    e = torch.empty(0, dtype=torch.long)
    plan = PoisonPlan(e, e, e, oracle.target_map, "all_to_one", 0.1, "dataset")
    value = {"ds": ds, "oracle": oracle, "plan": plan, "t": (1, "a", None), "n": np.arange(3), 3: [True, 2.5]}
    io.save_tree(tmp_path / "v.safetensors", value, {"kind": "test"})
    back, meta = io.load_tree(tmp_path / "v.safetensors")
    assert meta["kind"] == "test"
    assert torch.equal(back["ds"].x, ds.x) and back["ds"].classes == ds.classes
    assert isinstance(back["oracle"], Oracle) and back["oracle"].attack["name"] == "x"
    assert back["oracle"].attack["rate"] != back["oracle"].attack["rate"]  # NaN survives
    assert back["plan"].mode == "all_to_one" and back["t"] == (1, "a", None)
    assert np.array_equal(back["n"], np.arange(3)) and back[3] == [True, 2.5]


def test_tree_refuses_foreign_types(tmp_path):
    class Foreign:
        pass

    with pytest.raises(TypeError):
        io.save_tree(tmp_path / "f.safetensors", {"x": Foreign()})
    tensors, skel = io.encode_tree({"a": 1})
    skel = {"__dc__": "subprocess:Popen", "fields": {}}
    with pytest.raises(io.CorruptFileError, match="not a bdseal dataclass"):
        io.decode_tree(tensors, skel)


def test_model_round_trip_and_legacy_pt(tmp_path, caplog):
    from bdseal.models import build_model

    m = build_model("small", 3, in_channels=1, image_size=8)
    io.save_model(tmp_path / "run", m, {"arch": "small"})
    state, meta = io.load_model_state(tmp_path / "run")
    assert meta["arch"] == "small" and meta["num_classes"] == 3
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    info = io.read_json(tmp_path / "run" / io.MODEL_META)
    assert info["num_classes"] == 3 and len(info["file_sha256"]) == 64 and "mean" in info
    torch.save(m.state_dict(), tmp_path / "legacy.pt")
    with caplog.at_level("WARNING", logger="bdseal"):
        state2, meta2 = io.load_model_state(tmp_path / "legacy.pt")
    assert meta2["legacy_pt"] and "weights_only=True" in caplog.text
    assert all(torch.equal(state2[k], v) for k, v in m.state_dict().items())


def test_atomic_write_leaves_no_temp_and_old_file_on_failure(tmp_path, monkeypatch):
    p = io.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert io.read_json(p) == {"a": 1}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        io.atomic_write_json(p, {"a": 2})
    monkeypatch.undo()
    assert io.read_json(p) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["m.json"]
    p.write_text("{not json")
    with pytest.raises(io.CorruptFileError, match="m.json"):
        io.read_json(p)


def test_pickle_module_unused_for_loading():
    src = Path(io.__file__).read_text()
    assert "pickle.load" not in src and "weights_only=False" not in src
    assert pickle  # the module is imported above only to build the hostile fixture
