"""Content-addressed caches: a key is a hash of *everything* that produced an artefact.

A cache entry lives at ``<root>/<kind>/<key>.pt`` next to ``<key>.json`` holding the key's parts,
so a stale or colliding entry cannot be read by mistake and a human can see what made it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def default_cache_root() -> Path:
    return Path(os.environ.get("BDSEAL_CACHE", Path.home() / ".cache" / "bdseal"))


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (dicts sorted) or a tensor (its bytes)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:20]


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim safe
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


class ArtifactCache:
    """``get_or_compute(kind, parts, fn)`` stores ``fn()`` with ``torch.save`` under a hash of ``parts``."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.enabled = enabled

    def path(self, kind: str, parts: dict[str, Any]) -> Path:
        return self.root / kind / f"{fingerprint(parts)}.pt"

    def get_or_compute(self, kind: str, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        if not self.enabled:
            return compute()
        path = self.path(kind, parts)
        if path.exists():
            meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else None
            if meta == json.loads(json.dumps(parts, sort_keys=True, default=str)):
                return torch.load(path, map_location="cpu", weights_only=False)
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent writers (Slurm jobs, ranks) never share a temp file
        torch.save(value, tmp)
        path.with_suffix(".json").write_text(json.dumps(parts, sort_keys=True, default=str, indent=1))
        os.replace(tmp, path)
        return value
