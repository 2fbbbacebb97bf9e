"""GSSD unit tests on synthetic feature tensors: flows, scores, histogram rule, σ, splits."""

from __future__ import annotations

import math

import pytest
import torch

from bdseal.defenses.gssd import scores as S
from bdseal.defenses.gssd.defense import analyse, resolve
from bdseal.defenses.gssd.flows import BatchedCouplingFlow, FlowConfig, fit_class_flows, train_flows
from bdseal.defenses.gssd.split import split_counts, split_dataset


def _gaussian_2d(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([1.0, -0.5])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    x = torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(cov).T + mean
    return x, mean, cov


def test_flow_is_a_normalised_density_matching_a_gaussian():
    """A flow trained on 2-D Gaussian data: its density integrates to 1 on a grid and its per-dim
    log-likelihood of held-out points matches the analytic Gaussian log-density."""
    x, mean, cov = _gaussian_2d(2000, seed=0)
    flow, _ = fit_class_flows(x, torch.zeros(2000, dtype=torch.long), [0],
                              FlowConfig(hidden=32, epochs=10, batch_size=128, lr=1e-2), seed=0)
    grid = torch.linspace(-9, 9, 361)
    gx, gy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    dens = (flow.log_prob_all(pts)[:, 0] * 2).exp()  # per-dim log-density × D = full log-density
    cell = (grid[1] - grid[0]) ** 2
    assert float(dens.sum() * cell) == pytest.approx(1.0, abs=0.02)
    held, _, _ = _gaussian_2d(2000, seed=1)
    true = torch.distributions.MultivariateNormal(mean, cov).log_prob(held) / 2
    assert float(flow.log_prob_all(held)[:, 0].mean()) == pytest.approx(float(true.mean()), abs=0.05)


def test_batched_flows_equal_separate_trainings():
    """K flows trained jointly give the same densities as K one-flow trainings from the same init and
    batch streams (classes of different sizes, partial last batches, early-finishing classes frozen)."""
    g = torch.Generator().manual_seed(3)
    groups = [torch.randn(n, 6, generator=g) * (1 + i) + i for i, n in enumerate((37, 50, 20))]
    cfg = FlowConfig(hidden=8, epochs=3, batch_size=16, lr=1e-2)
    joint = BatchedCouplingFlow(3, 6, 2, 8, generator=torch.Generator().manual_seed(0))
    singles = [joint.slice(k) for k in range(3)]
    seeds = [11, 12, 13]
    train_flows(joint, groups, seeds, cfg)
    probe = torch.randn(64, 6, generator=g) * 2
    got = joint.log_prob_all(probe)
    for k, one in enumerate(singles):
        train_flows(one, [groups[k]], [seeds[k]], cfg)
        torch.testing.assert_close(got[:, k], one.log_prob_all(probe)[:, 0], atol=1e-5, rtol=1e-5)


def _planted(seed: int = 0, k: int = 5, d: int = 12, n: int = 60, rate: float = 0.4, scale: float = 1.5):
    """k Gaussian clusters; class 0 additionally holds ``rate·n`` samples drawn from the other clusters
    (non-disruptive poisoning: poisoned embeddings stay near their source class)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * scale
    xs, ys, src = [], [], []
    for c in range(k):
        xs.append(centres[c] + torch.randn(n, d, generator=g))
        ys.append(torch.full((n,), c))
        src.append(torch.full((n,), c))
    n_p = int(rate * n)
    from_cls = torch.randint(1, k, (n_p,), generator=g)
    xs.append(centres[from_cls] + torch.randn(n_p, d, generator=g))
    ys.append(torch.zeros(n_p, dtype=torch.long))
    src.append(from_cls)
    return torch.cat(xs), torch.cat(ys).long(), torch.cat(src).long()


def test_s_nd_ranks_the_planted_target_first_and_relabels_to_the_source():
    """Flows trained on a known mixture: the target's flow gives foreign samples the highest mean density
    (Eq. 2), the most suspicious 15% of the target are planted samples, relabelled to their source (Eq. 7)."""
    x, y, src = _planted(k=10, n=40, d=8, scale=3.0)
    z = S.standardise(x)
    classes = list(range(10))
    flow, _ = fit_class_flows(z, y, classes, FlowConfig(hidden=8, epochs=8, batch_size=16), seed=0)
    logp = flow.log_prob_all(z)
    snd = S.s_nd(logp, S.class_columns(y, classes))
    assert int(snd.argmax()) == 0 and int(S.robust_z(snd).argmax()) == 0
    a = analyse(logp, y, classes, resolve({"detect_disruptive": False, "nd_rule": "robust", "robust_z": 2.0}))
    assert a["nd"] == [0]
    poisoned = (y == 0) & (src != 0)
    split = split_dataset(y, a["pi"], a["relabel_to"], a["nd"], a["d"])
    assert bool(poisoned[split.poisoned].all())
    assert bool((split.relabels[split.poisoned] == src[split.poisoned]).float().mean() > 0.9)
    assert not bool(poisoned[split.clean].any())


def test_robust_rule_flags_only_the_outlier():
    snd = torch.tensor([-3.1, -2.9, -3.0, -3.3, -1.2, -3.05, -2.8, -3.2, -3.0, -2.95])
    assert S.nd_flags_robust(snd, 3.5).nonzero().flatten().tolist() == [4]
    assert S.nd_flags_absolute(snd, 1.5).nonzero().flatten().tolist() == [4]
    assert not S.nd_flags_robust(snd[torch.arange(10) != 4], 3.5).any()


def test_loo_z_hand_case_and_tight_cluster_behaviour():
    """(v_k − mean of the others) / std of the others; a near-tie among the others does not blow it up the way
    the MAD does (the robust z's failure on clean runs, docs/gssd.md)."""
    v = torch.tensor([0.0, 1.0, 2.0, 9.0])
    others = torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(S.loo_z(v)[3], (9.0 - others.mean()) / others.std())
    assert torch.allclose(S.loo_z(v)[0], (0.0 - torch.tensor([1.0, 2.0, 9.0]).mean()) / torch.tensor([1.0, 2.0, 9.0]).std())
    # seven classes nearly tied, one a little higher, two far below: the MAD is tiny, the std is not
    clean = torch.tensor([-3.00, -3.001, -3.002, -2.999, -3.0005, -2.9995, -3.0015, -2.97, -4.5, -5.0])
    assert float(S.robust_z(clean).max()) > 3.5 and float(S.loo_z(clean).max()) < 1.0
    planted = torch.tensor([-3.1, -2.9, -3.0, -3.3, -1.2, -3.05, -2.8, -3.2, -3.0, -2.95])
    assert (S.loo_z(planted) > 2.0).nonzero().flatten().tolist() == [4]
    a = analyse(torch.zeros(10, 10), torch.arange(10), list(range(10)), resolve({"detect_disruptive": False, "nd_rule": "loo"}))
    assert a["nd"] == [] and a["loo_z"].shape == (10,)


def test_histogram_rule_finds_the_dip_of_a_bimodal_distribution():
    g = torch.Generator().manual_seed(0)
    low = 0.05 + 0.02 * torch.randn(60, generator=g)
    high = 0.5 + 0.05 * torch.randn(340, generator=g)
    r = S.histogram_rule(torch.cat([low, high]).clamp_min(1e-4), lam=0.75, bins=30, beta_d=0.05)
    assert r.flagged
    assert float(low.max()) < r.mu + (r.edges[1] - r.edges[0]) and r.mu < float(high.min())
    assert r.s_d == pytest.approx(60 / 400, abs=0.01)
    # a unimodal class whose bulk lies right of λ (clean classes in the authors' feature space) passes
    assert not S.histogram_rule(0.9 + 0.05 * torch.randn(400, generator=g), lam=0.75).flagged
    # the relative variant (λ = class median) also passes a unimodal class wherever its bulk lies...
    uni = 0.5 + 0.05 * torch.randn(400, generator=g)
    assert not S.histogram_rule(uni, lam=float(uni.median())).flagged
    # ...and still finds the planted dip
    both = torch.cat([low, high]).clamp_min(1e-4)
    assert S.histogram_rule(both, lam=float(both.median())).flagged


def test_sigma_flips_sign_for_disruptive_classes():
    s = torch.tensor([-2.0, 0.5, 3.0, -1.0])
    disruptive = torch.tensor([False, False, True, True])
    torch.testing.assert_close(S.log_sigma(s, disruptive), torch.tensor([-2.0, 0.5, -3.0, 1.0]))
    torch.testing.assert_close(S.poisoning_score(s, disruptive), torch.tensor([2.0, -0.5, 3.0, -1.0]))
    # through analyse, on a hand-made (N, K) per-dim log-density matrix: class 2 holds 40 samples with
    # near-zero density under every foreign flow (disruptive), so it is D and its π is +s
    g = torch.Generator().manual_seed(1)
    k, n = 4, 400
    y = torch.arange(k).repeat_interleave(n)
    logp = -0.3 + 0.03 * torch.randn(k * n, k, generator=g)  # foreign per-dim density ≈ 0.74
    logp[torch.arange(k * n), y] = -0.1 + 0.03 * torch.randn(k * n, generator=g)
    outl = (y == 2) & (torch.arange(k * n) % n < 40)
    logp[outl] = -3.0 + 0.1 * torch.randn(int(outl.sum()), k, generator=g)
    logp[outl, 2] = -0.2
    a = analyse(logp, y, list(range(k)), resolve({"nd_rule": "robust"}))
    assert a["d"] == [2] and a["nd"] == []
    m2 = y == 2
    torch.testing.assert_close(a["pi"][m2], a["s"][m2])
    torch.testing.assert_close(a["pi"][y == 1], -a["s"][y == 1])
    assert bool(a["pi"][outl].min() > a["pi"][m2 & ~outl].max())  # the outliers are the suspicious ones


@pytest.mark.parametrize("n", [200, 137, 9])
def test_split_has_the_requested_fractions(n):
    g = torch.Generator().manual_seed(n)
    y = torch.cat([torch.zeros(n), torch.ones(n), torch.full((n,), 2)]).long()
    score = torch.randn(3 * n, generator=g)
    relabel_to = torch.full((3 * n,), 1)
    sp = split_dataset(y, score, relabel_to, flagged_nd=[0], flagged_d=[2], alpha_c=0.3, alpha_p=0.15)
    n_c, n_p = split_counts(n, 0.3, 0.15)
    assert (n_c, n_p) == (n - math.floor(0.7 * n + 1e-9), math.floor(0.15 * n + 1e-9))
    for c in (0, 2):
        m = y == c
        assert int(sp.clean[m].sum()) == n_c and int(sp.poisoned[m].sum()) == n_p
        assert int(sp.uncertain[m].sum()) == n - n_c - n_p
        assert score[m & sp.poisoned].min() >= score[m & ~sp.poisoned].max() if n_p else True
        assert score[m & sp.clean].max() <= score[m & ~sp.clean].min()
    assert bool(sp.clean[y == 1].all())
    assert bool((sp.relabels[(y == 0) & sp.poisoned] == 1).all())
    assert bool((sp.relabels[y == 2] == -1).all()) and bool((sp.relabels[~sp.poisoned] == -1).all())
    assert not bool((sp.clean & sp.poisoned).any())


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown option"):
        resolve({"alpha": 0.1})
    with pytest.raises(ValueError, match="retrain"):
        resolve({"retrain": "bogus"})


@pytest.mark.parametrize("mode", ["clean_then_finetune", "original_then_finetune", "clean_plus_relabelled"])
def test_retrain_modes_train_on_the_right_sets(mode, monkeypatch):
    """Table 4 rows: which samples (and labels) each fit call sees; fine-tune uses the paper's recipe."""
    from types import SimpleNamespace

    from bdseal.defenses.gssd import defense as D
    from bdseal.defenses.gssd.split import Split
    from bdseal.train.loop import TrainConfig

    calls = []
    monkeypatch.setattr(D, "fit", lambda model, x, y, cfg, **kw: calls.append((x[:, 0, 0, 0].tolist(), y.tolist(), cfg)))
    n = 6
    view = SimpleNamespace(x=torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2), y=torch.zeros(n, dtype=torch.long))
    sp = Split(clean=torch.tensor([1, 1, 1, 0, 0, 0]).bool(), poisoned=torch.tensor([0, 0, 0, 0, 1, 1]).bool(),
               uncertain=torch.tensor([0, 0, 0, 1, 0, 0]).bool(), relabels=torch.tensor([-1, -1, -1, -1, 3, 5]))
    ctx = SimpleNamespace(train_cfg=TrainConfig(epochs=7, lr=0.1), build_model=lambda: torch.nn.Linear(1, 1), device="cpu", seed=0)
    _, info = D.retrain(view, sp, resolve({"retrain": mode}), ctx)
    first = {"clean_then_finetune": ([0, 1, 2], [0, 0, 0]), "original_then_finetune": (list(range(n)), [0] * n),
             "clean_plus_relabelled": ([0, 1, 2, 4, 5], [0, 0, 0, 3, 5])}[mode]
    assert (calls[0][0], calls[0][1]) == first and calls[0][2].epochs == 7
    if mode == "clean_plus_relabelled":
        assert len(calls) == 1 and info["finetuned_on"] == 0
    else:
        assert (calls[1][0], calls[1][1]) == ([4, 5], [3, 5])
        assert calls[1][2].epochs == 2 and calls[1][2].lr == 1e-4 and info["finetuned_on"] == 2


def test_diverging_flows_raise_instead_of_returning_nan_scores():
    from bdseal.errors import TrainingDivergedError

    x = torch.randn(64, 4)
    with pytest.raises(TrainingDivergedError, match=r"flow\(s\) \[0\].*lr=1e\+12"):
        fit_class_flows(x * 1e6, torch.zeros(64, dtype=torch.long), [0], FlowConfig(hidden=8, epochs=3, batch_size=16, lr=1e12), seed=0)
