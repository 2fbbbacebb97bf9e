"""Unit tests of PGRL's pieces: LCV pseudo-labels, voting, Eq. 3 weights, the WCE loss, densities."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdseal.defenses.pgrl import (
    PGRLConfig, SphereClassifier, fresh_weights, gaussian_max_log_density, lcv_plans, lcv_pseudo_labels,
    normalize_weights, plot_per_epoch, plot_weight_distribution, steps_per_epoch, umap_reduce,
    vote_labels, wce_log_density, wce_loss,
)
from bdseal.models import build_model


def _half_circle(n: int = 230, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    return torch.stack([theta.cos(), theta.sin()], 1)


def test_fig7_toy_lcv_balances_where_cosine_argmax_collapses():
    """Seed App. E, Fig. 7: 230 points on the upper half circle, two prototypes. The seed's text lost
    the prototype coordinates; with '0' at the top (0, 1) and '1' at the bottom (0, −1) plain cosine
    argmax puts *every* point on '0' (Fig. 7a). LCV with its real settings (ε = 0.05, 3 SwAV
    iterations) splits them far more evenly (Fig. 7b)."""
    pts = _half_circle()
    cos = pts @ torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64).T
    assert torch.bincount(cos.argmax(1), minlength=2).tolist() == [230, 0]
    labels, mean_plan = lcv_pseudo_labels(cos[None], epsilon=0.05, iterations=3)
    counts = torch.bincount(labels, minlength=2)
    assert int(counts.min()) >= 0.35 * 230, counts
    assert torch.allclose(mean_plan.sum(1), torch.ones(230), atol=1e-5)
    # the points sent to '1' are those least similar to '0' (the two ends of the arc)
    assert cos[labels == 1, 0].max() < cos[labels == 0, 0].min()


def _swav_reference(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn written out plainly (classes first, then samples)."""
    q = torch.exp(scores / eps).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).T


@pytest.mark.parametrize("iters", [1, 3])
def test_lcv_plans_match_swav_sinkhorn(iters):
    g = torch.Generator().manual_seed(1)
    s = F.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=1) @ \
        F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1).T
    plans = lcv_plans(s[None], 0.05, iters)
    assert plans.shape == (1, 40, 5)
    assert torch.allclose(plans[0].double(), _swav_reference(s, 0.05, iters), atol=1e-6)


def test_observed_marginal_shifts_assignment():
    pts = _half_circle()
    cos = pts @ torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64).T
    uni = torch.bincount(lcv_pseudo_labels(cos[None])[0], minlength=2)
    skew = torch.bincount(lcv_pseudo_labels(cos[None], col_marginal=torch.tensor([0.9, 0.1]))[0], minlength=2)
    assert skew[0] > uni[0]


def test_majority_voting_and_average():
    # 3 views, 2 samples, 3 classes. Sample 0: views vote 1, 1, 2 but view 2 is very confident in 2.
    plans = torch.tensor([
        [[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]],
        [[0.1, 0.5, 0.4], [0.2, 0.7, 0.1]],
        [[0.0, 0.01, 0.99], [0.3, 0.6, 0.1]],
    ])
    assert vote_labels(plans, "majority").tolist() == [1, 1]
    assert vote_labels(plans, "average").tolist() == [2, 1]  # mean of sample 0: [.07, .34, .60]
    # a 1-1-1 tie goes to the class with the larger averaged plan
    tie = torch.tensor([[[0.9, 0.1, 0.0]], [[0.0, 0.6, 0.4]], [[0.4, 0.05, 0.55]]])  # mean [.43, .25, .32]
    assert vote_labels(tie, "majority").tolist() == [0]
    with pytest.raises(ValueError):
        vote_labels(plans, "plurality")


def test_weight_normalisation_top_tau_at_one_rest_in_range():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(1000, generator=g, dtype=torch.float64)
    w = normalize_weights(d, tau=0.9)
    assert w.min() == pytest.approx(-1.0) and w.max() == pytest.approx(1.0)
    assert ((w >= -1 - 1e-6) & (w <= 1 + 1e-6)).all()
    top = d > torch.sort(d, descending=True).values[900]
    assert int(top.sum()) == 900 and torch.all(w[top] == 1.0)
    rest = ~top  # min-max rescaled, order preserved
    order = torch.argsort(d[rest])
    assert torch.all(torch.diff(w[rest][order]) >= 0)
    assert w[rest][order][0] == pytest.approx(-1.0) and w[rest][order][-1] == pytest.approx(1.0)
    lo, hi = d[rest].min(), d[rest].max()
    assert torch.allclose(w[rest].double(), 2 * (d[rest] - lo) / (hi - lo) - 1, atol=1e-6)
    # τ = 0: every sample in the rescaled part
    w0 = normalize_weights(d, tau=0.0)
    assert int((w0 == 1.0).sum()) == 1
    with pytest.raises(ValueError):
        normalize_weights(d, tau=1.5)


def test_fresh_weights_from_log_density_scale_invariant():
    logd = torch.tensor([-1.0, -2.0, -50.0, -1000.0, -3.0] * 4, dtype=torch.float64)
    w1, w2 = fresh_weights(logd, 0.5), fresh_weights(logd + 400.0, 0.5)
    assert torch.allclose(w1, w2)
    assert torch.all(w1[logd == -1000.0] == -1.0)


