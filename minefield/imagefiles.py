"""CIFAR-10 and SVHN, read from files the user already has (nothing is downloaded).

CIFAR-10's python batches are pickles: they are read with an unpickler that
allows only plain containers and numpy array reconstruction, so no code from a
file ever runs. SVHN's ``.mat`` files are read with scipy. Both return a
:class:`~minefield.data.Dataset` (use :func:`minefield.data.load_dataset`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .config import DataConfig
from .data import DataError, Dataset, _given, _make, _seed

__all__ = ["cifar10", "svhn"]

_MEAN_STD = {"cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
             "svhn": ((0.438, 0.444, 0.473), (0.198, 0.201, 0.197))}


def _normalise(x_uint8: np.ndarray, name: str) -> np.ndarray:
    mean, std = (np.array(v, np.float32)[None, :, None, None] for v in _MEAN_STD[name])
    return (x_uint8.astype(np.float32) / 255.0 - mean) / std


def _need_dir(cfg: DataConfig, name: str, hint: str) -> Path:
    if not cfg.data_dir:
        raise DataError(f"{name} needs --data-dir pointing at {hint}")
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(f"{name}: data directory {root} does not exist")
    return root


def _regular(path: Path, what: str) -> None:
    if not path.is_file() or path.stat().st_size > 2**31:  # not a FIFO, a device, a folder
        raise DataError(f"{path} is not {what} (not a regular file under 2 GiB)")


def _checked(x, y, path: Path, what: str, shape: tuple[int, ...], labels: range
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` if ``x`` is a uint8 array of ``shape`` (``-1``: the image count) and ``y``
    one integer label in ``labels`` per image; else one DataError line (a cast would
    wrap, truncate or reshape bad contents into plausible images)."""
    x, y = np.asarray(x), np.asarray(y)
    n = x.shape[shape.index(-1)] if x.ndim == len(shape) else -1
    ok_x = x.dtype == np.uint8 and x.ndim == len(shape) and all(
        a == b for a, b in zip(x.shape, shape) if b != -1)
    ok_y = y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.array_equal(y, np.round(y)))
    y = y.reshape(-1)
    if not (ok_x and ok_y and len(y) == n and (not n or (
            labels.start <= y.min() and y.max() < labels.stop))):
        raise DataError(f"{path} is not {what}: images {x.dtype} {tuple(x.shape)} (want uint8 "
                        f"{tuple('N' if b == -1 else b for b in shape)}), labels {y.dtype} x "
                        f"{len(y)} (want one integer in {labels.start}..{labels.stop - 1} "
                        "per image)")
    return x, y.astype(np.int64)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # CIFAR-10's python batches are pickles of plain dicts of numpy arrays. Only
    # builtins and numpy array reconstruction are allowed: no code from the file runs.
    try:
        _regular(path, "a CIFAR-10 batch")
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, path.stat().st_size).load()
        x, y = _checked(_flat(d[b"data"], path), _flat(d[b"labels"], path), path,
                        "a CIFAR-10 python batch", (-1, 3072), range(10))
        x = x.reshape(-1, 3, 32, 32)
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError, LookupError) as e:
        why = "it is empty" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path} is not a CIFAR-10 python batch ({why[:120]})") from None
    return x, y


def _flat(v, path: Path):
    """``v`` if it is an array or a flat list of numbers, else one DataError line: the
    pickle's memo lets nested lists share their items, and ``np.asarray`` of them built
    an array far larger than the file (27 million numbers, 216 MB, from 1.9 KB)."""
    if isinstance(v, np.ndarray) or (isinstance(v, list | tuple) and all(
            isinstance(e, int | float | np.generic) for e in v)):
        return v
    raise DataError(f"{path} is not a CIFAR-10 python batch (its images and labels must be "
                    f"arrays or flat lists of numbers, got a {type(v).__name__} that is not)")


class _SafeUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}

    def __init__(self, f, size: int):
        super().__init__(f, encoding="bytes")
        self.size = size  # the file's bytes: no array it holds is larger

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR batch file")
        found = super().find_class(module, name)
        if name != "_reconstruct":
            return found

        def bounded(cls, shape, dtype):  # numpy's own pickles pass shape (0,), then the data
            if np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize > self.size:
                raise ValueError(f"an array of shape {tuple(shape)} cannot come from "
                                 f"{self.size} bytes")
            return found(cls, shape, dtype)
        return bounded


