"""Metrics: pure functions of predictions, labels and the oracle (never of a defense's internals).

- ACC: fraction of clean test images classified correctly.
- ASR: fraction of triggered test images, whose true class is *not* mapped to itself, classified as
  their attack label (all-to-one: the target; all-to-all: the mapped label y -> (y+1) mod K).
- RA (robust accuracy): fraction of the same triggered test images classified as their *true* class
  (BackdoorBench's RA; ASR + RA <= 1, the rest went to other classes).
- DEM Γ: PGBD Eq. 5-6 (REFERENCE.md: Γ = ½·min(1, CA_D/CA_P) + ½·max(0, (ASR_P − ASR_D)/ASR_P)).
- Detection: TPR/FPR of a boolean flag against ``is_poison`` and AUROC of per-sample suspicion scores;
  for defenses that retrain on a kept subset, the poisons left in it (removal TPR) and the uncertain count.
- Relabel accuracy: of the poisoned samples a defense relabelled, the fraction whose new label is the
  true one.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NOT_LEARNED_ASR = 0.5  # an attack whose undefended ASR is below this was not learned: no defense row on it is evidence


def attack_not_learned(undefended_asr: float) -> bool:
    """Whether the undefended (backdoored) model failed to learn the attack: its ASR is below
    :data:`NOT_LEARNED_ASR` (NaN, i.e. no attack, is never flagged)."""
    return undefended_asr == undefended_asr and undefended_asr < NOT_LEARNED_ASR


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels`` (NaN for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    return float((pred.cpu() == labels.cpu()).float().mean())


def nontarget_accuracy(pred: torch.Tensor, labels: torch.Tensor, target_classes: list[int]) -> float:
    """Clean accuracy over test images whose true class is not an attack target (PGBD's authors' CA,
    REFERENCE.md "PGBD"); NaN when every class is a target (all-to-all). No targets: plain accuracy."""
    keep = ~torch.isin(labels.cpu(), torch.tensor(target_classes, dtype=labels.dtype))
    return accuracy(pred.cpu()[keep], labels.cpu()[keep])


def attack_success_rate(pred_triggered: torch.Tensor, attack_labels: torch.Tensor) -> float:
    """ASR over triggered test images already restricted to those whose true label differs from the
    attack label; ``attack_labels`` is the target (all-to-one) or the mapped label (all-to-all)."""
    return accuracy(pred_triggered, attack_labels)


def robust_accuracy(pred_triggered: torch.Tensor, true_labels: torch.Tensor) -> float:
    """RA: fraction of the triggered test images (the ASR set) classified as their true class."""
    return accuracy(pred_triggered, true_labels)


def dem(ca_poisoned: float, asr_poisoned: float, ca_defended: float, asr_defended: float) -> float:
    """Defense Efficacy Metric Γ (PGBD Eq. 5-6): half clean-accuracy retention (capped at 1), half
    relative ASR reduction (clipped at 0). An undefended model (no change) scores 0.5."""
    ca_term = min(1.0, ca_defended / ca_poisoned) if ca_poisoned > 0 else 1.0
    asr_term = max(0.0, (asr_poisoned - asr_defended) / asr_poisoned) if asr_poisoned > 0 else 0.0
    return 0.5 * ca_term + 0.5 * asr_term


def auroc(scores: torch.Tensor | np.ndarray, positives: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more suspicious) for ``positives``.

    Mann-Whitney U statistic with average ranks for ties; NaN when one class is empty.
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu().double())
    p = np.asarray(torch.as_tensor(positives).detach().cpu().bool())
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks for ties
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def detection_rates(flagged: torch.Tensor, positives: torch.Tensor) -> dict[str, float]:
    """TPR = flagged ∩ poisoned / poisoned; FPR = flagged ∩ clean / clean."""
    f = torch.as_tensor(flagged).cpu().bool()
    p = torch.as_tensor(positives).cpu().bool()
    tp, fp = int((f & p).sum()), int((f & ~p).sum())
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    return {
        "tpr": tp / n_pos if n_pos else float("nan"),
        "fpr": fp / n_neg if n_neg else float("nan"),
        "flagged": int(f.sum()),
        "flagged_poison": tp,
    }


def retention_counts(kept: torch.Tensor, positives: torch.Tensor, flagged: torch.Tensor | None = None) -> dict[str, float]:
    """For defenses that retrain on a filtered set (GSSD's D̂_C = ``kept``): poisons left in it
    (``poison_kept``), removal TPR = 1 − poison_kept / #poisons, the kept-set size, and — given the
    defense's ``flagged`` set — the samples neither kept nor flagged (``uncertain``, GSSD's D̂_U) and the
    poisons among them."""
    k = torch.as_tensor(kept).cpu().bool()
    p = torch.as_tensor(positives).cpu().bool()
    n_pos, left = int(p.sum()), int((k & p).sum())
    out: dict[str, float] = {"kept": int(k.sum()), "poison_kept": left,
                             "removal_tpr": 1 - left / n_pos if n_pos else float("nan")}
    if flagged is not None:
        u = ~k & ~torch.as_tensor(flagged).cpu().bool()
        out.update(uncertain=int(u.sum()), uncertain_poison=int((u & p).sum()))
    return out


def detection_metrics(
    positives: torch.Tensor, scores: torch.Tensor | None = None, flagged: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> dict[str, float]:
    """TPR/FPR of ``flagged`` (when given), AUROC of ``scores`` (when given) and the
    :func:`retention_counts` of ``kept`` (when given)."""
    out: dict[str, float] = {}
    if flagged is not None:
        out.update(detection_rates(flagged, positives))
    if scores is not None:
        out["auroc"] = auroc(scores, positives)
    if kept is not None:
        out.update(retention_counts(kept, positives, flagged))
    return out


def relabel_accuracy(relabels: torch.Tensor, true_labels: torch.Tensor, is_poison: torch.Tensor) -> dict[str, float]:
    """``relabels``: (N,) new label per training sample, −1 where the defense did not relabel.

    Returns the accuracy of new labels on poisoned samples that were relabelled (``relabel_acc``), the
    fraction of poisoned samples relabelled (``relabel_coverage``) and the accuracy of new labels on all
    relabelled samples (``relabel_acc_all``).
    """
    r = torch.as_tensor(relabels).cpu()
    t = torch.as_tensor(true_labels).cpu()
    p = torch.as_tensor(is_poison).cpu().bool()
    done = r >= 0
    pd_ = done & p
    return {
        "relabel_acc": float((r[pd_] == t[pd_]).float().mean()) if pd_.any() else float("nan"),
        "relabel_coverage": float(pd_.sum() / p.sum()) if p.any() else float("nan"),
        "relabel_acc_all": float((r[done] == t[done]).float().mean()) if done.any() else float("nan"),
    }


def relabel_history_metrics(history: list[tuple[int, torch.Tensor]], observed: torch.Tensor, true_labels: torch.Tensor,
                            is_poison: torch.Tensor) -> list[dict[str, float]]:
    """Per relabelling round (VIBE's E-steps): over the samples given a label, agreement with the
    observed and with the true labels; over the poisoned samples, the fraction relabelled (label ≠ observed)
    and the fraction given their true label. Oracle side only: defenses never call this."""
    y, t, p = (torch.as_tensor(a).cpu() for a in (observed, true_labels, is_poison))
    p = p.bool()
    mean = lambda m: float(m.double().mean()) if m.numel() else float("nan")  # noqa: E731
    rows = []
    for step, labels in history:
        lab = torch.as_tensor(labels).cpu().long()
        done = lab >= 0
        pd_ = done & p
        rows.append({"step": int(step), "agree_observed": mean(lab[done] == y[done]), "agree_true": mean(lab[done] == t[done]),
                     "poison_relabelled": mean(lab[pd_] != y[pd_]), "poison_to_true": mean(lab[pd_] == t[pd_])})
    return rows


def round_float(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits: float32 artefacts go (0.10000000149 -> 0.1) while
    accuracies on 10^6 test images keep their last digit."""
    return float(f"{value:.{digits}g}")


def clean_json(value: object, digits: int | None = 6) -> object:
    """Replace NaN/inf by None recursively so metrics.json is strict JSON; round other floats to ``digits``
    significant digits (None: keep them as they are)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round_float(value, digits) if digits else value
    if isinstance(value, dict):
        return {k: clean_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v, digits) for v in value]
    return value
