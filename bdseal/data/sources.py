"""Dataset sources: ``load_dataset(name, root=None, **options) -> DataSplits``.

Every source turns its files into numpy arrays and hands them to :func:`make_dataset`, the one
place where shapes, dtypes, layouts and label ranges are validated. Images end up as ``uint8``
``(N, C, H, W)`` tensors (see :mod:`bdseal.data.dataset`).

Sources: ``digits`` (embedded default, scikit-learn), ``synthetic`` (generated, for tests),
``cifar10`` / ``cifar100`` (``.npz`` or official pickle directory, optional download),
``gtsrb`` (official layout or ``.npz``) and ``imagefolder`` (``root/{train,test}/<class>/*``).
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import inspect
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import DataError, DataSplits, ImageDataset

__all__ = [
    "SOURCES",
    "IMAGE_EXTENSIONS",
    "default_root",
    "list_datasets",
    "load_dataset",
    "load_npz",
    "make_dataset",
    "register_source",
    "stratified_split_indices",
]

SOURCES: dict[str, Callable[..., DataSplits]] = {}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SHARED_DATA = _REPO_ROOT.parent / "shared" / "data"


def register_source(name: str) -> Callable[[Callable[..., DataSplits]], Callable[..., DataSplits]]:
    """Decorator adding a loader ``fn(root=None, **options) -> DataSplits`` to :data:`SOURCES`."""

    def deco(fn: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        SOURCES[name.lower()] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (built-in sources and plugins)."""
    from bdseal.registry import load_entry_point_plugins

    load_entry_point_plugins()
    return sorted(SOURCES)


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> DataSplits:
    """Load dataset ``name`` (see :func:`list_datasets`) as uint8 NCHW train/test splits."""
    key = str(name).lower()
    if key not in SOURCES and key not in list_datasets():
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    fn = SOURCES[key]
    try:
        inspect.signature(fn).bind(root=root, **options)
    except TypeError:
        accepted = [p for p in inspect.signature(fn).parameters if p != "root"]
        bad = sorted(set(options) - set(accepted))
        raise DataError(f"dataset {key!r}: unknown option(s) {bad}; accepted: {accepted}") from None
    return fn(root=root, **options)


