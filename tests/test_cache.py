import gc

import torch

from bdseal.cache import ArtifactCache, dataset_fingerprint, fingerprint
from bdseal.data.dataset import ImageDataset


def test_fingerprint_sensitive_to_every_part():
    a = fingerprint({"x": torch.zeros(3, dtype=torch.uint8), "attack": "badnets", "seed": 0})
    assert a == fingerprint({"seed": 0, "attack": "badnets", "x": torch.zeros(3, dtype=torch.uint8)})
    assert a != fingerprint({"x": torch.zeros(3, dtype=torch.uint8), "attack": "badnets", "seed": 1})
    assert a != fingerprint({"x": torch.ones(3, dtype=torch.uint8), "attack": "badnets", "seed": 0})


def test_cache_computes_once_per_key(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(3)

    assert torch.equal(cache.get_or_compute("k", {"a": 1}, compute), torch.arange(3))
    cache.get_or_compute("k", {"a": 1}, compute)
    cache.get_or_compute("k", {"a": 2}, compute)
    assert len(calls) == 2


def test_fingerprint_of_zero_dim_tensors():
    assert fingerprint(torch.tensor(3)) != fingerprint(torch.tensor(4))
    assert fingerprint({"n": torch.tensor(3)}) == fingerprint({"n": torch.tensor(3)})


def _count_hashes(monkeypatch):
    import bdseal.cache as C

    calls: list[torch.Tensor] = []
    real = C._hash_tensor

    def counting(t):
        calls.append(t)
        return real(t)

    monkeypatch.setattr(C, "_hash_tensor", counting)
    return calls


def test_tensor_is_hashed_once_and_reused(monkeypatch):
    calls = _count_hashes(monkeypatch)
    x, y = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8), torch.arange(8)
    ds = ImageDataset(x, y % 2)
    first = dataset_fingerprint(ds)
    assert dataset_fingerprint(ds) == first and fingerprint({"x": ds.x, "y": ds.y}) == first
    assert sum(t is ds.x for t in calls) == 1 and sum(t is ds.y for t in calls) == 1


def test_different_data_gives_different_keys():
    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 2
    key = dataset_fingerprint(ImageDataset(x, y))
    assert dataset_fingerprint(ImageDataset(x.clone(), y.clone())) == key  # content, not identity
    x2 = x.clone()
    x2[3, 1, 2, 2] ^= 1
    assert dataset_fingerprint(ImageDataset(x2, y)) != key
    assert dataset_fingerprint(ImageDataset(x, 1 - y)) != key
    assert fingerprint(x.float()) != fingerprint(x) and fingerprint(x.view(8, 48)) != fingerprint(x)  # dtype, shape


def test_in_place_change_invalidates_the_memo():
    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    before = fingerprint(x)
    x[1] = 7  # bumps the version counter
    assert fingerprint(x) != before and fingerprint(x) == fingerprint(x.clone())
    x.add_(1)
    assert fingerprint(x) == fingerprint(x.clone())


def test_memo_forgets_freed_tensors_and_skips_inference_tensors():
    import bdseal.cache as C

    x = torch.ones(5, dtype=torch.uint8)
    fingerprint(x)
    key = id(x)
    assert key in C._DIGESTS
    del x
    gc.collect()
    assert key not in C._DIGESTS  # dropped by the weak reference callback
    with torch.inference_mode():
        t = torch.ones(3)
    assert fingerprint(t) == fingerprint(torch.ones(3)) and id(t) not in C._DIGESTS


# --- self-checking entries (bdseal.io format) -------------------------------------------------------


def _entry(cache, calls, parts=None):
    def compute():
        calls.append(1)
        return {"w": torch.arange(1000, dtype=torch.float32), "n": 3}

    return cache.get_or_compute("k", parts or {"a": 1}, compute)


def test_truncated_or_bit_flipped_entry_warns_deletes_and_recomputes(tmp_path, caplog):
    cache, calls = ArtifactCache(tmp_path), []
    _entry(cache, calls)
    path = cache.path("k", {"a": 1})
    assert path.suffix == ".safetensors" and path.exists()
    data = bytearray(path.read_bytes())
    for damaged in (bytes(data[: len(data) // 2]), bytes(data[:-4]) + b"\x01\x02\x03\x04", b"{not json"):
        path.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING", logger="bdseal"):
            value = _entry(cache, calls)
        assert torch.equal(value["w"], torch.arange(1000, dtype=torch.float32)) and value["n"] == 3
        assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1
    assert len(calls) == 4  # first compute + one recompute per damage
    _entry(cache, calls)
    assert len(calls) == 4  # the rewritten entry is used again


def test_planted_pickle_in_cache_runs_nothing(tmp_path):
    from tests.test_io import write_evil_pickle

    cache, calls = ArtifactCache(tmp_path), []
    path = cache.path("k", {"a": 1})
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    write_evil_pickle(path, marker)
    legacy = tmp_path / "k" / f"{fingerprint({'a': 1})}.pt"  # where the pickle-based cache kept this entry
    write_evil_pickle(legacy, marker)
    legacy.with_suffix(".json").write_text('{"a": 1}')
    assert _entry(cache, calls)["n"] == 3 and calls == [1]
    assert not marker.exists()


def test_entry_of_other_code_or_parts_is_not_used(tmp_path, monkeypatch):
    import bdseal.cache as C
    from bdseal import io

    cache, calls = ArtifactCache(tmp_path), []
    _entry(cache, calls)
    path = cache.path("k", {"a": 1})
    value, meta = io.load_tree(path)
    io.save_tree(path, {"w": torch.zeros(3), "n": 0}, {**meta, "parts": {"a": 2}})  # valid file, wrong parts
    assert _entry(cache, calls)["n"] == 3 and len(calls) == 2
    monkeypatch.setattr(C, "_CODE_VERSION", "0.0.0+othercode")
    assert cache.path("k", {"a": 1}) != path  # the code version is part of the key
    _entry(cache, calls)
    assert len(calls) == 3


def _concurrent_writer(root: str, q) -> None:  # noqa: ANN001
    cache = ArtifactCache(root)
    out = cache.get_or_compute("k", {"a": 1}, lambda: {"w": torch.arange(200_000, dtype=torch.float32)})
    q.put(float(out["w"].sum()))


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    import multiprocessing as mp

    from bdseal import io

    ctx = mp.get_context("spawn")  # fork after torch's thread pool started can hang the children
    q = ctx.Queue()
    procs = [ctx.Process(target=_concurrent_writer, args=(str(tmp_path), q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len({q.get() for _ in procs}) == 1
    entries = list((tmp_path / "k").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"  # no temp files left
    value, _ = io.load_tree(entries[0])
    assert torch.equal(value["w"], torch.arange(200_000, dtype=torch.float32))


def test_value_bdseal_io_cannot_store_is_used_but_not_cached(tmp_path, caplog):
    from pathlib import Path

    cache = ArtifactCache(tmp_path)
    with caplog.at_level("WARNING", logger="bdseal"):
        value = cache.get_or_compute("k", {"a": 1}, lambda: {"where": Path("x")})
    assert value == {"where": Path("x")} and "not stored" in caplog.text
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))
