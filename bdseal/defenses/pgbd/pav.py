"""Prototypes, Prototype Activation Vectors (PAV) and the sanitisation loss of PGBD.

Sources (seed ``pgbd_paper.txt`` Sec. 4.1–4.2 and REFERENCE.md "PGBD", which wins where they differ):

- Activations are taken at ``layer`` of a :class:`~bdseal.models.base.StagedClassifier`. REFERENCE: the
  authors hook PreAct-RN18 ``layer4.1.conv2``, but the block adds its shortcut **in place** on that tensor,
  so the activation they use is the **block output after the residual add** (:func:`block_output_name`);
  **flattened** (``space="pool"`` is offered).
- Prototypes (REFERENCE): per class, k-means with k = 3 centres on D_S activations, P_c = mean of the
  centres (:func:`bdseal.prototypes.kmeans_prototypes`).
- PAV (Eq. 1): V_c = P_t − P_c; with a per-class target map t(c) (all-to-all) V_c = P_{t(c)} − P_c.
- L_p (REFERENCE): Σ over the class's centres of MSE(a, centre) (Eq. 2 uses the single prototype; since
  Σ_j ∇_a MSE(a, c_j) ∝ k·(a − mean_j c_j) = k·(a − P_c) both give the same gradient direction).
- L_s (REFERENCE; not a signed mean): Σ over the batch of |cos(∇_a L_p, V_y)| where the
  gradient is taken **w.r.t. the activation a** with ``create_graph=True`` so that L_s trains the
  network; samples whose class is its own target (V = 0) contribute nothing.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from bdseal.errors import ConfigError
from bdseal.data import to_float
from bdseal.prototypes import kmeans_prototypes
from bdseal.train.loop import batched_eval

Space = Literal["flatten", "pool"]
SPACES: tuple[str, ...] = get_args(Space)


def block_output_name(model: nn.Module) -> str:
    """Dotted path of the last residual block of the last stage (``stages.layer4.1`` for the ResNets), whose
    output is the tensor PGBD's authors use (REFERENCE). A stage whose direct children include bare convs (no
    blocks, e.g. the small nets) is its own block: its name is returned. A wrapped user model
    (:class:`bdseal.models.wrap.WrappedClassifier`) names its own."""
    if hasattr(model, "block_output_name"):
        return model.block_output_name()
    last = model.layer_names[-1]
    stage = model.stages[last]
    children = list(stage.named_children())
    if any(isinstance(m, nn.Conv2d) for _, m in children) or not children:
        return last
    blocks = [n for n, m in children if any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: stage {last!r} has no convolution")
    return f"stages.{last}.{blocks[-1]}"


def resolve_layer(model: nn.Module, layer: str | None) -> str:
    """``block_output`` (default) → :func:`block_output_name`; ``last_conv`` → the raw output of the last
    Conv2d (before any residual add); anything else is a stage name or dotted submodule path."""
    if layer in (None, "block_output"):
        return block_output_name(model)
    if layer == "last_conv":
        return model.last_conv_name()
    return layer


def to_space(a: torch.Tensor, space: Space) -> torch.Tensor:
    """Activation (B, C, H, W) or (B, D) → the vector space the prototypes live in (B, D)."""
    if space == "flatten" or a.ndim == 2:
        return a.flatten(1)
    if space == "pool":
        return a.mean(dim=(2, 3))
    raise ConfigError(f"unknown activation space {space!r}; use one of {SPACES}")


@torch.no_grad()
def layer_activations(model: nn.Module, x: torch.Tensor, layer: str, *, device: torch.device | str = "cpu",
                      batch_size: int = 256) -> torch.Tensor:
    """Raw activations of stage ``layer`` for uint8 or float [0, 1] images, eval mode, on CPU (N, ...)."""
    return batched_eval(lambda xb: model.forward_with(xb, [layer])[1][layer], model, x, device=device,
                        batch_size=batch_size, amp=False)


def class_prototypes(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 3,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class k-means centres (K, k', D) and prototypes P (K, D) = mean of the centres.

    k' = min(k, smallest class count) so that tiny clean subsets still work (REFERENCE: k = 3)."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ConfigError(f"PGBD prototypes: the clean subset has no sample of classes {missing}")
    k_eff = int(min(k, int(counts.min())))
    return kmeans_prototypes(feats.flatten(1), labels, num_classes, k=k_eff, seed=seed)


def target_map(num_classes: int, target: int | torch.Tensor) -> torch.Tensor:
    """(K,) long: the target class t(c) of every class (an int gives all-to-one)."""
    if isinstance(target, torch.Tensor):
        t = target.long().flatten()
        if t.numel() != num_classes:
            raise ValueError(f"target map has {t.numel()} entries for {num_classes} classes")
        return t
    if not 0 <= int(target) < num_classes:
        raise ConfigError(f"target {target} outside [0, {num_classes})")
    return torch.full((num_classes,), int(target), dtype=torch.long)


def pav(protos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 1: V_c = P_{t(c)} − P_c, (K, D); zero rows where t(c) = c."""
    return protos[targets.to(protos.device)] - protos


def sanitisation_terms(feat: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, V: torch.Tensor,
                       active: torch.Tensor) -> torch.Tensor:
    """Per-sample |cos(∇_f L_p, V_y)| (B,), zero for inactive classes, differentiable (create_graph).

    ``feat`` (B, D) must be part of the autograd graph of the model's parameters (or require grad).
    L_p = Σ_j MSE(f, c_{y,j}) over the class's centres ``centres`` (K, k, D) (REFERENCE)."""
    feat32 = feat.float()
    c = centres.to(feat32.device, feat32.dtype)[y]  # (B, k, D)
    lp = (feat32[:, None, :] - c).pow(2).mean(dim=2).sum()  # Σ_i Σ_j MSE_i,j; per-sample grads are separable
    (grad,) = torch.autograd.grad(lp, feat32, create_graph=True)
    v = V.to(grad.device, grad.dtype)[y]
    cos = F.cosine_similarity(grad, v, dim=1, eps=1e-12)
    return cos.abs() * active.to(grad.device)[y].to(grad.dtype)


def sanitisation_loss(feat: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, V: torch.Tensor,
                      active: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as in REFERENCE: L_s = Σ_batch |cos(∇_f L_p, V_y)| (target-class samples give 0)."""
    return sanitisation_terms(feat, y, centres, V, active).sum()


def _param_grad_norm(loss: torch.Tensor, params: list[nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(((g.float() ** 2).sum() for g in grads if g is not None), torch.tensor(0.0))))


def gradient_pull(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str, space: Space, centres: torch.Tensor,
                  V: torch.Tensor, active: torch.Tensor, lam: float, batch_size: int,
                  device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Per batch of ``batch_size`` (last partial batch dropped): the parameter-gradient norms of CE and of λ·L_s
    (Eq. 4's two terms) at the model's current weights, without a step — how hard the sanitisation term pulls
    compared with the task loss (docs/pgbd.md, "Why it collapses"). ``x`` uint8 or float [0, 1] images."""
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, list[float]] = {"ce": [], "lam_ls": []}
    for i in range(0, len(y) - batch_size + 1, batch_size):
        xb = to_float(x[i:i + batch_size].to(device))
        yb = y[i:i + batch_size].to(device)
        logits, acts = model.forward_with(xb, [layer])
        terms = sanitisation_terms(to_space(acts[layer], space), yb, centres, V, active)
        out["ce"].append(_param_grad_norm(F.cross_entropy(logits.float(), yb), params))
        out["lam_ls"].append(_param_grad_norm(lam * terms.sum(), params))
    return out
