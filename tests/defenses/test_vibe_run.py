"""VIBE through the experiment pipeline: oracle-blind, the frozen (FM) path, and the end-to-end
defense against BadNets on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdseal.experiment.config import compose_config
from bdseal.experiment.run import run_experiment
from bdseal.io import load_model_state
from tests.helpers import assert_oracle_blind

TINY = ["dataset=digits", "dataset.train_per_class=20", "dataset.test_per_class=10", "baseline=false",
        "+defense.ssl.arch_params={widths:[8,16,16]}", "defense.ssl.epochs=1", "defense.iterations=12",
        "defense.e_step_every=5", "defense.batch_size=64", "defense.leiden_k=10", "defense.leiden_resolutions=[0.1,3.0,10]"]


def test_vibe_is_oracle_blind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_oracle_blind(tmp_path, [*TINY, "defense=vibe_ss_f"], monkeypatch, extra_keys=["e_steps", "leiden"])


def test_vibe_frozen_foundation_path(tmp_path: Path) -> None:
    """VIBE-FM-A on a tiny random DINOv2 checkpoint: frozen features, μ_y frozen, all outputs present."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=28, patch_size=14)
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path / "dino")
    m = run_experiment(compose_config([*TINY, "defense=vibe_fm_a", f"defense.fm.checkpoint={tmp_path / 'dino'}",
                                       "defense.fm.image_size=28", f"out={tmp_path / 'r'}", "progress=false", "cache=false"]))
    ex = m["extras"]
    assert ex["variant"] == {"backbone": "fm", "corruption": "class", "freeze": True, "freeze_mu_y": True, "leiden": False,
                            "normalize_features": True}  # FM: unit-norm features as the authors' reloaded cache
    assert "leiden" not in ex and ex["n_kept"] == m["n_train"]
    assert [e["step"] for e in ex["e_steps"]] == [0, 5, 10, 12]
    assert all(0 <= e["agree_observed"] <= 1 for e in ex["e_steps"])
    assert "relabel_acc" in m and "detection" in m
    state, _ = load_model_state(tmp_path / "r")
    assert state["head.mu_y"].shape == (10, 16)


def test_vibe_ss_finetune_outputs(tmp_path: Path) -> None:
    """SS-A with a fine-tuned backbone: E-steps at 0, T, 2T and a final one; scores in [0, 1]."""
    from bdseal.defenses import get_defense
    from bdseal.experiment import run as run_mod

    captured = {}
    real = get_defense("vibe_ss_a").fn

    def spy(view, cfg, ctx):
        captured["r"] = real(view, cfg, ctx)
        captured["y"] = view.y
        return captured["r"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "get_defense", lambda name: type(get_defense(name))(name, spy))
        m = run_experiment(compose_config([*TINY, "defense=vibe_ss_a", f"out={tmp_path / 'r'}", "progress=false", "cache=false"]))
    r = captured["r"]
    # per E-step pseudo-labels, scored against the oracle by the experiment layer (the E-step log)
    assert [s for s, _ in r.relabel_history] == [0, 5, 10, 12]
    assert all(h.shape == (len(captured["y"]),) for _, h in r.relabel_history)
    assert torch.equal(r.relabel_history[-1][1].long(), r.relabels)  # no filter here: the last round is the output
    rows = m["relabel_history"]
    assert [row["step"] for row in rows] == [0, 5, 10, 12]
    assert all(0 <= row[k] <= 1 for row in rows for k in ("agree_observed", "agree_true", "poison_relabelled", "poison_to_true"))
    assert rows[-1]["poison_to_true"] == pytest.approx(m["relabel_acc"])
    n = len(captured["y"])
    assert r.relabels.shape == (n,) and (r.relabels >= 0).all()
    assert r.scores.shape == (n,) and (r.scores >= 0).all() and (r.scores <= 1 + 1e-6).all()
    assert r.flagged[r.relabels != captured["y"]].all()  # a changed label is a flag
    assert [e["step"] for e in r.extras["e_steps"]] == [0, 5, 10, 12]
    logits = r.model(torch.rand(3, 3, 32, 32))
    assert torch.allclose(logits.exp().sum(1), torch.ones(3), atol=1e-4)


E2E = ["dataset=digits", "attack=badnets", "defense=vibe_ss_a", "baseline=true", "defense.ssl.epochs=20",
       "defense.iterations=900", "defense.e_step_every=150",
       "defense.normalize_features=false"]  # the raw-feature setting this test's numbers were measured with


@pytest.mark.slow
def test_vibe_defeats_badnets_on_digits(tmp_path: Path) -> None:
    """VIBE ASR < 0.05 where no defense reaches > 0.9, clean accuracy within 5
    points (the default digits cell; VIBE-SS-A, SimCLR small_half 20 epochs, 900 EM iterations with an
    E-step every 150). Measured (docs/vibe.md): baseline 0.983 / 1.000, VIBE-SS-A 0.958 / 0.003, detection
    TPR 0.978 FPR 0.007, relabel acc 0.91 (2,000 s on a 4x-oversubscribed 2-core machine)."""
    m = run_experiment(compose_config([*E2E, f"out={tmp_path / 'r'}", "progress=false"]))
    assert m["baseline"]["asr"] > 0.9
    assert m["asr"] < 0.05
    assert m["clean_acc"] >= m["baseline"]["clean_acc"] - 0.05
    assert m["detection"]["tpr"] > 0.9
