"""Volume estimators of a star-shaped basin, each reporting how far it can be trusted.

Every estimator takes a *line-loss* function ``f(x0, v, t)``: the loss at
``x0_k + t_kj v_k`` for starts ``x0`` ``(K, n)`` (``None``: the centre, the
origin), unit directions ``v`` ``(K, n)`` and distances ``t`` ``(K,)`` or
``(K, T)``, returned in the shape of ``t``. The basin is the region below
``cutoff`` within ``r_max`` of the centre; radii along rays come from the
batched bisection of :func:`minefield.basin.find_radii`, which leaves a relative
error of at most ``rtol`` in every radius. Estimators (:class:`Estimator`):

- ``naive`` (Huang et al. 2019): ``V = omega_n E_u[r(u)^n]``, ``u`` uniform on the
  sphere. In high dimension this sum is its largest term: read the ESS.
- ``is``: importance sampling of directions from the angular central Gaussian
  (ACG) of a positive-definite curvature ``C`` (:class:`~minefield.precondition.Preconditioner`),
  ``u = T g / |T g|`` with ``T T^T = C^-1``, whose density relative to the uniform
  one is ``p(u) = det(C)^1/2 (u^T C u)^-n/2`` (Tyler 1987). Each radius gets the weight
  ``w(u) = r(u)^n / p(u)``, and ``V = omega_n E_p[w]``. Exact (every weight equal)
  when the basin is the ellipsoid ``{x^T C x <= s}`` for any ``s``; it assumes the
  basin is roughly that ellipsoid: the weights' spread (ESS) says how far it is not.
  With a power ``p`` (:meth:`~minefield.precondition.Preconditioner.with_power`) the
  guessed body is ``T B_p``, the unit l_p ball shaped by ``T``, exact on it (p = inf: a
  box, whose zero Hessian no curvature can see, and which no ellipsoid fits: even its
  exact axis scales leave a cube, whose weights under any ellipsoidal proposal spread
  over hundreds of nats at n = 3457). ``power="auto"`` learns ``p`` from pilot rays
  (:func:`fit_power`): adaptive importance sampling over the family's shape.
- ``gaussian`` (the "probability of sampling the network at random" of
  EleutherAI's basin-volume code): the mass of the basin under ``N(0, sigma^2 I)``,
  ``E_u[F_n(r(u) / sigma)]`` with ``F_n`` the chi distribution's CDF
  (:func:`log_chi_cdf`), with the same IS weights when a preconditioner is given.
- ``mcmc``: multiphase Gaussian cooling (:mod:`minefield.cooling`): no shape assumed.

All work in logs (``n`` up to millions). Every estimate is a :class:`VolumeEstimate`
with diagnostics: the effective sample size ``(sum w)^2 / sum w^2`` of the weights,
the share of the largest weight, the rays that reached ``r_max``, and a confidence
interval that adds the bisection's worst case ``n log(1 + rtol)`` on each side to the
sampling error. Directions come in pairs ``u, -u`` (the paper's d and -d); the
sampling error treats each pair's mean as one independent draw.

Example (an ellipsoid, exact with the matched preconditioner)::

    >>> from minefield.bodies import Ellipsoid
    >>> from minefield.precondition import Preconditioner
    >>> body = Ellipsoid(torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64))
    >>> est = star_volume(body, 3, body.cutoff, "is", 50, torch.Generator().manual_seed(0),
    ...                   r_max=10.0, rtol=1e-9,
    ...                   preconditioner=Preconditioner.diagonal(body.curvature()))
    >>> round(est.log_volume, 6) == round(body.log_volume, 6), est.ess
    (True, 100.0)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .bodies import log_ball_volume
from .config import ConfigError
from .intervals import (
    FEW,
    HEAVY,
    MIN_ESS,
    _check_level,
    honest_interval,
    light_tailed,
    pair_ess,
    weights_estimate,
)
from .options import CurvatureKind, Estimator
from .precondition import Preconditioner
from .volume_options import (
    check_owned_options,
    check_shape_options,
    parse_estimator,
    parse_power,
    power_text,
)

__all__ = ["Estimator", "parse_estimator", "parse_power", "power_text", "LineLoss",
           "check_shape_options", "check_owned_options",
           "VolumeEstimate", "log_chi_cdf", "star_volume", "fit_power", "POWERS",
           "weights_estimate", "honest_interval", "ray_radii", "LN10"]

LN10 = math.log(10.0)
#: ``line_loss(x0, v, t)``: the loss at ``x0 + t v`` (``x0`` None: the centre), CPU
#: float64 tensors in; the losses may come back on any device (the estimators read them
#: on the CPU)
LineLoss = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], torch.Tensor]
THIN = 0.1  # mcmc: a phase ESS below this share of the chains is warned about


@dataclass
class VolumeEstimate:
    """A log-volume (natural log; for ``gaussian``, the log-mass) with its diagnostics."""

    estimator: str
    log_volume: float
    ci: tuple[float, float]  # natural log, at `level`, bisection tolerance included
    level: float
    n: int
    ess: float  # of the weights (mcmc: the smallest per-phase ESS)
    n_samples: int  # weights (mcmc: chains)
    max_share: float  # largest weight / sum of weights
    n_at_r_max: int
    n_evaluations: int
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def log10_volume(self) -> float:
        return self.log_volume / LN10

    @property
    def ci_log10(self) -> tuple[float, float]:
        return self.ci[0] / LN10, self.ci[1] / LN10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ci": list(self.ci)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VolumeEstimate:
        return cls(**{**d, "ci": tuple(d["ci"])})


def log_chi_cdf(x: torch.Tensor, n: int) -> torch.Tensor:
    """``log P(chi_n <= x)`` in float64, stable for ``n`` in the millions.

    ``P(chi_n <= x) = P(n/2, x^2/2)``, the regularised lower incomplete gamma
    function. Where it underflows (far below the mode ``sqrt(n - 1)``) the series
    ``log P(a, z) = a log z - z - lgamma(a + 1) + log sum_k z^k / ((a+1)...(a+k))``
    (Abramowitz & Stegun 6.5.29) takes over; its terms shrink at least as fast as
    ``(z / a)^k`` there.

    >>> round(float(log_chi_cdf(torch.tensor(1.0), 2)), 6)   # log(1 - exp(-1/2))
    -0.932752
    """
    if n < 1:
        raise ConfigError(f"dimension n must be >= 1, got {n}")
    x = torch.as_tensor(x, dtype=torch.float64)
    a = torch.tensor(0.5 * n, dtype=torch.float64)
    z = 0.5 * x.clamp(min=0).pow(2)
    out = torch.special.gammainc(a, z).log()
    low = (out < -600) & (z > 0)
    if bool(low.any()):
        out[low] = _log_gammainc_series(a, z[low])
    return torch.where(x <= 0, torch.full_like(out, -math.inf), out)


def _log_gammainc_series(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log P(a, z)`` by the series of :func:`log_chi_cdf` (for ``z < a``; ``z > 0``)."""
    log_s, log_term = torch.zeros_like(z), torch.zeros_like(z)
    for k in range(1, 10**7):
        log_term = log_term + torch.log(z / (a + k))
        log_s = torch.logaddexp(log_s, log_term)
        if bool((log_term - log_s < -40).all()):
            break
    return a * z.log() - z - torch.lgamma(a + 1) + log_s


