"""CIFAR-10 loading: the three layouts, the cache, standardization, errors."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import data
from benchmarks.data import cache_dir, load_cifar10, load_cifar10_uint8, standardize

PIL = pytest.importorskip("PIL.Image")

CLASSES = ["cat", "airplane", "dog"]  # written unsorted: labels must follow sorted order


def make_images(seed: int = 0) -> dict[str, dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return {
        split: {
            c: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(k)]
            for c in CLASSES
        }
        for split, k in (("train", 3), ("test", 2))
    }


def expected(
    images: dict[str, dict[str, list[np.ndarray]]], split: str
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, c in enumerate(sorted(CLASSES)):
        xs += images[split][c]
        ys += [label] * len(images[split][c])
    return np.stack(xs), np.array(ys, dtype=np.int64)


def write_folder(root: Path, images: dict[str, dict[str, list[np.ndarray]]]) -> Path:
    for split, by_class in images.items():
        for c, ims in by_class.items():
            (root / split / c).mkdir(parents=True)
            for i, im in enumerate(ims):
                # PNG: lossless, so decoded pixels can be compared exactly.
                PIL.fromarray(im).save(root / split / c / f"{i:04d}.png")
    return root


def write_batches(root: Path, images: dict[str, dict[str, list[np.ndarray]]]) -> Path:
    root.mkdir(parents=True)
    for split, names in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)]),
        ("test", ["test_batch"]),
    ):
        x, y = expected(images, split)
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # official: R, G, B planes
        for k, name in enumerate(names):
            sl = slice(k, None, len(names))
            d = {b"data": flat[sl], b"labels": y[sl].tolist()}
            (root / name).write_bytes(pickle.dumps(d))
    return root


def pairs(x: np.ndarray, y: np.ndarray) -> list[tuple[int, bytes]]:
    return sorted((int(label), im.tobytes()) for im, label in zip(x, y, strict=True))


def check(
    arrays: tuple[np.ndarray, ...],
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
) -> None:
    """Same dtypes and the same multiset of (label, image) pairs per split."""
    got_xtr, got_ytr, got_xte, got_yte = arrays
    for g, e in ((got_xtr, x_tr), (got_ytr, y_tr), (got_xte, x_te), (got_yte, y_te)):
        assert g.dtype == e.dtype and g.shape == e.shape
    assert pairs(got_xtr, got_ytr) == pairs(x_tr, y_tr)
    assert pairs(got_xte, got_yte) == pairs(x_te, y_te)


@pytest.fixture()
def images() -> dict[str, dict[str, list[np.ndarray]]]:
    return make_images()


def test_image_folder(tmp_path: Path, images: dict) -> None:
    src = write_folder(tmp_path / "cifar", images)
    arrays = load_cifar10_uint8(src, cache=tmp_path / "cache")
    x_tr, y_tr = expected(images, "train")
    x_te, y_te = expected(images, "test")
    np.testing.assert_array_equal(arrays[0], x_tr)  # sorted by (class, file name)
    np.testing.assert_array_equal(arrays[1], y_tr)
    np.testing.assert_array_equal(arrays[2], x_te)
    np.testing.assert_array_equal(arrays[3], y_te)
    assert arrays[0].dtype == np.uint8 and arrays[1].dtype == np.int64


@pytest.mark.parametrize("prefix", ["", "cifar10-jpeg/"])
def test_tar(tmp_path: Path, images: dict, prefix: str) -> None:
    src = write_folder(tmp_path / "cifar", images)
    tar = tmp_path / "c.tar"
    with tarfile.open(tar, "w") as t:
        for split in ("test", "train"):  # archive order must not matter
            t.add(src / split, arcname=prefix + split)
    arrays = load_cifar10_uint8(tar, cache=tmp_path / "cache")
    check(arrays, *expected(images, "train"), *expected(images, "test"))
    np.testing.assert_array_equal(arrays[0], expected(images, "train")[0])


def test_python_batches(tmp_path: Path, images: dict) -> None:
    batches = write_batches(tmp_path / "cifar-10-batches-py", images)
    a = load_cifar10_uint8(batches, cache=tmp_path / "c1")
    check(a, *expected(images, "train"), *expected(images, "test"))
    b = load_cifar10_uint8(tmp_path, cache=tmp_path / "c2")  # the folder containing it
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(batches, arcname="cifar-10-batches-py")
    c = load_cifar10_uint8(tgz, cache=tmp_path / "c3")
    for u, v in zip(a, c, strict=True):
        np.testing.assert_array_equal(u, v)


def test_cache_is_used_and_invalidated(
    tmp_path: Path, images: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_folder(tmp_path / "cifar", images)
    tar = tmp_path / "c.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src / "train", arcname="train")
        t.add(src / "test", arcname="test")
    monkeypatch.setenv("DEEPOPT_CACHE", str(tmp_path / "envcache"))
    assert cache_dir() == tmp_path / "envcache"
    first = load_cifar10_uint8(tar)
    assert len(list((tmp_path / "envcache").glob("cifar10-*.npz"))) == 1

    calls = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda p: calls.append(p) or real(p))
    again = load_cifar10_uint8(tar)
    assert calls == []  # served from the cache
    for u, v in zip(first, again, strict=True):
        np.testing.assert_array_equal(u, v)

    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_cifar10_uint8(tar)
    assert len(calls) == 1  # source changed: decoded again


def test_corrupt_cache_is_rebuilt(tmp_path: Path, images: dict) -> None:
    src = write_folder(tmp_path / "cifar", images)
    load_cifar10_uint8(src, cache=tmp_path / "cache")
    (cfile,) = (tmp_path / "cache").glob("*.npz")
    cfile.write_bytes(b"garbage")
    arrays = load_cifar10_uint8(src, cache=tmp_path / "cache")
    np.testing.assert_array_equal(arrays[0], expected(images, "train")[0])


def test_load_cifar10_tensors(tmp_path: Path, images: dict) -> None:
    src = write_folder(tmp_path / "cifar", images)
    x_tr, y_tr, x_te, y_te = load_cifar10(src, cache=tmp_path / "cache")
    assert x_tr.shape == (9, 3, 32, 32) and x_te.shape == (6, 3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_tr.is_contiguous()
    raw = expected(images, "train")[0][4].astype(np.float64)  # HWC
    ref = (raw - raw.mean()) / max(raw.std(), 1 / np.sqrt(3072))
    np.testing.assert_allclose(x_tr[4].numpy(), ref.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_standardize_matches_tf_formula() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x[1] = 7  # constant image: std 0, the 1/sqrt(3072) floor applies -> all zeros
    x[2] = 0
    x[2, 0, 0, 0] = 1  # tiny std, below the floor
    out = standardize(x, chunk=2)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    for i in range(5):
        f = x[i].astype(np.float64)
        ref = (f - f.mean()) / max(f.std(ddof=0), 1 / np.sqrt(3072))
        np.testing.assert_allclose(out[i].numpy(), ref.transpose(2, 0, 1), rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(out[1]) == 0
    assert out[0].mean().abs() < 1e-6 and out[0].std(correction=0) == pytest.approx(1.0, abs=1e-5)


def test_standardize_bad_shape() -> None:
    with pytest.raises(ValueError, match="N x H x W x C"):
        standardize(np.zeros((32, 32, 3), dtype=np.uint8))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.*accepted layouts"):
        load_cifar10(tmp_path / "nope", cache=tmp_path / "cache")


def test_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="neither train/ and test/.*accepted layouts"):
        load_cifar10(tmp_path / "d", cache=tmp_path / "cache")


def test_not_a_tar(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    with pytest.raises(ValueError, match="x.bin.*neither a directory nor a tar"):
        load_cifar10(f, cache=tmp_path / "cache")


def test_tar_without_images(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    tar = tmp_path / "e.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "other", arcname="other")
    with pytest.raises(ValueError, match="no images under train"):
        load_cifar10(tar, cache=tmp_path / "cache")


def test_wrong_image_size(tmp_path: Path, images: dict) -> None:
    src = write_folder(tmp_path / "cifar", images)
    PIL.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(src / "train" / "cat" / "9999.png")
    with pytest.raises(ValueError, match="9999.png is 16x16, expected 32x32"):
        load_cifar10(src, cache=tmp_path / "cache")


def test_class_mismatch(tmp_path: Path, images: dict) -> None:
    src = write_folder(tmp_path / "cifar", images)
    (src / "test" / "dog").rename(src / "test" / "frog")
    with pytest.raises(ValueError, match="train classes"):
        load_cifar10(src, cache=tmp_path / "cache")
