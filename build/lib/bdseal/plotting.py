"""Figure plumbing shared by defenses and reports: matplotlib on the non-interactive Agg backend, imported
lazily (a run that draws nothing never imports it), and one way to write a figure to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int, tight_bbox: bool = False) -> Path:
    """Write ``fig`` to ``path`` (parent folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight_bbox else {}))
    pyplot().close(fig)
    return path
