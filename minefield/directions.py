"""Random directions in parameter space, reproducible from a seed.

A direction ``d`` is a dict shaped like one model's parameters; the point
``theta + t d`` lies ``t`` *direction units* away from ``theta``. Three kinds:

- ``filter`` (Li et al. 2018, "Visualizing the loss landscape"; the paper's
  ``get_random_dir``): for every output unit / conv filter ``i`` of every weight
  tensor (its slice along dim 0) draw ``g ~ N(0, I)`` and set
  ``d_i = g / ||g|| * ||theta_i||``. Distances are then relative to the size
  of each filter, so rescaling a ReLU layer does not change the landscape.
- ``layer``: the same, one Gaussian per whole tensor, ``d = g / ||g|| * ||theta||``.
- ``gaussian``: one Gaussian over all perturbed coordinates scaled to **unit
  Euclidean norm** (uniform on the unit sphere), so ``t`` is a plain Euclidean
  distance and the basin volume is a genuine volume in parameter space.

Biases and normalisation parameters (tensors with fewer than 2 dims per model)
follow :class:`BiasPolicy`:

- ``exclude`` (the default; the paper's ``get_random_dir`` with PAPER.md's n):
  their direction is 0 and they are left out of the count, so ``n_perturbed`` =
  weights only (3457 for the swiss-roll net): the basin is a star-shaped body
  in the space the directions actually span.
- ``zero``: direction 0 as for ``exclude``, but they still count as coordinates
  (``n_perturbed`` = all parameters), for comparison with tools that do so. This
  is a convention of the paper's ``naive`` estimator only: its ``omega_n E[r^n]``
  then uses an ``n`` larger than the space its directions span. The estimators of
  :mod:`minefield.volume` integrate over the coordinates they move, where a
  coordinate that never moves has no extent, so they refuse it (``VolumeConfig``).
- ``include``: perturbed too; under ``filter`` each entry is a "filter of size
  1" (``d_j = sign(g_j) |theta_j|``), under ``layer`` scaled to the tensor norm.

A ``filter`` (or ``layer``) whose parameters are all exactly 0 gets direction 0
too, yet would count in ``n``: :func:`check_units` refuses it for volumes.

Directions are drawn one after another from the generator, so the first ``n``
of ``random_directions(..., 2 * n)`` equal ``random_directions(..., n)``, and the
Gaussian draws do not depend on ``theta`` (members of a stack get "the same"
directions, each normalised to its own filters).

Example::

    >>> theta = {"w": torch.ones(2, 3), "b": torch.ones(2)}
    >>> d = random_directions(theta, 4, generator=torch.Generator().manual_seed(0))
    >>> d["w"].shape, d["w"][0].norm(dim=1), d["b"].abs().max()
    (torch.Size([4, 2, 3]), tensor([1.7321, 1.7321]), tensor(0.))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import ConfigError, _Config
from .functional import Params, alone, flatten, is_weight, n_members, unflatten
from .options import BiasPolicy, DirectionKind, option

__all__ = ["DirectionKind", "BiasPolicy", "DirectionSpec", "random_directions", "n_perturbed",
           "check_units", "orthogonalize", "distances"]


@dataclass(frozen=True)
class DirectionSpec(_Config):
    """How directions are drawn; recorded with every result that uses them."""

    kind: DirectionKind = DirectionKind.FILTER
    bias: BiasPolicy = BiasPolicy.EXCLUDE
    seed: int = 0
    _section: ClassVar[str] = "directions"

    def _validate(self):
        # -1 is torch's seed 2**64 - 1: the same directions under another key; the CLI's range
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**32):
            raise ConfigError(f"directions.seed must be an integer in [0, 2**32), got "
                              f"{self.seed!r}")

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed))


def _perturbed(shape: torch.Size, bias: BiasPolicy) -> bool:
    return is_weight("", shape) or bias is BiasPolicy.INCLUDE


def n_perturbed(params: Params, kind: DirectionKind | str = "filter",
                bias: BiasPolicy | str = "exclude") -> int:
    """Dimension n of the space the directions live in (the ``n`` of the volume ``r^n``).

    ``params`` is one model (no member dim). All parameters for ``zero`` and
    ``include``, weights only for ``exclude``; ``kind`` does not change it.
    """
    option(DirectionKind, kind, "direction kind")
    bias = option(BiasPolicy, bias, "direction bias")
    return sum(v.numel() for v in params.values()
               if bias is not BiasPolicy.EXCLUDE or is_weight("", v.shape))


def check_units(params: Params, kind: DirectionKind | str = "filter",
                bias: BiasPolicy | str = "exclude") -> None:
    """:class:`ConfigError` when a ``filter`` / ``layer`` direction of the single model
    ``params`` cannot move a perturbed coordinate: its filter (its tensor for ``layer``;
    the entry itself for a 1-D tensor under ``filter``) is exactly 0, so every direction
    is 0 there while ``n`` counts it, and every radius would be set by the rest alone
    (a ``QuadraticNet`` at its minimum: all at ``r_max``)."""
    kind = option(DirectionKind, kind, "direction kind")
    bias = option(BiasPolicy, bias, "direction bias")
    if kind is DirectionKind.GAUSSIAN:
        return
    zero = []
    for k, v in params.items():
        if not _perturbed(v.shape, bias) or v.numel() == 0:
            continue
        t = (v.reshape(1, -1) if kind is DirectionKind.LAYER else
             v.reshape(v.shape[0], -1) if v.dim() >= 2 else v.reshape(-1, 1))  # (filters, .)
        if bool((t.detach().abs().amax(dim=1) == 0).any()):
            zero.append(k)
    if zero:
        weights = [is_weight("", params[k].shape) for k in zero]
        what = "weights" if all(weights) else "parameters" if any(weights) else "biases"
        raise ConfigError(f"{kind.value} units are zero in {', '.join(zero)} ({what} exactly "
                          f"0 there: a {kind.value}-normalised direction never moves them): "
                          f"use directions of kind 'gaussian'"
                          + ("" if all(weights) else " or bias 'exclude'"))


def random_directions(params: Params, n: int, kind: DirectionKind | str = "filter",
                      bias: BiasPolicy | str = "exclude",
                      generator: torch.Generator | None = None, skip: int = 0) -> Params:
    """``n`` random directions for the single model ``params``: a dict of ``(n, ...)``.

    ``generator`` (a CPU ``torch.Generator``) makes them reproducible; draws are
    made in float64 on the CPU and cast to each tensor's dtype/device. ``skip``: the
    first ``skip`` directions are drawn and dropped, not kept, so the result is
    ``random_directions(params, skip + n, ...)[skip:]`` in memory for ``n`` only.
    """
    kind = option(DirectionKind, kind, "direction kind")
    bias = option(BiasPolicy, bias, "direction bias")
    if n < 0 or skip < 0:
        raise ValueError(f"number of directions must be >= 0, got {n} (skip {skip})")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    keys = [k for k, v in params.items() if _perturbed(v.shape, bias)]
    for _ in range(skip):  # the same draws, one direction at a time, as below
        for k in keys:
            torch.randn(params[k].shape, generator=g, dtype=torch.float64)
    theta = {k: params[k].detach().double().cpu() for k in keys}
    out = {k: torch.zeros(n, *v.shape, dtype=torch.float64) for k, v in params.items()}
    for i in range(n):
        raw = {k: torch.randn(theta[k].shape, generator=g, dtype=torch.float64) for k in keys}
        if kind is DirectionKind.GAUSSIAN:
            norm = torch.sqrt(sum(r.pow(2).sum() for r in raw.values()))
            for k in keys:
                out[k][i] = raw[k] / norm
        elif kind is DirectionKind.LAYER:
            for k in keys:
                out[k][i] = raw[k] * (theta[k].norm() / raw[k].norm())
        else:
            for k in keys:
                if raw[k].numel() == 0:  # checked after reshape(0, -1), which had raised
                    continue
                rows = raw[k].shape[0] if raw[k].dim() else 1  # a 0-d scalar: one filter
                r, t = raw[k].reshape(rows, -1), theta[k].reshape(rows, -1)
                # 1-D tensors are filters of size 1: d_j = sign(g_j) |theta_j|; so is a
                # 0-d one (``shape[0]`` of it had raised IndexError under ``include``).
                scale = t.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True)
                out[k][i] = (r * scale).reshape(raw[k].shape)
    return {k: v.to(dtype=params[k].dtype, device=params[k].device) for k, v in out.items()}


def orthogonalize(directions: Params) -> Params:
    """Gram-Schmidt over the K directions of ``directions`` ``(K, ...)``, in flat space.

    Direction k loses its components along directions 0..k-1 and is rescaled to
    its *original* norm, so a filter-normalised pair keeps its scale:
    ``d2' = (d2 - <d2, d1> d1 / ||d1||^2) * ||d2|| / ||...||``. Used for 2-D planes.
    """
    flat = flatten(directions).double()  # (K, P)
    norms = flat.norm(dim=1)
    if bool((norms == 0).any()):
        raise ValueError("cannot orthogonalize a zero direction")
    basis: list[torch.Tensor] = []
    for k in range(flat.shape[0]):
        v = flat[k].clone()
        for u in basis:
            v -= (v @ u) * u
        if float(v.norm()) <= 1e-12 * float(norms[k]):
            raise ValueError(f"direction {k} is linearly dependent on the previous ones")
        basis.append(v / v.norm())
    out = torch.stack(basis) * norms[:, None]
    dtype = next(iter(directions.values())).dtype
    return unflatten(out.to(dtype), directions)


def _filter_rows(v: torch.Tensor) -> torch.Tensor:
    # (M, out, ...) -> (M, out, fan_in): one row per filter / output unit
    return v.reshape(v.shape[0], v.shape[1], -1)


def distances(params: Params, ref: Params, *, isolated: bool = False
              ) -> dict[str, torch.Tensor]:
    """Plain and filter-normalised distances of each member of ``params`` to ``ref``.

    ``ref`` has M members or one (broadcast). Returns ``{"l2": (M,), "filter": (M,)}``
    in float64: ``l2 = ||theta - ref||`` over all parameters, ``filter =
    sqrt(mean_f ||Delta_f||^2 / ||ref_f||^2)`` over the filters of weight tensors, dead
    filters of ``ref`` left out (``||ref_f||^2`` below 1e-12 of its layer's mean: their
    relative change is undefined, and filter-normalised directions are zero there).
    ``isolated=True`` reduces one member at a time (bit-for-bit the same in any stack).

    Example::

        >>> ref = {"w": torch.ones(1, 2, 3), "b": torch.zeros(1, 2)}
        >>> distances({"w": 3 * torch.ones(1, 2, 3), "b": torch.ones(1, 2)}, ref)["filter"]
        tensor([2.], dtype=torch.float64)
    """
    if isolated:
        rows = [distances(alone(params, i), alone(ref, i if n_members(ref) > 1 else 0))
                for i in range(n_members(params))]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    sq = 0.0
    ratios = []
    for k, v in params.items():
        d = (v.double() - ref[k].double())
        sq = sq + d.reshape(d.shape[0], -1).pow(2).sum(1)
        if is_weight(k, v.shape[1:]):
            num = _filter_rows(d).pow(2).sum(-1)
            den = _filter_rows(ref[k].double()).pow(2).sum(-1)
            alive = den > 1e-12 * den.mean(-1, keepdim=True)
            ratios.append(torch.where(alive, num / den.clamp_min(1e-300), math.nan).reshape(
                d.shape[0], -1))
    filt = (torch.cat(ratios, 1).nanmean(1).sqrt() if ratios
            else torch.full_like(sq, math.nan))
    return {"l2": sq.sqrt(), "filter": filt}
