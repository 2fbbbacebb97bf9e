import math

import pytest
import torch

from bdseal import metrics as M


def test_accuracy_and_asr_hand_case():
    assert M.accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75
    # 3 triggered non-target images, two classified as the target 0
    assert M.attack_success_rate(torch.tensor([0, 0, 3]), torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)
    assert math.isnan(M.accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)))


def test_dem_matches_pgbd_definition():
    assert M.dem(0.9, 1.0, 0.9, 0.0) == 1.0  # perfect defense
    assert M.dem(0.9, 0.95, 0.9, 0.95) == 0.5  # no change
    assert M.dem(0.9, 0.5, 0.95, 0.9) == 0.5  # ASR went up: clipped at 0; CA gain capped at 1
    assert M.dem(0.8, 1.0, 0.4, 0.5) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    # a row of PGBD Table 2 style: CA_P .9 ASR_P .95 -> CA_D .88 ASR_D .01
    assert M.dem(0.9, 0.95, 0.88, 0.01) == pytest.approx(0.5 * 0.88 / 0.9 + 0.5 * 0.94 / 0.95)


def test_auroc_hand_cases():
    pos = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert M.auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), pos) == 1.0
    assert M.auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), pos) == 0.0
    assert M.auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), pos) == 0.5  # ties count half
    assert M.auroc(torch.tensor([0.9, 0.3, 0.5, 0.1]), pos) == 0.75
    assert math.isnan(M.auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))


def test_detection_rates():
    flagged = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    pos = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    r = M.detection_rates(flagged, pos)
    assert r["tpr"] == 0.5 and r["fpr"] == pytest.approx(1 / 3) and r["flagged"] == 2 and r["flagged_poison"] == 1


def test_retention_counts_split_the_poisons_into_kept_flagged_uncertain():
    """6 samples, poisons at 0, 1, 2: flagged {0, 3}, kept {2, 4}, so uncertain {1, 5}: one poison in each part."""
    pos = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    flagged = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    kept = torch.tensor([0, 0, 1, 0, 1, 0], dtype=torch.bool)
    r = M.detection_metrics(pos, flagged=flagged, kept=kept)
    assert (r["flagged_poison"], r["poison_kept"], r["uncertain"], r["uncertain_poison"], r["kept"]) == (1, 1, 2, 1, 2)
    assert r["removal_tpr"] == pytest.approx(2 / 3)
    assert "uncertain" not in M.retention_counts(kept, pos) and math.isnan(M.retention_counts(kept, pos * False)["removal_tpr"])


def test_relabel_accuracy():
    relabels = torch.tensor([3, -1, 2, 5, -1])
    true = torch.tensor([3, 1, 1, 5, 4])
    poison = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool)
    r = M.relabel_accuracy(relabels, true, poison)
    assert r["relabel_acc"] == 0.5  # poisoned & relabelled: idx 0 (right), 2 (wrong)
    assert r["relabel_coverage"] == pytest.approx(2 / 3)
    assert r["relabel_acc_all"] == pytest.approx(2 / 3)


def test_clean_json_replaces_nan():
    assert M.clean_json({"a": float("nan"), "b": [1.0, float("inf")]}) == {"a": None, "b": [1.0, None]}


def test_relabel_history_metrics_hand_case():
    observed = torch.tensor([0, 0, 1, 1, 2])
    true = torch.tensor([0, 2, 1, 0, 2])
    poison = torch.tensor([False, True, False, True, False])
    history = [(0, torch.tensor([0, 0, 1, 1, -1])), (7, torch.tensor([0, 2, 1, 1, 2]))]
    rows = M.relabel_history_metrics(history, observed, true, poison)
    assert rows[0] == {"step": 0, "agree_observed": 1.0, "agree_true": 0.5, "poison_relabelled": 0.0, "poison_to_true": 0.0}
    assert rows[1]["agree_observed"] == 0.8 and rows[1]["agree_true"] == 0.8
    assert rows[1]["poison_relabelled"] == 0.5 and rows[1]["poison_to_true"] == 0.5


def test_robust_accuracy_hand_case():
    pred = torch.tensor([0, 0, 2, 3, 1])
    true = torch.tensor([1, 2, 2, 3, 4])  # triggered images' true classes; target 0
    assert M.robust_accuracy(pred, true) == pytest.approx(0.4)
    assert M.attack_success_rate(pred, torch.zeros(5, dtype=torch.long)) == pytest.approx(0.4)


def test_clean_json_rounds_to_six_significant_digits():
    f32 = float(torch.tensor(0.1, dtype=torch.float32))  # 0.10000000149011612
    out = M.clean_json({"rate": f32, "acc": 2 / 3, "big": 123456789.0, "n": 7, "ok": True, "l": [f32]})
    assert out == {"rate": 0.1, "acc": 0.666667, "big": 123457000.0, "n": 7, "ok": True, "l": [0.1]}
    assert M.clean_json(2 / 3, digits=None) == 2 / 3
