"""Exact k-nearest neighbours with ``torch.cdist`` and UMAP on top of them (shared by GSSD's Fig. 1,
PGRL's WCE weights and VIBE's Leiden filter).

umap-learn gets the exact kNN as ``precomputed_knn``, which skips pynndescent's 30-40 s JIT compile
per process and is exact at the sizes we use. Three more things make UMAP cheap and harmless here:

- **threads**: a seeded ``umap.UMAP`` calls ``numba.set_num_threads(1)`` and afterwards restores numba's
  original count (every core). With numba's OpenMP layer that goes through the OpenMP runtime torch shares,
  so torch silently switched from ``OMP_NUM_THREADS=1`` to every core after each call (oversubscription on
  shared machines). :func:`umap_embed` restores torch's thread count after every call.
- **compile cache**: umap-learn's numba functions are not cached on disk, so each process spent ~40 s
  compiling them; :func:`enable_umap_numba_cache` turns numba's on-disk cache on for them (first call in a
  new process: 42 s → 4 s, measured on the 2-core CPU).
- **parallel per-class runs**: :func:`umap_embed_many` runs independent seeded UMAPs in worker processes.
  Each stays single-threaded and seeded, so the result is bit-identical to running them one after another.
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context

import numpy as np
import torch

UMAP_MAX_EPOCHS = 200  # cap on umap-learn's default optimisation epochs (its default: 500 below 10,000 points)


def exact_knn(features: torch.Tensor, k: int, *, include_self: bool = True, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, distances), each (N, k), of the k nearest rows by Euclidean distance, computed in
    chunks of ``chunk`` rows. With ``include_self`` a point is its own first neighbour (UMAP's
    convention); without it the point itself is excluded."""
    x = torch.as_tensor(features).float()
    n = len(x)
    if not 1 <= k <= (n if include_self else n - 1):
        raise ValueError(f"k={k} neighbours impossible among {n} points (include_self={include_self})")
    idx, dst = [], []
    for s in range(0, n, chunk):
        d = torch.cdist(x[s : s + chunk], x)
        if not include_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + s] = float("inf")
        vals, ind = d.topk(k, dim=1, largest=False)
        idx.append(ind)
        dst.append(vals)
    return torch.cat(idx), torch.cat(dst)


@contextmanager
def preserve_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit (numba's OpenMP layer shares torch's runtime, and a
    seeded UMAP resets it to every core; see the module docstring)."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


_CACHE_ON = False


def enable_umap_numba_cache() -> int:
    """Switch numba's on-disk cache on for umap-learn's jitted functions (they are compiled with
    ``cache=False``), so only the first process ever compiles them. Returns how many were switched."""
    global _CACHE_ON
    if _CACHE_ON:
        return 0
    import umap.distances
    import umap.layouts
    import umap.sparse
    import umap.spectral
    import umap.umap_
    import umap.utils
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    n = 0
    for mod in (umap.umap_, umap.layouts, umap.spectral, umap.utils, umap.sparse, umap.distances):
        for obj in list(vars(mod).values()):
            if isinstance(obj, CPUDispatcher) and isinstance(obj._cache, NullCache):
                obj.enable_caching()
                n += 1
    _CACHE_ON = True
    return n


def default_umap_epochs(n: int, cap: int | None = UMAP_MAX_EPOCHS) -> int:
    """umap-learn's default number of layout epochs for ``n`` points (500 up to 10,000, else 200),
    capped at ``cap`` (``None``: no cap)."""
    epochs = 500 if n <= 10_000 else 200
    return epochs if cap is None else min(epochs, int(cap))


def umap_embed(x: np.ndarray | torch.Tensor, dim: int, n_neighbors: int = 15, seed: int | None = 0,
               n_epochs: int | None = None, init: str = "spectral") -> np.ndarray:
    """UMAP (umap-learn) of ``x`` to ``dim`` dimensions with an exact precomputed kNN graph.

    ``seed``: an int makes the layout reproducible, but umap-learn then optimises it on one thread;
    ``None`` lets it use every core at the price of run-to-run differences. ``n_epochs=None``:
    umap-learn's default capped at :data:`UMAP_MAX_EPOCHS`. torch's thread count is unchanged afterwards."""
    import umap  # heavy import (numba): only when needed

    enable_umap_numba_cache()
    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x).float()
    k = max(2, min(n_neighbors, len(t) - 1))
    knn_i, knn_d = exact_knn(t, k)
    with warnings.catch_warnings(), preserve_torch_threads():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=dim, n_neighbors=k, random_state=seed, init=init, n_jobs=-1 if seed is None else 1,
                            n_epochs=default_umap_epochs(len(t)) if n_epochs is None else int(n_epochs),
                            precomputed_knn=(knn_i.numpy().astype(np.int64), knn_d.numpy().astype(np.float32), None))
        return reducer.fit_transform(t.numpy()).astype(np.float32)


def _umap_job(args: tuple) -> np.ndarray:
    """Worker entry point of :func:`umap_embed_many` (one thread per worker process)."""
    torch.set_num_threads(1)
    return umap_embed(*args)


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    """A persistent pool of ``workers`` spawned processes (spawn: forking a process that already runs
    OpenMP threads can deadlock), shut down at exit."""
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        atexit.register(_POOLS[workers].shutdown, cancel_futures=True)
    return _POOLS[workers]


def default_umap_workers(jobs: int) -> int:
    """Worker processes for ``jobs`` independent UMAPs: at most the CPUs this process may use, numba's
    thread budget (``NUMBA_NUM_THREADS``) and torch's (``OMP_NUM_THREADS``), so a job told to use one
    thread stays in one process."""
    import numba

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(jobs, cpus, int(numba.config.NUMBA_NUM_THREADS), torch.get_num_threads()))


def umap_embed_many(xs: Sequence[np.ndarray], dim: int, n_neighbors: int = 15, seeds: Sequence[int | None] | None = None,
                    n_epochs: int | None = None, inits: Sequence[str] | None = None, workers: int | None = None) -> list[np.ndarray]:
    """:func:`umap_embed` of each array in ``xs`` (seed ``seeds[i]``, init ``inits[i]``), in up to ``workers``
    processes (``None``: :func:`default_umap_workers`). Seeded runs give the same result as sequential calls."""
    seeds = list(seeds) if seeds is not None else [0] * len(xs)
    inits = list(inits) if inits is not None else ["spectral"] * len(xs)
    if not len(seeds) == len(inits) == len(xs):
        raise ValueError(f"umap_embed_many: {len(xs)} arrays but {len(seeds)} seeds and {len(inits)} inits")
    jobs = [(np.ascontiguousarray(x, dtype=np.float32), dim, n_neighbors, s, n_epochs, i) for x, s, i in zip(xs, seeds, inits)]
    w = default_umap_workers(len(jobs)) if workers is None else max(1, min(int(workers), len(jobs)))
    if w == 1 or len(jobs) <= 1:
        return [umap_embed(*j) for j in jobs]
    with preserve_torch_threads():
        return list(_pool(w).map(_umap_job, jobs))
