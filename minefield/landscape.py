"""Loss landscapes: 1-D slices and 2-D planes through parameter space.

A *slice* evaluates ``theta + t d`` for ``t`` on a line: ``d`` a random
(filter-normalised) direction, or ``d = theta_b - theta_a`` for the straight
line between two models (t = 0 is ``a``, t = 1 is ``b``; e.g. a good and a bad
minimum). A *surface* evaluates ``theta + x d_1 + y d_2`` on a grid, with
``d_1, d_2`` two filter-normalised directions made orthogonal by Gram-Schmidt
(Li et al. 2018). Loss is the mean NLL and accuracy the fraction correct, on
each requested split, all through the batched :mod:`~minefield.engine`.

Results keep their coordinates and mark what was not computed with NaN. A
surface is computed in blocks of rows; ``on_block(surface)`` after each block
lets the caller save it, and ``partial=`` resumes from such a saved surface
(its ``done`` rows are skipped). This module never touches files.

Example::

    >>> from minefield import DataConfig, ModelConfig, build_model, init_params, load_dataset
    >>> from minefield import member, stack
    >>> data = load_dataset(DataConfig("blobs"))
    >>> model = build_model(ModelConfig(widths=(8,)), (2,), 2)
    >>> theta = stack([init_params(model, "glorot_uniform", torch.Generator().manual_seed(0))])
    >>> dirs = plane_directions(member(theta, 0), DirectionSpec(seed=0))
    >>> s = surface(model, theta, dirs, torch.linspace(-1, 1, 21), torch.linspace(-1, 1, 21),
    ...             data)
    >>> s.values["train_loss"].shape
    torch.Size([21, 21])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .config import ConfigError, _Config
from .data import Dataset
from .directions import DirectionSpec, orthogonalize, random_directions
from .engine import evaluate_combinations, evaluate_points
from .functional import Params, check_single, n_members
from .options import Split, choices
from .validate import FLOAT32_MAX

__all__ = ["LandscapeConfig", "Slice", "Surface", "axis", "line_direction", "line_1d", "slice_1d",
           "plane_directions", "surface", "check_finite", "check_splits", "METRICS"]

METRICS = ("loss", "acc")


@dataclass(frozen=True)
class LandscapeConfig(_Config):
    """A 1-D slice or a 2-D surface around one member of a run (``minefield landscape``).

    ``other`` (a second run) makes the slice the line from the run (t = 0) to it
    (t = 1); otherwise slices and surfaces follow random ``directions``.
    ``points`` per axis over ``span`` (default ``(-1, 1)``; with ``other``
    ``(-0.5, 1.5)``), plus t = 0 and t = 1 exactly (:func:`axis`).
    """

    other: str | None = None
    checkpoint: str | None = None
    dim: int = 1
    points: int = 51
    span: tuple[float, ...] | None = None
    splits: tuple[str, ...] = ("train", "test")
    member: int = 0
    directions: DirectionSpec = field(default_factory=DirectionSpec)
    _section: ClassVar[str] = "landscape"

    def _validate(self):
        if self.dim not in (1, 2):
            raise ConfigError(f"landscape.dim must be 1 or 2, got {self.dim}")
        if self.other is not None and not self.other.strip():
            raise ConfigError("--other needs a run name, got an empty string")
        if self.other and self.dim == 2:
            raise ConfigError("landscape.other draws a line: use it with --dim 1")
        if self.points < 2 or self.member < 0:
            raise ConfigError(f"landscape.points must be >= 2 and landscape.member >= 0, got "
                              f"{self.points} and {self.member}")
        if self.points > 10_000:
            raise ConfigError(f"--points is per axis: at most 10000, got {self.points}")
        if self.span is not None and (len(self.span) != 2 or not all(
                math.isfinite(t) and abs(t) <= FLOAT32_MAX for t in self.span)  # run: float32
                                      or not self.span[0] < self.span[1]):
            raise ConfigError(f"--span needs two finite numbers (float32: |t| <= "
                              f"{FLOAT32_MAX:.3g}), low < high; got {self.span}")
        if not self.splits:
            raise ConfigError("--splits needs train, test and/or poison, got none")
        for s in self.splits:
            if s not in set(choices(Split)):
                raise ConfigError(f"unknown split {s!r}; use train, test or poison")

    def grid(self) -> torch.Tensor:
        """The values of t (each axis): ``points`` over the span, plus 0 (and 1 on a line)."""
        lo, hi = self.span or ((-0.5, 1.5) if self.other else (-1.0, 1.0))
        return axis(lo, hi, self.points, (0.0, 1.0) if self.other else (0.0,))


def check_splits(data: Dataset, splits: Sequence[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{split: (x, y)}`` of ``splits``; ValueError for an unknown or an empty split (a
    run without poison points has no poison landscape, only NaN)."""
    out = {}
    if not splits:
        raise ValueError("no split given; use train, test and/or poison")
    for s in splits:
        if s not in ("train", "test", "poison"):
            raise ValueError(f"unknown split {s!r}; use train, test or poison")
        out[s] = data.split(s)
        if len(out[s][1]) == 0:
            raise ValueError(f"the data have no {s} points: leave {s} out of the splits")
    return out