def test_wce_loss_matches_hand_computation_with_stopping_term():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.5]])
    labels = torch.tensor([0, 1, 0, 0])
    w = torch.tensor([1.0, -0.5, -1.0, 0.3])
    # sample 1: w<0 and predicted 0 != 1 -> already forgotten -> w̃ = 0
    # sample 2: w<0, predicted 1 != 0 -> misclassified -> w̃ = 0
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(3.0)),
          math.log(1 + math.exp(-0.5))]
    expected = 1.0 * ce[0] + 0.0 * ce[1] + 0.0 * ce[2] + 0.3 * ce[3]
    assert float(wce_loss(logits, labels, w)) == pytest.approx(expected, rel=1e-5)
    # a negative weight on a still-correct view is kept (unlearning continues)
    w2 = torch.tensor([-0.5, 1.0, 1.0, 1.0])
    exp2 = -0.5 * ce[0] + ce[1] + ce[2] + ce[3]
    assert float(wce_loss(logits, labels, w2)) == pytest.approx(exp2, rel=1e-5)
    assert float(wce_loss(logits, labels, w2, "mean")) == pytest.approx(exp2 / 4, rel=1e-5)


def test_wce_loss_bounded_below_under_unlearning():
    """Gradient descent on a single negative-weight sample stops once it is misclassified."""
    logits = torch.tensor([[1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    for _ in range(200):
        loss = wce_loss(logits, y, torch.tensor([-1.0]))
        if loss.requires_grad and loss.grad_fn is not None:
            logits.grad = None
            loss.backward()
            with torch.no_grad():
                logits -= 0.5 * logits.grad
    assert logits.argmax(1).item() == 1 and float(wce_loss(logits, y, torch.tensor([-1.0])).detach()) == 0.0
    assert logits.abs().max() < 5.0


def test_gaussian_density_is_max_over_anchors_in_log_space():
    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    anchors = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    ld = gaussian_max_log_density(pts, anchors)
    ref = [max(-0.5 * float(((p - a) ** 2).sum()) - math.log(2 * math.pi) for a in anchors) for p in pts]
    assert torch.allclose(ld, torch.tensor(ref, dtype=torch.float64))


def test_umap_density_separates_far_cluster():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(10, 16, generator=g)
    near = clean.repeat(4, 1) + 0.1 * torch.randn(40, 16, generator=g)
    far = torch.randn(8, 16, generator=g) + 8.0
    feats, labels = torch.cat([near, far]), torch.zeros(48, dtype=torch.long)
    logd = wce_log_density(feats, labels, clean, torch.zeros(10, dtype=torch.long), 1, dim=4, n_neighbors=8, seed=0,
                           n_epochs=60)
    assert logd[40:].max() < logd[:40].min()
    w = fresh_weights(logd, 0.8)
    assert torch.all(w[40:] < w[:40].min() + 1e-6)
    # tiny sets skip UMAP
    assert umap_reduce(np.zeros((5, 3), dtype=np.float32), dim=10).shape == (5, 3)


def test_sphere_classifier_shapes_and_norm():
    backbone = build_model("small_half", 10, in_channels=3, image_size=32)
    m = SphereClassifier(backbone, 10, hidden_dim=32, sphere_dim=16)
    x = torch.rand(4, 3, 32, 32)
    z, logits = m.embed(x)
    assert z.shape == (4, 16) and logits.shape == (4, 10)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert (m.features(x) >= 0).all()
    assert torch.equal(m(x), logits)


def test_config_validation():
    assert PGRLConfig.from_dict({"name": "pgrl", "clean_per_class": 3}).clean_per_class == 3
    with pytest.raises(ValueError, match="unknown PGRL option"):
        PGRLConfig.from_dict({"sphere_dims": 4})
    with pytest.raises(ValueError):
        PGRLConfig.from_dict({"marginal": "zipf"})


def test_plot_weight_distribution(tmp_path):
    w = torch.linspace(-1, 1, 50)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[:5] = True
    p = plot_weight_distribution(w, mask, path=tmp_path / "w.png")
    assert p.exists() and p.stat().st_size > 1000
    assert plot_weight_distribution(w, path=tmp_path / "w2.png").exists()


def test_lcv_plans_batched_over_views_equal_per_view_swav():
    """All views solved in one batched call = SwAV's loop run on each view separately."""
    g = torch.Generator().manual_seed(3)
    protos = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1)
    s = torch.stack([F.normalize(torch.randn(30, 8, generator=g, dtype=torch.float64), dim=1) @ protos.T for _ in range(5)])
    plans = lcv_plans(s, 0.05, 3)
    assert plans.shape == (5, 30, 4) and plans.dtype == torch.float32
    for v in range(5):
        assert torch.allclose(plans[v].double(), _swav_reference(s[v], 0.05, 3), atol=1e-5)


def test_schedule_in_steps_overrides_epochs():
    c = PGRLConfig.from_dict({})
    assert c.schedule_steps(260) == (1300, 2600, 1300)  # the paper's 5 / 10 / 5 epochs at 260 steps per epoch
    c2 = PGRLConfig.from_dict({"warmup_steps": 400, "weight_start_step": 900, "weight_every_steps": 250})
    assert c2.schedule_steps(10) == (400, 900, 250)
    assert steps_per_epoch(47_400, 192) == 247 and steps_per_epoch(100, 192) == 1
    assert steps_per_epoch(500, 192, drop_last=True) == 2
    with pytest.raises(ValueError, match="dv_augment"):
        PGRLConfig.from_dict({"dv_augment": "mixed"})


def test_sphere_classifier_authors_resolution_and_grid_feature():
    """input_size 64 + feature_grid 2: 32x32 images are resized and the last map is pooled to 2x2, so the
    projector's input is 4x the backbone's feature_dim (ResNet-18: 2048)."""
    backbone = build_model("small_half", 10, in_channels=3, image_size=32)
    m = SphereClassifier(backbone, 10, hidden_dim=32, sphere_dim=16, input_size=64, feature_grid=2)
    assert m.feature_dim == 4 * backbone.feature_dim and m.projector[0].in_features == m.feature_dim
    x = torch.rand(3, 3, 32, 32)
    assert m.resize(x).shape == (3, 3, 64, 64)
    h, z, logits = m.embed_all(x)
    assert h.shape == (3, m.feature_dim) and logits.shape == (3, 10)
    assert torch.allclose(m(x), m(m.resize(x)), atol=1e-5)  # resizing is idempotent at the target size


def test_per_epoch_oracle_stats_and_plot(tmp_path):
    from bdseal.experiment.figures import per_epoch_oracle_stats  # experiment layer: it reads the oracle

    poison = torch.tensor([True, False, False, False, True, False])
    hist = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    rows = per_epoch_oracle_stats({"trusted_history": hist, "history_epochs": torch.tensor([2, 3])}, poison)
    assert rows[0] == {"epoch": 2, "trusted": 3, "trusted_clean_frac": pytest.approx(2 / 3), "poison_trusted": 1}
    assert rows[1]["trusted"] == 4 and rows[1]["trusted_clean_frac"] == 1.0 and rows[1]["poison_trusted"] == 0
    assert per_epoch_oracle_stats({"trusted_history": torch.zeros(0, 6, dtype=torch.bool)}, poison) == []
    rows[0].update(clean_acc=0.5, asr=0.9)
    p = plot_per_epoch(rows, 6, tmp_path / "e.png")
    assert p.exists() and p.stat().st_size > 1000


def _trainer(**cfg):
    from bdseal.data.dataset import ImageDataset
    from bdseal.defenses.base import DefenderView, RunContext
    from bdseal.defenses.pgrl import PGRLTrainer
    from bdseal.train.loop import TrainConfig

    g = torch.Generator().manual_seed(0)
    train = ImageDataset(torch.randint(0, 256, (8, 3, 16, 16), generator=g, dtype=torch.uint8), torch.tensor([0, 1] * 4),
                         ["a", "b"])
    clean = ImageDataset(torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]),
                         ["a", "b"])
    backbone = build_model("small_half", 2, in_channels=3, image_size=16, widths=(8, 16, 16))
    model = SphereClassifier(backbone, 2, hidden_dim=8, sphere_dim=4)
    ctx = RunContext(device=torch.device("cpu"), seed=0, build_model=lambda **k: backbone, train_cfg=TrainConfig(), cache=None)
    pc = PGRLConfig.from_dict({"n_weak": 1, "n_strong": 1, "dv_augment": "none", "weak_augment": "none",
                               "strong_augment": "none", "weak_augment_args": {}, "strong_augment_args": {}, "lcv": False, **cfg})
    return PGRLTrainer(model.eval(), DefenderView(train=train, clean=clean), pc, ctx, steps_per_epoch=2), model, train, clean


def test_loss_counts_dv_once_in_warmup_and_dv_copies_times_after():
    """Without augmentation the loss is a hand-computable sum: warm-up = Σ CE(D_v); after warm-up
    = dv_copies·Σ CE(D_v) + Σ over views of w·CE (LCV off: all trusted), weights 1."""
    from bdseal.train.loop import Batch

    tr, model, train, clean = _trainer(warmup_steps=1, dv_copies=2)
    batch = Batch(train.x.float() / 255, train.y, torch.arange(8), None, train.x)
    with torch.no_grad():
        ce_v = F.cross_entropy(model(clean.x.float() / 255), clean.y, reduction="sum")
        ce_b = F.cross_entropy(model(train.x.float() / 255), train.y, reduction="sum")
        assert tr.in_warmup
        assert float(tr.loss(model, batch)) == pytest.approx(float(ce_v), rel=1e-4)
        tr.step = 1  # past warm-up
        assert float(tr.loss(model, batch)) == pytest.approx(float(2 * ce_v + 2 * ce_b), rel=1e-4)  # 2 views
    assert tr.seen.all() and tr.feat_buf.shape == (8, model.feature_dim) and tr.dv_feat.shape == (4, model.feature_dim)
