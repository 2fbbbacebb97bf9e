"""What produced a result: recorded in every ``metrics.json`` and results-store row.

``schema_version`` numbers the layout of ``metrics.json`` (2: provenance keys and ``ra`` added);
``bdseal_version`` is the package's; ``git_commit`` the checkout's commit (``+dirty`` when files differ
from it) or ``None`` outside a git checkout (an installed wheel); ``torch_version``; and the input shape.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import torch

import bdseal

METRICS_SCHEMA_VERSION = 2


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout bdseal runs from, ``None`` when it is not one or git is absent."""
    root = Path(bdseal.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance(**extra: Any) -> dict[str, Any]:
    """``schema_version``, ``bdseal_version``, ``git_commit``, ``torch_version`` and ``extra`` (e.g.
    ``device``, ``input_shape``)."""
    return {"schema_version": METRICS_SCHEMA_VERSION, "bdseal_version": bdseal.__version__,
            "git_commit": git_commit(), "torch_version": torch.__version__, **extra}
