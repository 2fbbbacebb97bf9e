"""VIBE unit tests: normalisation of the model's log-probabilities, the x-conditioned formula on a
hand case, the E-step and the Leiden filter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bdseal.defenses.vibe import Prior, VIBEHead, e_step, leiden_filter, resolve
from bdseal.defenses.vibe.leiden_filter import centroid_deviations, knn_edges


def _head(corruption: str, k: int = 4, d: int = 6, seed: int = 0) -> tuple[VIBEHead, Prior]:
    g = torch.Generator().manual_seed(seed)
    return VIBEHead(torch.randn(k, d, generator=g), kappa=10, corruption=corruption), Prior(k, 0.02, g)


@pytest.mark.parametrize("corruption", ["x", "class"])
def test_log_probs_normalise(corruption: str) -> None:
    head, prior = _head(corruption)
    with torch.no_grad():
        head.mu_y.add_(torch.randn_like(head.mu_y))
    v = torch.randn(5, 6) * 3
    assert torch.allclose(head.log_p_l(v, prior.log_prior()).exp().sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(head.log_p_y_all(v).exp().sum(2), torch.ones(5, 4), atol=1e-5)
    assert torch.allclose(prior.log_prior().exp().sum(), torch.tensor(1.0), atol=1e-6)


def test_prior_is_scaled_before_log_softmax() -> None:
    p = Prior(3, scale=0.5)
    with torch.no_grad():
        p.pi.copy_(torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(p.log_prior(), F.log_softmax(torch.tensor([0.0, 0.5, 1.0]), 0))


def test_x_conditioned_hand_case() -> None:
    """2 classes in 2-d: μ_z = (e1, e2), μ_y = (2·e1, e2), v = (1, 1), ν = 1:
    logits_y for l = 0: ⟨n(μ_y[y]), e1 + v⟩ = (2, 1); for l = 1: ⟨n(μ_y[y]), e2 + v⟩ = (1, 2)."""
    head = VIBEHead(torch.eye(2), kappa=1.0, nu=1.0, corruption="x")
    with torch.no_grad():
        head.mu_y.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    lp = head.log_p_y_all(torch.tensor([[1.0, 1.0]]))[0]
    expect = torch.log_softmax(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), dim=1)
    assert torch.allclose(lp, expect, atol=1e-6)
    # class-conditional: ν·cos(μ_y[y], μ_z[l]) = identity logits
    head_a = VIBEHead(torch.eye(2), kappa=1.0, nu=1.0, corruption="class")
    assert torch.allclose(head_a.log_p_y_all(torch.zeros(3, 2))[1], torch.log_softmax(torch.eye(2), 1), atol=1e-6)
    # vMF classifier: κ·cos(v, μ_z) + log prior
    prior = torch.log(torch.tensor([0.25, 0.75]))
    got = head.log_p_l(torch.tensor([[3.0, 0.0]]), prior)
    assert torch.allclose(got, torch.log_softmax(torch.tensor([[1.0 + math.log(0.25), math.log(0.75)]]), 1), atol=1e-6)


def test_nll_matches_joint() -> None:
    head, prior = _head("x")
    v, y, l = torch.randn(7, 6), torch.randint(0, 4, (7,)), torch.randint(0, 4, (7,))
    joint = head.joint(v, y, prior.log_prior())
    assert torch.allclose(head.nll(v, y, l, prior.log_prior()), -joint.gather(1, l[:, None]).mean(), atol=1e-5)


def test_first_e_step_recovers_clusters_and_marginal() -> None:
    """Well-separated clusters, observed labels 20 % flipped to class 0: the uniform-corruption first
    E-step assigns by the vMF classifier, i.e. the true cluster."""
    g = torch.Generator().manual_seed(0)
    k, n = 3, 300
    centres = torch.eye(k) * 5
    z = torch.arange(n) % k
    v = centres[z] + 0.3 * torch.randn(n, k, generator=g)
    y = z.clone()
    y[torch.randperm(n, generator=g)[:60]] = 0
    head = VIBEHead(centres, kappa=10, corruption="class")
    prior = Prior(k, 0.02, g)
    res = e_step(head, prior, v, y, lam=25, uniform_corruption=True, max_iter=200)
    assert (res.labels == z).float().mean() > 0.99
    assert torch.allclose(res.log_plan.exp().sum(0), prior.log_prior().exp(), atol=1e-4)


def _blobs(n_per: int, k: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 6
    return (centres[:, None] + torch.randn(k, n_per, d, generator=g)).reshape(-1, d)


def test_knn_graph_is_symmetric_without_self_loops() -> None:
    e = knn_edges(torch.randn(30, 3), 4)
    assert (e[:, 0] < e[:, 1]).all() and len(e) >= 30 * 4 / 2


def test_leiden_drops_planted_outlier_cluster() -> None:
    k = 4
    clean = _blobs(60, k, seed=1)
    g = torch.Generator().manual_seed(2)
    outlier = torch.full((40, 8), 60.0) + torch.randn(40, 8, generator=g)  # far from every class cluster
    feats = torch.cat([clean, outlier])
    res = leiden_filter(feats, k, k=10, resolutions=(0.1, 3.0, 30), seed=0)
    assert res.removed is not None
    assert not res.keep[-40:].any() and res.keep[:-40].all()


def test_leiden_keeps_clean_blobs() -> None:
    res = leiden_filter(_blobs(60, 5, seed=3), 5, k=10, resolutions=(0.1, 3.0, 30), seed=0)
    assert res.keep.all() and res.removed is None


def test_centroid_deviation_formula() -> None:
    f = torch.tensor([[0.0], [1.0], [10.0]])
    dev = centroid_deviations(f, torch.tensor([0, 1, 2]))
    md = torch.tensor([11.0, 10.0, 19.0]) / 3
    md = md / md.max()
    assert torch.allclose(dev, (md - (md.sum() - md) / 2).abs())


def test_resolve_variants() -> None:
    fm_a = resolve({"backbone": "fm", "corruption": "class"})
    assert fm_a["freeze"] and fm_a["freeze_mu_y"] and not fm_a["leiden"] and fm_a["lr"] == 1e-2 and fm_a["batch_size"] == 1024
    ss_f = resolve({"backbone": "ss", "corruption": "x"})
    assert not ss_f["freeze"] and not ss_f["freeze_mu_y"] and ss_f["leiden"] and ss_f["e_step_every"] == 1000
    with pytest.raises(ValueError, match="unknown option"):
        resolve({"kapa": 3})
    with pytest.raises(ValueError, match="frozen"):
        resolve({"backbone": "fm", "freeze": False})


def test_e_step_on_non_finite_features_raises_instead_of_nan_labels():
    from bdseal.defenses.vibe.em import e_step
    from bdseal.defenses.vibe.model import Prior, VIBEHead
    from bdseal.errors import TrainingDivergedError

    v = torch.nn.functional.normalize(torch.randn(12, 4), dim=1)
    y = torch.arange(12) % 3
    head, prior = VIBEHead(torch.nn.functional.normalize(torch.randn(3, 4), dim=1)), Prior(3)
    v[5] = float("nan")  # a diverged encoder
    with pytest.raises(TrainingDivergedError, match="Sinkhorn"):
        e_step(head, prior, v, y)
