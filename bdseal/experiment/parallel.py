"""``bdseal bench ... jobs=N``: several bench workers on one machine, sharing one store."""

from __future__ import annotations

import os
import subprocess
import sys

from bdseal.errors import ConfigError
from bdseal.experiment.store import ResultStore


def run_jobs(argv: list[str], jobs: int) -> int:
    """N worker processes of the same ``bdseal bench`` command on one machine (one GPU: batch-16
    fine-tuning, Neural Cleanse and E-steps leave it mostly idle, and one worker's CPU stages overlap the
    others' GPU work). They share the store and the artefact cache and take cells through the store's
    claims, so every cell runs once. Returns the workers' worst exit code."""
    if jobs < 1:
        raise ConfigError(f"bench: jobs must be >= 1, got {jobs}")
    if not hasattr(ResultStore, "claim"):
        raise ConfigError("bench: jobs=N needs a results store with cell claims (ResultStore.claim); run one bench per "
                         "store instead")
    cmd = [sys.executable, "-c", "import sys; from bdseal.cli import main; sys.exit(main(sys.argv[1:]))", "bench", *argv]
    procs = [subprocess.Popen(cmd, env={**os.environ, "BDSEAL_BENCH_WORKER": str(i)}) for i in range(jobs)]
    return max(p.wait() for p in procs)
