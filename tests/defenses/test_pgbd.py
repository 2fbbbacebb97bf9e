"""Unit tests of PGBD's pieces: prototypes, PAVs, the sanitisation loss, NT schedule, mapping, Grad-CAM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.defenses.pgbd import mapping as mp
from bdseal.defenses.pgbd.defense import nt_schedule
from bdseal.defenses.pgbd.gradcam import gradcam, save_gradcam_figure
from bdseal.defenses.pgbd.pav import (class_prototypes, gradient_pull, pav, sanitisation_loss, sanitisation_terms, target_map,
                                      to_space)
from bdseal.models import build_model
from bdseal.prototypes import kmeans


def _tiny_model(k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model("small", k, in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.25] * 3, widths=(8, 8, 8))


def test_sanitisation_loss_matches_closed_form_single_centre():
    """One centre per class: |cos(∇_f L_p, V)| = |cos(2(f − P_c), V)| (Eq. 2–3)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    centres = torch.randn(3, 1, 7, generator=g)
    protos = centres.mean(1)
    V = pav(protos, target_map(3, 2))
    active = torch.tensor([True, True, False])
    terms = sanitisation_terms(f, y, centres, V, active)
    expected = F.cosine_similarity(2 * (f - protos[y]), V[y], dim=1).abs() * active[y].float()
    assert torch.allclose(terms, expected, atol=1e-5)
    assert torch.allclose(sanitisation_loss(f, y, centres, V, active), expected.sum(), atol=1e-5)
    assert terms[2] == 0  # the target class's sample contributes nothing


def test_multi_centre_gradient_points_to_the_prototype():
    """Σ_j ∇ MSE(f, c_j) ∝ f − mean_j c_j, so k centres give the cosine against P_c = mean of centres."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(4, 6, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    centres = torch.randn(2, 3, 6, generator=g)
    V = pav(centres.mean(1), target_map(2, 1))
    terms = sanitisation_terms(f, y, centres, V, torch.tensor([True, False]))
    expected = F.cosine_similarity(f - centres.mean(1)[y], V[y], dim=1).abs() * (y == 0).float()
    assert torch.allclose(terms, expected, atol=1e-5)


def test_sanitisation_loss_trains_the_network():
    """L_s computed through the model's activation has non-zero gradients w.r.t. its parameters."""
    model = _tiny_model().eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    layer = model.layer_names[-1]
    _, acts = model.forward_with(x, [layer])
    feat = to_space(acts[layer], "flatten")
    centres, protos = class_prototypes(feat.detach(), y, 3, k=2)
    V = pav(protos, target_map(3, 0))
    ls = sanitisation_loss(feat, y, centres, V, torch.tensor([False, True, True]))
    ls.backward()
    grads = [p.grad for p in model.stages[layer].parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_target_class_samples_give_no_gradient():
    f = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([1, 1, 1])
    centres = torch.randn(2, 1, 4)
    V = pav(centres.mean(1), target_map(2, 1))
    ls = sanitisation_loss(f, y, centres, V, V.norm(dim=1) > 0)
    assert float(ls.detach()) == 0.0
    ls.backward()
    assert f.grad is None or float(f.grad.abs().sum()) == 0.0


def test_prototypes_are_means_of_kmeans_centres():
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(12, 5, generator=g) + 4 * c for c in range(3)])
    labels = torch.arange(3).repeat_interleave(12)
    centres, protos = class_prototypes(feats, labels, 3, k=3, seed=7)
    assert centres.shape == (3, 3, 5) and protos.shape == (3, 5)
    for c in range(3):
        ref = kmeans(feats[labels == c], 3, seed=7 + c)
        assert torch.allclose(centres[c], ref)
        assert torch.allclose(protos[c], ref.mean(0))
    # a class with fewer samples than k: k shrinks to the smallest class count
    c2, _ = class_prototypes(feats[:14], torch.tensor([0] * 12 + [1, 1]), 2, k=3)
    assert c2.shape[1] == 2