def default_root() -> Path:
    """``$BDSEAL_DATA`` or ``~/.cache/bdseal/data``."""
    env = os.environ.get("BDSEAL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bdseal" / "data"


# ---------------------------------------------------------------------------------------------
# validation helper (used by every source)
# ---------------------------------------------------------------------------------------------


def make_dataset(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor | Sequence[int],
    classes: Sequence[str] | None = None,
    *,
    what: str = "data",
) -> ImageDataset:
    """Validate numpy images/labels and build an :class:`ImageDataset`.

    ``x``: uint8 (or integer in 0..255) images, ``(N, H, W)``, ``(N, C, H, W)`` or
    ``(N, H, W, C)`` with ``C`` in (1, 3); NHWC is transposed to NCHW. ``y``: integer labels
    ``(N,)`` in ``[0, len(classes))``. ``what`` names the data in error messages.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"{what}: images must be uint8, got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{what}: integer images must lie in 0..255")
        x = x.astype(np.uint8)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{what}: images must be (N,C,H,W) or (N,H,W,C), got shape {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        pass  # NCHW
    elif x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW (also wins for tiny ambiguous shapes)
    else:
        raise DataError(f"{what}: cannot find a channel axis with 1 or 3 channels in shape {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{what}: labels must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if len(y) != len(x):
        raise DataError(f"{what}: {len(x)} images but {len(y)} labels")
    y = y.astype(np.int64)
    if classes is None or len(classes) == 0:
        classes = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes]
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise DataError(
            f"{what}: labels span [{int(y.min())}, {int(y.max())}] but there are {len(classes)} classes"
        )
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), classes)


def _check_shared_shape(splits: DataSplits) -> DataSplits:
    tr, te = splits.train, splits.test
    if tr.image_shape != te.image_shape and len(te):
        raise DataError(f"{splits.name}: train images {tr.image_shape} but test images {te.image_shape}")
    if tr.classes != te.classes:
        raise DataError(f"{splits.name}: train and test class names differ")
    return splits


def stratified_split_indices(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split of ``range(len(y))`` into sorted (train, test) indices."""
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.RandomState(seed)
    test: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = int(round(test_fraction * len(idx)))
        if test_fraction > 0 and len(idx) > 1:
            n = min(max(n, 1), len(idx) - 1)
        test.append(idx[:n])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[te] = False
    return np.flatnonzero(mask), te


# ---------------------------------------------------------------------------------------------
# npz files
# ---------------------------------------------------------------------------------------------


def load_npz(path: str | os.PathLike, name: str = "npz") -> DataSplits:
    """Read ``x_train, y_train, x_test, y_test`` (+ optional ``classes``) from an ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise DataError(f"{name}: {path} is not an .npz archive (it does not start like a zip file); "
                        "regenerate it with numpy.savez or point the dataset's root at the right file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise DataError(f"{name}: {path} lacks arrays {missing} (has {z.files})")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            classes = [str(c) for c in z["classes"].tolist()] if "classes" in z.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:  # truncated or damaged archive
        why = "it holds object arrays, which bdseal does not unpickle" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise DataError(f"{name}: cannot read {path} ({why}); the file is damaged or truncated: regenerate or re-download it") from e
    if classes is None:
        ys = np.concatenate([arrays["y_train"].ravel(), arrays["y_test"].ravel()])
        classes = [str(i) for i in range(int(ys.max()) + 1 if ys.size else 0)]
    train = make_dataset(arrays["x_train"], arrays["y_train"], classes, what=f"{name} train ({path})")
    test = make_dataset(arrays["x_test"], arrays["y_test"], classes, what=f"{name} test ({path})")
    return _check_shared_shape(DataSplits(name, train, test))


@register_source("npz")
def load_npz_source(root: str | os.PathLike | None = None) -> DataSplits:
    """``root``: an ``.npz`` with ``x_train, y_train, x_test, y_test`` (+ ``classes``), or a directory written
    by ``bdseal poison`` (its ``poisoned.npz``: the poisoned images with their observed labels)."""
    if root is None:
        raise DataError("dataset=npz needs dataset.root=<file.npz or a bdseal poison directory>")
    path = Path(root).expanduser()
    if path.is_dir():
        path = path / "poisoned.npz"
    return load_npz(path, name="npz")


# ---------------------------------------------------------------------------------------------
# digits (embedded default) and synthetic
# ---------------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float images in 0..16 and int64 labels, read straight from scikit-learn's
    bundled ``digits.csv.gz`` (importing sklearn itself costs seconds)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise DataError("digits: scikit-learn is required for the digits dataset") from e
    d = load_digits()
    return d.images, d.target.astype(np.int64)


@register_source("digits")
def load_digits_source(
    root: str | None = None,
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled to ``image_size`` RGB (``root`` unused)."""
    if channels not in (1, 3):
        raise DataError(f"digits: channels must be 1 or 3, got {channels}")
    images, y = _digits_arrays()
    imgs = torch.from_numpy(images.astype(np.float32) * (255.0 / 16.0))[:, None]
    imgs = F.interpolate(imgs, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = imgs.round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1).numpy()
    tr, te = stratified_split_indices(y, test_fraction, seed)
    classes = [str(i) for i in range(10)]
    return DataSplits(
        "digits", make_dataset(x[tr], y[tr], classes, what="digits"), make_dataset(x[te], y[te], classes, what="digits")
    )


def _synthetic_images(
    labels: torch.Tensor, num_classes: int, size: int, channels: int, noise: float, g: torch.Generator
) -> torch.Tensor:
    n = len(labels)
    hues = torch.arange(num_classes, dtype=torch.float32) / num_classes
    colours = torch.tensor([colorsys.hsv_to_rgb(float(h), 0.8, 0.9) for h in hues], dtype=torch.float32)
    angles = math.pi * torch.arange(num_classes, dtype=torch.float32) / num_classes
    freqs = 1.5 + (torch.arange(num_classes) % 3).float()  # cycles per image
    coords = torch.linspace(-0.5, 0.5, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    a, f = angles[labels], freqs[labels]
    phase = torch.rand(n, generator=g) * 2 * math.pi
    proj = xx[None] * torch.cos(a)[:, None, None] + yy[None] * torch.sin(a)[:, None, None]
    wave = torch.sin(2 * math.pi * f[:, None, None] * proj + phase[:, None, None])  # (n,H,W)
    if channels == 3:
        base = colours[labels][:, :, None, None]
    else:
        base = (0.3 + 0.4 * hues[labels])[:, None, None, None]
    img = base * (0.65 + 0.35 * wave[:, None]) + noise * torch.randn(n, channels, size, size, generator=g)
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


@register_source("synthetic")
def load_synthetic(
    root: str | None = None,
    num_classes: int = 10,
    n_train: int = 100,
    n_test: int = 20,
    image_size: int = 32,
    channels: int = 3,
    noise: float = 0.08,
    seed: int = 0,
) -> DataSplits:
    """Deterministic class patterns (colour + oriented sinusoid + noise); ``n_train``/``n_test`` are per class."""
    if num_classes < 1 or n_train < 0 or n_test < 0 or image_size < 2 or channels not in (1, 3):
        raise DataError(
            f"synthetic: bad options num_classes={num_classes} n_train={n_train} n_test={n_test} "
            f"image_size={image_size} channels={channels}"
        )
    g = torch.Generator().manual_seed(int(seed))
    classes = [f"class{i}" for i in range(num_classes)]
    out = []
    for n in (n_train, n_test):
        y = torch.arange(num_classes).repeat_interleave(n)
        y = y[torch.randperm(len(y), generator=g)]
        x = _synthetic_images(y, num_classes, image_size, channels, noise, g)
        out.append(make_dataset(x, y, classes, what="synthetic"))
    return DataSplits("synthetic", out[0], out[1])


# ---------------------------------------------------------------------------------------------
# file lookup and download
# ---------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_and_extract(url: str, md5: str, dest: Path, name: str) -> None:
    """Download ``url`` into ``dest``, verify its md5 and extract the tarball there."""
    import urllib.request

    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / url.rsplit("/", 1)[-1]
    if not (archive.is_file() and _md5(archive) == md5):
        fd, tmp = tempfile.mkstemp(dir=dest, suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise DataError(f"{name}: download of {url} failed: {e}") from e
        got = _md5(Path(tmp))
        if got != md5:
            Path(tmp).unlink(missing_ok=True)
            raise DataError(f"{name}: md5 mismatch for {url}: got {got}, expected {md5}")
        os.replace(tmp, archive)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - old Python
            tar.extractall(dest)


def _search_dirs(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    return [default_root(), _SHARED_DATA]


def _missing(name: str, looked: Iterable[Path], hint: str) -> DataError:
    paths = ", ".join(str(p) for p in looked)
    return DataError(f"{name}: no data found (looked at: {paths}). {hint}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(
        dir="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": dict(
        dir="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR python batches contain: dicts, lists, bytes, ints and numpy
    arrays / scalars (rebuilt by numpy's own reconstructors). Any other global is refused, so a hostile
    file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        try:
            from numpy._core import multiarray as ma  # numpy >= 2
        except ImportError:  # numpy 1.x
            from numpy.core import multiarray as ma  # type: ignore[no-redef]
        return getattr(ma, name)


def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{name}: cannot read {path} ({e}); it is not an official CIFAR python batch: "
                        "re-download it (download=true) or use an .npz") from e
    if not isinstance(d, dict):
        raise DataError(f"{name}: {path} does not hold a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_cifar_pickles(folder: Path, name: str) -> DataSplits:
    spec = _CIFAR[name]
    for f in [*spec["train"], *spec["test"], spec["meta"]]:
        if not (folder / f).is_file():
            raise DataError(f"{name}: {folder} lacks {f} (official python-pickle layout expected)")

    def part(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(folder / f, name)
            if "data" not in d or spec["label_key"] not in d:
                raise DataError(f"{name}: {folder / f} lacks 'data' or {spec['label_key']!r}")
            data = np.asarray(d["data"])
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{name}: {folder / f} data has shape {data.shape}, expected (N, 3072)")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[spec["label_key"]], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    meta = _unpickle(folder / spec["meta"], name)
    if spec["names_key"] not in meta:
        raise DataError(f"{name}: {folder / spec['meta']} lacks {spec['names_key']!r}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec["names_key"]]]
    (xtr, ytr), (xte, yte) = part(spec["train"]), part(spec["test"])
    return _check_shared_shape(
        DataSplits(
            name,
            make_dataset(xtr, ytr, classes, what=f"{name} train ({folder})"),
            make_dataset(xte, yte, classes, what=f"{name} test ({folder})"),
        )
    )


def _load_cifar(name: str, root: str | os.PathLike | None, download: bool) -> DataSplits:
    spec = _CIFAR[name]
    looked: list[Path] = []
    for base in _search_dirs(root):
        if base.is_file() or base.suffix == ".npz":
            if base.suffix != ".npz":
                raise DataError(f"{name}: {base} is a file but not an .npz")
            return load_npz(base, name)
        npz = base / f"{name}.npz"
        looked.append(npz)
        if npz.is_file():
            return load_npz(npz, name)
        for cand in (base / spec["dir"], base):
            looked.append(cand)
            if (cand / spec["meta"]).is_file():
                return _read_cifar_pickles(cand, name)
    dest = Path(root).expanduser() if root is not None else default_root()
    if download:
        _download_and_extract(spec["url"], spec["md5"], dest, name)
        return _read_cifar_pickles(dest / spec["dir"], name)
    raise _missing(
        name,
        looked,
        f"Pass root= an .npz file (x_train,y_train,x_test,y_test[,classes]) or a directory holding "
        f"{name}.npz or {spec['dir']}/, or use download=True to fetch {spec['url']} into {dest}.",
    )


@register_source("cifar10")
def load_cifar10(root: str | os.PathLike | None = None, download: bool = False) -> DataSplits:
    """CIFAR-10 from an ``.npz``, the official pickle directory, or (``download=True``) the web."""
    return _load_cifar("cifar10", root, download)


@register_source("cifar100")
def load_cifar100(root: str | os.PathLike | None = None, download: bool = False) -> DataSplits:
    """CIFAR-100 (fine labels) from an ``.npz``, the official pickle directory, or the web."""
    return _load_cifar("cifar100", root, download)


# ---------------------------------------------------------------------------------------------
# image files (GTSRB, imagefolder)
# ---------------------------------------------------------------------------------------------


def _read_image(path: Path, size: int, channels: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if box is not None:
                im = im.crop(box)
            im = im.resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stack(images: list[np.ndarray], size: int, channels: int) -> np.ndarray:
    if not images:
        return np.zeros((0, channels, size, size), np.uint8)
    return np.stack(images)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


GTSRB_CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for heavy vehicles", "right of way at next intersection", "priority road", "yield",
    "stop", "no vehicles", "heavy vehicles prohibited", "no entry", "general caution",
    "dangerous curve left", "dangerous curve right", "double curve", "bumpy road", "slippery road",
    "road narrows on the right", "road work", "traffic signals", "pedestrians", "children crossing",
    "bicycles crossing", "beware of ice/snow", "wild animals crossing", "end of all limits",
    "turn right ahead", "turn left ahead", "ahead only", "go straight or right",
    "go straight or left", "keep right", "keep left", "roundabout mandatory", "end of no passing",
    "end of no passing for heavy vehicles",
]


def _read_gt_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def _gtsrb_box(row: dict[str, str], crop_roi: bool) -> tuple[int, int, int, int] | None:
    if not crop_roi:
        return None
    try:
        return (int(row["Roi.X1"]), int(row["Roi.Y1"]), int(row["Roi.X2"]) + 1, int(row["Roi.Y2"]) + 1)
    except (KeyError, ValueError) as e:
        raise DataError(f"gtsrb: bad ROI columns in ground-truth row {row}") from e


def _read_gtsrb_official(base: Path, size: int, crop_roi: bool) -> DataSplits:
    train_dir = base / "Final_Training" / "Images"
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for cdir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        try:
            label = int(cdir.name)
        except ValueError as e:
            raise DataError(f"gtsrb: class folder {cdir} is not a number") from e
        gts = sorted(cdir.glob("GT-*.csv"))
        if gts:
            for row in _read_gt_csv(gts[0]):
                xs.append(_read_image(cdir / row["Filename"], size, 3, _gtsrb_box(row, crop_roi)))
                ys.append(int(row.get("ClassId", label)))
        else:
            for p in sorted(filter(_is_image, cdir.iterdir())):
                xs.append(_read_image(p, size, 3))
                ys.append(label)
    test_dir = base / "Final_Test" / "Images"
    gt = next((p for p in (test_dir / "GT-final_test.csv", base / "GT-final_test.csv",
                           base / "Final_Test" / "GT-final_test.csv") if p.is_file()), None)
    if gt is None:
        raise DataError(
            f"gtsrb: test labels GT-final_test.csv not found in {test_dir} or {base} "
            "(it ships separately as GTSRB_Final_Test_GT.zip)"
        )
    xt: list[np.ndarray] = []
    yt: list[int] = []
    for row in _read_gt_csv(gt):
        if "ClassId" not in row:
            raise DataError(f"gtsrb: {gt} has no ClassId column")
        xt.append(_read_image(test_dir / row["Filename"], size, 3, _gtsrb_box(row, crop_roi)))
        yt.append(int(row["ClassId"]))
    n = max([*ys, *yt, -1]) + 1
    classes = GTSRB_CLASSES if n <= len(GTSRB_CLASSES) else [str(i) for i in range(n)]
    return DataSplits(
        "gtsrb",
        make_dataset(_stack(xs, size, 3), np.asarray(ys, np.int64), classes, what=f"gtsrb train ({train_dir})"),
        make_dataset(_stack(xt, size, 3), np.asarray(yt, np.int64), classes, what=f"gtsrb test ({test_dir})"),
    )


@register_source("gtsrb")
def load_gtsrb(root: str | os.PathLike | None = None, image_size: int = 32, crop_roi: bool = False) -> DataSplits:
    """GTSRB from the official layout (``Final_Training/Images``, ``Final_Test/Images`` + GT csv) or an ``.npz``."""
    looked: list[Path] = []
    for base in _search_dirs(root):
        if base.is_file() or base.suffix == ".npz":
            return load_npz(base, "gtsrb")
        for cand in (base / "gtsrb.npz",):
            looked.append(cand)
            if cand.is_file():
                return load_npz(cand, "gtsrb")
        for cand in (base, base / "GTSRB"):
            looked.append(cand / "Final_Training" / "Images")
            if (cand / "Final_Training" / "Images").is_dir():
                return _read_gtsrb_official(cand, image_size, crop_roi)
    raise _missing(
        "gtsrb",
        looked,
        "Pass root= a gtsrb .npz or a directory with Final_Training/Images/000xx/ and "
        "Final_Test/Images/ + GT-final_test.csv (no automatic download).",
    )


def _class_tree(folder: Path) -> dict[str, list[Path]]:
    return {
        d.name: sorted(filter(_is_image, d.rglob("*")))
        for d in sorted(p for p in folder.iterdir() if p.is_dir())
    }


@register_source("imagefolder")
def load_imagefolder(
    root: str | os.PathLike | None = None,
    image_size: int = 64,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplits:
    """``root/{train,test}/<class>/*.{png,jpg,...}`` (``val`` accepted for ``test``), or a single
    ``root/<class>/*`` tree split per class with ``test_fraction``. Classes sorted by folder name."""
    if root is None:
        raise DataError("imagefolder: root= is required (a folder of class sub-folders)")
    if channels not in (1, 3):
        raise DataError(f"imagefolder: channels must be 1 or 3, got {channels}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder: directory not found: {base}")
    name = f"imagefolder:{base.name}"
    test_dir = next((base / t for t in ("test", "val") if (base / t).is_dir()), None)
    if (base / "train").is_dir():
        tr_tree = _class_tree(base / "train")
        te_tree = _class_tree(test_dir) if test_dir is not None else {}
        extra = sorted(set(te_tree) - set(tr_tree))
        if extra:
            raise DataError(f"{name}: test classes {extra} have no train folder")
    else:
        tr_tree, te_tree = _class_tree(base), {}
    classes = sorted(tr_tree)
    if not classes or not any(tr_tree.values()):
        raise DataError(f"{name}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) under {base}")

    def read(tree: dict[str, list[Path]]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for p in tree.get(c, []):
                xs.append(_read_image(p, image_size, channels))
                ys.append(ci)
        return _stack(xs, image_size, channels), np.asarray(ys, np.int64)

    x, y = read(tr_tree)
    if test_dir is not None and (base / "train").is_dir():
        xt, yt = read(te_tree)
    else:
        tr, te = stratified_split_indices(y, test_fraction, seed)
        x, y, xt, yt = x[tr], y[tr], x[te], y[te]
    return DataSplits(name, make_dataset(x, y, classes, what=name), make_dataset(xt, yt, classes, what=name))
