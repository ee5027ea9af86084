"""Confidence intervals for a mean of nonnegative weights, and when to trust one.

Every estimator of :mod:`minefield.volume` is a mean of nonnegative weights
``w`` (``r^n``, ``r^n / p(u)``, a chi CDF), drawn in pairs ``u, -u``: each pair's
mean is one independent draw. :func:`weights_estimate` gives the mean in logs
with a skewness-corrected interval, the ESS ``(sum w)^2 / sum w^2`` and the
largest weight's share; :func:`honest_interval` keeps that interval only when
the weights look light-tailed, and otherwise reports one that holds whatever the
tail (a Markov lower bound up to a bound known before sampling).

    >>> lw = torch.log(torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64))
    >>> est, ci, ess, share = weights_estimate(lw)   # pairs (1, 1) and (3, 3)
    >>> round(math.exp(est), 6), round(ess, 3), share
    (2.0, 3.2, 0.375)
"""

from __future__ import annotations

import math

import torch
from scipy.stats import t as student_t

from .config import ConfigError

__all__ = ["weights_estimate", "hall_interval", "honest_interval", "light_tailed", "pair_ess",
           "replicate_interval",
           "replicate_estimate", "FEW", "HEAVY", "MIN_ESS", "SPREAD"]

FEW = 10.0  # an ESS below this many draws is "a handful"
HEAVY = 0.5  # an ESS below this share of the draws: heavy-tailed weights (honest_interval)
MIN_ESS = 20.0  # and below this many draws: too few to trust a normal interval
SPREAD = 1e-9  # a normal interval no wider (nats, beyond the slack): no spread was seen


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"level must be a probability in (0, 1), got {level}")


def weights_estimate(log_w: torch.Tensor, pairs: bool = True, level: float = 0.95,
                     slack: float = 0.0) -> tuple[float, tuple[float, float], float, float]:
    """``log mean(w)``, its interval, the ESS and the largest weight's share, from log-weights.

    The interval is for the mean of the (pair-averaged when ``pairs``: the first half
    of ``log_w`` are the ``u``, the second the ``-u``) weights: Hall's skewness-corrected
    t interval ("On the removal of skewness by transformation", JRSS B 54, 1992),
    ``mean - s g^-1(+-q / sqrt(N))`` with ``g^-1(x) = (3 / gamma) ((1 + gamma (x - gamma
    / (6 N)))^(1/3) - 1)``, ``gamma`` the sample skewness, ``s`` the standard deviation
    and ``q`` the Student t quantile with ``N - 1`` degrees of freedom. Weights are
    right-skewed, and the plain ``mean +- z se`` misses mostly below the truth: on 4,000
    samples of 20 exponential draws it covered 89.5% at 95%, this 93.2%. The interval is
    mapped to logs (lower end ``-inf`` when not positive) and widened by ``slack`` (the
    bisection's worst case) on each side.

    Raises:
        ConfigError: fewer than two independent draws, or ``level`` not in (0, 1).
    """
    _check_level(level)
    lw = log_w.double()
    if pairs and len(lw) % 2:
        raise ConfigError(f"{len(lw)} weights cannot be pairs (u, -u): give an even number, "
                          "or pairs=False")
    w_all = torch.exp(lw - lw.max())
    ess = float(w_all.sum() ** 2 / w_all.pow(2).sum())
    share = float(w_all.max() / w_all.sum())
    draws = torch.logaddexp(*lw.reshape(2, -1)) - math.log(2) if pairs else lw
    if len(draws) < 2:
        raise ConfigError(f"{len(draws)} independent draw(s) give no interval: use at least "
                          f"2 directions (chains, replicates)")
    top = float(draws.max())
    if not math.isfinite(top):  # every weight is zero: the basin is empty along every draw
        return -math.inf, (-math.inf, -math.inf + slack), 0.0, float("nan")
    w = torch.exp(draws - top)
    mean = float(w.mean())
    lo_abs, hi_abs = hall_interval(w[None], level)
    lo_rel, hi_rel = float(lo_abs) / mean, float(hi_abs) / mean
    est = top + math.log(mean)
    lo = est + math.log(lo_rel) if lo_rel > 0 else -math.inf
    return est, (lo - slack, est + math.log(hi_rel) + slack), ess, share


