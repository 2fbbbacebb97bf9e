"""Command line of the repo's per-seed validation scripts (``scripts/gssd_null.py``, ``scripts/pgbd_grad_ratio.py``):
``--seeds``, ``--out`` (a JSON file that must not exist yet: results are never overwritten) and bdseal config
overrides after ``--``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def seed_sweep_args(description: str | None, default_seeds: list[int]) -> argparse.Namespace:
    """Parse ``--seeds S ... --out FILE -- overrides...``; exit with a message if ``--out`` exists."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=default_seeds)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write (refused if it exists)")
    ap.add_argument("overrides", nargs="*", help="bdseal config overrides after --")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out or delete it")
    return args


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
