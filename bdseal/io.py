"""The one serialization layer: tensors in safetensors, metadata in JSON, atomic writes, verified loads.

Nothing here unpickles: a file can only ever produce tensors and JSON values, so pointing bdseal at an
untrusted checkpoint or cache entry cannot run code (docs/safety.md).

File format (one file, so one atomic rename publishes it): a standard ``.safetensors`` file whose header
metadata holds one key, ``"bdseal"``, a JSON object::

    {"schema": 1, "bdseal_version": "0.1.0", "sha256": "<digest of the tensors>", "meta": {...}}

``sha256`` covers every tensor's name, dtype, shape and bytes (:func:`tensors_sha256`), so truncation,
bit flips and edits are caught on load as :class:`CorruptFileError`.

API
---
- :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json`: temp file in the same
  directory + ``os.replace`` (readers see the old file or the new one, never half of one).
- :func:`read_json`: a JSON file, :class:`CorruptFileError` naming the path when it does not parse.
- :func:`save_tensors` / :func:`load_tensors`: ``dict[str, Tensor]`` + JSON ``meta``.
- :func:`save_tree` / :func:`load_tree`: nested dicts / lists / tuples / bdseal dataclasses of tensors and
  JSON scalars (cache entries, run artefacts, resume checkpoints).
- :func:`save_model` / :func:`load_model_state`: ``model.safetensors`` + a human-readable ``model.json``
  (architecture, number of classes, normalisation, versions); a legacy ``.pt`` state dict is read with
  ``torch.load(weights_only=True)`` (:func:`load_legacy_pt`) and a notice says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdseal import __version__
from bdseal.errors import BdsealError

log = logging.getLogger("bdseal")

SCHEMA_VERSION = 1
MODEL_FILE = "model.safetensors"
MODEL_META = "model.json"
_HEADER_KEY = "bdseal"


class CorruptFileError(BdsealError):
    """A file bdseal wrote (or was given) is truncated, altered, of the wrong kind, or not parseable."""


# ---------------------------------------------------------------------------------------------- atomic


def _umask_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a uniquely named temp sibling + ``os.replace``: concurrent writers
    never share a temp file and readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; a finished file gets the usual umask-based mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Parsed JSON of ``path``; :class:`CorruptFileError` naming it when unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); delete or regenerate it") from e


# --------------------------------------------------------------------------------------------- tensors


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """CPU, contiguous, owning exactly its bytes (safetensors refuses shared or strided storage)."""
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted tensor names with each tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of a bdseal safetensors file (see the module docstring)."""
    from safetensors.torch import save

    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_tensors: {k!r} is a {type(v).__name__}, not a tensor")
        t = _plain_tensor(v)
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # two names over one storage (views): safetensors stores each once
        seen.add(t.untyped_storage().data_ptr())
        flat[str(k)] = t
    header = {"schema": SCHEMA_VERSION, "bdseal_version": __version__, "sha256": tensors_sha256(flat), "meta": dict(meta or {})}
    return save(flat, metadata={_HEADER_KEY: json.dumps(header, default=str)})


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """Atomically write ``tensors`` (moved to CPU) and JSON-able ``meta`` to ``path``."""
    return atomic_write_bytes(path, tensors_to_bytes(tensors, meta))


def _header(data: bytes, path: Path) -> dict[str, Any]:
    if len(data) < 8:
        raise CorruptFileError(f"{path} is truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise CorruptFileError(f"{path} is not a safetensors file or is truncated (header of {n} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} has an unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} has an unreadable safetensors header")
    return header


