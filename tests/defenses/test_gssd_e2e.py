"""GSSD end to end through the experiment runner (digits + BadNets)."""

from __future__ import annotations

import pytest
import torch

from bdseal.experiment.config import compose_config
from bdseal.experiment.run import run_experiment
from bdseal.io import load_tree
from tests.helpers import assert_oracle_blind

FAST = ["defense=gssd", "dataset.train_per_class=30", "train.epochs=2", "baseline=false",
        "defense.backbone.epochs=1", "defense.flow.epochs=2", "defense.flow.hidden=16"]


def test_gssd_fast_path_outputs(tmp_path):
    """Tiny cell: the whole pipeline runs and reports its facts (no quality claim at this scale)."""
    out = tmp_path / "r"
    m = run_experiment(compose_config([*FAST, f"out={out}", "progress=false"]))
    ex = m["extras"]
    for key in ("detected_targets", "s_nd", "s_d", "nd_rule", "split", "no_class_flagged", "retrain"):
        assert key in ex
    assert len(ex["s_nd"]) == 10 and ex["nd_rule"] == "loo" and len(ex["s_nd_loo_z"]) == 10
    assert sum(ex["split"][k] for k in ("clean", "poisoned", "uncertain")) == m["n_train"]
    assert "auroc" in m["detection"] and "relabel_acc" in m
    saved, _ = load_tree(out / "gssd_scores.safetensors")
    assert saved["pi"].shape == (m["n_train"],) and torch.isfinite(saved["pi"]).all()
    assert (out / "gssd_vy_hist.png").exists()
    if ex["no_class_flagged"]:
        assert ex["split"]["clean"] == m["n_train"] and ex["finetuned_on"] == 0


def test_gssd_is_blind_to_the_oracle(tmp_path, monkeypatch):
    assert_oracle_blind(tmp_path, FAST, monkeypatch, extra_keys=["detected_targets", "s_nd", "split"])


# Digits-scale detection rule (docs/gssd.md "Thresholds at CPU scale", "Calibrating the relative rule"): the
# paper's absolute β_ND / λ thresholds are calibrated on 512-d ResNet-18 SimCLR features (REFERENCE) and do not
# transfer to the 128-d small_half backbone; BadNets is a non-disruptive attack, so only the leave-one-out S_ND
# outlier rule runs (threshold chosen on validation runs, docs/gssd.md: every clean class <= 1.9; this seed's target 4.24).
DIGITS_RULE = ["defense.nd_rule=loo", "defense.loo_z=2.0", "defense.detect_disruptive=false"]  # = gssd.yaml defaults, pinned


@pytest.mark.slow
def test_gssd_defends_badnets_on_digits(tmp_path):
    """Digits, BadNets 10% to class 0, default recipe: the target is found, the backdoor is gone and the
    clean accuracy stays within 5 points of the undefended model trained in the same run.
    Measured on the 2-core CPU with the earlier robust-z rule: target 0 found (robust z 3.28, next 1.06), clean 0.978 vs 0.983,
    ASR 0.000, 40 relabelled samples all to their true class; the loo rule flags the same class (loo z 4.24,
    next 0.56), so the same split — passes with 2 threads."""
    m = run_experiment(compose_config(["defense=gssd", *DIGITS_RULE, f"out={tmp_path / 'r'}", "progress=false"]))
    assert m["target"] in m["extras"]["detected_targets"]
    assert m["asr"] < 0.05
    assert m["clean_acc"] >= m["baseline"]["clean_acc"] - 0.05
    assert m["relabel_acc"] > 0.9


@pytest.mark.slow
def test_gssd_flags_nothing_on_clean_digits(tmp_path):
    """The same rule on the clean digits set (attack=none, the null run) flags no class and keeps the clean
    accuracy. The robust-z rule flagged clean classes 5 and 9 in the 2-thread run (clean
    0.939 vs 0.989); with the leave-one-out rule clean digits classes stay
    <= 0.90 over three seeds (scripts/gssd_null.py) and this test passed with 2 threads (1703 s for both slow
    tests of this file on a loaded 2-core machine)."""
    m = run_experiment(compose_config(["defense=gssd", "attack=none", *DIGITS_RULE, f"out={tmp_path / 'r'}",
                                       "progress=false"]))
    assert m["extras"]["detected_targets"] == []
    assert m["clean_acc"] >= m["baseline"]["clean_acc"] - 0.05
