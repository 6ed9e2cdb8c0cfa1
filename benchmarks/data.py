"""CIFAR-10 for the seed6 benchmark: decode once, cache as uint8, standardize per image.

Accepted sources (``path``):

(a) a tar archive (optionally compressed) in ImageFolder layout:
    ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``, possibly below one top folder;
    this is the layout of ``shared/data/cifar10-jpeg.tar``;
(b) an ImageFolder directory with ``train/`` and ``test/`` sub-folders, same layout;
(c) the official python release, ``cifar-10-batches-py`` (the folder itself, a folder
    containing it, or the ``cifar-10-python.tar.gz`` archive).

The decoded images are cached as ``uint8`` arrays (N x 32 x 32 x 3, HWC, RGB) plus
``int64`` labels in an ``.npz`` under :func:`cache_dir`, keyed by the source's
path, size and modification time, so a changed source is decoded again.
Labels are the positions of the class folder names in sorted order (for (c), the
official label indices, which are the same sorted order for CIFAR-10).

Example::

    from benchmarks.data import load_cifar10
    x_train, y_train, x_test, y_test = load_cifar10("../shared/data/cifar10-jpeg.tar")
    # x_*: float32 N x 3 x 32 x 32, standardized per image; y_*: int64 N
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from deepopt.datasets import cache_dir

__all__ = [
    "CLASSES",
    "cache_dir",
    "load_cifar10",
    "load_cifar10_uint8",
    "standardize",
]

#: CIFAR-10 class names; label index = position (the sorted folder names).
CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Bump when the cached arrays' meaning changes, so stale caches are not reused.
_CACHE_FORMAT = 1
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_SPLITS = ("train", "test")
_BATCH_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_LAYOUTS = (
    "accepted layouts: (a) a tar archive with train/<class>/*.jpg and test/<class>/*.jpg, "
    "(b) a directory with train/<class>/*.jpg and test/<class>/*.jpg, "
    "(c) the official 'cifar-10-batches-py' folder (data_batch_1..5, test_batch), "
    "a folder containing it, or 'cifar-10-python.tar.gz'"
)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_cifar10(
    path: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None
) -> Tensors:
    """Load CIFAR-10 as standardized float32 NCHW tensors (seed6.md preprocessing).

    Args:
        path: the data source; see the module docstring for the accepted layouts.
        cache: cache directory; default :func:`cache_dir`.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: ``x_*`` float32 ``N x 3 x 32 x 32``,
        each image standardized by :func:`standardize`; ``y_*`` int64 ``N``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but holds none of the accepted layouts, or an
            image is not 32 x 32.
    """
    x_train, y_train, x_test, y_test = load_cifar10_uint8(path, cache=cache)
    return (
        standardize(x_train),
        torch.from_numpy(y_train),
        standardize(x_test),
        torch.from_numpy(y_test),
    )


def validation_split(data: Tensors, size: int = 5000) -> Tensors:
    """Hold ``size`` training images out as the evaluation set; the test set is dropped.

    Hyperparameters (a radius, a noise scale) are chosen on this split, never on the test
    set. The held-out images are a fixed random subset (generator seed 0), the same for
    every run, so that class-sorted sources do not give a one-class split.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(10, 1), torch.arange(10)
        >>> xt, yt, xv, yv = validation_split((x, y, x[:0], y[:0]), size=3)
        >>> len(yt), len(yv), sorted(torch.cat([yt, yv]).tolist()) == list(range(10))
        (7, 3, True)
    """
    x_train, y_train = data[0], data[1]
    if not 0 < size < len(y_train):
        raise ValueError(f"size={size} is invalid: it must lie in (0, {len(y_train)}).")
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))
    keep, held = order[:-size].sort().values, order[-size:].sort().values
    return x_train[keep], y_train[keep], x_train[held], y_train[held]


def standardize(images: np.ndarray | torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """Per-image standardization, as ``tf.image.per_image_standardization``.

    For each image ``x`` (its 3,072 raw 0..255 values):
    ``(x - mean(x)) / max(std(x), 1/sqrt(x.numel()))``, with the population std
    (divide by n, not n - 1). The statistics are computed in float64, the result
    stored in float32.

    Args:
        images: ``uint8`` (or any real dtype) array ``N x H x W x C`` (HWC, as cached).
        chunk: images processed at once; bounds the float64 working memory.

    Returns:
        float32 tensor ``N x C x H x W`` (contiguous NCHW).
    """
    src = torch.as_tensor(images)
    if src.ndim != 4:
        raise ValueError(f"images must be N x H x W x C, got shape {tuple(src.shape)}")
    n, h, w, c = src.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    floor = 1.0 / math.sqrt(h * w * c)
    for i in range(0, n, chunk):
        x = src[i : i + chunk].to(torch.float64)
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1, correction=0).clamp_min(floor)
        x = (x - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
        out[i : i + chunk] = x.permute(0, 3, 1, 2)
    return out


def load_cifar10_uint8(
    path: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None
) -> Arrays:
    """Load the raw images, decoding the source only if no valid cache entry exists.

    Args:
        path: the data source; see the module docstring.
        cache: cache directory; default :func:`cache_dir`.

    Returns:
        ``(x_train, y_train, x_test, y_test)`` as numpy arrays: ``x_*`` uint8
        ``N x 32 x 32 x 3``; ``y_*`` int64 ``N``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_cifar10`.
    """
    src = Path(path).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"CIFAR-10 source not found: '{src}' ({_LAYOUTS})")
    src = src.resolve()
    key = _source_key(src)
    cdir = Path(cache).expanduser() if cache is not None else cache_dir()
    cfile = cdir / f"cifar10-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cfile.exists():
        cached = _read_cache(cfile, key)
        if cached is not None:
            return cached
    arrays = _decode(src)
    _write_cache(cfile, key, arrays)
    return arrays


# --------------------------------------------------------------------------- cache


def _stat_sig(p: Path) -> list[object]:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _source_key(src: Path) -> str:
    """Path + size + mtime of the source; for a folder, of the entries that hold the data.

    A folder's own mtime does not change when a file two levels down does, so the
    split and class folders (ImageFolder) or the batch files (python release) are
    included too.
    """
    parts: list[object] = [_CACHE_FORMAT, _stat_sig(src)]
    if src.is_dir():
        batches = _batches_dir(src)
        if batches is not None:
            for names in _BATCH_FILES.values():
                parts += [_stat_sig(batches / n) for n in names]
        else:
            for split in _SPLITS:
                d = src / split
                if d.is_dir():
                    parts.append(_stat_sig(d))
                    parts += [_stat_sig(c) for c in sorted(d.iterdir()) if c.is_dir()]
    return json.dumps(parts)


def _read_cache(cfile: Path, key: str) -> Arrays | None:
    try:
        with np.load(cfile, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return (z["x_train"], z["y_train"], z["x_test"], z["y_test"])
    except (OSError, KeyError, ValueError):
        return None  # unreadable or partial cache: decode again and overwrite it


def _write_cache(cfile: Path, key: str, arrays: Arrays) -> None:
    cfile.parent.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays
    # Write to a temporary file and rename, so a crash or a concurrent reader never
    # sees a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=cfile.parent, prefix=cfile.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, key=np.array(key), x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shareable read-only data
        os.replace(tmp, cfile)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- decoding


def _decode(src: Path) -> Arrays:
    if src.is_dir():
        batches = _batches_dir(src)
        if batches is not None:
            return _from_batches(
                {n: (batches / n).read_bytes for names in _BATCH_FILES.values() for n in names}, src
            )
        if all((src / s).is_dir() for s in _SPLITS):
            files = (
                (s, c.name, f.name, f.read_bytes)
                for s in _SPLITS
                for c in sorted((src / s).iterdir())
                if c.is_dir()
                for f in sorted(c.iterdir())
                if _is_image(f.name)
            )
            return _from_image_files(files, src)
        raise ValueError(
            f"'{src}' is a directory but has neither train/ and test/ nor cifar-10-batches-py ({_LAYOUTS})"
        )
    if src.is_file() and tarfile.is_tarfile(src):
        return _decode_tar(src)
    raise ValueError(f"'{src}' is neither a directory nor a tar archive ({_LAYOUTS})")


def _batches_dir(src: Path) -> Path | None:
    for d in (src, src / "cifar-10-batches-py"):
        if all((d / n).is_file() for names in _BATCH_FILES.values() for n in names):
            return d
    return None


def _decode_tar(src: Path) -> Arrays:
    with tarfile.open(src) as tar:
        members = [m for m in tar if m.isfile()]
        by_name = {Path(m.name).name: m for m in members}
        wanted = [n for names in _BATCH_FILES.values() for n in names]
        if all(n in by_name for n in wanted):
            return _from_batches({n: _tar_reader(tar, by_name[n]) for n in wanted}, src)
        files = []
        for m in members:
            parts = Path(m.name).parts
            # .../<split>/<class>/<file>; any leading folders are ignored.
            if len(parts) >= 3 and parts[-3] in _SPLITS and _is_image(parts[-1]):
                files.append((parts[-3], parts[-2], parts[-1], _tar_reader(tar, m)))
        if not files:
            raise ValueError(
                f"tar archive '{src}' holds no images under train/<class>/ or test/<class>/ ({_LAYOUTS})"
            )
        # Decode in archive order (cheap for compressed archives), then sort.
        return _from_image_files(files, src)


def _tar_reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        f = tar.extractfile(member)
        if f is None:
            raise ValueError(f"cannot read '{member.name}' from '{tar.name}'")
        return f.read()

    return read


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_IMAGE_SUFFIXES)


def _from_image_files(
    files: Iterable[tuple[str, str, str, Callable[[], bytes]]], src: Path
) -> Arrays:
    """Decode ``(split, class, file name, read)`` records into sorted arrays."""
    from PIL import Image  # only needed to decode; the cache path does not import Pillow

    decoded: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in _SPLITS}
    for split, cls, name, read in files:
        with Image.open(io.BytesIO(read())) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if arr.shape != (32, 32, 3):
            raise ValueError(
                f"'{src}': {split}/{cls}/{name} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32"
            )
        decoded[split].append((cls, name, arr))
    classes = {s: sorted({c for c, _, _ in decoded[s]}) for s in _SPLITS}
    for s in _SPLITS:
        if not decoded[s]:
            raise ValueError(f"'{src}' has no images under {s}/<class>/ ({_LAYOUTS})")
    if classes["train"] != classes["test"]:
        raise ValueError(
            f"'{src}': train classes {classes['train']} differ from test classes {classes['test']}"
        )
    index = {c: i for i, c in enumerate(classes["train"])}
    out: list[np.ndarray] = []
    for s in _SPLITS:
        recs = sorted(decoded[s], key=lambda r: (r[0], r[1]))
        out.append(np.stack([r[2] for r in recs]))
        out.append(np.array([index[r[0]] for r in recs], dtype=np.int64))
    return out[0], out[1], out[2], out[3]


def _from_batches(readers: dict[str, Callable[[], bytes]], src: Path) -> Arrays:
    """Official python release: pickled dicts with b'data' (N x 3072, CHW planes) and b'labels'.

    Only unpickle files you trust (pickle can run code); this reads local data the
    user pointed at.
    """
    out: list[np.ndarray] = []
    for split in _SPLITS:
        xs, ys = [], []
        for name in _BATCH_FILES[split]:
            try:
                d = pickle.loads(readers[name](), encoding="bytes")
                data = np.asarray(d[b"data"], dtype=np.uint8)
                labels = np.asarray(d[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, KeyError, TypeError, EOFError) as e:
                raise ValueError(f"'{src}': {name} is not a CIFAR-10 python batch ({e!r})") from e
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise ValueError(
                    f"'{src}': {name} has data of shape {data.shape}, expected N x 3072"
                )
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(labels)
        out.append(np.ascontiguousarray(np.concatenate(xs)))
        out.append(np.concatenate(ys))
    return out[0], out[1], out[2], out[3]
