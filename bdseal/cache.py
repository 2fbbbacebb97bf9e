"""Content-addressed caches: a key is a hash of *everything* that produced an artefact.

A cache entry lives at ``<root>/<kind>/<key>.pt`` next to ``<key>.json`` holding the key's parts,
so a stale or colliding entry cannot be read by mistake and a human can see what made it.

Hashing tensors is the costly part of a key (150 MB of CIFAR-10 training images take seconds), and one
run keys several artefacts by the same data (poisoned set, baseline, surrogate, SSL backbones through
``DefenderView.data_fingerprint``). :func:`tensor_digest` therefore hashes each tensor *object* once and
memoises the digest by the object's identity. Datasets' tensors are treated as immutable once built
(every bdseal step that changes images makes new tensors); as a safety net the memo entry is also
dropped when the tensor's in-place version counter moves (``t._version``, bumped by ``add_``,
``x[i] = ...``...) and when the tensor is freed (weak reference), so a reused ``id`` never returns a stale
digest. Writes that bypass autograd's version counter (``t.data.add_()``, numpy views) are not seen:
do not mutate a tensor after it has been hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def default_cache_root() -> Path:
    return Path(os.environ.get("BDSEAL_CACHE", Path.home() / ".cache" / "bdseal"))


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (dicts sorted) or a tensor (its shape, dtype and bytes).
    Tensors enter through :func:`tensor_digest`, so each tensor object is hashed once per process."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:20]


def dataset_fingerprint(ds: Any) -> str:
    """Cache-key part of a dataset: its images and (observed) labels, ``ds.x`` and ``ds.y``."""
    return fingerprint({"x": ds.x, "y": ds.y})


# id(tensor) -> (weak reference to it, its version counter when hashed, digest)
_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def _hash_tensor(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and bytes (the uncached work)."""
    h = hashlib.sha256()
    c = t.detach().cpu().contiguous()
    h.update(f"tensor{tuple(c.shape)}{c.dtype}".encode())
    if c.numel():  # 0-dim safe; hashlib reads the numpy buffer without a copy
        h.update(c.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference-mode tensors have no version counter: never memoised
        return None


def tensor_digest(t: torch.Tensor) -> str:
    """:func:`_hash_tensor` memoised per tensor object (see the module docstring for the contract)."""
    key, version = id(t), _version(t)
    hit = _DIGESTS.get(key)
    if hit is not None and version is not None and hit[0]() is t and hit[1] == version:
        return hit[2]
    digest = _hash_tensor(t)
    if version is not None:

        def forget(ref: weakref.ref, key: int = key) -> None:
            if _DIGESTS.get(key, (None,))[0] is ref:
                del _DIGESTS[key]

        _DIGESTS[key] = (weakref.ref(t, forget), version, digest)
    return digest


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(b"tensor")
        h.update(tensor_digest(obj).encode())
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