def check_finite(params: Params, what: str) -> None:
    """ValueError when ``params`` hold a NaN or infinite value: every loss around them
    would be NaN, a landscape of nothing."""
    if not all(bool(v.isfinite().all()) for v in params.values()):
        raise ValueError(f"{what} has NaN or infinite weights: its landscape is undefined")


def _check_grid(ts, what: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``ts`` as float64 on the CPU, or a ValueError unless it is 1-D, non-empty and finite,
    in ``dtype`` too (the parameters'): t = 1e39 is inf in float32, and every point but
    the centre was NaN, drawn with accuracy 0.5 (a NaN logit's prediction)."""
    ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
    if ts.dim() != 1 or len(ts) == 0 or not bool(torch.isfinite(ts.to(dtype)).all()):
        raise ValueError(f"{what} must be finite coordinates (1-D, at least one, each "
                         f"finite in {str(dtype).replace('torch.', '')})")
    return ts


@dataclass
class Slice:
    """Metrics at ``theta + t d`` for each ``t`` in ``ts``: ``values[f"{split}_{metric}"]`` (T,)."""

    ts: torch.Tensor
    values: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Surface:
    """Metrics on the grid ``theta + xs[i] d_1 + ys[j] d_2``: ``values[...]`` (A, B).

    ``done[i]`` says row i is computed; other rows hold NaN.
    """

    xs: torch.Tensor
    ys: torch.Tensor
    values: dict[str, torch.Tensor]
    done: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.done.all())


def axis(lo: float, hi: float, points: int, anchors: Sequence[float] = (0.0,)
         ) -> torch.Tensor:
    """``points`` evenly spaced values in ``[lo, hi]`` plus every anchor inside the range.

    A landscape must be measured *at* the models it is drawn around: t = 0 (the
    centre) and, on the line from model a to model b, t = 1. ``linspace(-0.5,
    1.5, 51)`` steps by 0.04 and misses both, so the anchors are added exactly
    (sorted, no duplicates): the result has ``points`` to ``points + len(anchors)``
    values, float64.

    Example::

        >>> t = axis(-0.5, 1.5, 51, anchors=(0.0, 1.0))
        >>> len(t), bool((t == 0).any()), bool((t == 1).any())
        (53, True, True)
        >>> axis(-1, 1, 5).tolist()
        [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    if points < 2 or not lo < hi:
        raise ValueError(f"an axis needs lo < hi and points >= 2, got [{lo}, {hi}], {points}")
    ts = torch.linspace(lo, hi, points, dtype=torch.float64)
    inside = [a for a in anchors if lo <= a <= hi]
    for a in inside:  # a grid value within rounding of an anchor (linspace's -5.6e-17) is it
        ts = torch.where((ts - a).abs() <= 1e-9 * (hi - lo), torch.tensor(float(a)).double(), ts)
    return torch.unique(torch.cat([ts, torch.tensor(inside, dtype=torch.float64)]))


def _check_pair(a: Params, b: Params) -> None:
    """ValueError unless ``a`` and ``b`` are single models of the same parameter shapes."""
    check_single(a, "model a")
    check_single(b, "model b")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("the two models have different parameter shapes")


def line_direction(a: Params, b: Params) -> Params:
    """``b - a`` as a single direction ``(1, ...)``: the line from model a to model b."""
    _check_pair(a, b)
    return {k: b[k] - a[k] for k in a}


def slice_1d(model: nn.Module, center: Params, direction: Params, ts: torch.Tensor,
             data: Dataset, splits: Sequence[str] = ("train", "test"),
             buffers: Params | None = None, memory_mb: float | None = None,
             config: dict[str, Any] | None = None) -> Slice:
    """Loss and accuracy at ``center + t * direction`` for every ``t`` in ``ts`` (T,).

    ``direction`` is ``(1, ...)``: a random direction or :func:`line_direction`.
    """
    check_single(center, "the centre")
    check_single(direction, "the direction")
    check_finite(center, "the centre")
    check_finite(direction, "the direction")
    ts = _check_grid(ts, "ts", next(iter(center.values())).dtype)
    values = {}
    for s, (x, y) in check_splits(data, splits).items():
        lo, ac = evaluate_points(model, center, direction, ts[None], x, y, buffers, memory_mb)
        values[f"{s}_loss"], values[f"{s}_acc"] = lo[0].cpu(), ac[0].cpu()  # as a Surface's
    return Slice(ts, values, dict(config or {}))


def line_1d(model: nn.Module, a: Params, b: Params, ts: torch.Tensor, data: Dataset,
            splits: Sequence[str] = ("train", "test"), buffers: Params | None = None,
            memory_mb: float | None = None, config: dict[str, Any] | None = None) -> Slice:
    """Loss and accuracy at ``(1 - t) a + t b`` for every ``t`` in ``ts``: the line from
    model a (t = 0) to model b (t = 1), each end the model itself, bit for bit.

    ``slice_1d(model, a, line_direction(a, b), ts, ...)`` is the same line, but in the
    parameters' precision ``a + 1 * (b - a)`` is not ``b`` (``b - a`` and the sum each
    round: 31 of a float32 net's 105 weights came out 1 ulp off), so t = 1 measured
    another model than b.
    """
    _check_pair(a, b)
    check_finite(a, "model a")
    check_finite(b, "model b")
    ts = _check_grid(ts, "ts", next(iter(a.values())).dtype)
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    ends = {k: torch.cat([a[k], b[k]]) for k in a}  # (2, ...): the basis a, b
    coeffs = torch.stack([1 - ts, ts], 1)  # 0 a + 1 b is b exactly (and 1 a + 0 b is a)
    values = {}
    for s, (x, y) in check_splits(data, splits).items():
        lo, ac = evaluate_combinations(model, zero, ends, coeffs, x, y, buffers, memory_mb)
        values[f"{s}_loss"], values[f"{s}_acc"] = lo.cpu(), ac.cpu()
    return Slice(ts, values, dict(config or {}))


def plane_directions(theta: Params, spec: DirectionSpec = DirectionSpec()) -> Params:
    """Two random directions of ``spec`` for the single model ``theta`` (no member dim),
    orthogonalised (each keeps its norm): ``(2, ...)``."""
    d = random_directions(theta, 2, spec.kind, spec.bias, spec.generator())
    return orthogonalize(d)


def surface(model: nn.Module, center: Params, directions: Params, xs: torch.Tensor,
            ys: torch.Tensor, data: Dataset, splits: Sequence[str] = ("train",),
            buffers: Params | None = None, memory_mb: float | None = None,
            partial: Surface | None = None, on_block: Callable[[Surface], None] | None = None,
            block_rows: int = 4, config: dict[str, Any] | None = None) -> Surface:
    """Metrics on the plane ``center + xs[i] d_1 + ys[j] d_2``, ``directions`` ``(2, ...)``.

    Rows (fixed ``xs[i]``) are computed ``block_rows`` at a time; after each
    block ``on_block(result_so_far)`` is called. ``partial`` (same grid) resumes:
    its finished rows are kept, not recomputed.
    """
    check_single(center, "the centre")
    check_finite(center, "the centre")
    check_finite(directions, "a direction")
    if n_members(directions) != 2:
        raise ValueError(f"a plane needs 2 directions, got {n_members(directions)}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    dtype = next(iter(center.values())).dtype
    xs, ys = _check_grid(xs, "xs", dtype), _check_grid(ys, "ys", dtype)
    sets = check_splits(data, splits)
    keys = [f"{s}_{m}" for s in sets for m in METRICS]
    if partial is not None:
        same = (partial.xs.shape == xs.shape and partial.ys.shape == ys.shape
                and torch.equal(partial.xs, xs) and torch.equal(partial.ys, ys)
                and set(keys) <= set(partial.values))
        if not same:
            raise ValueError("cannot resume: the saved surface has a different grid or splits")
        res = Surface(xs, ys, {k: partial.values[k].clone() for k in keys},
                      partial.done.clone(), dict(config or partial.config))
    else:
        nan = torch.full((len(xs), len(ys)), float("nan"), dtype=torch.float64)
        res = Surface(xs, ys, {k: nan.clone() for k in keys},
                      torch.zeros(len(xs), dtype=torch.bool), dict(config or {}))
    todo = (~res.done).nonzero().flatten().tolist()
    for b in range(0, len(todo), block_rows):
        rows = torch.tensor(todo[b:b + block_rows])
        gx, gy = torch.meshgrid(xs[rows], ys, indexing="ij")
        coeffs = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)  # (rows * B, 2)
        for s, (x, y) in sets.items():
            lo, ac = evaluate_combinations(model, center, directions, coeffs, x, y, buffers,
                                           memory_mb)
            res.values[f"{s}_loss"][rows] = lo.reshape(len(rows), len(ys)).cpu()
            res.values[f"{s}_acc"][rows] = ac.reshape(len(rows), len(ys)).cpu()
        res.done[rows] = True
        if on_block is not None:
            on_block(res)
    return res
