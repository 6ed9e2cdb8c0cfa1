"""Datasets deepopt runs on out of the box, and where decoded data is cached.

MNIST-1D (Greydanus 2020) is the embedded default dataset of ``deepopt demo``: the
``mnist1d`` package generates it offline and deterministically (4,000 training and 1,000
test sequences of length 40, 10 classes; no download), and it is cached as ``.npz``
under :func:`cache_dir`. CIFAR-10 for the seed benchmark is read from a local copy by
``benchmarks.data`` (the lab beside the package in the repository), which caches into the
same folder.

Example:
    >>> from deepopt.datasets import load_mnist1d
    >>> data = load_mnist1d()
    >>> tuple(data["x"].shape), tuple(data["x_test"].shape)
    ((4000, 40), (1000, 40))
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["cache_dir", "load_mnist1d"]

# Bump when the cached arrays' meaning changes, so stale caches are not reused.
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    """Directory of the dataset cache: ``$DEEPOPT_CACHE`` if set and non-empty, else ``~/.cache/deepopt``."""
    env = os.environ.get("DEEPOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deepopt"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Generate MNIST-1D with the package's default arguments, offline.

    ``make_dataset`` seeds NumPy's and Python's global generators itself (seed 42), so
    the result is deterministic; the caller's global random state is restored after.
    """
    import matplotlib

    matplotlib.use("Agg")  # mnist1d.utils imports pyplot; never open a window
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())  # builds from templates, no download
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.ascontiguousarray(raw["x"], dtype=np.float32),
        "y": np.ascontiguousarray(raw["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(raw["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(raw["y_test"], dtype=np.int64),
    }


def _cache_key() -> str:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    text = json.dumps({"format": _CACHE_FORMAT, "args": args}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _valid(arrays: dict[str, np.ndarray]) -> bool:
    try:
        x, y, xt, yt = arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]
    except KeyError:
        return False
    return (
        x.ndim == 2 and xt.ndim == 2 and x.shape[1] == xt.shape[1]
        and len(x) == len(y) and len(xt) == len(yt) and len(x) > 0
        and bool(np.isfinite(x).all()) and bool(np.isfinite(xt).all())
    )


def load_mnist1d(cache: str | os.PathLike[str] | None = None) -> dict[str, Tensor]:
    """MNIST-1D as tensors, generated offline on first use and cached as ``.npz``.

    Args:
        cache: cache directory; default :func:`cache_dir`. A missing, unreadable or
            malformed cache file is regenerated (atomically replaced).

    Returns:
        ``{"x": float32 4000x40, "y": int64 4000, "x_test": float32 1000x40,
        "y_test": int64 1000}`` with the package's default arguments.
    """
    cdir = Path(cache).expanduser() if cache is not None else cache_dir()
    path = cdir / f"mnist1d-{_cache_key()}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if path.is_file():
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError):
            arrays = None
        if arrays is not None and not _valid(arrays):
            arrays = None
    if arrays is None:
        arrays = _generate_mnist1d()
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache only costs regeneration next time
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
