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

    >>> dirs = plane_directions(member(theta, 0), DirectionSpec(seed=0))
    >>> s = surface(model, theta, dirs, torch.linspace(-1, 1, 21), torch.linspace(-1, 1, 21),
    ...             data)
    >>> s.values["train_loss"].shape
    torch.Size([21, 21])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Dataset
from .directions import DirectionSpec, orthogonalize, random_directions
from .engine import evaluate_combinations, evaluate_points
from .functional import Params, n_members

__all__ = ["Slice", "Surface", "line_direction", "slice_1d", "plane_directions", "surface",
           "METRICS"]

METRICS = ("loss", "acc")


def _splits(data: Dataset, splits: Sequence[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    out = {}
    if not splits:
        raise ValueError("no split given; use train, test and/or poison")
    for s in splits:
        if s not in ("train", "test", "poison"):
            raise ValueError(f"unknown split {s!r}; use train, test or poison")
        out[s] = data.split(s)
    return out


def _check_grid(ts, what: str) -> torch.Tensor:
    """``ts`` as float64, or a ValueError unless it is 1-D, non-empty and finite."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.dim() != 1 or len(ts) == 0 or not bool(torch.isfinite(ts).all()):
        raise ValueError(f"{what} must be finite coordinates (1-D, at least one)")
    return ts


def _check_one(params: Params, what: str) -> None:
    if n_members(params) != 1:
        raise ValueError(f"{what} must be a single member (1, ...), got {n_members(params)}")


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


def line_direction(a: Params, b: Params) -> Params:
    """``b - a`` as a single direction ``(1, ...)``: the line from model a to model b."""
    _check_one(a, "model a")
    _check_one(b, "model b")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("the two models have different parameter shapes")
    return {k: b[k] - a[k] for k in a}


def slice_1d(model: nn.Module, center: Params, direction: Params, ts: torch.Tensor,
             data: Dataset, splits: Sequence[str] = ("train", "test"),
             buffers: Params | None = None, memory_mb: float = 256.0,
             config: dict[str, Any] | None = None) -> Slice:
    """Loss and accuracy at ``center + t * direction`` for every ``t`` in ``ts`` (T,).

    ``direction`` is ``(1, ...)``: a random direction or :func:`line_direction`.
    """
    _check_one(center, "the centre")
    _check_one(direction, "the direction")
    ts = _check_grid(ts, "ts")
    values = {}
    for s, (x, y) in _splits(data, splits).items():
        lo, ac = evaluate_points(model, center, direction, ts[None], x, y, buffers, memory_mb)
        values[f"{s}_loss"], values[f"{s}_acc"] = lo[0], ac[0]
    return Slice(ts, values, dict(config or {}))


def plane_directions(theta: Params, spec: DirectionSpec = DirectionSpec()) -> Params:
    """Two random directions of ``spec`` for the single model ``theta`` (no member dim),
    orthogonalised (each keeps its norm): ``(2, ...)``."""
    d = random_directions(theta, 2, spec.kind, spec.bias, spec.generator())
    return orthogonalize(d)


def surface(model: nn.Module, center: Params, directions: Params, xs: torch.Tensor,
            ys: torch.Tensor, data: Dataset, splits: Sequence[str] = ("train",),
            buffers: Params | None = None, memory_mb: float = 256.0,
            partial: Surface | None = None, on_block: Callable[[Surface], None] | None = None,
            block_rows: int = 4, config: dict[str, Any] | None = None) -> Surface:
    """Metrics on the plane ``center + xs[i] d_1 + ys[j] d_2``, ``directions`` ``(2, ...)``.

    Rows (fixed ``xs[i]``) are computed ``block_rows`` at a time; after each
    block ``on_block(result_so_far)`` is called. ``partial`` (same grid) resumes:
    its finished rows are kept, not recomputed.
    """
    _check_one(center, "the centre")
    if n_members(directions) != 2:
        raise ValueError(f"a plane needs 2 directions, got {n_members(directions)}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    xs, ys = _check_grid(xs, "xs"), _check_grid(ys, "ys")
    sets = _splits(data, splits)
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
