"""``bdseal list``: every registered name with a description, each paper's attack presets, defenses' threat models."""

from __future__ import annotations

from importlib import resources

import pytest

from bdseal.attacks import list_attacks
from bdseal.cli import main
from bdseal.data import list_datasets
from bdseal.defenses import list_defenses
from bdseal.experiment import catalog
from bdseal.models import list_models


@pytest.fixture(scope="module")
def listing() -> str:
    return catalog.render()


def _line(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.split()[:1] == [name])


def test_every_registered_name_is_listed_with_a_description(listing: str) -> None:
    for names in (list_datasets(), list_models(), list_attacks(), list_defenses()):
        for n in names:
            words = _line(listing, n).split()
            assert len(words) > 2, n  # name + a description


def test_attack_presets_and_bench_configs_are_listed(listing: str) -> None:
    presets = catalog.attack_presets()
    assert {"gssd", "pgbd", "pgrl"} <= set(presets) and "badnets" in presets["gssd"]
    assert "attack=PAPER/NAME" in listing and "gssd/badnets" in listing and "pgrl/freq" in listing
    benches = sorted(f.name[:-5] for f in (resources.files("bdseal.conf") / "bench").iterdir() if f.name.endswith(".yaml"))
    for b in benches:
        assert _line(listing, b)


def test_threat_models_come_from_the_registry_and_default_configs() -> None:
    assert catalog.threat_model("pgrl").startswith("clean data: 10 per class")
    assert "post-hoc: yes" in catalog.threat_model("ft") and "post-hoc: no" in catalog.threat_model("gssd")
    assert catalog.threat_model("none").startswith("clean data: no")
    assert "Neural Cleanse" in catalog.threat_model("pgbd")


def test_first_sentence_of_a_config_comment() -> None:
    assert catalog._first_sentence("# PGRL on CIFAR-10 (PGRL Table 2 / Fig. 2 setting): more.\n# x\nname: a") == \
        "PGRL on CIFAR-10 (PGRL Table 2 / Fig. 2 setting)"
    assert catalog._first_sentence("# One thing. Two\nname: a") == "One thing."
    assert catalog._first_sentence("name: a") == ""


def test_cli_list_prints_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("datasets (dataset=NAME)") and "defenses (defense=NAME)" in out
