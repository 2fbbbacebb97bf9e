"""``bdseal demo``: the demo bench's first attack and seed, the comparison table, the report."""

from __future__ import annotations

import pytest

from bdseal.cli import main
from bdseal.experiment import demo
from bdseal.experiment.store import Row


def _row(defense: str, acc: float, asr: float | None, det: dict | None = None) -> Row:
    m = {"clean_acc": acc, "asr": asr, "time_s": 12.3, "n_train": 100, "n_poison": 10, "target": 0}
    if det:
        m["detection"] = det
    cfg = {"dataset": {"name": "digits", "options": {"image_size": 16}}, "train": {"epochs": 15}}
    return Row("h" + defense, "digits", "small_half", "badnets", defense, 0, cfg, m, f"runs/{defense}")


def test_removed_needs_low_asr_and_at_most_five_points_lost() -> None:
    none = _row("none", 0.98, 1.0)
    assert demo.removed(_row("a", 0.95, 0.05), none) == "yes"
    assert demo.removed(_row("b", 0.92, 0.00), none) == "no"  # 6 points lost
    assert demo.removed(_row("c", 0.98, 0.20), none) == "no"  # backdoor still there
    assert demo.removed(none, none) == "–"


def test_table_has_one_line_per_defense_with_real_numbers() -> None:
    rows = [_row("gssd", 0.981, 0.0, {"tpr": 0.29, "fpr": 0.0}), _row("none", 0.9805, 1.0), _row("ft", 0.861, 0.009)]
    lines = demo.demo_table(rows).splitlines()
    assert lines[0].split() == ["defense", "clean", "ACC", "ASR", "TPR", "FPR", "time", "(s)", "removed"]
    assert [ln.split()[0] for ln in lines[2:]] == ["none", "ft", "gssd"]
    assert lines[2].split()[1:] == ["98.0", "100.0", "–", "–", "12", "–"]
    assert lines[3].split()[1:] == ["86.1", "0.9", "–", "–", "12", "no"]
    assert lines[4].split()[1:] == ["98.1", "0.0", "29.0", "0.0", "12", "yes"]
    assert "16x16, 100 training images (10 poisoned by badnets" in demo.scale_line(rows[1])


def test_demo_spec_is_the_first_attack_and_seed_of_the_demo_bench(tmp_path) -> None:
    spec = demo.demo_spec([f"out={tmp_path}"])
    assert spec.name == "demo" and spec.attacks == ["badnets"] and spec.seeds == [0] and spec.out == str(tmp_path)
    assert "none" in spec.defenses and len(spec.defenses) >= 2


def test_demo_end_to_end_at_tiny_scale(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI runs the demo cells into the bench store, prints the table and the run folders, writes the
    report; a second call reuses the stored runs."""
    argv = [f"out={tmp_path / 'demo'}", "defenses=[none,ft]", "dataset.train_per_class=15", "dataset.test_per_class=5",
            "train.epochs=1", "defense_overrides.ft=[defense.train.epochs=1]", "figures.enabled=false"]
    assert main(["demo", *argv]) == 0
    out = capsys.readouterr().out
    assert "defense  clean ACC" in out and "\nnone " in out and "\nft " in out
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert str(tmp_path / "demo" / "runs") in out
    res = demo.run_demo(argv)
    assert len(res.rows) == 2 and {r.defense for r in res.rows} == {"none", "ft"}