def test_pav_is_target_minus_class_prototype():
    P = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    V = pav(P, target_map(3, 2))
    assert torch.equal(V, torch.tensor([[0.0, 2.0], [-1.0, 2.0], [0.0, 0.0]]))
    V2 = pav(P, target_map(3, torch.tensor([1, 2, 0])))  # all-to-all map
    assert torch.equal(V2[2], P[0] - P[2])


def test_nt_target_cycling_schedule():
    assert nt_schedule(5, list(range(3))) == [0, 1, 2, 0, 1]
    assert nt_schedule(7, list(range(10)), every=3, t0=2) == [2, 2, 2, 3, 3, 3, 4]
    assert nt_schedule(4, [7, 4], every=1) == [7, 4, 7, 4]


class _ConvTeacher(nn.Module):
    """A tiny frozen 'foundation' teacher: (B, 3, H, W) -> (B, 24, H/4, W/4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Conv2d(3, 24, 4, stride=4), nn.GELU())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_mapping_reconstruction_loss_decreases_and_pav_shape():
    model = _tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(40, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    y = torch.arange(4).repeat(10)
    t = mp.pca_reduce(mp.teacher_features(_ConvTeacher(), x, torch.device("cpu")), channels=16)
    assert t.shape == (40, 16, 4, 4)
    s = model.forward_with(x.float() / 255, [model.layer_names[-1]])[1][model.layer_names[-1]].detach()
    res = mp.fit_mapping(t, s, epochs=30, lr=1e-2, batch_size=8)
    assert res.losses[-1] < 0.7 * res.losses[0]
    P = s.flatten(1)[:4]
    V = res.mapping.pav(P, P[[1, 2, 3, 0]], tuple(s.shape[1:]))
    assert V.shape == P.shape and torch.isfinite(V).all()
    idx = mp.balanced_indices(y, 8)
    assert torch.bincount(y[idx]).tolist() == [2, 2, 2, 2]


def test_gradcam_maps_and_figure(tmp_path):
    model = _tiny_model()
    x = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    cam = gradcam(model, x, class_idx=1)
    assert cam.shape == (3, 16, 16) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    path = save_gradcam_figure({"M_B": model, "M_C": _tiny_model()}, x, tmp_path / "cam.png")
    assert path.exists() and path.stat().st_size > 1000


def test_gradient_pull_measures_both_terms_of_eq4():
    """gradient_pull: per batch ‖∇CE‖ and ‖∇λ·L_s‖ (params); λ scales the second linearly, the first not at all,
    and a batch of target-class samples only has no sanitisation pull."""
    model = _tiny_model().eval()
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0, 0, 0, 0])
    layer = model.layer_names[-1]
    _, acts = model.forward_with(x, [layer])
    centres, protos = class_prototypes(to_space(acts[layer], "flatten").detach(), y, 3, k=1)
    V, active = pav(protos, target_map(3, 0)), torch.tensor([False, True, True])
    one = gradient_pull(model, x, y, layer, "flatten", centres, V, active, lam=1.0, batch_size=4)
    ten = gradient_pull(model, x, y, layer, "flatten", centres, V, active, lam=10.0, batch_size=4)
    assert len(one["ce"]) == 2 and one["ce"] == ten["ce"] and min(one["ce"]) > 0
    assert one["lam_ls"][0] > 0 and abs(ten["lam_ls"][0] - 10 * one["lam_ls"][0]) < 1e-4 * ten["lam_ls"][0]
    assert one["lam_ls"][1] == 0.0  # second batch: all class 0 = the target, L_s is constant
    model.zero_grad()
    logits, acts = model.forward_with(x[:4], [layer])
    sanitisation_loss(to_space(acts[layer], "flatten"), y[:4], centres, V, active).backward()
    manual = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
    assert abs(float(manual) - one["lam_ls"][0]) < 1e-4 * float(manual)
