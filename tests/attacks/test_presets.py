"""Per-paper attack presets (REFERENCE.md "Attacks" table) compose, build and mean what the table says."""

import pytest
import torch

from bdseal.attacks import build_attack
from bdseal.attacks.base import resolve_cover_rate
from bdseal.experiment.config import compose_config
from bdseal.experiment.run import plain

# preset: (attack, rate, target, mode, effective cover rate (explicit or the attack's default), rate_of, params subset)
TABLE = {
    "gssd/badnets": ("badnets", 0.1, 0, "all_to_one", 0.0, "dataset", {"size": 2, "pattern": "colors", "position": [4, 4]}),
    "gssd/blend": ("blend", 0.1, 0, "all_to_one", 0.0, "dataset", {"alpha": 0.1, "test_alpha": 0.1}),
    "gssd/wanet": ("wanet", 0.1, 0, "all_to_one", 0.0, "dataset", {"k": 4, "s": 0.5, "noise": False}),
    "gssd/adap_blend": ("adap_blend", 0.01, 0, "all_to_one", 0.01, "dataset", {"alpha": 0.15, "test_alpha": 0.2, "pieces": 16, "masked_pieces": 8}),
    "gssd/adap_patch": ("adap_patch", 0.01, 0, "all_to_one", 0.01, "dataset", {"train_alphas": [0.5, 0.2, 0.5, 0.3],
                        "test_triggers": ["phoenix_corner2", "badnet_patch4"], "test_alphas": [1.0, 1.0]}),
    "pgbd/badnets": ("badnets", 0.01, 0, "all_to_one", 0.0, "dataset", {"size": 3, "pattern": "white", "position": "bottom_right"}),
    "pgbd/blend": ("blend", 0.01, 0, "all_to_one", 0.0, "dataset", {"alpha": 0.2, "test_alpha": 0.2}),
    "pgbd/wanet": ("wanet", 0.01, 0, "all_to_one", 0.02, "dataset", {"k": 4, "s": 0.5, "noise": True}),
    "pgbd/sig": ("sig", 0.01, 0, "clean_label", 0.0, "dataset", {"delta": 40, "freq": 6}),
    "pgrl/badnets": ("badnets", 0.05, 2, "all_to_one", 0.0, "dataset", {"size": 6, "cell": 2, "pattern": "checkerboard", "position": [22, 22]}),
    "pgrl/wanet": ("wanet", 0.05, 2, "all_to_one", 0.05, "dataset", {"k": 4, "s": 0.5, "noise": True, "cover_pool": "source"}),
    "pgrl/sig": ("sig", 0.05, 2, "clean_label", 0.0, "dataset", {"delta": 20, "freq": 6}),
    "pgrl/freq": ("freq", 0.05, 0, "clean_label", 0.0, "dataset", {"magnitude": 500, "window": 32, "positions": [[15, 15], [31, 31]], "channels": [1, 2]}),
    "pgrl/adap_blend": ("adap_blend", 0.05, 2, "all_to_one", 0.05, "dataset", {"alpha": 0.2, "test_alpha": 0.2, "cover_pool": "source"}),
}


@pytest.mark.parametrize("preset", sorted(TABLE))
def test_preset_matches_the_reference_table(preset):
    name, rate, target, mode, cover, rate_of, params = TABLE[preset]
    a = compose_config([f"attack={preset}"]).attack
    got = plain(a.params)
    atk = build_attack(a.name, **got)
    effective = resolve_cover_rate(atk, a.rate, a.cover_rate)
    assert (a.name, a.rate, a.target, a.mode, effective, a.rate_of) == (name, rate, target, mode, cover, rate_of)
    assert {k: got[k] for k in params} == params
    atk.check_image((3, 32, 32))


@pytest.mark.parametrize("preset,ratio", [("wanet", 2.0), ("pgbd/wanet", 2.0), ("pgrl/wanet", 1.0), ("lotus", 1.0)])
def test_cover_rates_follow_the_poison_rate(preset, ratio):
    """WaNet/Lotus presets leave cover_rate null: changing attack.rate keeps the paper's ratio."""
    a = compose_config([f"attack={preset}", "attack.rate=0.03"]).attack
    assert a.cover_rate is None
    assert resolve_cover_rate(build_attack(a.name, **plain(a.params)), a.rate, a.cover_rate) == pytest.approx(ratio * 0.03)


def _changed(preset):
    a = compose_config([f"attack={preset}"]).attack
    out = build_attack(a.name, **plain(a.params)).apply(torch.zeros(1, 3, 32, 32), phase="train")
    return out, (out != 0).any(1)[0]


def test_badnets_presets_geometry():
    out, ch = _changed("gssd/badnets")
    rows, cols = torch.nonzero(ch, as_tuple=True)
    assert set(rows.tolist()) <= {4, 5} and set(cols.tolist()) <= {4, 5}
    out, ch = _changed("pgbd/badnets")
    assert ch[29:, 29:].all() and ch.sum() == 9 and (out[0, :, 29:, 29:] == 1).all()
    out, ch = _changed("pgrl/badnets")
    region = out[0, 0, 22:28, 22:28]
    assert ch.sum() == int((region > 0).sum()) and region[0:2, 0:2].eq(1).all() and region[0:2, 2:4].eq(0).all()


@pytest.mark.parametrize("name", ["blend", "wanet", "sig", "freq", "adap_patch", "adap_blend"])
def test_base_configs_build(name):
    a = compose_config([f"attack={name}"]).attack
    assert a.name == name and 0 < a.rate < 1
    atk = build_attack(name, **plain(a.params))
    atk.check_image((3, 32, 32))
    if name in ("sig", "freq"):
        assert atk.default_mode == "clean_label" and a.mode is None
    if name == "wanet":
        assert resolve_cover_rate(atk, a.rate, a.cover_rate) == pytest.approx(2 * a.rate)  # cross ratio 2
    if name.startswith("adap_"):
        assert a.rate == a.cover_rate == 0.01
