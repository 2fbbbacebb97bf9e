import numpy as np
import ot as pot
import pytest
import torch

from bdseal.ot import sinkhorn_log


@pytest.mark.parametrize("eps", [1.0, 0.1, 0.04])
def test_marginals_and_plan_match_pot(eps):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(30, 5, generator=g, dtype=torch.float64)
    b = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    res = sinkhorn_log(s, eps, col_marginal=b, max_iter=5000, tol=1e-10)
    plan = res.plan
    assert torch.allclose(plan.sum(1), torch.full((30,), 1 / 30, dtype=plan.dtype), atol=1e-8)
    assert torch.allclose(plan.sum(0), b, atol=1e-8)
    ref = pot.bregman.sinkhorn_log(np.full(30, 1 / 30), b.numpy(), (-s).numpy(), reg=eps, numItermax=5000, stopThr=1e-12)
    assert np.allclose(plan.numpy(), ref, atol=1e-7)


def test_fixed_iterations_and_large_lambda_no_overflow():
    s = torch.randn(1000, 10, dtype=torch.float64) * 50  # log-likelihood-like scale, λ = 25
    res = sinkhorn_log(s, 1 / 25, max_iter=3, tol=None)
    assert res.iterations == 3 and torch.isfinite(res.log_plan).all()


def test_balanced_assignment_where_argmax_collapses():
    # PGRL Fig. 7 toy: 230 points on the upper half circle, two prototypes; plain argmax is unbalanced
    theta = torch.linspace(0.05, np.pi - 0.05, 230, dtype=torch.float64)
    pts = torch.stack([theta.cos(), theta.sin()], 1)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cos = pts @ protos.T
    argmax_counts = torch.bincount(cos.argmax(1), minlength=2)
    assert argmax_counts.min() < 80  # collapse towards the "upper" prototype
    q = sinkhorn_log(cos, 0.05, max_iter=2000, tol=1e-9).assignments()
    counts = torch.bincount(q, minlength=2)
    assert abs(int(counts[0]) - int(counts[1])) <= 10


def test_bad_inputs():
    with pytest.raises(ValueError):
        sinkhorn_log(torch.randn(3), 0.1)
    with pytest.raises(ValueError):
        sinkhorn_log(torch.randn(3, 2), 0.0)
    with pytest.raises(ValueError):
        sinkhorn_log(torch.randn(3, 2), 0.1, col_marginal=torch.tensor([0.9, 0.9]))


def test_non_finite_scores_stop_with_an_error_instead_of_a_nan_plan():
    from bdseal.errors import TrainingDivergedError

    s = torch.randn(20, 4, dtype=torch.float64)
    s[3, 1] = float("nan")
    for tol in (None, 1e-6):
        with pytest.raises(TrainingDivergedError, match="non-finite transport plan"):
            sinkhorn_log(s, 0.1, max_iter=20, tol=tol)
