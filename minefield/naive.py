"""The paper's volume estimate from radii (Huang et al. 2019): log V and its bootstrap.

Radii ``r_i`` along ``N`` unit directions of a star-shaped basin in ``n``
dimensions give, in polar coordinates, ``V = omega_n E[r^n]``, estimated in logs:

    log V = (n/2) log pi - lgamma(n/2 + 1) + logsumexp_i(n log r_i) - log N.

Radii come in pairs along ``d`` and ``-d`` (``+d_1..+d_K`` then ``-d_1..-d_K``,
the layout of :func:`minefield.basin.direction_radii`): the two radii of a pair
share their direction, so the bootstrap resamples pairs.

    >>> r = torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=torch.float64)  # two pairs
    >>> round(math.exp(log_volume(r, 2)), 4)   # pi (1 + 1/4 + 1 + 1/4) / 4
    1.9635
"""

from __future__ import annotations

import math

import torch

from .config import ConfigError

__all__ = ["LN10", "log_volume", "log10_volume", "bootstrap_log10_volume"]

LN10 = math.log(10.0)


def log_volume(radii: torch.Tensor, n: int) -> torch.Tensor:
    """Natural log of the Monte-Carlo star-body volume ``omega_n mean(r_i^n)``.

    ``log V = (n/2) log pi - lgamma(n/2 + 1) + logsumexp(n log r_i) - log N``,
    in float64; ``r_i = 0`` contributes ``exp(-inf) = 0``; all zero gives ``-inf``.
    Leading dims of ``radii`` (e.g. bootstrap replicates) are kept.
    """
    r = radii.double()
    if n < 1:
        raise ValueError(f"dimension n must be >= 1, got {n}")
    if bool((r < 0).any()) or bool(torch.isnan(r).any()):
        raise ValueError("radii must be >= 0 and not NaN")
    log_omega = 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1)
    return log_omega + torch.logsumexp(n * torch.log(r), -1) - math.log(r.shape[-1])


def log10_volume(radii: torch.Tensor, n: int) -> float:
    """``log10 V`` (see :func:`log_volume`)."""
    return float(log_volume(radii, n)) / LN10


def bootstrap_log10_volume(radii: torch.Tensor, n: int, n_boot: int = 1000, seed: int = 0,
                           level: float = 0.95, pairs: bool = True) -> tuple[float, float]:
    """Percentile bootstrap interval of ``log10 V`` at ``level`` (Efron & Tibshirani 1993, 13.3).

    The bootstrap resamples *independent* draws. With ``pairs`` (the layout of every
    radius set here: ``+d_1..+d_K`` then ``-d_1..-d_K``) a draw is the pair
    ``(r_i, r_{i+K})`` of one direction, which share it and are not independent (on a
    centrally symmetric basin they are equal): each replicate resamples ``K`` pair
    indices with replacement and keeps both radii of each, as
    :func:`minefield.volume.weights_estimate` averages pairs. Resampling the ``2K``
    radii one by one would count every direction twice and give an interval about
    ``sqrt(2)`` too narrow. ``pairs=False``: the radii are independent draws.
    """
    if n_boot == 0:
        return float("nan"), float("nan")
    if pairs and len(radii) % 2:
        raise ConfigError(f"{len(radii)} radii are not pairs along d and -d (pairs=False "
                          f"for independent radii)")
    g = torch.Generator().manual_seed(int(seed))
    r = radii.double().cpu()  # resampled by a CPU generator: the same numbers on any device
    k = len(r) // 2 if pairs else len(r)
    idx = torch.randint(k, (n_boot, k), generator=g)  # (n_boot, k) draws
    if pairs:
        idx = torch.cat([idx, idx + k], 1)  # both radii of each drawn direction
    vals = log_volume(r[idx], n) / LN10
    finite = vals[torch.isfinite(vals)]
    if len(finite) < n_boot:  # some replicates drew only zero radii: -inf is a valid quantile
        vals = vals.sort().values
        lo_i = int(math.floor((1 - level) / 2 * (n_boot - 1)))
        hi_i = int(math.ceil((1 + level) / 2 * (n_boot - 1)))
        return float(vals[lo_i]), float(vals[hi_i])
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(vals, q).tolist()
    return lo, hi
