import torch

from bdseal.cache import ArtifactCache, fingerprint


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