def read_meta(path: str | Path) -> dict[str, Any]:
    """The bdseal header (schema, versions, sha256, meta) of a file, without reading its tensors."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        data = head + f.read(n if 0 < n < 1 << 28 else 0)
    return _bdseal_header(_header(data, path), path)


def _bdseal_header(header: dict[str, Any], path: Path) -> dict[str, Any]:
    raw = (header.get("__metadata__") or {}).get(_HEADER_KEY)
    if raw is None:
        raise CorruptFileError(f"{path} is a safetensors file without bdseal metadata; it was not written by bdseal")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: bdseal metadata is not JSON ({e})") from e
    if not isinstance(info, dict) or "sha256" not in info:
        raise CorruptFileError(f"{path}: bdseal metadata lacks its sha256")
    if int(info.get("schema", -1)) > SCHEMA_VERSION:
        raise CorruptFileError(f"{path} has schema {info.get('schema')}, newer than this bdseal ({SCHEMA_VERSION}); upgrade bdseal")
    return info


def load_tensors(path: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a file written by :func:`save_tensors` (on CPU); :class:`CorruptFileError`
    naming the path when it is truncated, altered (sha256 mismatch) or not a bdseal file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    data = path.read_bytes()
    info = _bdseal_header(_header(data, path), path)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} is damaged ({e}); delete it and regenerate it") from e
    if verify and tensors_sha256(tensors) != info["sha256"]:
        raise CorruptFileError(f"{path} does not match its recorded sha256 (altered or damaged); delete it and regenerate it")
    meta = info.get("meta") or {}
    meta = {**meta, "_bdseal_version": info.get("bdseal_version"), "_schema": info.get("schema")}
    return tensors, meta


# ------------------------------------------------------------------------------------------------ trees


def _dataclass_type(name: str, path: Path) -> type:
    """A dataclass by ``module:qualname``, admitted only from the ``bdseal`` package."""
    module, _, qual = name.partition(":")
    if not (module == "bdseal" or module.startswith("bdseal.")):
        raise CorruptFileError(f"{path} names type {name!r}, which is not a bdseal dataclass")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise CorruptFileError(f"{path} names type {name!r}, which is not a bdseal dataclass")
    return obj


def encode_tree(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)``: the tensors of a nested value by path, and a JSON skeleton referencing them.
    Admits tensors, numpy arrays, None/bool/int/float/str, lists, tuples, dicts and bdseal dataclasses."""
    tensors: dict[str, torch.Tensor] = {}
    by_id: dict[int, str] = {}  # one tensor object reached twice is stored once and comes back shared

    def enc(v: Any, where: str) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) not in by_id:
                by_id[id(v)] = where
                tensors[where] = v
            return {"__t__": by_id[id(v)]}
        if isinstance(v, np.ndarray):
            tensors[where] = torch.from_numpy(np.ascontiguousarray(v))
            return {"__np__": where}
        if isinstance(v, torch.device):
            return {"__device__": str(v)}
        if isinstance(v, float) and not np.isfinite(v):
            return {"__float__": repr(v)}
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (np.integer, np.floating, np.bool_)):
            return v.item()
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            cls = type(v)
            if not cls.__module__.startswith("bdseal"):
                raise TypeError(f"encode_tree: {cls.__module__}.{cls.__qualname__} is not a bdseal dataclass")
            fields = {f.name: enc(getattr(v, f.name), f"{where}.{f.name}") for f in dataclasses.fields(v)}
            return {"__dc__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            if all(isinstance(k, str) for k in v):
                return {"__dict__": {k: enc(x, f"{where}/{k}") for k, x in v.items()}}
            return {"__items__": [[enc(k, f"{where}/k{i}"), enc(x, f"{where}/v{i}")] for i, (k, x) in enumerate(v.items())]}
        raise TypeError(f"encode_tree: cannot store a {type(v).__name__} at {where or 'the top'}")

    return tensors, enc(obj, "")


def decode_tree(tensors: Mapping[str, torch.Tensor], skeleton: Any, path: Path = Path("<memory>")) -> Any:
    """Inverse of :func:`encode_tree`; builds only containers, tensors and bdseal dataclasses."""

    def dec(s: Any) -> Any:
        if isinstance(s, list):
            return [dec(x) for x in s]
        if not isinstance(s, dict):
            return s
        if "__t__" in s or "__np__" in s:
            key = s.get("__t__", s.get("__np__"))
            if key not in tensors:
                raise CorruptFileError(f"{path} lacks tensor {key!r}")
            return tensors[key] if "__t__" in s else tensors[key].numpy()
        if "__device__" in s:
            return torch.device(s["__device__"])
        if "__float__" in s:
            return float(s["__float__"])
        if "__tuple__" in s:
            return tuple(dec(x) for x in s["__tuple__"])
        if "__dict__" in s:
            return {k: dec(x) for k, x in s["__dict__"].items()}
        if "__items__" in s:
            return {_hashable(dec(k)): dec(x) for k, x in s["__items__"]}
        if "__dc__" in s:
            cls = _dataclass_type(s["__dc__"], path)
            obj = object.__new__(cls)
            names = {f.name for f in dataclasses.fields(cls)}
            for k, x in s["fields"].items():
                if k not in names:
                    raise CorruptFileError(f"{path}: {s['__dc__']} has no field {k!r} (written by another bdseal version)")
                object.__setattr__(obj, k, dec(x))
            return obj
        raise CorruptFileError(f"{path}: unknown entry {sorted(s)[:3]}")

    return dec(skeleton)


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def save_tree(path: str | Path, obj: Any, meta: Mapping[str, Any] | None = None) -> Path:
    """Atomically store a nested value (see :func:`encode_tree`) with JSON ``meta``."""
    tensors, skeleton = encode_tree(obj)
    return save_tensors(path, tensors, {**dict(meta or {}), "tree": skeleton})


def load_tree(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(value, meta)`` of a file written by :func:`save_tree` (verified like :func:`load_tensors`)."""
    path = Path(path)
    tensors, meta = load_tensors(path)
    if "tree" not in meta:
        raise CorruptFileError(f"{path} holds plain tensors, not a bdseal value")
    return decode_tree(tensors, meta.pop("tree"), path), meta


# ----------------------------------------------------------------------------------------------- models


def model_info(model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
    """What ``model.json`` records: class, number of classes and normalisation where the model has them."""
    info: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    for attr in ("num_classes", "arch"):
        if hasattr(model, attr):
            info[attr] = getattr(model, attr)
    norm = next((m for m in model.modules() if isinstance(getattr(m, "mean", None), torch.Tensor)
                 and isinstance(getattr(m, "std", None), torch.Tensor)), None)
    if norm is not None:  # the input normalisation layer (bdseal.models.base.Normalize)
        info["mean"] = [float(x) for x in norm.mean.detach().reshape(-1).cpu()]
        info["std"] = [float(x) for x in norm.std.detach().reshape(-1).cpu()]
    info.update(extra)
    return info


def save_model(directory: str | Path, model: torch.nn.Module | Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
    """``directory/model.safetensors`` (verified weights + meta) and ``directory/model.json`` (the same meta
    for people, plus the payload's sha256). Returns the ``.safetensors`` path."""
    directory = Path(directory)
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    info = {**(model_info(model) if isinstance(model, torch.nn.Module) else {}), **dict(meta or {})}
    data = tensors_to_bytes(state, {"kind": "model", **info})
    path = atomic_write_bytes(directory / MODEL_FILE, data)
    atomic_write_json(directory / MODEL_META, {"schema": SCHEMA_VERSION, "bdseal_version": __version__,
                                               "file": MODEL_FILE, "file_sha256": hashlib.sha256(data).hexdigest(), **info})
    return path


def load_legacy_pt(path: str | Path) -> Any:
    """A legacy ``torch.save`` file read with ``torch.load(weights_only=True)`` (tensors and plain
    containers only; no code runs). Anything else is refused with :class:`CorruptFileError`."""
    import pickle

    path = Path(path)
    log.warning("reading legacy checkpoint %s with torch.load(weights_only=True); re-save it as .safetensors with bdseal", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CorruptFileError(
            f"{path} holds Python objects, not just tensors; bdseal does not unpickle them (it could run code). "
            "Save a plain state_dict (or model.safetensors) instead") from e
    except Exception as e:  # torch raises many types for damaged archives (and delegates *.safetensors)
        raise CorruptFileError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def load_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` from a run directory, a ``.safetensors`` file or a legacy ``.pt`` state dict.
    A directory is searched for ``model.safetensors`` then ``model.pt``."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE if (p / MODEL_FILE).exists() else p / "model.pt"
    if not p.exists():
        raise FileNotFoundError(p)
    if p.suffix != ".pt" and p.suffix != ".pth":
        with open(p, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:
            return load_tensors(p)
    state = load_legacy_pt(p)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a legacy training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFileError(f"{p} is not a state dict (name -> tensor)")
    return state, {"legacy_pt": True}
