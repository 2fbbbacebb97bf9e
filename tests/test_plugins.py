"""Plugins: a user's attack, defense, dataset and model run through ``bdseal run``; entry points load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import bdseal
from bdseal import registry
from bdseal.cli import main
from bdseal.data import load_dataset
from bdseal.registry import PluginError, load_plugin, plugin_overrides
from bdseal.train import predict

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_example.py"


def test_plugin_attack_and_defense_run_through_bdseal_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    rc = main(["run", f"plugins=[{EXAMPLE}]", "dataset=stripes", "model=tiny_cnn", "attack=corner", "defense=high_loss",
               "train.epochs=4", "train.augment=none", "train.batch_size=32", f"out={out}", "progress=false",
               "cache=false", "baseline=false"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["dataset"], m["model"], m["attack"], m["defense"]) == ("stripes", "tiny_cnn", "corner", "high_loss")
    assert m["n_poison"] == round(0.1 * m["n_train"]) and m["extras"]["n_flagged"] == m["detection"]["flagged"]
    # the user's scores reach the detection metrics aligned with the oracle: dirty-label poisons keep a high loss
    assert m["detection"]["auroc"] > 0.8
    for key in ("schema_version", "bdseal_version", "git_commit", "torch_version", "device", "ra"):
        assert key in m
    rec = bdseal.load_run(out)  # rebuilt from config + weights: the plugin's module inside its input normalisation
    assert type(rec.model).__name__ == "WrappedClassifier" and type(rec.model.model).__name__ == "TinyCNN"
    assert rec.metrics == m and rec.config["defense"]["name"] == "high_loss"
    test = load_dataset("stripes").test
    acc = float((predict(rec.model, test.x) == test.y).float().mean())
    assert acc == pytest.approx(m["clean_acc"], abs=1e-6)


def test_plugin_errors_are_one_line_and_name_the_plugin(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="no module 'surely_not_a_module_xyz'"):
        load_plugin("surely_not_a_module_xyz")
    with pytest.raises(PluginError, match="does not exist"):
        load_plugin(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="bad_plugin.py failed to import: RuntimeError: boom"):
        load_plugin(str(bad))


def test_plugin_overrides_parse_hydra_lists() -> None:
    assert plugin_overrides(["seed=1", "plugins=[a.b,c/d.py]", "+plugins=e"]) == ["a.b", "c/d.py", "e"]
    assert plugin_overrides(["plugins=[]"]) == []


def test_module_name_plugins_are_found_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cwd_plugin_h4.py").write_text("LOADED = True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_plugin("cwd_plugin_h4").LOADED
    sys.modules.pop("cwd_plugin_h4", None)


def test_entry_point_plugins_are_loaded_before_registries_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package's ``[project.entry-points."bdseal.plugins"]`` (a real dist-info on sys.path)."""
    (tmp_path / "ep_plugin_h4.py").write_text(
        "from bdseal.defenses import register_defense\n"
        "@register_defense('ep_defense_h4')\n"
        "def d(view, cfg, ctx):\n    raise NotImplementedError\n")
    dist = tmp_path / "ep_plugin_h4-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin-h4\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bdseal.plugins]\nh4 = ep_plugin_h4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._ENTRY_POINTS_STATE, "done", False)
    from bdseal.defenses import base

    try:
        assert "ep_defense_h4" in bdseal.defenses.list_defenses()
        assert "h4" in registry._ENTRY_POINTS_LOADED
    finally:
        base._DEFENSES.pop("ep_defense_h4", None)
        registry._ENTRY_POINTS_LOADED.remove("h4") if "h4" in registry._ENTRY_POINTS_LOADED else None
        sys.modules.pop("ep_plugin_h4", None)


def test_registered_names_get_template_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from bdseal.data.sources import SOURCES

    SOURCES["tmpl_ds_h4"] = lambda root=None: None  # type: ignore[assignment]
    try:
        assert "dataset/tmpl_ds_h4" in registry.register_missing_configs()
        assert registry.has_config("dataset", "tmpl_ds_h4")
        node = ConfigStore.instance().load("dataset/tmpl_ds_h4.yaml").node
        assert node.name == "tmpl_ds_h4" and node.train_per_class is None
        assert not registry.has_config("dataset", "never_registered_h4")
    finally:
        SOURCES.pop("tmpl_ds_h4", None)


def test_register_config_rejects_unknown_groups() -> None:
    with pytest.raises(ValueError, match="group must be one of"):
        registry.register_config("optimizer", "x")


def test_foundation_backbones_without_transformers_say_install_fm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bdseal.ssl.foundation import load_foundation

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'bdseal\[fm\]'"):
        load_foundation(tmp_path, torch.device("cpu"))


def test_bench_plans_cells_of_plugin_names(tmp_path: Path) -> None:
    from bdseal.experiment import bench

    spec, _ = bench.parse_args(["bench=demo", f"plugins=[{EXAMPLE}]", "attacks=[corner]", "defenses=[high_loss]",
                                "datasets=[stripes]", "seeds=[0]", f"out={tmp_path}"])
    missing: list[str] = []
    cells = bench.plan_cells(spec, missing)
    assert missing == [] and len(cells) == 1
    cfg, _ = bench.cell_config(cells[0], spec)
    assert (cfg.attack.name, cfg.defense.name, cfg.dataset.name) == ("corner", "high_loss", "stripes")
    assert cfg.defense.fraction == 0.1 and cfg.attack.params.size == 2  # the plugin's register_config defaults


def test_every_control_row_names_registered_defenses() -> None:
    """A defense's ``control_for`` (the report's "the control did not learn the attack" flag) names defenses that
    exist, and PGRL's recipe control covers the three PGRL variants."""
    from bdseal.defenses import get_defense, list_defenses

    names = set(list_defenses())
    for name in names:
        assert set(get_defense(name).control_for) <= names - {name}, name
    assert set(get_defense("pgrl_recipe").control_for) == {"pgrl", "lcv", "wce"}
