"""Every ``bdseal ...`` command in a fenced block of README.md and docs/*.md works as written.

The commands are extracted, not listed here, so a rewritten README is checked as it stands. Each command is
checked without training (fast): ``run`` / ``probe`` / ``bench-speed`` compose and validate their config,
``bench`` / ``demo`` plan and compose every cell of the matrix, ``report`` parses its options, ``list`` and
``--help`` run. A transcript line (``$ bdseal ...`` followed by ``bdseal: error: ...``) must fail with that
error. The README's commands also run end to end at a tiny scale in order (slow test), so that chains such as
``out=runs/demo`` then ``backdoored_ckpt=runs/demo`` work."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from bdseal.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\.\.\.|\$\w|<[^>]*>|\bFILE\b")  # a sketch, a shell variable, <name>: not runnable as is


@dataclass(frozen=True)
class DocCommand:
    source: str  # file:line
    args: tuple[str, ...]  # after "bdseal"
    expect_error: str | None = None  # a transcript's "bdseal: error: ..." line

    def __str__(self) -> str:
        return f"{self.source}: bdseal {' '.join(self.args)}"


def _strip_comment(line: str) -> str:
    """``line`` without a shell comment (``#`` at a word start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _bdseal_args(tokens: list[str]) -> list[str] | None:
    """The arguments after ``bdseal`` / ``.venv/bin/bdseal`` / ``[.venv/bin/]python -m bdseal``, else None."""
    if tokens and tokens[0].endswith("bdseal") and "/" not in tokens[0].replace(".venv/bin/", ""):
        return tokens[1:]
    if len(tokens) > 2 and tokens[0].endswith("python") and tokens[1:3] == ["-m", "bdseal"]:
        return tokens[3:]
    return None


def doc_commands(paths: list[Path] = DOCS) -> list[DocCommand]:
    """Every bdseal command in the fenced code blocks of ``paths`` (continuations joined, ``&&`` / ``;`` split)."""
    found: list[DocCommand] = []
    for path in paths:
        text = path.read_text()
        for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
            first_line = text[: m.start(1)].count("\n") + 1
            lines = m.group(1).split("\n")
            i = 0
            while i < len(lines):
                start, line = i, lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                transcript = line.startswith("$ ")
                line = _strip_comment(line[2:] if transcript else line).strip()
                error = lines[i].split("bdseal: error:", 1)[1].strip() if transcript and i < len(lines) and \
                    lines[i].startswith("bdseal: error:") else None
                try:
                    lex = shlex.shlex(line, posix=True, punctuation_chars=";&")
                    lex.whitespace_split, lex.commenters = True, ""
                    tokens = list(lex)
                except ValueError:
                    continue
                parts: list[list[str]] = [[]]
                for t in tokens:
                    if t in (";", "&&"):
                        parts.append([])
                    else:
                        parts[-1].append(t)
                for part in parts:
                    args = _bdseal_args(part)
                    if args is not None:
                        found.append(DocCommand(f"{path.relative_to(ROOT)}:{first_line + start}", tuple(args), error))
    return found


def runnable(cmd: DocCommand) -> bool:
    return not any(PLACEHOLDER.search(a) for a in cmd.args)


def _first_sweep_value(arg: str) -> str:
    """``key=a,b`` (a ``-m`` sweep) -> ``key=a``; lists ``[a,b]`` and quoted values are kept."""
    key, sep, value = arg.partition("=")
    if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
        return f"{key}={value.split(',')[0]}"
    return arg


def check_without_training(cmd: DocCommand, tmp_path: Path) -> None:
    """Parse and compose what ``cmd`` would run, training nothing; raise on any error."""
    from bdseal.experiment.config import compose_config
    from bdseal.experiment.validate import validate_run_config

    sub, *args = cmd.args
    assert sub in SUBCOMMANDS or sub in ("-h", "--help", "help"), f"unknown command {sub!r}"
    if sub in ("-h", "--help", "help", "list") or "--help" in args or "-h" in args:
        assert main(list(cmd.args)) == 0
        return
    if sub == "run":
        over = [_repo_plugins(_first_sweep_value(a)) for a in args if a != "-m" and not a.startswith("hydra.")]
        cfg = compose_config([o for o in over if not o.startswith("backdoored_ckpt=")])
        validate_run_config(cfg)
    elif sub in ("bench", "demo"):
        from bdseal.experiment import bench, demo

        spec = demo.demo_spec(args) if sub == "demo" else bench.parse_args(args)[0]
        seen: set[tuple[str, str]] = set()
        for cell in bench.plan_cells(spec):  # every dataset, attack and defense label composed at least once
            labels = {("dataset", cell.dataset), ("attack", cell.attack), ("defense", cell.defense)}
            if labels <= seen:
                continue
            seen |= labels
            validate_run_config(bench.cell_config(cell, spec)[0])
    elif sub == "report":
        paths = [a for a in args if "=" not in a]
        opts = dict(a.split("=", 1) for a in args if "=" in a)
        assert len(paths) <= 1 and set(opts) <= {"out", "title"}, f"report takes BENCH_DIR [out=DIR] [title=TEXT], got {args}"
    elif sub == "probe":
        from bdseal.ssl.features import resolve_cfg
        from bdseal.ssl.probe import split_argv

        ssl, rest = split_argv(args)
        validate_run_config(compose_config(rest))
        resolve_cfg({"arch": "small_half", **ssl})
    elif sub == "bench-speed":
        from bdseal.experiment import speed

        cell = [a for a in args if a.partition("=")[0] not in ("part", "device", "out", "defenses") and not a.startswith("loop.")]
        loop = {a.partition("=")[0][5:] for a in args if a.startswith("loop.")}
        assert loop <= set(speed._LOOP_KEYS), f"unknown loop options {loop - set(speed._LOOP_KEYS)}"
        validate_run_config(compose_config([*speed.DEFAULT_CELL, *cell]))
    elif sub == "poison":
        validate_run_config(compose_config([_repo_plugins(a) for a in args]))
    elif sub == "reproduce":
        from bdseal.experiment import bench, reproduce

        table, _, rest = reproduce.parse_args(args)
        if table.endswith((".yaml", ".yml")) and not Path(table).exists():
            return  # a placeholder path for the user's own table: the command line itself parsed
        spec = bench.parse_args([f"bench={table}", *rest])[0]
        for cell in bench.plan_cells(spec)[:1]:
            validate_run_config(bench.cell_config(cell, spec)[0])
    else:
        pytest.fail(f"no check for command {sub!r}: add one to tests/test_docs_commands.py")


def _repo_plugins(arg: str) -> str:
    """``plugins=[examples/x.py]`` names files relative to the repository root; the check runs elsewhere."""
    key, sep, value = arg.partition("=")
    if key != "plugins" or not sep:
        return arg
    items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return "plugins=[" + ",".join(str(ROOT / v) if v.endswith(".py") else v for v in items) + "]"


COMMANDS = doc_commands()


def test_the_docs_hold_commands_and_the_extraction_is_sound() -> None:
    readme = [c for c in COMMANDS if c.source.startswith("README.md")]
    assert readme, "README.md shows no bdseal command"
    assert _strip_comment("bdseal run a=b#c  # note") == "bdseal run a=b#c  "
    assert _first_sweep_value("attack=badnets,blend") == "attack=badnets" and _first_sweep_value("x=[1,2]") == "x=[1,2]"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if runnable(c)], ids=str)
