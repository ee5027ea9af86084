"""Radii of a sub-cutoff region along fixed directions: where the loss first reaches c.

Along direction i the radius is the first ``t > 0`` with ``L(theta + t d_i) >= c``
(``r_max`` when there is none, 0 when the centre is already at or above c).
:func:`find_radii` needs only a batched loss along the directions,
``loss_fn(ts (K,) or (K, T)) -> same shape``; :mod:`minefield.basin` turns the
radii into a basin volume, :mod:`minefield.volume` and :mod:`minefield.cooling`
use them as chords.

Example (the quadratic bowl ``L(t) = a t^2 / 2``: ``r = sqrt(2c/a)``)::

    >>> r, n_evals = find_radii(lambda t: 2.0 * t**2 / 2, 10, 0.5, r_max=1.0)
    >>> round(float(r.mean()), 3)   # within rtol = 1e-3 of 0.7071
    0.707
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import ConfigError
from .options import Grid, RadiusMethod, option

__all__ = ["find_radii", "radius_grid", "check_radii"]

# halvings from the largest float64 to 0 (2098), plus room: find_radii always ends sooner
_MAX_STEPS = 2200


def radius_grid(r_max: float, points: int, kind: Grid | str = Grid.POWER, power: float = 5.0
                ) -> torch.Tensor:
    """The paper's scan ``t_j = r_max u_j^power``, ``u_j`` = linspace(0, 1, points)."""
    u = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    return r_max * (u ** power if option(Grid, kind, "grid") is Grid.POWER else u)