def cifar10(cfg: DataConfig) -> Dataset:
    """CIFAR-10 from the python batches in ``cfg.data_dir``; poison: held-out train images.

    ``n_poison`` (default 10,000, at most half) training images are held out as
    the poison set; ``n_train`` of the rest train; the test batch tests. Images
    are normalised by the usual per-channel mean and std.
    """
    root = _need_dir(cfg, "cifar10", "the 'cifar-10-batches-py' folder")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
    missing = [p.name for p in train_files + [root / "test_batch"] if not p.exists()]
    if missing:
        raise DataError(f"cifar10: {root} lacks {', '.join(missing)} (CIFAR-10 python batches)")
    xs, ys = zip(*(_read_cifar_batch(p) for p in train_files))
    x, y = np.concatenate(xs), np.concatenate(ys)
    xt, yt = _read_cifar_batch(root / "test_batch")
    # Poison: a held-out part of the training batches (same distribution, true labels).
    rng = np.random.RandomState(_seed(cfg, 0))
    perm = rng.permutation(len(x))
    n_p = min(10000 if cfg.n_poison is None else cfg.n_poison, len(x) // 2)
    n_tr = _given(cfg.n_train, len(x) - n_p)
    p_idx, tr_idx = perm[:n_p], perm[n_p:n_p + n_tr]
    n_te = _given(cfg.n_test, len(xt))
    return _make("cifar10", _normalise(x[tr_idx], "cifar10"), y[tr_idx],
                 _normalise(xt[:n_te], "cifar10"), yt[:n_te],
                 _normalise(x[p_idx], "cifar10"), y[p_idx], 10)


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    _regular(path, "an SVHN .mat file")
    try:
        d = loadmat(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(f"svhn: cannot read {path}: {e}") from None
    held = sorted(k for k in d if not k.startswith("__"))  # not the header entries
    if "X" not in held or "y" not in held:  # a KeyError said only "svhn: cannot read ...: 'X'"
        raise DataError(f"{path} is not an SVHN cropped-digit file: it must hold variables X "
                        f"(images) and y (labels), it holds {', '.join(held[:8]) or 'none'}")
    x, y = d["X"], d["y"]
    x, y = _checked(x, y, path, "an SVHN cropped-digit file", (32, 32, 3, -1), range(1, 11))
    # (32, 32, 3, N) -> (N, 3, 32, 32); SVHN stores digit 0 as label 10
    return np.transpose(x, (3, 2, 0, 1)), y % 10


def svhn(cfg: DataConfig) -> Dataset:
    """SVHN cropped digits from ``cfg.data_dir``; poison: ``extra_32x32.mat`` when present.

    Without the extra set, a fifth of the training images is held out as poison.
    """
    root = _need_dir(cfg, "svhn", "a folder with train_32x32.mat and test_32x32.mat")
    need = [root / "train_32x32.mat", root / "test_32x32.mat"]
    missing = [p.name for p in need if not p.exists()]
    if missing:
        raise DataError(f"svhn: {root} lacks {', '.join(missing)} (SVHN cropped-digit .mat files)")
    x, y = _read_svhn_mat(need[0])
    xt, yt = _read_svhn_mat(need[1])
    rng = np.random.RandomState(_seed(cfg, 0))
    if (root / "extra_32x32.mat").exists():  # the paper's poison source
        xp, yp = _read_svhn_mat(root / "extra_32x32.mat")
        pp = rng.permutation(len(xp))[: _given(cfg.n_poison, 50000)]
        xp, yp = xp[pp], yp[pp]
        tr = np.arange(len(x))[: _given(cfg.n_train, len(x))]
    else:  # hold out part of train instead
        perm = rng.permutation(len(x))
        n_p = _given(cfg.n_poison, len(x) // 5)
        xp, yp = x[perm[:n_p]], y[perm[:n_p]]
        tr = perm[n_p:][: _given(cfg.n_train, len(x))]
    n_te = _given(cfg.n_test, len(xt))
    return _make("svhn", _normalise(x[tr], "svhn"), y[tr], _normalise(xt[:n_te], "svhn"),
                 yt[:n_te], _normalise(xp, "svhn"), yp, 10)
