"""``bdseal reproduce <paper> budget_s=540``: fill a seed paper's full-scale CIFAR-10 table window by window.

A paper's table is a bench matrix (``bdseal/conf/bench/<paper>_gpu.yaml``, or any bench name / YAML path)
whose cells are listed in priority order. Each call runs the next cells whose rows are not in the store
(``bench/gpu/<paper>/results.sqlite`` unless ``out=`` is given) until ``budget_s`` seconds have passed:

- finished stages stay in the bench's artefact cache (poisoned sets, backdoored models, Neural Cleanse, ...);
- every plain training run (:func:`bdseal.train.fit` without hooks or a custom loss: backdoored models,
  undefended models, retraining) checkpoints each epoch under ``<out>/checkpoints`` and resumes there;
- once the budget is over, the running fit stops at its next epoch end (checkpoint written) and no new cell
  starts (each window starts at least one), so a cell cut by the budget continues in the next window. Stages with their own state (a
  defense's hooks) restart from their beginning.

It then prints the rows it stored and the cells still missing. The same numbers come out whether a cell
ran in one window or several (same data order, augmentation stream and optimiser state after a resume).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from bdseal.experiment import bench
from bdseal.experiment.store import ResultStore
from bdseal.train.loop import BudgetExhausted, window

log = logging.getLogger("bdseal.reproduce")

PAPER_TABLES = {"pgbd": "pgbd_gpu", "pgrl": "pgrl_gpu"}
"""Paper -> its table's bench matrix (cells in priority order)."""


@dataclass
class ReproduceResult:
    ran: list[str] = field(default_factory=list)  # hashes of the cells finished in this window
    left: list[str] = field(default_factory=list)  # labels of the cells still missing
    interrupted: str | None = None  # the fit the budget stopped, if any
    store: Path | None = None


def parse_args(argv: list[str]) -> tuple[str, float, list[str]]:
    """``<paper> budget_s=SECONDS [bench keys and cell overrides...]`` -> (bench name, budget, the rest)."""
    if not argv or "=" in argv[0]:
        raise ValueError("reproduce: give the paper first, e.g. 'bdseal reproduce pgbd budget_s=540' "
                         f"(papers: {sorted(PAPER_TABLES)}, or a bench name / YAML path)")
    paper, budget, rest = argv[0], None, []
    for a in argv[1:]:
        key, sep, value = a.partition("=")
        if key == "budget_s":
            try:
                budget = float(value)
            except ValueError:
                raise ValueError(f"reproduce: budget_s must be a number of seconds, got {value!r}") from None
            if budget <= 0:
                raise ValueError(f"reproduce: budget_s must be > 0, got {value}")
        else:
            rest.append(a)
    if budget is None:
        raise ValueError("reproduce: budget_s=SECONDS is required (e.g. 540 for a 10-minute device call)")
    return PAPER_TABLES.get(paper, paper), budget, rest


def reproduce(table: str, budget_s: float, argv: list[str] = (), *, out: str | None = None) -> ReproduceResult:
    """Run the next missing cells of bench matrix ``table`` for at most about ``budget_s`` seconds (plus
    the epoch in flight when it runs out)."""
    t0 = time.time()
    deadline, started = t0 + budget_s, False
    name = Path(table).stem if table.endswith((".yaml", ".yml")) else table
    given_out = any(a.startswith("out=") for a in argv)
    spec, _ = bench.parse_args([f"bench={table}", *argv])
    if out is not None:
        spec.out = out
    elif not given_out:
        spec.out = str(Path("bench") / "gpu" / name.removesuffix("_gpu"))
    result = ReproduceResult(store=spec.store_path)
    store = ResultStore(spec.store_path)
    with window(Path(spec.out) / "checkpoints", deadline):
        for cell in bench.plan_cells(spec):  # priority order = the table's order
            if bench.cell_config(cell, spec)[1] in store.hashes():
                continue
            if started and time.time() > deadline:
                break
            started = True
            one = dataclasses.replace(spec, datasets=[cell.dataset], defenses=[cell.defense], attacks=[cell.attack],
                                      attacks_by_defense={}, seeds=[cell.seed])
            try:
                result.ran += bench.run_bench(one).ran
            except BudgetExhausted as e:
                result.interrupted = str(e)
                log.info("reproduce %s: budget of %.0fs over (%s); the cell resumes in the next window", name, budget_s, e)
                break
    done = ResultStore(spec.store_path).hashes()
    result.left = [c.label for c in bench.plan_cells(spec) if bench.cell_config(c, spec)[1] not in done]
    return result
