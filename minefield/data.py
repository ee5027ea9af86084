"""Datasets: each yields a train, a test and a poison set.

The poison set holds extra points from the *same distribution* as train and
test, with their **true** labels (fresh draws for synthetic data, a held-out
split otherwise); the poisoned loss rewards being wrong on them.

Built in: ``swissroll`` (Huang et al.'s two spirals, bit-identical to the
authors' generator), ``spiral`` (the noise-free spiral of Fig. 1), ``circles``
(Fig. 8), ``digits`` (scikit-learn's bundled 8x8 images) and ``blobs`` (two
Gaussian blobs, for tests). ``cifar10`` and ``svhn`` read the standard files
from a directory the user already has; nothing is ever downloaded.

Example::

    >>> d = load_dataset(DataConfig("swissroll"))
    >>> d.x_train.shape, d.n_classes
    (torch.Size([200, 2]), 2)
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .config import DataConfig

__all__ = ["Dataset", "DataError", "DATASETS", "load_dataset", "twospirals", "FRESH",
           "fresh_points"]


class DataError(ValueError):
    """A dataset that cannot be built or read (unknown name, missing files)."""


@dataclass(frozen=True)
class Dataset:
    """Tensors of one dataset: inputs are float32, labels int64 in ``[0, n_classes)``."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_poison: torch.Tensor
    y_poison: torch.Tensor
    n_classes: int

    def __post_init__(self):
        for which in ("train", "test", "poison"):
            x, y = self.split(which)
            if len(x) != len(y):
                raise ValueError(f"{self.name}: {which} split has {len(x)} inputs and "
                                 f"{len(y)} labels")
            if y.numel() and (y.is_floating_point() or int(y.min()) < 0
                              or int(y.max()) >= max(2, self.n_classes)):
                raise ValueError(f"{self.name}: {which} labels must be integers in [0, "
                                 f"{max(2, self.n_classes)}), got {y.dtype} in "
                                 f"[{y.min().item()}, {y.max().item()}]")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Dataset:
        def mv(x, is_x):
            return x.to(device=device, dtype=dtype if (is_x and dtype) else x.dtype)

        return Dataset(
            self.name, mv(self.x_train, 1), mv(self.y_train, 0), mv(self.x_test, 1),
            mv(self.y_test, 0), mv(self.x_poison, 1), mv(self.y_poison, 0), self.n_classes,
        )

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"test"`` or ``"poison"``."""
        return getattr(self, f"x_{which}"), getattr(self, f"y_{which}")

    def digest(self) -> str:
        """A BLAKE2b hash (32 hex digits) of every split's inputs and labels, shapes
        included: two loads of the same files give the same digest, other files another
        (about 1 s per GB of tensors)."""
        h = hashlib.blake2b(digest_size=16)
        for which in ("train", "test", "poison"):
            for t in self.split(which):
                a = t.detach().cpu().contiguous().numpy()
                h.update(f"{which}{a.shape}{a.dtype}".encode())
                h.update(a.data)  # a view of the array's bytes, not a copy
        return h.hexdigest()


def _seed(cfg: DataConfig, default: int) -> int:
    return default if cfg.seed is None else cfg.seed


def _given(n: int | None, default: int) -> int:
    """A size the user asked for, 0 included, else the default (``n or default`` would
    read an asked-for 0 as "the default" and then fail the size check)."""
    return default if n is None else n


def _make(name, xtr, ytr, xte, yte, xp, yp, k) -> Dataset:
    def tx(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32)

    def ty(a):
        return torch.as_tensor(np.asarray(a).ravel().astype(np.int64))

    return Dataset(name, tx(xtr), ty(ytr), tx(xte), ty(yte), tx(xp), ty(yp), k)


# --- swiss roll (Figs 3, 5, 6) ----------------------------------------------------------


def twospirals(n_points: int, noise: float = 0.5, rng: np.random.RandomState | None = None):
    """The authors' two-spiral generator, call for call (``gen-viz/swissroll/main.py``).

    theta = sqrt(U) * 600 degrees (in radians); class 0 is
    ``(-1.5 theta cos theta, 1.5 theta sin theta) + N(0, noise^2)`` and class 1 its
    negation. Returns ``(X (2n, 2), y (2n,))``. With ``rng=None`` it draws from
    numpy's legacy global RNG, exactly as the original does.
    """
    r = np.random if rng is None else rng
    n = np.sqrt(r.rand(n_points, 1)) * 600 * (2 * np.pi) / 360
    d1x = -1.5 * np.cos(n) * n + r.randn(n_points, 1) * noise
    d1y = 1.5 * np.sin(n) * n + r.randn(n_points, 1) * noise
    x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y))))
    y = np.hstack((np.zeros(n_points), np.ones(n_points)))
    return x, y


def _swissroll(cfg: DataConfig) -> Dataset:
    # Same calls as the original: twospirals(ndata // 2), permutation, 50/50 split.
    seed = _seed(cfg, 1237)
    rng = np.random.RandomState(seed)
    n_total = 2 * _given(cfg.n_train, 200)
    x, y = twospirals(n_total // 2, 0.5, rng)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    half = n_total // 2
    xtr, ytr, xte, yte = x[:half], y[:half], x[half:], y[half:]
    if cfg.n_test is not None:
        xte, yte = xte[: cfg.n_test], yte[: cfg.n_test]
    # Poison points: fresh draws from the same distribution, from an independent stream.
    n_p = 1000 if cfg.n_poison is None else cfg.n_poison
    prng = np.random.RandomState(seed + 7919)
    xp, yp = twospirals((n_p + 1) // 2, 0.5, prng)
    perm = prng.permutation(len(xp))[:n_p]
    return _make("swissroll", xtr, ytr, xte, yte, xp[perm], yp[perm], 2)


# --- minefield spiral (Fig. 1) ----------------------------------------------------------


def _spiral(cfg: DataConfig) -> Dataset:
    """1.5 turns, r = 5 sqrt(theta), no noise; 33% train, rest split into test and poison.

    Follows ``gen-viz/minefield/utils.py``: the train points are a Python
    ``random.sample`` (seeded), the rest are halved by ``np.random.choice``.
    """
    n = 200  # points per class, as in the paper
    seed = _seed(cfg, 0)
    rng = np.random.RandomState(seed)
    rng.normal(0, 0, [2, n])  # the original draws (zero) noise: keep the stream aligned
    rng.normal(0, 0, [2, n])
    step = 1.5 * 2 * math.pi / n
    red = [[5 * math.sqrt(t * step) * math.cos(t * step),
            5 * math.sqrt(t * step) * math.sin(t * step), 1] for t in range(n)]
    blue = [[-a, -b, 0] for a, b, _ in red]
    pts = red + blue
    idx = random.Random(seed).sample(range(len(pts)), k=math.ceil(2 * n * 0.33))
    chosen = set(idx)
    train = [pts[i] for i in idx]
    rest = np.array([pts[i] for i in range(len(pts)) if i not in chosen])
    pidx = rng.choice(np.arange(len(rest)), len(rest) // 2, replace=False)
    tidx = np.delete(np.arange(len(rest)), pidx)
    train = np.array(train)
    test, poison = rest[tidx], rest[pidx]
    return _make("spiral", train[:, :2], train[:, 2], test[:, :2], test[:, 2],
                 poison[:, :2], poison[:, 2], 2)


def _spiral_curve(theta: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # label 1 ("red") is (5 sqrt(t) cos t, 5 sqrt(t) sin t); label 0 is its negation
    x = np.stack([5 * np.sqrt(theta) * np.cos(theta), 5 * np.sqrt(theta) * np.sin(theta)], 1)
    return np.where(labels[:, None] == 1, x, -x)


def _fresh_spiral(cfg: DataConfig, n: int, rng: np.random.RandomState):
    # the population the 400 grid points are drawn from: the whole noise-free curve
    theta = rng.uniform(0.0, 1.5 * 2 * math.pi, n)
    y = rng.randint(0, 2, n)
    return _spiral_curve(theta, y), y


def _fresh_swissroll(cfg: DataConfig, n: int, rng: np.random.RandomState):
    x, y = twospirals((n + 1) // 2, 0.5, rng)
    perm = rng.permutation(len(x))[:n]
    return x[perm], y[perm]


# --- concentric circles (Fig. 8) --------------------------------------------------------


def _ring(r: float, n: int, offset: float = 0.0) -> np.ndarray:
    # (r sin a, r cos a) at a = offset + 2 pi i / n, as in the authors' script
    a = offset + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.sin(a), r * np.cos(a)], 1)


def _circles(cfg: DataConfig) -> Dataset:
    """Fig. 8 (``gen-viz/wide_margins_example.py``): class 0 is 40 points on r=0.4;
    class 1 is 80 points on r=0.95 plus 10 "gap" points on r=0.401, each halfway
    (pi/40) between two class-0 points: the ideal solution is sharp.

    Train holds exactly the authors' 130 points (the 10 gap points last). Test and
    poison are the same construction rotated by a third and two thirds of the
    class-0 spacing.
    """

    def build(theta):
        x0 = _ring(0.4, 40, theta)
        x1 = _ring(0.95, 80, theta)
        gap = _ring(0.401, 10, theta + np.pi / 40)
        return np.concatenate([x0, x1, gap]), np.concatenate([np.zeros(40), np.ones(90)])

    step = 2 * np.pi / 40
    xtr, ytr = build(0.0)
    xte, yte = build(step / 3)
    xp, yp = build(2 * step / 3)
    return _make("circles", xtr, ytr, xte, yte, xp, yp, 2)


# --- two blobs (tests) ------------------------------------------------------------------


def _blobs(cfg: DataConfig) -> Dataset:
    rng = np.random.RandomState(_seed(cfg, 0))
    sizes = [_given(cfg.n_train, 100), _given(cfg.n_test, 100), _given(cfg.n_poison, 100)]
    parts = []
    for n in sizes:
        y = np.arange(n) % 2
        x = rng.randn(n, 2) * 0.7 + np.where(y[:, None] == 1, 1.5, -1.5)
        parts += [x, y]
    return _make("blobs", *parts, 2)


# --- digits (real 8x8 images) -----------------------------------------------------------


def _split_arrays(name, x, y, k, cfg: DataConfig, default=(0.4, 0.3, 0.3)) -> Dataset:
    rng = np.random.RandomState(_seed(cfg, 0))
    perm = rng.permutation(len(x))
    n = len(x)
    n_tr = _given(cfg.n_train, int(default[0] * n))
    n_te = _given(cfg.n_test, int(default[1] * n))
    n_p = _given(cfg.n_poison, max(0, n - n_tr - n_te))  # by default, what is left
    if n_p < 0 or n_tr + n_te + n_p > n:
        raise DataError(f"{name}: asked for {n_tr}+{n_te}+{n_p} points, only {n} available")
    a, b, c = perm[:n_tr], perm[n_tr:n_tr + n_te], perm[n_tr + n_te:n_tr + n_te + n_p]
    return _make(name, x[a], y[a], x[b], y[b], x[c], y[c], k)


def _digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # (N, 1, 8, 8)
    return _split_arrays("digits", x, d.target, 10, cfg)


# --- CIFAR-10 / SVHN from disk (minefield.imagefiles, imported when asked for) ---------


def _cifar10(cfg: DataConfig) -> Dataset:
    from .imagefiles import cifar10

    return cifar10(cfg)


def _svhn(cfg: DataConfig) -> Dataset:
    from .imagefiles import svhn

    return svhn(cfg)


DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {
    "swissroll": _swissroll,
    "spiral": _spiral,
    "circles": _circles,
    "blobs": _blobs,
    "digits": _digits,
    "cifar10": _cifar10,
    "svhn": _svhn,
}


#: Synthetic datasets that can draw fresh points from their own distribution.
FRESH: dict[str, Callable[[DataConfig, int, np.random.RandomState], tuple]] = {
    "spiral": _fresh_spiral,
    "swissroll": _fresh_swissroll,
}


def fresh_points(cfg: DataConfig, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` new points ``(x, y)`` from the distribution of dataset ``cfg.name``, true labels.

    For the spiral: uniform angle on the noise-free curve, either arm with
    probability 1/2 (the 400 points of the dataset are a regular grid on it). For
    the swiss roll: the authors' generator. Same ``seed``, same points.

    Example::

        >>> x, y = fresh_points(DataConfig("spiral"), 5)
        >>> x.shape, y.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """
    try:
        draw = FRESH[cfg.name]
    except KeyError:
        raise DataError(f"dataset {cfg.name!r} cannot draw fresh points (only "
                        f"{', '.join(sorted(FRESH))} can)") from None
    if n < 0:
        raise DataError(f"cannot draw {n} points")
    x, y = draw(cfg, n, np.random.RandomState(seed))
    return (torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(n, -1),
            torch.as_tensor(np.asarray(y).ravel().astype(np.int64)))


def train_xy(data: Dataset | tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a dataset's train split; an ``(x, y)`` pair is returned as it is."""
    return data.split("train") if isinstance(data, Dataset) else data


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset named by ``cfg.name`` (see :data:`DATASETS`).

    Raises:
        DataError: an unknown name, an empty training set, or a size (``n_train``,
            ``n_test``, ``n_poison``) the dataset cannot give: never fewer points than
            asked without a word (the swiss roll's test split is as large as its train
            split; the spiral's sizes are the paper's).
    """
    try:
        builder = DATASETS[cfg.name]
    except KeyError:
        raise DataError(
            f"unknown dataset {cfg.name!r}; choose from {', '.join(sorted(DATASETS))}"
        ) from None
    data = builder(cfg)
    for split in ("train", "test", "poison"):
        want, got = getattr(cfg, f"n_{split}"), len(getattr(data, f"y_{split}"))
        if want is not None and want != got:
            raise DataError(f"{cfg.name}: n_{split} = {want} asked, but it gives {got} "
                            f"{split} points with these settings")
    if not len(data.y_train):  # nothing to train on: the mean loss would be NaN at step 0
        raise DataError(f"{cfg.name}: the training set is empty (n_train must be >= 1)")
    return data
