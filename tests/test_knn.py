import numpy as np
import pytest
import torch

from bdseal.knn import exact_knn, umap_embed


def test_exact_knn_matches_brute_force_in_chunks():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    idx, dst = exact_knn(x, 5, chunk=7)
    d = torch.cdist(x, x)
    assert torch.equal(idx[:, 0], torch.arange(50))  # self first
    assert torch.allclose(dst, d.topk(5, largest=False).values)
    idx2, _ = exact_knn(x, 5, include_self=False, chunk=7)
    assert not (idx2 == torch.arange(50)[:, None]).any()
    with pytest.raises(ValueError):
        exact_knn(x, 50, include_self=False)


@pytest.mark.parametrize("seed", [0, None])  # None = umap-learn's multi-threaded, unseeded path
def test_umap_embed_separates_far_clusters(seed):
    g = np.random.default_rng(0)
    x = np.concatenate([g.normal(0, 1, (40, 8)), g.normal(30, 1, (40, 8))]).astype(np.float32)
    e = umap_embed(x, 2, n_neighbors=10, seed=seed)
    assert e.shape == (80, 2)
    nearest = exact_knn(torch.from_numpy(e), 2)[0][:, 1].numpy()  # nearest other point in the embedding
    assert ((nearest < 40) == (np.arange(80) < 40)).all()