def hall_interval(x: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Hall's skewness-corrected t interval for the mean of each row of ``x`` ``(M, N)``:
    ``mean - s g^-1(+-q / sqrt(N))`` with ``g^-1(x) = (3 / gamma) ((1 + gamma (x - gamma
    / (6 N)))^(1/3) - 1)``, ``gamma`` the sample skewness, ``s`` the (unbiased) standard
    deviation, ``q`` the Student t quantile with ``N - 1`` degrees of freedom (Hall 1992,
    JRSS B 54); ``gamma = 0`` gives the Student t interval. Returns ``(lo, hi)``, ``(M,)``.

    >>> lo, hi = hall_interval(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    >>> round(float(lo), 4), round(float(hi), 4)   # symmetric: 2 -+ 4.303 / sqrt(3)
    (-0.4841, 4.4841)
    """
    n = x.shape[-1]
    mean, sd = x.mean(-1), x.std(-1)
    c = x - mean[..., None]
    m2 = c.pow(2).mean(-1)
    gamma = torch.where(m2 > 0, c.pow(3).mean(-1) / m2.clamp(min=1e-300).pow(1.5), 0.0)
    flat = gamma.abs() < 1e-12
    g = torch.where(flat, torch.ones_like(gamma), gamma)
    q = float(student_t.ppf(0.5 + level / 2, n - 1)) / math.sqrt(n)

    def g_inv(t: float) -> torch.Tensor:  # the inverse of Hall's cubic transformation
        v = 1 + g * (t - g / (6 * n))
        return torch.where(flat, torch.full_like(gamma, t), 3 / g * (v.sign() * v.abs().pow(
            1 / 3) - 1))

    return mean - sd * g_inv(q), mean - sd * g_inv(-q)


def pair_ess(log_w: torch.Tensor) -> float:
    """The ESS ``(sum w)^2 / sum w^2`` of the pair means of ``log_w`` (the first half the
    ``u``, the second the ``-u``): of the independent draws, where the ESS of all the
    weights counts a pair (equal radii on a symmetric body) twice."""
    draws = torch.logaddexp(*log_w.double().reshape(2, -1))
    if not math.isfinite(float(draws.max())):
        return 0.0
    w = torch.exp(draws - draws.max())
    return float(w.sum() ** 2 / w.pow(2).sum())


def honest_interval(est: float, normal: tuple[float, float], ess: float, n_draws: int,
                    level: float, log_upper: float, slack: float = 0.0,
                    draws_ess: float | None = None, sample_ok: bool = True
                    ) -> tuple[tuple[float, float], str]:
    """The interval to report for a mean of nonnegative weights, and which kind it is.

    ``normal`` (labelled so) only when the weights look light-tailed: ESS at least
    ``HEAVY`` (half) of the ``n_draws`` and at least ``MIN_ESS`` (20) independent draws'
    worth: ``draws_ess`` when given (weights in pairs ``u, -u``: :func:`pair_ess`; the
    ESS of all ``2K`` weights counted each pair twice, so 10 directions passed, and at
    20 pairs on a 5-d ellipsoid the intervals labelled normal covered 77% at 95%, the
    paper's bootstrap 66%), else ``ess``. ESS / N ``= 1 /
    (1 + cv^2)`` of the sample, so this asks for a sample coefficient of variation of
    at most 1. At the old threshold (ESS >= 10% of the draws) ``naive``'s "normal" 95%
    intervals covered 5 of 56 times on a 10-d ellipsoid spanning a decade, and an ESS
    of 1 of 8 draws passed. A sample cannot show a tail it never drew, so with skewed
    weights a normal interval still runs somewhat narrow (README, "Basin volume you can
    defend"). Otherwise (at n = 3457 the paper's estimate of an ellipsoid sat 1700 orders
    of magnitude below the truth inside a narrow normal interval) the interval is one
    that holds whatever the tail:

    - lower end ``est + log(1 - level)``: by Markov's inequality a nonnegative mean
      ``W`` of unbiased weights exceeds ``E[W] / (1 - level)`` with probability at most
      ``1 - level``, so ``E[W] >= (1 - level) W`` at the stated level;
    - upper end ``log_upper``, a bound known before sampling (the volume of the ball of
      radius ``r_max``, a probability of 1).

    Both ends are widened by ``slack`` (the bisection's worst case, already in ``normal``).

    A ``normal`` interval no wider than that slack (by ``SPREAD`` = 1e-9 nats) also gives
    the bound: every one of the ``k`` independent draws weighed the same ``c``, which a
    ball and a ball with an undrawn spike share (at n = 10, a spike over 0.5% of the
    directions holding half the volume, 50 pairs: 117 of 200 seeds drew no spike, and
    their zero-width intervals all missed). Its lower end is the zero-count (rule of
    three) bound instead of Markov's: the directions whose weight is not ``c`` have a
    mass ``q`` with ``(1 - q)^k >= 1 - level`` at the stated level, and weights are
    nonnegative, so ``E[W] >= (1 - q) c``: ``est + log(1 - level) / k`` (-0.06 nats at
    50 pairs, 95%). The upper end stays the bound: one undrawn direction may hold it.
    ``sample_ok=False`` gives the bound whatever the sample looks like: for uniform
    directions (``naive``), whose weights ``r^n`` put most of an elongated body's volume
    in a cap of directions few draws hit, the samples that pass the test above are the
    ones that missed the cap (a 10-d ellipsoid with one semi-axis 3, the rest 1, 50
    pairs, 300 seeds: 81 labelled normal, 29 of them covered at 95%), and for any
    proposal that does not cover such a cap (``is`` with the Hessian's diagonal when the
    long axis is rotated: 21 of 49): :func:`~minefield.volume.star_volume` and
    :func:`~minefield.basin.volume_from_radii` pass it always.
    Returns ``((lo, hi), "normal" | "bound")``.

    >>> honest_interval(0.0, (-0.1, 0.1), 60.0, 100, 0.95, 9.0)
    ((-0.1, 0.1), 'normal')
    >>> (lo, hi), kind = honest_interval(0.0, (-0.1, 0.1), 40.0, 100, 0.95, 9.0)
    >>> round(lo, 3), hi, kind    # log(0.05) = -2.996
    (-2.996, 9.0, 'bound')
    >>> (lo, hi), kind = honest_interval(0.0, (0.0, 0.0), 100.0, 100, 0.95, 9.0)
    >>> round(lo, 4), hi, kind    # 100 draws all of one weight: log(0.05) / 100
    (-0.03, 9.0, 'bound')
    """
    _check_level(level)
    spread = normal[1] - normal[0] - 2 * slack > SPREAD
    if sample_ok and light_tailed(normal, ess, n_draws, slack, draws_ess):
        return normal, "normal"
    # the normal interval's ends say nothing here (they may even pass the ball's volume)
    k = n_draws // 2 if draws_ess is not None else n_draws  # independent draws
    lower = math.log1p(-level) / (k if not spread and ess > 0 else 1)  # no spread; Markov
    return (est + lower - slack, log_upper + slack), "bound"


def light_tailed(normal: tuple[float, float], ess: float, n_draws: int, slack: float = 0.0,
                 draws_ess: float | None = None) -> bool:
    """Whether the sample passes :func:`honest_interval`'s test for a normal interval:
    some spread beyond ``slack``, an ESS of at least ``HEAVY`` of the draws and at least
    ``MIN_ESS`` independent draws' worth (``draws_ess`` when given)."""
    spread = normal[1] - normal[0] - 2 * slack > SPREAD
    return spread and ess >= HEAVY * n_draws and (
        ess if draws_ess is None else draws_ess) >= MIN_ESS


def replicate_interval(log_vol: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """``log E[Z]`` and the half-width of its interval from independent replicates'
    log-estimates ``log_vol`` ``(R,)``: each replicate's ``Z`` is unbiased and about
    lognormal, so Cox's ``mean + s^2/2 +- t_{R-1} sqrt(s^2/R + s^4/(2(R-1)))`` (Land 1972).
    """
    r = len(log_vol)
    var = float(log_vol.var())
    half = float(student_t.ppf(0.5 + level / 2, r - 1)) * math.sqrt(
        var / r + var**2 / (2 * (r - 1)))
    return float(log_vol.mean()) + var / 2, half


def replicate_estimate(log_vol: torch.Tensor, level: float, slack: float, log_upper: float
                       ) -> tuple[float, tuple[float, float], list[str]]:
    """:func:`replicate_interval`'s estimate and interval (widened by ``slack``), neither
    above ``log_upper``, the volume within ``r_max`` known before sampling: with spread
    replicates Cox's ``s^2/2`` has no bound (2 replicates 6.5 nats apart put a 10-d box
    of log V -4.6 at +4.8, above its r_max ball's 0.9). Also a warning when it was cut."""
    est, half = replicate_interval(log_vol, level)
    warns = [] if est <= log_upper else [
        f"Cox's estimate {est:.4g} nats exceeds the volume within r_max ({log_upper:.4g}), "
        f"which nothing in it can: the replicates disagree; reported at that bound"]
    top = min(est, log_upper)
    return top, (min(est - half, top) - slack, min(est + half, log_upper) + slack), warns