def _first_crossing(loss: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Index of the first column with ``loss >= cutoff`` per row; ``T`` when none. A NaN
    loss (overflowed logits) counts as above: it is not inside the basin."""
    above = ~(loss < cutoff)
    idx = torch.where(above, torch.arange(loss.shape[1]), loss.shape[1])
    return idx.min(1).values


def find_radii(loss_fn: Callable[[torch.Tensor], torch.Tensor], k: int, cutoff: float,
               r_max: float = 1.0, rtol: float = 1e-3, method: RadiusMethod | str = "bisect",
               grid_points: int = 100, grid: Grid | str = Grid.POWER, grid_power: float = 5.0,
               bracket_points: int = 6, centre_loss: float | None = None,
               bracket_ratio: float = 4.0) -> tuple[torch.Tensor, int]:
    """Radii ``(k,)`` of the sub-cutoff region along ``k`` fixed directions, and the
    number of loss evaluations used.

    ``loss_fn(ts)`` takes distances ``(k,)`` or ``(k, T)`` (row i along direction
    i) and returns the loss in the same shape. ``bisect``: loss on the bracket
    grid ``r_max * bracket_ratio^-j`` (j = bracket_points-1 .. 0; default
    1, 1/4, ..., 1/1024, one batched call), then bisection of the
    first bracket where it reaches ``cutoff`` until ``hi - lo <= 2 rtol lo`` (or
    the ends are adjacent floats); the answer is the midpoint, so (the radius being
    >= lo) its relative error is at most ``rtol``. A crossing below the lowest
    bracket point is found by halving from it, so any finite ``r_max`` converges.
    ``grid``: the first crossing on :func:`radius_grid`, linearly interpolated.
    Radii are 0 where the centre is already at or above the cutoff and ``r_max``
    where no crossing is found. A NaN loss counts as above the cutoff (float32 logits
    overflow far out), at the centre too.
    Both methods see only crossings that cover one of their grid points: a
    bump above the cutoff narrower than a bracket interval is missed.
    """
    method = option(RadiusMethod, method, "method")
    grid = option(Grid, grid, "grid")
    if not (bracket_ratio > 1 and 0 < grid_power < math.inf):  # NaN too
        raise ConfigError(f"find_radii needs bracket_ratio > 1 and a positive grid_power "
                          f"(t = r_max u^p scans [0, r_max]), got {bracket_ratio}, {grid_power}")
    if centre_loss is None:
        centre_loss = float(loss_fn(torch.zeros(k, dtype=torch.float64))[0])
    if not float(centre_loss) < cutoff:  # a NaN centre (a diverged model) has no basin
        return torch.zeros(k, dtype=torch.float64), 1
    if method is RadiusMethod.GRID:
        ts = radius_grid(r_max, grid_points, grid, grid_power)[1:]  # t = 0 is the centre
        loss = loss_fn(ts.expand(k, -1).contiguous()).double().cpu()  # (k, T)
        j = _first_crossing(loss, cutoff)
        t_all = torch.cat([torch.zeros(1, dtype=torch.float64), ts])
        l_all = torch.cat([torch.full((k, 1), centre_loss, dtype=torch.float64), loss], 1)
        jj = j.clamp(max=len(ts) - 1) + 1  # column of the crossing in t_all
        t0, t1 = t_all[jj - 1], t_all[jj]
        l0, l1 = l_all.gather(1, (jj - 1)[:, None])[:, 0], l_all.gather(1, jj[:, None])[:, 0]
        frac = ((cutoff - l0) / (l1 - l0)).clamp(0, 1).nan_to_num(1.0)
        r = torch.where(j < len(ts), t0 + frac * (t1 - t0), torch.full_like(t0, r_max))
        return r, k * len(ts) + 1
    ts = r_max * float(bracket_ratio) ** -torch.arange(bracket_points - 1, -1, -1,
                                                       dtype=torch.float64)
    loss = loss_fn(ts.expand(k, -1).contiguous()).double().cpu()  # (k, B)
    j = _first_crossing(loss, cutoff)
    hit = j < bracket_points
    jc = j.clamp(max=bracket_points - 1)
    hi = ts[jc].clone()
    lo = torch.where(jc > 0, ts[(jc - 1).clamp(min=0)], torch.zeros_like(hi))
    evals = k * bracket_points + 1
    for _ in range(_MAX_STEPS):
        # a converged direction stops moving: its radius depends on its own losses only,
        # not on which directions share the batch (so blocks of directions agree). Halving
        # down from a bracket that starts at 0 takes log2(hi / r) steps (330 for r_max =
        # 1e100), so there is no small cap; a midpoint equal to an end is float resolution.
        # (lo + hi) / 2 bit for bit (halving a normal float is exact), without overflow
        mid = lo / 2 + hi / 2
        active = hit & ((hi - lo) > 2 * rtol * lo) & (mid > lo) & (mid < hi)
        if not bool(active.any()):
            break
        above = ~(loss_fn(mid).double().cpu() < cutoff)  # NaN: outside
        evals += int(active.sum())  # the evaluations the radii needed (the batch is k wide)
        hi, lo = torch.where(active & above, mid, hi), torch.where(active & ~above, mid, lo)
    else:  # unreachable in float64 (each step halves hi or hi - lo): never return it silently
        raise RuntimeError(f"find_radii: bisection did not converge in {_MAX_STEPS} steps")
    r = torch.where(hit, lo / 2 + hi / 2, torch.full_like(hi, r_max))
    return r, evals


def check_radii(loss_fn: Callable[[torch.Tensor], torch.Tensor], r: torch.Tensor,
                cutoff: float, rtol: float, r_max: float) -> torch.Tensor:
    """``(k,)`` bool: whether each radius is a valid answer for ``loss_fn`` to ``rtol``.

    A crossing radius ``0 < r < r_max`` is valid when ``L(r (1 - rtol)) < cutoff <=
    L(r (1 + rtol))`` (a crossing lies within the bisection's tolerance of ``r``);
    ``r = r_max`` when ``L(r_max) < cutoff``; ``r = 0`` is always kept (the centre
    decides it). Two evaluations per direction: how radii bisected in a low precision
    (``bf16``) are checked in the parameters' own.
    """
    r = r.double()
    hit = (r > 0) & (r < r_max)
    lo = torch.where(hit, r * (1 - rtol), r)
    hi = torch.where(hit, (r * (1 + rtol)).clamp(max=r_max), r)
    loss = loss_fn(torch.stack([lo, hi], 1)).double().cpu()  # (k, 2)
    ok_hit = (loss[:, 0] < cutoff) & ~(loss[:, 1] < cutoff)
    ok_max = loss[:, 1] < cutoff
    return torch.where(hit, ok_hit, torch.where(r > 0, ok_max, torch.ones_like(ok_hit)))
