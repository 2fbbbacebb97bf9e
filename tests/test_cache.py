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
