"""End-to-end PGRL / LCV / WCE cells through the experiment runner."""

import pytest
import torch

from tests.helpers import assert_oracle_blind, run_cell

# tiny synthetic cell: 4 classes x 100 images of 16x16, a narrow small net
TINY = [
    "dataset=synthetic", "+dataset.options.num_classes=4", "+dataset.options.n_train=60", "+dataset.options.n_test=20",
    "+dataset.options.image_size=16", "+model.params.widths=[8,16,16]", "attack.rate=0.1", "defender.holdout=0.1",
    "baseline=false", "defense.clean_per_class=3", "defense.train.epochs=4", "defense.train.batch_size=64",
    "defense.warmup_epochs=1", "defense.weight_start=2", "defense.weight_every=1", "defense.n_weak=1",
    "defense.n_strong=1", "defense.hidden_dim=16", "defense.sphere_dim=8", "defense.umap_epochs=30",
]


def test_pgrl_is_blind_to_the_oracle(tmp_path, monkeypatch):
    assert_oracle_blind(tmp_path, [*TINY, "defense=pgrl"], monkeypatch,
                        extra_keys=("trusted_per_epoch", "final_consistent", "weights"))


@pytest.mark.parametrize("name", ["lcv", "wce"])
def test_ablation_rows_run_and_report(tmp_path, name):
    m, _ = run_cell(tmp_path, [*TINY, f"defense={name}"])
    ex = m["extras"]
    assert m["defense"] == name and ex["variant"] == name
    det = m["detection"]
    assert 0.0 <= det["tpr"] <= 1.0 and 0.0 <= det["fpr"] <= 1.0 and det["auroc"] == det["auroc"]
    if name == "lcv":
        assert ex["weight_epochs"] == [] and ex["weights"]["n_one"] == m["n_train"]  # no weights without WCE
        assert len(ex["trusted_per_epoch"]) == 3
    else:
        assert ex["weight_epochs"] == [2, 3, 4]  # at the end of epochs 2, 3, 4 (the last gives the final scores)
        assert ex["trusted_per_epoch"] == [m["n_train"]] * 3  # WCE alone trusts the whole batch
        assert ex["weights"]["min"] >= -1.0 and ex["weights"]["max"] <= 1.0


def test_recipe_control_and_per_epoch_logs(tmp_path):
    """pgrl_recipe trusts everything with w = 1 and flags nothing; PGRL logs per epoch the trusted-set size,
    its clean share (computed by the runner from the oracle), test accuracy and ASR, and draws the plot."""
    m, _ = run_cell(tmp_path, [*TINY, "defense=pgrl_recipe"], "recipe")
    ex = m["extras"]
    assert ex["variant"] == "pgrl_recipe" and "detection" not in m
    assert ex["trusted_per_epoch"] == [m["n_train"]] * 3 and ex["weight_epochs"] == []
    m2, _ = run_cell(tmp_path, [*TINY, "defense=pgrl"], "pgrl")
    rows = m2["extras"]["per_epoch"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert "trusted" not in rows[0] and all(0 <= r["clean_acc"] <= 1 for r in rows)  # epoch 1 = warm-up
    for r in rows[1:]:
        assert 0 <= r["trusted"] <= m2["n_train"] and 0.0 <= r["trusted_clean_frac"] <= 1.0
        assert r["poison_trusted"] <= m2["n_poison"]
    assert (tmp_path / "pgrl" / "pgrl_per_epoch.png").exists()


class _Stop(Exception):
    pass


def test_checkpointed_pgrl_resumes_to_the_same_model(tmp_path, monkeypatch):
    """defense.checkpoint=true: a run stopped at the start of epoch 3 and re-run into the same dir resumes
    there and ends with exactly the model, weights and logs of an uninterrupted run."""
    from bdseal.defenses import pgrl

    over = [*TINY, "defense=pgrl", "defense.checkpoint=true", "defense.epoch_eval=false"]
    m_full, w_full = run_cell(tmp_path, over, "full")
    assert not list((tmp_path / "full").glob("pgrl_resume_e*.safetensors")) and not (tmp_path / "full" / "pgrl_fit.ckpt").exists()
    real = pgrl.PGRLTrainer.on_epoch_start

    def stop_at_2(self, state):
        real(self, state)
        if state.epoch == 2:
            raise _Stop

    monkeypatch.setattr(pgrl.PGRLTrainer, "on_epoch_start", stop_at_2)
    with pytest.raises(_Stop):
        run_cell(tmp_path, over, "cut")
    failed = tmp_path / "cut.failed"  # an interrupted run is kept aside; a rerun into "cut" resumes from it
    assert (failed / "pgrl_fit.ckpt").exists() and (failed / "pgrl_resume_e2.safetensors").exists()
    epochs_run = []

    def count(self, state):
        epochs_run.append(state.epoch)
        real(self, state)

    monkeypatch.setattr(pgrl.PGRLTrainer, "on_epoch_start", count)
    m_res, w_res = run_cell(tmp_path, [*over, "overwrite=true"], "cut")
    assert epochs_run == [2, 3]  # resumed, not restarted
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for key in ("trusted_per_epoch", "weight_epochs", "final_consistent", "weights"):
        assert m_full["extras"][key] == m_res["extras"][key], key


def test_pgrl_cover_and_clean_label_attacks_run(tmp_path):
    """The PGRL paper's settings include cover samples (AdapBlend) and clean-label poisoning (Freq):
    both go through the defense (Freq's DCT window shrunk to the 16x16 test images)."""
    m1, _ = run_cell(tmp_path, [*TINY, "defense=pgrl", "attack=adap_blend", "attack.rate=0.05", "attack.cover_rate=0.05"],
                     "adap_blend")
    assert m1["n_cover"] > 0 and "detection" in m1
    m2, _ = run_cell(tmp_path, [*TINY, "defense=pgrl", "attack=freq", "attack.rate=0.1", "attack.params.window=16",
                                "attack.params.positions=[[7,7],[15,15]]"], "freq")
    assert m2["n_poison"] > 0 and "detection" in m2


DIGITS_PGRL = [
    "defense=pgrl", "defense.clean_per_class=5", "defense.train.epochs=20", "defense.train.batch_size=64",
    "defense.warmup_epochs=3", "defense.weight_start=5", "defense.weight_every=5", "defense.n_weak=1",
    "defense.n_strong=2",
]


@pytest.mark.slow
def test_pgrl_removes_badnets_on_digits(tmp_path):
    """Default digits BadNets cell (10%): no-defense ASR > 0.9, PGRL ASR < 0.05 at reduced scale.
    Measured on the 2-core CPU: baseline 0.983 / 1.000; PGRL 0.992 / 0.000, TPR 1.00, FPR 0.021 (581 s)."""
    m, _ = run_cell(tmp_path, [*DIGITS_PGRL, "baseline=true"])
    assert m["baseline"]["asr"] > 0.9
    assert m["asr"] < 0.05 and m["clean_acc"] > 0.8
    assert m["detection"]["tpr"] > 0.8
