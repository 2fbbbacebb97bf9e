"""The defender/oracle wall for every registered defense: its output (final weights, scores, flags,
relabels, kept set, extras) must not change when everything the defender may not see is scrambled — the
attack config (name, target, rate, parameters), ``is_poison``, the cover mask and the true labels. The
poisoned training images and observed labels stay the same (they are what the defender holds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import open_dict

from bdseal.defenses import list_defenses
from bdseal.experiment import run as run_mod
from bdseal.experiment.config import compose_config
from bdseal.io import load_model_state
from tests.helpers import scrambled

BASE = ["dataset=digits", "dataset.train_per_class=20", "dataset.test_per_class=5", "defender.holdout=0.2",
        "train.epochs=1", "figures.enabled=false", "progress=false", "cache=false"]
SSL = ["+defense.ssl.arch_params={widths:[8,16,16]}", "defense.ssl.epochs=1", "defense.iterations=6",
       "defense.e_step_every=3", "defense.batch_size=64", "defense.leiden_k=10", "defense.leiden_resolutions=[0.1,3.0,5]"]
PGBD = ["defense.train.epochs=1", "defense.neural_cleanse.steps=3", "defense.update_every=1"]
PGRL = ["defense.clean_per_class=3", "defense.train.epochs=2", "defense.train.batch_size=64", "defense.warmup_epochs=1",
        "defense.weight_start=1", "defense.weight_every=1", "defense.n_weak=1", "defense.n_strong=1", "defense.hidden_dim=16",
        "defense.sphere_dim=8", "defense.umap_epochs=10"]
# per-defense tiny settings; a defense not listed here runs with BASE alone (and is marked slow)
TINY: dict[str, list[str]] = {
    "none": [],
    "ft": ["defense.train.epochs=1"],
    "nad": ["defense.train.epochs=1", "defense.teacher_train.epochs=1"],
    "pgbd": PGBD, "nt_pgbd": PGBD, "st_pgbd": PGBD,
    "pgrl": PGRL, "lcv": PGRL, "wce": PGRL,
    "gssd": ["defense.backbone.epochs=1", "defense.flow.epochs=2", "defense.flow.hidden=16", "defense.nd_rule=loo",
             "defense.loo_z=0.0", "defense.plots=false"],  # loo z > 0: some class is flagged, so the split is exercised
    "vibe": SSL, "vibe_ss_a": SSL, "vibe_ss_f": SSL,
    "vibe_fm_a": ["defense.iterations=6", "defense.e_step_every=3", "defense.batch_size=64", "defense.fm.image_size=28"],
    "vibe_fm_f": ["defense.iterations=6", "defense.e_step_every=3", "defense.batch_size=64", "defense.fm.image_size=28"],
}
# covered by `pytest -m slow` (single-thread seconds: pgrl 105, st_pgbd 30, pgbd 24, lcv/wce 23, vibe_ss_a/f 8-11;
# `vibe` runs the same code as vibe_ss_f in the fast suite)
SLOW = {"pgbd", "st_pgbd", "pgrl", "lcv", "wce", "vibe_ss_a", "vibe_ss_f"}
FAKE_ATTACK = {"name": "blend", "target": 7, "rate": 0.37, "mode": "all_to_all", "params": {"alpha": 0.9}}


def _params() -> list[Any]:
    out = []
    for name in list_defenses():
        marks = [pytest.mark.slow] if name in SLOW or name not in TINY else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=28, patch_size=14)
    path = tmp_path_factory.mktemp("vit") / "dino"
    transformers.AutoModel.from_config(cfg).save_pretrained(path)
    return path


def _run(overrides: list[str], out: Path, monkeypatch: pytest.MonkeyPatch, scramble: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """One cell; returns (the DefenseResult the defense produced, final weights). With ``scramble`` the cell
    is poisoned with the real attack but every later step sees a fake attack config and a nonsense oracle."""
    cfg = compose_config([*overrides, f"out={out}"])
    captured: dict[str, Any] = {}
    real_get, real_poison = run_mod.get_defense, run_mod.poison

    def spy_get(name: str):
        spec = real_get(name)

        def fn(view, dcfg, ctx):
            captured["r"] = spec.fn(view, dcfg, ctx)
            return captured["r"]

        return type(spec)(spec.name, fn, spec.needs_clean, spec.post_hoc)

    with monkeypatch.context() as mp:
        mp.setattr(run_mod, "get_defense", spy_get)
        if scramble:
            real_cfg = cfg.copy()
            mp.setattr(run_mod, "poison", lambda _cfg, *a, **k: scrambled(real_poison(real_cfg, *a, **k)))
            with open_dict(cfg):
                cfg.attack = FAKE_ATTACK
        run_mod.run_experiment(cfg)
    # defense=none is the (cached) baseline training itself: no defense function runs, only its weights count
    return captured.get("r"), load_model_state(out)[0]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


@pytest.mark.parametrize("name", _params())
def test_defense_output_ignores_attack_config_and_oracle(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         request: pytest.FixtureRequest) -> None:
    overrides = [*BASE, f"defense={name}", *TINY.get(name, [])]
    if name.startswith("vibe_fm"):
        overrides.append(f"defense.fm.checkpoint={request.getfixturevalue('tiny_vit')}")
    r1, w1 = _run(overrides, tmp_path / "real", monkeypatch, scramble=False)
    r2, w2 = _run(overrides, tmp_path / "scrambled", monkeypatch, scramble=True)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), f"{name}: weights {k} changed when the attack config and oracle were scrambled"
    if name == "none":
        assert r1 is None and r2 is None
        return
    for field in ("scores", "flagged", "relabels", "kept"):
        a, b = getattr(r1, field, None), getattr(r2, field, None)
        assert (a is None and b is None) or _same(a, b), f"{name}: {field} changed"
    strip = lambda ex: {k: v for k, v in ex.items() if not k.endswith("time_s")}  # noqa: E731 - wall times differ
    assert strip(r1.extras) == strip(r2.extras), f"{name}: extras changed"
    if r1.relabel_history is not None:
        assert all(s1 == s2 and torch.equal(h1, h2) for (s1, h1), (s2, h2) in zip(r1.relabel_history, r2.relabel_history))


def test_context_carries_no_attack_config() -> None:
    """``RunContext`` has no attack config, and its ``cache_key`` depends on the defender's data, the dataset
    config and the seed only: two configs that differ in the attack alone give the same key for the same data."""
    cell = run_mod.prepare_cell(compose_config([*BASE, "attack.target=0"]))
    assert not hasattr(cell.ctx, "cache_parts") and len(cell.ctx.cache_key) >= 16
    train = cell.poisoned.train
    key = lambda over: run_mod.defender_cache_key(train, compose_config([*BASE, *over]), 0)  # noqa: E731
    assert cell.ctx.cache_key == key(["attack.target=0"]) == key(["attack=blend", "attack.target=5", "attack.rate=0.3"])
    assert key(["seed=1"]) == key([]) and run_mod.defender_cache_key(train, compose_config(BASE), 1) != key([])
    assert key(["dataset.train_per_class=21"]) != key([])