def ray_radii(line_loss: LineLoss, u: torch.Tensor, cutoff: float, r_max: float,
              rtol: float, centre_loss: float | None = None, bracket_points: int = 12,
              bracket_ratio: float = 4.0) -> tuple[torch.Tensor, int]:
    """Radii ``(K,)`` of the sub-cutoff region along the rays ``u`` ``(K, n)`` from the
    centre (batched bisection), and the number of loss evaluations."""
    from .basin import find_radii

    return find_radii(lambda ts: line_loss(None, u, ts), len(u), cutoff, r_max, rtol,
                      "bisect", bracket_points=bracket_points, centre_loss=centre_loss,
                      bracket_ratio=bracket_ratio)


def _directions(n: int, k: int, generator: torch.Generator,
                preconditioner: Preconditioner | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` pairs ``u, -u`` ``(2k, n)`` and ``log(uniform / proposal)`` density ``(2k,)``."""
    if preconditioner is None:
        g = torch.randn(k, n, generator=generator, dtype=torch.float64)
        u = g / g.norm(dim=1, keepdim=True)
        log_ratio = torch.zeros(2 * k, dtype=torch.float64)
    else:
        x = preconditioner.sample(k, generator)
        u = x / x.norm(dim=1, keepdim=True)
        log_ratio = preconditioner.log_ratio(u).repeat(2)  # even: p(-u) = p(u)
    return torch.cat([u, -u]), log_ratio


POWERS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, math.inf)  # proposal shapes tried by "auto"


def fit_power(line_loss: LineLoss, n: int, cutoff: float, preconditioner: Preconditioner,
              generator: torch.Generator, r_max: float, rtol: float,
              powers: tuple[float, ...] = POWERS, pairs: int = 16,
              centre_loss: float | None = None
              ) -> tuple[Preconditioner, dict[str, float], int]:
    """The proposal shape learnt from pilot rays: ``preconditioner`` with the power whose
    own ``pairs`` pilot pairs give the log-weights ``n log r(u) + log_ratio(u)`` the
    smallest variance (zero iff the proposal body ``T B_p`` has the basin's shape), the
    variance per power, and the loss evaluations spent. The pilot rays are drawn before,
    and independently of, the estimate's, so the choice does not bias it."""
    scores, evals = {}, 0
    for q in powers:
        pre = preconditioner.with_power(q)
        u, log_ratio = _directions(n, pairs, generator, pre)
        r, e = ray_radii(line_loss, u, cutoff, r_max, rtol, centre_loss)
        evals += e
        scores[str(q)] = float((n * r.log() + log_ratio).var())
    best = min(powers, key=lambda q: (scores[str(q)], abs(math.log(q / 2))))
    return preconditioner.with_power(best), scores, evals


def _check(n: int, cutoff: float, k: int, r_max: float, rtol: float, level: float = 0.95,
           line_loss: LineLoss | None = None) -> None:
    """Bad numbers, and an ``n`` other than the line-loss's own (bodies, NetworkLines)."""
    try:
        operator.index(n), operator.index(k)
    except TypeError:
        raise ConfigError(f"n and n_directions must be integers, got {n!r}, {k!r}") from None
    if n < 1:
        raise ConfigError(f"dimension n must be >= 1, got {n}")
    if k < 2:
        raise ConfigError(f"{k} direction pair(s) give no interval: use at least 2")
    if not (math.isfinite(cutoff) and math.isfinite(r_max) and r_max > 0 and 0 < rtol < 1):
        raise ConfigError(f"need a finite cutoff, a finite r_max > 0 and 0 < rtol < 1; got "
                          f"cutoff={cutoff}, r_max={r_max}, rtol={rtol}")
    _check_level(level)
    own = getattr(line_loss, "n", None)
    if own is not None and own != n:
        raise ConfigError(f"n = {n}, but the line-loss has {own} coordinates")


def _warnings(ess: float, n_at_max: int, n_rays: int, r_max: float,
              bound: bool = False, rays: int | None = None,
              draws_ess: float | None = None, looked: bool = False,
              mass: bool = False, shaped: bool = False) -> list[str]:
    """Warnings on ``ess`` of ``n_rays`` draws (``draws_ess``: of their pairs), and on
    ``n_at_max`` of ``rays`` (default ``n_rays``) rays at ``r_max``; ``looked``: a
    sample that looked light-tailed was given the bound (:func:`honest_interval`);
    ``mass``: the quantity is a Gaussian mass, at most 1; ``shaped``: the rays came
    from a preconditioner's proposal, not uniform directions."""
    out = []
    what = "the Gaussian mass, to 1" if mass else "the volume, to the volume within r_max"
    if looked:
        rays = ("the proposal's rays miss any thin cap of the basin that the proposal does "
                "not cover (a rotated long axis under a diagonal preconditioner)" if shaped
                else "uniform directions miss the thin cap that holds most of an elongated "
                "basin's volume")
        out.append(f"ESS {ess:.1f} of {n_rays} draws looks light-tailed, but {rays}, so the "
                   f"interval is the bound: from a Markov lower bound to {what} (the "
                   f"sample's normal interval is in the diagnostics)")
    elif bound and ess == 0:  # every weight 0: every radius is (radii stop at r_max)
        out.append("every radius is 0: the centre's loss is at or above the cutoff, so "
                   "there is no basin (log V = -inf); raise the cutoff")
    elif bound and ess >= HEAVY * n_rays and (draws_ess or ess) >= MIN_ESS:
        out.append(f"every one of the {n_rays} draws had the same weight: exact if the body "
                   f"is the proposal's shape (a ball for naive), but a sample shows no tail it "
                   f"never drew (a thin spike), so the interval runs from a zero-count lower "
                   f"bound (the undrawn mass is small) to the volume within r_max")
    elif bound:
        pairs = "" if draws_ess is None else f", {draws_ess:.1f} of their {n_rays // 2} pairs"
        need = (f"{max(HEAVY * n_rays, MIN_ESS):g}" if draws_ess is None else
                f"{HEAVY * n_rays:g} of them and >= {MIN_ESS:g} of the pairs")
        out.append(f"ESS {ess:.1f} of {n_rays} draws{pairs} (a normal interval needs >= "
                   f"{need}): heavy-tailed weights or too few draws, "
                   f"so the estimate is in effect a lower bound; the interval runs from a "
                   f"Markov lower bound to the volume within r_max (a better proposal or more "
                   f"draws narrow it)")
    elif ess < FEW:
        out.append(f"ESS {ess:.1f} of {n_rays} draws: a handful of draws decide the "
                   f"estimate and its interval is not trustworthy")
    elif ess < THIN * n_rays:  # mcmc, whose interval comes from its replicates
        out.append(f"ESS {ess:.1f} of {n_rays} draws: heavy-tailed weights, the interval "
                   f"may be too narrow")
    if n_at_max:
        out.append(f"{n_at_max} of {rays or n_rays} rays reached r_max = {r_max:g}: this is "
                   f"the volume of the basin within r_max")
    return out


def star_volume(line_loss: LineLoss, n: int, cutoff: float,
                estimator: Estimator | str = "naive", n_directions: int = 100,
                generator: torch.Generator | None = None, r_max: float = 1.0,
                rtol: float = 1e-3, preconditioner: Preconditioner | None = None,
                sigma: float | None = None, centre_loss: float | None = None,
                level: float = 0.95, power: float | str | None = None) -> VolumeEstimate:
    """``naive``, ``is`` or ``gaussian`` estimate from ``n_directions`` pairs of rays.

    Args:
        line_loss: the loss along lines (module docstring); ``n`` coordinates.
        cutoff: the basin is ``{L < cutoff}`` within ``r_max``.
        estimator: ``naive`` (uniform rays), ``is`` (ACG rays of ``preconditioner``)
            or ``gaussian`` (mass under ``N(0, sigma^2 I)``; IS rays when a
            preconditioner is given; ``sigma`` defaults to ``r_max / sqrt(n)``).
        n_directions: pairs ``u, -u``; ``generator``: their randomness.
        rtol: relative bisection tolerance of every radius.
        power: the proposal's shape (:class:`~minefield.precondition.Preconditioner`):
            ``None`` keeps the preconditioner's (2, an ellipsoid, unless set), a number
            sets it, ``"auto"`` learns it from pilot rays (:func:`fit_power`; their
            evaluations are counted, their choice is in ``details``).
    Returns:
        A :class:`VolumeEstimate`; ``details`` holds the radii. Its interval is the bound of
        :func:`honest_interval` whatever the sample: rays (uniform ones, or a proposal's)
        miss any thin cap of the body their proposal does not cover while the sample
        looks light-tailed, so a sample's interval can undercover without a sign. The
        sample's normal interval is ``details["ci_normal"]``.
    Raises:
        ConfigError: unknown estimator, missing/mismatched preconditioner, fewer
            than 2 pairs, bad numbers.
    """
    est = parse_estimator(estimator)
    if est is Estimator.MCMC:
        raise ConfigError("star_volume does naive, is and gaussian; mcmc is "
                          "minefield.cooling.cooling_volume")
    _check(n, cutoff, n_directions, r_max, rtol, level, line_loss)
    if est is Estimator.IS and preconditioner is None:
        raise ConfigError("estimator 'is' needs a preconditioner")
    if est is Estimator.NAIVE and preconditioner is not None:
        raise ConfigError("a preconditioner shapes is and gaussian; naive (the paper's) draws "
                          "uniform directions: pass none")
    check_shape_options(est, CurvatureKind.GIVEN if preconditioner is not None
                        else CurvatureKind.NONE,
                        "2" if power is None else power, sigma, None, prefix="")
    if preconditioner is not None:
        preconditioner.check(n)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    details: dict[str, Any] = {"rtol": rtol, "r_max": r_max}
    pilot = 0
    if power is not None and parse_power(power) == "auto" and preconditioner is not None:
        preconditioner, details["power_scores"], pilot = fit_power(
            line_loss, n, cutoff, preconditioner, g, r_max, rtol, centre_loss=centre_loss)
    elif power is not None and preconditioner is not None:
        preconditioner = preconditioner.with_power(parse_power(power))
    u, log_ratio = _directions(n, n_directions, g, preconditioner)
    r, evals = ray_radii(line_loss, u, cutoff, r_max, rtol, centre_loss)
    evals += pilot
    if est is Estimator.GAUSSIAN:
        sigma = r_max / math.sqrt(n) if sigma is None else float(sigma)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ConfigError(f"sigma must be a positive number, got {sigma}")
        log_w = log_chi_cdf(r / sigma, n) + log_ratio
        log_norm = 0.0
    else:
        log_w = n * r.log() + log_ratio
        log_norm = log_ball_volume(n)
    slack = n * math.log1p(rtol)
    value, normal, ess, share = weights_estimate(log_w, True, level, slack)
    upper = 0.0 if est is Estimator.GAUSSIAN else n * math.log(r_max)  # the r_max ball; mass 1
    ess_pairs = pair_ess(log_w)  # the draws: the two rays of a pair are one
    # rays miss any thin cap their proposal does not cover while the sample looks
    # light-tailed (a one-long-axis 10-d body: normal intervals covered 13 of 21 under
    # gaussian's uniform rays, 9 of 20 under `is` with the Hessian's diagonal when the
    # axis is rotated; tests/test_volume.py), so every estimate gets the bound
    (lo, hi), kind = honest_interval(value, normal, ess, len(r), level, upper, slack,
                                     ess_pairs, sample_ok=False)
    looked = light_tailed(normal, ess, len(r), slack, ess_pairs)
    n_at = int((r >= r_max).sum())
    details |= {"radii": r.tolist(), "interval": kind, "ess_pairs": ess_pairs,
                "ci_normal": [normal[0] + log_norm, normal[1] + log_norm]}
    over, top = value > upper, upper + slack * (est is not Estimator.GAUSSIAN)  # IS overshoots
    value, lo, hi = min(value, upper), min(lo, upper), min(hi, top)  # (lo > hi was seen)
    details |= {"sigma": sigma} if est is Estimator.GAUSSIAN else {}
    notes = _warnings(ess, n_at, len(r), r_max, kind == "bound", draws_ess=ess_pairs,
                      looked=looked, mass=est is Estimator.GAUSSIAN,
                      shaped=preconditioner is not None) + [
        "the estimate exceeded the most it can be (the r_max ball; a mass of 1): capped"] * over
    if preconditioner is not None:
        details["preconditioner"] = preconditioner.kind
        details["power"] = preconditioner.power
        details["isotropic"] = preconditioner.isotropic
        if preconditioner.isotropic and n > 1 and ess > 0:
            notes.append("the preconditioner is isotropic (at a curvature floor, every "
                         "entry is clipped to it): its curvature shaped nothing")
    return VolumeEstimate(est.value, value + log_norm, (lo + log_norm, hi + log_norm), level,
                          n, ess, len(r), share, n_at, evals, notes, details)
