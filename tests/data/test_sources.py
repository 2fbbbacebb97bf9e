"""Dataset sources: embedded/generated data, npz, official CIFAR pickles, image folders, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdseal.data import DataError, DataSplits, list_datasets, load_dataset
from bdseal.data.sources import make_dataset

SHARED_CIFAR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10.npz"


def _check_splits(s: DataSplits, shape: tuple[int, int, int], num_classes: int) -> None:
    for part in (s.train, s.test):
        assert part.x.dtype == torch.uint8 and part.y.dtype == torch.int64
        assert part.image_shape == shape
        assert part.num_classes == num_classes
        assert int(part.y.min()) >= 0 and int(part.y.max()) < num_classes


def test_registry_lists_sources() -> None:
    assert {"digits", "synthetic", "cifar10", "cifar100", "gtsrb", "imagefolder"} <= set(list_datasets())


def test_unknown_name_and_option() -> None:
    with pytest.raises(DataError, match="known datasets: .*digits"):
        load_dataset("mnist-nope")
    with pytest.raises(DataError, match="unknown option"):
        load_dataset("digits", colour=True)


def test_digits() -> None:
    s = load_dataset("digits")
    assert s.name == "digits"
    _check_splits(s, (3, 32, 32), 10)
    assert len(s.train) + len(s.test) == 1797
    assert len(s.test) == pytest.approx(0.2 * 1797, abs=10)
    # stratified: every class present in both splits with similar shares
    assert (s.test.y.bincount(minlength=10) >= 30).all()
    # channels are replicated grey; the range is used
    assert torch.equal(s.train.x[:, 0], s.train.x[:, 2])
    assert int(s.train.x.max()) > 200 and int(s.train.x.min()) == 0
    s2 = load_dataset("digits")
    assert torch.equal(s.train.x, s2.train.x) and torch.equal(s.test.y, s2.test.y)
    small = load_dataset("digits", image_size=16, channels=1)
    assert small.train.image_shape == (1, 16, 16)


def test_synthetic_determinism() -> None:
    a = load_dataset("synthetic", num_classes=4, n_train=10, n_test=5, image_size=16, seed=3)
    b = load_dataset("synthetic", num_classes=4, n_train=10, n_test=5, image_size=16, seed=3)
    c = load_dataset("synthetic", num_classes=4, n_train=10, n_test=5, image_size=16, seed=4)
    _check_splits(a, (3, 16, 16), 4)
    assert len(a.train) == 40 and len(a.test) == 20
    assert (a.train.y.bincount() == 10).all()
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    # classes differ on average (distinct patterns)
    means = torch.stack([a.train.x[a.train.y == k].float().mean(0) for k in range(4)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 100
    grey = load_dataset("synthetic", num_classes=3, n_train=2, n_test=1, channels=1)
    assert grey.train.image_shape == (1, 32, 32)


def _write_npz(path: Path, nhwc: bool, **extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (6, 8, 8, 3) if nhwc else (6, 3, 8, 8)).astype(np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(path, x_train=x, y_train=y, x_test=x[:3], y_test=y[:3], **extra)
    return x, y


@pytest.mark.parametrize("nhwc", [True, False])
def test_npz_layouts(tmp_path: Path, nhwc: bool) -> None:
    f = tmp_path / "cifar10.npz"
    x, y = _write_npz(f, nhwc, classes=np.array(["a", "b", "c"]))
    for root in (f, tmp_path):  # the file itself or a directory holding cifar10.npz
        s = load_dataset("cifar10", root=str(root))
        _check_splits(s, (3, 8, 8), 3)
        assert s.train.classes == ["a", "b", "c"]
        expect = x.transpose(0, 3, 1, 2) if nhwc else x
        assert np.array_equal(s.train.x.numpy(), expect)
        assert np.array_equal(s.train.y.numpy(), y) and len(s.test) == 3


def test_npz_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 5, 8, 8), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((1, 3, 8, 8), np.uint8), y_test=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="channel"):
        load_dataset("cifar10", root=bad)
    np.savez(bad, x_train=np.zeros((4, 3, 8, 8), np.float32), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((1, 3, 8, 8), np.uint8), y_test=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="uint8"):
        load_dataset("cifar10", root=bad)
    np.savez(bad, x_train=np.zeros((4, 3, 8, 8), np.uint8), y_train=np.zeros(3, np.int64),
             x_test=np.zeros((1, 3, 8, 8), np.uint8), y_test=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="4 images but 3 labels"):
        load_dataset("cifar10", root=bad)
    np.savez(bad, x_train=np.zeros((2, 3, 8, 8), np.uint8), y_train=np.array([0, 5]),
             x_test=np.zeros((1, 3, 8, 8), np.uint8), y_test=np.zeros(1, np.int64), classes=np.array(["a", "b"]))
    with pytest.raises(DataError, match="labels span"):
        load_dataset("cifar10", root=bad)
    np.savez(bad, x_train=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="lacks arrays"):
        load_dataset("cifar10", root=bad)


def test_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download=True") as e:
        load_dataset("cifar10", root=tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar100", root=tmp_path / "missing.npz")
    with pytest.raises(DataError, match="gtsrb"):
        load_dataset("gtsrb", root=tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dataset("imagefolder", root=tmp_path / "nope")


def test_make_dataset_validation() -> None:
    ds = make_dataset(np.zeros((2, 4, 4), np.int32), [0, 1])  # (N,H,W) integer -> 1 channel uint8
    assert ds.image_shape == (1, 4, 4) and ds.x.dtype == torch.uint8
    with pytest.raises(DataError, match="0..255"):
        make_dataset(np.full((2, 3, 4, 4), 300), [0, 1])
    with pytest.raises(DataError, match="integers"):
        make_dataset(np.zeros((2, 3, 4, 4), np.uint8), [0.5, 1.0])


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_pickle_layout(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.RandomState(1)
    batches = []
    for i in range(1, 6):
        data = rng.randint(0, 256, (4, 3072)).astype(np.uint8)
        labels = list(rng.randint(0, 10, 4))
        batches.append((data, labels))
        _pickle(d / f"data_batch_{i}", {b"data": data, b"labels": labels, b"batch_label": b"x"})
    tdata = rng.randint(0, 256, (3, 3072)).astype(np.uint8)
    _pickle(d / "test_batch", {b"data": tdata, b"labels": [1, 2, 3]})
    names = [f"c{i}".encode() for i in range(10)]
    _pickle(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    for root in (tmp_path, d):
        s = load_dataset("cifar10", root=root)
        _check_splits(s, (3, 32, 32), 10)
        assert len(s.train) == 20 and len(s.test) == 3
        assert s.train.classes[3] == "c3"
        assert np.array_equal(s.train.x[4].numpy(), batches[1][0][0].reshape(3, 32, 32))
        assert s.test.y.tolist() == [1, 2, 3]


def test_cifar100_pickle_layout(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.RandomState(2)
    _pickle(d / "train", {b"data": rng.randint(0, 256, (5, 3072)).astype(np.uint8),
                          b"fine_labels": [0, 99, 5, 5, 7], b"coarse_labels": [0, 1, 2, 3, 4]})
    _pickle(d / "test", {b"data": rng.randint(0, 256, (2, 3072)).astype(np.uint8),
                         b"fine_labels": [42, 1], b"coarse_labels": [0, 1]})
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    s = load_dataset("cifar100", root=tmp_path)
    _check_splits(s, (3, 32, 32), 100)
    assert s.train.y.tolist() == [0, 99, 5, 5, 7] and s.train.classes[99] == "f99"
    (d / "meta").unlink()
    with pytest.raises(DataError):
        load_dataset("cifar100", root=tmp_path)


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (10, 7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_train_test(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls, col in (("zebra", (250, 0, 0)), ("ant", (0, 0, 250))):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", col)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    s = load_dataset("imagefolder", root=tmp_path, image_size=12)
    _check_splits(s, (3, 12, 12), 2)
    assert s.train.classes == ["ant", "zebra"]
    assert len(s.train) == 6 and len(s.test) == 4
    ant = s.train.x[s.train.y == 0]
    assert (ant[:, 2] == 250).all() and (ant[:, 0] == 0).all()


def test_imagefolder_single_tree_split(tmp_path: Path) -> None:
    for cls in ("a", "b", "c"):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.jpg", (i * 40, 10, 10), size=(20, 20))
    s = load_dataset("imagefolder", root=tmp_path, image_size=8, test_fraction=0.4, seed=1)
    _check_splits(s, (3, 8, 8), 3)
    assert s.train.y.bincount().tolist() == [3, 3, 3] and s.test.y.bincount().tolist() == [2, 2, 2]
    again = load_dataset("imagefolder", root=tmp_path, image_size=8, test_fraction=0.4, seed=1)
    assert torch.equal(s.test.x, again.test.x)


def test_gtsrb_official_layout(tmp_path: Path) -> None:
    base = tmp_path / "GTSRB"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for c in (0, 2):
        cdir = base / "Final_Training" / "Images" / f"{c:05d}"
        rows = []
        for i in range(2):
            fn = f"00000_{i:05d}.ppm"
            _png(cdir / fn, (100 * c, 50, 0), size=(30, 30))
            rows.append(f"{fn};30;30;5;5;24;24;{c}\n")
        (cdir / f"GT-{c:05d}.csv").write_text(header + "".join(rows))
    tdir = base / "Final_Test" / "Images"
    _png(tdir / "00000.ppm", (0, 0, 0), size=(40, 35))
    _png(tdir / "00001.ppm", (200, 50, 0), size=(25, 30))
    (tdir / "GT-final_test.csv").write_text(header + "00000.ppm;40;35;1;1;30;30;0\n00001.ppm;25;30;2;2;20;20;2\n")
    s = load_dataset("gtsrb", root=tmp_path, image_size=16)
    _check_splits(s, (3, 16, 16), 43)
    assert s.train.y.tolist() == [0, 0, 2, 2] and s.test.y.tolist() == [0, 2]
    assert s.train.classes[14] == "stop"
    assert int(s.train.x[2, 0, 8, 8]) == 200
    roi = load_dataset("gtsrb", root=base, image_size=16, crop_roi=True)
    assert len(roi.train) == 4


@pytest.mark.cifar
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="../shared/data/cifar10.npz absent")
def test_shared_cifar10_npz() -> None:
    s = load_dataset("cifar10", root=SHARED_CIFAR)
    _check_splits(s, (3, 32, 32), 10)
    assert len(s.train) == 50000 and len(s.test) == 10000
    assert s.train.classes[0] == "airplane"
    assert (s.test.y.bincount() == 1000).all()


def test_download_verifies_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import tarfile

    from bdseal.data import sources

    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(src / f, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    _pickle(src / "batches.meta", {b"label_names": [b"a", b"b"]})
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    spec = dict(sources._CIFAR["cifar10"], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(sources._CIFAR, "cifar10", spec)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="md5 mismatch"):
        load_dataset("cifar10", root=dest, download=True)
    monkeypatch.setitem(sources._CIFAR, "cifar10", dict(spec, md5=md5))
    s = load_dataset("cifar10", root=dest, download=True)
    assert len(s.train) == 10 and s.train.classes == ["a", "b"]
    assert len(load_dataset("cifar10", root=dest).test) == 2  # found again without downloading


def test_cifar_batches_admit_only_their_own_types(tmp_path: Path) -> None:
    """A pickle that calls ``os.system`` in place of a CIFAR batch is refused by the restricted unpickler."""
    from tests.test_io import _Evil

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _pickle(d / f"data_batch_{i}", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    _pickle(d / "batches.meta", {b"label_names": [b"a", b"b"]})
    marker = tmp_path / "pwned"
    _pickle(d / "test_batch", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(DataError, match="posix.system is not allowed|os.system is not allowed|nt.system is not allowed"):
        load_dataset("cifar10", root=d)
    assert not marker.exists()


def test_damaged_npz_errors_name_the_file_and_never_suggest_pickle(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x_train=np.zeros((4, 3, 8, 8), np.uint8), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((1, 3, 8, 8), np.uint8), y_test=np.zeros(1, np.int64))
    data = good.read_bytes()
    for name, content in (("truncated.npz", data[: len(data) // 2]), ("random.npz", np.random.RandomState(0).bytes(500))):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(DataError) as e:
            load_dataset("cifar10", root=p)
        assert str(p) in str(e.value) and "allow_pickle" not in str(e.value)
