import pytest
import torch

from bdseal.attacks import AttackContext
from bdseal.attacks import surrogate as S
from bdseal.cache import ArtifactCache
from bdseal.data.sources import load_synthetic
from bdseal.train import predict

TINY = {"widths": [8, 16, 16]}


@pytest.fixture(scope="module")
def data():
    return load_synthetic(num_classes=4, n_train=40, n_test=10, image_size=16)


def test_surrogate_learns_is_frozen_and_cached(data, tmp_path, monkeypatch):
    ctx = AttackContext(seed=3, cache=ArtifactCache(tmp_path), progress=False)
    calls = []
    real_fit = S.fit
    monkeypatch.setattr(S, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    m1 = S.train_surrogate(data.train, ctx, epochs=3, model_kw=TINY)
    assert not m1.training and not any(p.requires_grad for p in m1.parameters())
    acc = (predict(m1, data.test.x) == data.test.y).float().mean()
    assert acc > 0.5  # 4 easy classes: well above chance (0.25)
    m2 = S.train_surrogate(data.train, ctx, epochs=3, model_kw=TINY)
    assert len(calls) == 1  # second call read the cache
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    # the key holds the data, the recipe and the seed: a different seed trains again
    S.train_surrogate(data.train, AttackContext(seed=4, cache=ctx.cache, progress=False), epochs=3, model_kw=TINY)
    assert len(calls) == 2


def test_surrogate_deterministic_without_cache(data):
    ctx = AttackContext(seed=1, progress=False)
    a = S.train_surrogate(data.train, ctx, epochs=1, model_kw=TINY).state_dict()
    b = S.train_surrogate(data.train, ctx, epochs=1, model_kw=TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_surrogate_bad_options(data):
    with pytest.raises(ValueError, match="epochs"):
        S.train_surrogate(data.train, AttackContext(progress=False), epochs=0)
    with pytest.raises(ValueError, match="unknown model"):
        S.train_surrogate(data.train, AttackContext(progress=False), arch="nope", epochs=1)
