"""Data-parallel training with ``torchrun`` (DistributedDataParallel): process-group setup from the
environment, rank-0-only IO, and a ``torchrun`` entry point for a whole experiment cell.

``bdseal.train.fit`` already does the data-parallel part when a process group is initialised: it wraps
the model in DDP and gives rank ``r`` the slice ``perm[r*n//W : (r+1)*n//W]`` of every epoch's
permutation (the same permutation on every rank: same seed), then takes consecutive batches of
``batch_size`` from its slice. DDP averages gradients over ranks, so one step of ``W`` processes with
per-rank batch ``B`` equals one single-process step on the union of the ranks' batches — a global batch
of ``W·B`` samples (:func:`global_batches`) — provided the loss is a per-batch mean (equal per-rank
batch sizes), BatchNorm statistics are not involved (BN normalises per rank; use SyncBatchNorm on GPUs
or a BN-free model for an exact comparison) and augmentation randomness is the same (``augment=none``
for an exact comparison: each rank draws from its own generator). ``tests/train/test_ddp.py`` checks
this equivalence with 2 gloo processes on CPU.

Usage::

    torchrun --nproc_per_node=4 -m bdseal.train.ddp dataset=cifar10 attack=badnets defense=none out=runs/x

runs one cell (same overrides as ``bdseal run``) with every ``fit`` data-parallel over the 4 processes
(NCCL on CUDA, one GPU per local rank; gloo on CPU). Rank 0 writes the run dir and the artefact
cache; the other ranks compute the same cell (evaluation included) and write nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from bdseal.cache import ArtifactCache

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as set by ``torchrun``; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(backend: str | None = None, device: str = "auto") -> DistInfo:
    """Initialise the default process group from torchrun's environment (``env://``) when
    WORLD_SIZE > 1; a no-op returning rank 0 of 1 otherwise. ``backend``: nccl on CUDA, gloo on CPU.
    On CUDA each process takes GPU ``LOCAL_RANK``."""
    rank, world, local = env_ranks()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(backend: str | None = None, device: str = "auto") -> Iterator[DistInfo]:
    """``with distributed() as info:`` — the process group for the block, destroyed afterwards."""
    info = init_distributed(backend, device)
    try:
        yield info
    finally:
        destroy_distributed()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (itself when not distributed)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Run ``fn`` on rank 0 only (other ranks get ``None``); all ranks meet at a barrier afterwards."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        out = fn(*args, **kwargs) if is_main_process() else None
        barrier()
        return out

    return wrapper


def global_batches(n: int, world: int, batch_size: int, seed: int, epochs: int) -> list[torch.Tensor]:
    """The indices of every global step of ``fit`` run on ``world`` ranks with per-rank ``batch_size``:
    per epoch one permutation from ``torch.Generator().manual_seed(seed)``, rank ``r`` takes the slice
    ``[r*n//world, (r+1)*n//world)`` and batch ``s`` of its slice; the global batch is the ranks' batches
    concatenated. With ``world=1`` this is single-process ``fit``'s batch order. The single-process
    reference of a DDP run trains on exactly these batches (``drop_last=False``, no ``steps`` budget)."""
    gen = torch.Generator().manual_seed(seed)
    per_rank = n // world
    steps = max(1, -(-per_rank // batch_size))
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        shards = [perm[r * per_rank : (r + 1) * per_rank] for r in range(world)]
        out += [torch.cat([sh[s * batch_size : (s + 1) * batch_size] for sh in shards]) for s in range(steps)]
    return out


class DistributedArtifactCache(ArtifactCache):
    """An :class:`ArtifactCache` whose decisions are identical on all ranks: rank 0 decides hit or miss
    and broadcasts it; on a miss every rank computes (a ``fit`` inside is collective) and only rank 0
    writes. Without this, ranks racing on the same cache file can disagree (one loads, one trains:
    a DDP deadlock) or clobber each other's temporary file."""

    def get_or_compute(self, kind: str, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        if not self.enabled or rank_world()[1] == 1:
            return super().get_or_compute(kind, parts, compute)
        from bdseal.cache import _MISS

        found = self.load(kind, parts) if is_main_process() else _MISS  # rank 0 verifies (and drops a bad entry)
        if broadcast_object(found is not _MISS if is_main_process() else None):
            barrier()
            return found if is_main_process() else super().get_or_compute(kind, parts, compute)  # loads
        value = compute()
        if is_main_process():
            self.store(kind, parts, value)  # atomic
        barrier()
        return value


def run_cell(overrides: Sequence[str]) -> dict[str, Any] | None:
    """One experiment cell under torchrun: every rank runs it (each ``fit`` is data-parallel), rank 0
    writes the run dir and the cache; returns rank 0's metrics (``None`` on other ranks)."""
    from unittest import mock

    from bdseal.experiment import run as run_mod
    from bdseal.experiment.config import compose_config

    cfg = compose_config(list(overrides))
    with distributed(device=str(cfg.device)) as info:
        scratch = None
        if not info.is_main:  # other ranks write their (identical) outputs to a scratch dir, then drop it
            scratch = tempfile.mkdtemp(prefix=f"bdseal-rank{info.rank}-")
            cfg.out, cfg.progress = scratch, False
        if info.device.type == "cuda":
            cfg.device = str(info.device)
        try:
            with mock.patch.object(run_mod, "ArtifactCache", DistributedArtifactCache):
                metrics = run_mod.run_experiment(cfg)
        finally:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        return metrics if info.is_main else None


def main(argv: Sequence[str] | None = None) -> int:
    import json
    import sys

    metrics = run_cell(list(sys.argv[1:] if argv is None else argv))
    if metrics is not None:
        print(json.dumps({k: metrics.get(k) for k in ("dataset", "attack", "defense", "clean_acc", "asr", "time_s", "run_dir")}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
