"""Pack CIFAR-10 (the benchmark .npz) into JPEG bytes small enough to ship to a remote GPU, and unpack it.

Why: a remote GPU call here carries at most 64 MiB of files per call; the 170 MB .npz does not fit.
`pack` re-encodes every image as a JPEG (quality 90, no chroma subsampling: PSNR ~43 dB against the .npz, whose
pixels already come from JPEGs) and keeps all 50,000 training images and the first `--test-per-class` test images
of each class. `unpack` decodes back to an .npz with the same arrays, readable by `dataset=cifar10 dataset.root=...`.
GPU numbers in docs/BENCHMARKS.md that say "CIFAR-10 (JPEG q90 transfer copy)" were measured on such a copy.

    python scripts/cifar_jpeg.py pack ../shared/data/cifar10.npz .gpudata/cifar10_q90.npz
    python scripts/cifar_jpeg.py unpack .gpudata/cifar10_q90.npz /tmp/cifar10.npz
"""
from __future__ import annotations

import argparse
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def _encode(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _decode(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def _pack_split(x: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    blobs = [_encode(img, quality) for img in x]
    sizes = np.array([len(b) for b in blobs], dtype=np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), sizes


def _unpack_split(data: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    ends = np.cumsum(sizes)
    starts = ends - sizes
    raw = data.tobytes()
    with ThreadPoolExecutor() as pool:
        images = list(pool.map(lambda se: _decode(raw[se[0]:se[1]]), zip(starts, ends)))
    return np.stack(images)


def first_per_class(y: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of every class, in dataset order."""
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    return np.sort(keep)


def pack(src: str, dst: str, quality: int, test_per_class: int) -> None:
    d = np.load(src)
    test_idx = first_per_class(d["y_test"], test_per_class)
    out = {"classes": d["classes"], "y_train": d["y_train"], "y_test": d["y_test"][test_idx]}
    out["jpg_train"], out["len_train"] = _pack_split(d["x_train"], quality)
    out["jpg_test"], out["len_test"] = _pack_split(d["x_test"][test_idx], quality)
    np.savez(dst, **out)


def unpack(src: str, dst: str) -> None:
    d = np.load(src)
    np.savez(dst, classes=d["classes"], y_train=d["y_train"], y_test=d["y_test"],
             x_train=_unpack_split(d["jpg_train"], d["len_train"]), x_test=_unpack_split(d["jpg_test"], d["len_test"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["pack", "unpack"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--test-per-class", type=int, default=500)
    args = parser.parse_args()
    if args.mode == "pack":
        pack(args.src, args.dst, args.quality, args.test_per_class)
    else:
        unpack(args.src, args.dst)


if __name__ == "__main__":
    main()
