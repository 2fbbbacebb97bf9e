"""Content-addressed caches: a key is a hash of *everything* that produced an artefact.

A cache entry lives at ``<root>/<kind>/<key>.safetensors`` (:mod:`bdseal.io`: tensors + JSON, never
pickle); its header records the key's parts, the code version and the payload's sha256, so a stale,
colliding or damaged entry is never used (:class:`ArtifactCache`) and a human can see what made it.

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
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

log = logging.getLogger("bdseal")
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


_MISS: Any = object()


def code_version() -> str:
    """``<bdseal version>+<sha256 of the package's .py sources>``: part of every cache key, so an artefact
    made by other code (e.g. before a trigger fix) is never reused. Computed once per process."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import bdseal

        h = hashlib.sha256()
        pkg = Path(bdseal.__file__).parent
        for f in sorted(pkg.rglob("*.py")):
            h.update(str(f.relative_to(pkg)).encode())
            h.update(f.read_bytes())
        _CODE_VERSION = f"{bdseal.__version__}+{h.hexdigest()[:12]}"
    return _CODE_VERSION


_CODE_VERSION: str | None = None


def _plain_parts(parts: dict[str, Any]) -> Any:
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


class ArtifactCache:
    """``get_or_compute(kind, parts, fn)`` stores ``fn()`` under a hash of ``parts`` and the code version.

    Entries are ``<root>/<kind>/<key>.safetensors`` written by :func:`bdseal.io.save_tree` (tensors +
    JSON, never pickle) with the key's parts, the kind and :func:`code_version` in the header and the
    payload's sha256. A truncated, altered or foreign entry, or one whose recorded parts / kind / code
    version differ, is reported in one warning naming the path, deleted and recomputed. Writes are atomic
    (unique temp file + rename), so concurrent writers of one key leave one complete entry."""

    SUFFIX = ".safetensors"

    def __init__(self, root: str | Path | None = None, enabled: bool = True) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.enabled = enabled

    def path(self, kind: str, parts: dict[str, Any]) -> Path:
        return self.root / kind / f"{fingerprint({'parts': parts, 'code': code_version()})}{self.SUFFIX}"

    def load(self, kind: str, parts: dict[str, Any]) -> Any:
        """The entry's value, or ``_MISS`` when absent or unusable (then deleted, with one warning)."""
        from bdseal.io import CorruptFileError, load_tree

        path = self.path(kind, parts)
        if not path.exists():
            return _MISS
        try:
            value, meta = load_tree(path)
            if meta.get("kind") != kind or meta.get("code") != code_version() or meta.get("parts") != _plain_parts(parts):
                raise CorruptFileError(f"its recorded kind/parts/code version do not match (recorded {meta.get('kind')!r}, code {meta.get('code')!r})")
        except FileNotFoundError:
            return _MISS  # deleted by a concurrent reader
        except (CorruptFileError, OSError) as e:
            log.warning("cache entry %s is unusable (%s); deleting it and recomputing", path, e)
            path.unlink(missing_ok=True)
            return _MISS
        return value

    def store(self, kind: str, parts: dict[str, Any], value: Any) -> Path:
        from bdseal.io import save_tree

        return save_tree(self.path(kind, parts), value, {"kind": kind, "parts": _plain_parts(parts), "code": code_version()})

    def get_or_compute(self, kind: str, parts: dict[str, Any], compute: Callable[[], T]) -> T:
        if not self.enabled:
            return compute()
        value = self.load(kind, parts)
        if value is _MISS:
            value = compute()
            try:
                self.store(kind, parts, value)
            except TypeError as e:  # a value bdseal.io cannot represent: used, not cached (never pickled)
                log.warning("cache: %s entry not stored (%s)", kind, e)
        return value
