import numpy as np
import pytest
import torch

from bdseal.knn import UMAP_MAX_EPOCHS, default_umap_epochs, exact_knn, umap_embed, umap_embed_many


def test_exact_knn_matches_brute_force_in_chunks():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    idx, dst = exact_knn(x, 5, chunk=7)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(idx[:, 0], torch.arange(50))  # self first
    assert torch.allclose(dst, d.topk(5, largest=False).values, atol=2e-3)  # cdist's matrix-product path: sqrt of rounding near 0
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


def test_umap_leaves_torch_thread_count_unchanged():
    """Regression: a seeded UMAP resets numba's threads through the OpenMP runtime torch shares; torch's
    count must be what it was before the call (it used to jump from 1 to every core)."""
    before = torch.get_num_threads()
    x = np.random.default_rng(1).normal(size=(60, 6)).astype(np.float32)
    try:
        torch.set_num_threads(1)
        umap_embed(x, 2, n_neighbors=5, seed=0)
        assert torch.get_num_threads() == 1
        umap_embed(x, 2, n_neighbors=5, seed=None)  # unseeded, multi-threaded path
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_default_umap_epochs_capped():
    assert default_umap_epochs(5_000) == UMAP_MAX_EPOCHS == 200
    assert default_umap_epochs(5_000, cap=None) == 500
    assert default_umap_epochs(20_000, cap=None) == 200
    assert default_umap_epochs(100, cap=50) == 50


@pytest.mark.slow  # spawns two worker processes that import torch and umap (~40 s on 2 busy cores)
def test_umap_embed_many_in_processes_equals_sequential():
    """Per-class UMAPs in worker processes are bit-identical to sequential seeded calls."""
    g = np.random.default_rng(2)
    xs = [g.normal(size=(40 + 5 * i, 6)).astype(np.float32) for i in range(3)]
    seq = umap_embed_many(xs, 2, n_neighbors=5, seeds=[3, 4, 5], n_epochs=30, workers=1)
    par = umap_embed_many(xs, 2, n_neighbors=5, seeds=[3, 4, 5], n_epochs=30, workers=2)
    assert [a.shape for a in par] == [(40, 2), (45, 2), (50, 2)]
    for a, b in zip(seq, par):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seeds"):
        umap_embed_many(xs, 2, seeds=[0])