def test_doc_command_parses_and_composes(cmd: DocCommand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if cmd.expect_error:
        shown = cmd.expect_error.split(";")[0].rstrip(". ")
        with pytest.raises(Exception, match=re.escape(shown)):
            check_without_training(cmd, tmp_path)
    else:
        check_without_training(cmd, tmp_path)


# --------------------------------------------------------------------------------------- end to end (slow)

TINY = ["train.epochs=1", "dataset.train_per_class=30", "dataset.test_per_class=5", "progress=false", "figures.enabled=false"]
# defense -> overrides that make its default run take seconds (keys of its own config)
DEFENSE_TINY = {
    "gssd": ["defense.backbone.epochs=1", "defense.flow.epochs=1"],
    "pgbd": ["defense.train.epochs=1", "defense.neural_cleanse.steps=5"],
    "ft": ["defense.train.epochs=1"],
    "nad": ["defense.train.epochs=1", "defense.teacher_train.epochs=1"],
    "pgrl": ["defense.train.epochs=2", "defense.warmup_epochs=1", "defense.weight_start=1", "defense.weight_every=1",
             "defense.n_weak=1", "defense.n_strong=1", "defense.umap_epochs=20"],
}


def tiny(cmd: DocCommand) -> list[str] | None:
    """``cmd``'s arguments with tiny-scale overrides appended, or None when it cannot run here (CIFAR data
    not present, a cluster launcher)."""
    sub, *args = cmd.args
    if any(a.startswith(("+cluster", "hydra.")) for a in args) or any("cifar" in a or "gtsrb" in a for a in args):
        return None
    if sub in ("run", "probe"):
        defense = next((a.split("=", 1)[1] for a in args if a.startswith("defense=")), "none")
        extra = [*TINY, *DEFENSE_TINY.get(defense.split(",")[0], [])]
        if sub == "probe":
            extra = [e for e in extra if not e.startswith(("train.", "figures."))] + ["ssl.epochs=1"]
        return [sub, *args, *extra]
    if sub in ("bench", "demo"):
        from bdseal.experiment import bench, demo

        spec = demo.demo_spec(args) if sub == "demo" else bench.parse_args(args)[0]
        per_defense = [f"defense_overrides.{d}=[{','.join([*spec.defense_overrides.get(d, []), *o])}]"
                       for d, o in DEFENSE_TINY.items() if d in spec.defenses]
        return [sub, *args, *TINY, *per_defense]
    return list(cmd.args)


@pytest.mark.slow
def test_readme_commands_run_in_order_at_tiny_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's commands, in order, in a fresh folder (each with tiny-scale overrides)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BDSEAL_CACHE", str(tmp_path / "cache"))
    ran = 0
    for cmd in COMMANDS:
        if not cmd.source.startswith("README.md") or not runnable(cmd) or cmd.expect_error:
            continue
        argv = tiny(cmd)
        if argv is None:
            continue
        assert main(argv) == 0, str(cmd)
        ran += 1
    assert ran > 0
