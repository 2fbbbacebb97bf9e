"""CPU micro-benchmarks of the hot loops named in docs/bench.md ("Hot loops"): CPU milliseconds per
call (process time, median of repeats, so other jobs on the machine inflate it less than wall time)
and host read-backs per call (``bool``/``float``/``int``/``.item()``/``.tolist()`` on a tensor; each is a
device sync on a GPU; boolean-mask indexing also syncs on a GPU but is not counted).

    OMP_NUM_THREADS=1 python scripts/speed_hotloops.py [augment] [sinkhorn] [nc]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable

import torch


def cpu_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    """Median process CPU time of ``fn`` in ms (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1e3 * statistics.median(times)


def host_reads(fn: Callable[[], object]) -> int:
    """Number of ``bool()`` / ``float()`` / ``int()`` / ``.item()`` / ``.tolist()`` calls on tensors made by ``fn``."""
    n = [0]
    names = ("__bool__", "__float__", "__int__", "item", "tolist")
    orig = {k: getattr(torch.Tensor, k) for k in names}

    def counted(k: str) -> Callable[..., object]:
        def f(t: torch.Tensor, *a: object) -> object:
            n[0] += 1
            return orig[k](t, *a)

        return f

    for k in names:
        setattr(torch.Tensor, k, counted(k))
    try:
        fn()
    finally:
        for k in names:
            setattr(torch.Tensor, k, orig[k])
    return n[0]


def bench_augment() -> None:
    from bdseal.data import augment as A

    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cases = {
        "simclr": A.build_augment("simclr"),
        "randaugment (crop + 3 ops)": A.build_augment("randaugment"),
        "randaugment ranges=pgrl, reflect crop": A.build_augment("randaugment", ranges="pgrl", padding_mode="reflect")
        if "ranges" in A.rand_augment.__code__.co_varnames else A.build_augment("randaugment"),
    }
    modes = [("masked", False), ("sync-free", True)] if hasattr(A, "SYNC_FREE") else [("masked", None)]
    for name, aug in cases.items():
        for mode, flag in modes:
            if flag is not None:
                A.SYNC_FREE = flag
            g = torch.Generator().manual_seed(0)
            ms = cpu_ms(lambda: aug(x, generator=g))
            reads = host_reads(lambda: aug(x, generator=g))
            print(f"augment  {name:40s} {mode:9s} B=256 32x32: {ms:7.1f} CPU ms/call, {reads:4d} host reads/call")
    if hasattr(A, "SYNC_FREE"):
        A.SYNC_FREE = None


def _vibe_like_scores(n: int, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ln P of a confident K-class model (log-softmax of logits with the true class +4) and a prior."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    logits[torch.arange(n), torch.randint(0, k, (n,), generator=g)] += 4
    return logits.log_softmax(1), torch.softmax(torch.randn(k, generator=g) * 0.3, 0)


def bench_sinkhorn() -> None:
    from bdseal.ot import sinkhorn_log

    for n, tol in [(20000, 1e-6), (20000, 1e-9)]:
        log_p, prior = _vibe_like_scores(n)
        t0 = time.process_time()
        res = sinkhorn_log(log_p, 1 / 25, col_marginal=prior, max_iter=5000, tol=tol)
        cpu = time.process_time() - t0
        reads = host_reads(lambda: sinkhorn_log(log_p, 1 / 25, col_marginal=prior, max_iter=5000, tol=tol))
        print(f"sinkhorn N={n} K=10 lambda=25 tol={tol:g} max_iter=5000: {res.iterations} iterations, "
              f"{cpu:.2f} CPU s, {reads} host reads")


def bench_nc() -> None:
    """Neural Cleanse on the default digits cell's backdoored model (BadNets 10%, target 0; trained once,
    ~1-2 CPU min) with the pgbd.yaml options: all 300 steps vs NC's early stop."""
    import dataclasses
    import tempfile

    from bdseal.defenses.pgbd.neural_cleanse import NCConfig, neural_cleanse
    from bdseal.experiment import run as run_mod
    from bdseal.experiment.config import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["defense=pgbd", "progress=false", "device=cpu", f"cache_dir={tmp}"])
        cell = run_mod.prepare_cell(cfg)
        model = run_mod.train_baseline(cfg, cell.ctx, cell.poisoned.train)
        nc_cfg = NCConfig.from_dict(dict(cfg.defense.neural_cleanse) if "neural_cleanse" in cfg.defense else
                                    {"steps": 300, "batch_size": 32, "lr": 0.1, "init_cost": 1e-3})
        x = cell.defender_pool.x
        runs = [("all steps", nc_cfg)]
        if "early_stop_patience" in NCConfig.__dataclass_fields__:
            runs.append(("early stop 50", dataclasses.replace(nc_cfg, early_stop_patience=50)))
        for label, c in runs:
            t0 = time.process_time()
            r = neural_cleanse(model, x, c, seed=0)
            cpu = time.process_time() - t0
            print(f"nc digits ({len(x)} clean images, {c.steps} steps x {c.batch_size} x 10 classes) {label}: "
                  f"{cpu:.1f} CPU s, steps {r.extras.get('steps', [c.steps])}, target {r.target}, "
                  f"anomaly {float(r.anomaly[r.target]):.2f}, flagged {r.flagged}")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    parts = argv or ["augment", "sinkhorn", "nc"]
    table = {"augment": bench_augment}
    for extra in ("sinkhorn", "nc"):
        fn = globals().get(f"bench_{extra}")
        if fn is not None:
            table[extra] = fn
    for p in parts:
        if p not in table:
            raise SystemExit(f"unknown part {p!r}; known: {sorted(table)}")
        table[p]()


if __name__ == "__main__":
    main(sys.argv[1:])
