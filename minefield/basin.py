"""Basin radius along random directions, and the log-volume of the basin (Huang et al. 2019).

The basin around a minimum theta is the set of points whose train loss stays
below a cutoff c. Along a unit direction phi its radius is

    r(phi) = min(r_max, first t > 0 with L(theta + t phi) >= c),   r = 0 if L(theta) >= c,

and d and -d are two separate directions (two radii). Viewing the basin as a
star-shaped body in n dimensions, polar coordinates give its volume

    V = omega_n E_phi[r(phi)^n],   omega_n = pi^(n/2) / Gamma(n/2 + 1),

estimated by Monte Carlo over N directions and computed in logs, so nothing
overflows even for n = 1e8:

    log V = (n/2) log pi - lgamma(n/2 + 1) + logsumexp_i(n log r_i) - log N.

``n`` is the number of perturbed coordinates (:func:`~minefield.directions.n_perturbed`).
Because ``E[r^n]`` is dominated by the largest sampled radius, results also
report ``n * mean(log10 r)``, the log-volume of a ball of the geometric-mean
radius (minus omega_n), and a bootstrap interval of log10 V.

Radii come from :func:`find_radii`, which needs only a batched loss along fixed
directions, ``loss_fn(ts (K,) or (K, T)) -> same shape``: ``bisect`` brackets
the first crossing on a geometric grid ``r_max * 2^-j`` and bisects *all*
directions at once to a relative tolerance; ``grid`` is the paper's fixed scan
(``t = r_max u^p`` or linear), linearly interpolated between the last point
below and the first point at or above the cutoff. :func:`basin_radii` plugs the
batched :mod:`~minefield.engine` in for a network.

Example (the quadratic bowl of reproduction check 9)::

    >>> a, c = 2.0, 0.5   # L(t) = a t^2 / 2 along unit directions: r = sqrt(2c/a) = 0.707
    >>> r, n_evals = find_radii(lambda t: a * t**2 / 2, 10, c, r_max=1.0)
    >>> round(float(r.mean()), 3)   # within rtol = 1e-3 of 0.7071
    0.707
    >>> round(float(log_volume(r, n=3).exp()), 2)   # 4/3 pi r^3 = 1.481
    1.48
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .config import ConfigError, _Config
from .data import Dataset, train_xy
from .directions import DirectionSpec, check_units, n_perturbed, random_directions
from .engine import evaluate_points
from .functional import Params, alone, check_single, member, n_members, one
from .intervals import pair_ess
from .naive import LN10, bootstrap_log10_volume, log10_volume, log_volume
from .options import BiasPolicy, CurvatureKind, CutoffKind, Estimator, Grid, Precision, RadiusMethod
from .radii import check_radii, find_radii, radius_grid
from .rollout import Rollouts, rollouts
from .volume import (
    _warnings,
    check_owned_options,
    check_shape_options,
    honest_interval,
    light_tailed,
    parse_power,
    power_text,
    weights_estimate,
)

__all__ = ["CutoffKind", "RadiusMethod", "VolumeConfig", "BasinResult", "BasinWarning",
           "Rollouts", "find_radii", "check_radii", "radius_grid", "log_volume", "log10_volume",
           "bootstrap_log10_volume", "basin_radii", "basin_members", "rollouts",
           "volume_from_radii", "direction_radii", "radii_result"]


@dataclass(frozen=True)
class VolumeConfig(_Config):
    """Settings of one basin-radius / volume estimate (all recorded with the result).

    ``n_directions`` random directions give ``2 * n_directions`` radii (d and -d). ``rtol``:
    bisection stops when ``hi - lo <= 2 rtol lo``. ``grid_points``, ``grid`` (``power``:
    ``t = r_max u^grid_power``, the paper's u^5; ``linear``) configure the ``grid`` method.
    ``memory_mb`` bounds the engine's chunks (``None``: the device's default,
    :func:`minefield.autotune.memory_budget_mb`); ``seed`` drives the bootstrap diagnostic
    ``diagnostics["ci_log10_bootstrap"]`` (``n_bootstrap = 0``: NaN), not the directions:
    ``minefield basin --seed S`` is ``VolumeConfig(seed=S, directions=DirectionSpec(seed=S))``.
    ``estimator`` (:mod:`minefield.volume`): ``naive`` (the paper's), ``is``,
    ``gaussian`` (mass under ``N(theta, sigma^2 I)``, default ``sigma = r_max / sqrt(n)``)
    or ``mcmc`` (``n_chains`` x ``n_replicates`` chains, ``walk_length`` hit-and-run
    steps per phase; ``mcmc_blocks``: independent blocks of replicates, each seeded by
    its index, :mod:`minefield.cooling_blocks`: the unit of a task); ``preconditioner``
    (:mod:`minefield.netvolume`) shapes the last three (``probes``: Hutchinson probes);
    ``power`` is the shape of the ``is`` / ``gaussian`` proposal body (``"2"``: the
    preconditioner's ellipsoid; ``"inf"``: its box; ``"auto"``: :func:`~.volume.fit_power`).
    ``precision`` (``naive`` only): ``bf16`` / ``tf32`` bisect in that arithmetic, then every
    radius is checked in the parameters' own (:func:`check_radii`) and those that moved are
    redone in it (all of them until 2026-12-02: a split's blocks redid only their own)."""

    cutoff: float = 1.0
    cutoff_kind: CutoffKind = CutoffKind.ABS
    r_max: float = 1.0
    n_directions: int = 100
    rtol: float = 1e-3
    method: RadiusMethod = RadiusMethod.BISECT
    grid_points: int = 100
    grid: Grid = Grid.POWER
    grid_power: float = 5.0
    bracket_points: int = 6
    bracket_ratio: float = 4.0
    directions: DirectionSpec = field(default_factory=DirectionSpec)
    memory_mb: float | None = None
    n_bootstrap: int = 1000
    seed: int = 0
    estimator: Estimator = Estimator.NAIVE
    preconditioner: CurvatureKind = CurvatureKind.NONE
    sigma: float | None = None
    n_chains: int = 64
    n_replicates: int = 8
    walk_length: int | None = None
    probes: int = 64
    power: str = "2"
    precision: Precision = Precision.FLOAT32
    mcmc_blocks: int = 1

    _section: ClassVar[str] = "volume"
    _omit_default: ClassVar[tuple[str, ...]] = ("mcmc_blocks",)

    def proposal_power(self) -> float | str:
        """``power`` as :func:`~minefield.volume.star_volume` takes it."""
        return parse_power(self.power, "volume.power")

    def _validate(self):
        counts = ("n_directions", "grid_points", "bracket_points", "n_bootstrap", "seed",
                  "n_chains", "n_replicates", "probes", "mcmc_blocks", "walk_length")
        for name in counts:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"volume.{name} must be an integer, got {v!r}")
        if self.estimator is Estimator.IS and self.preconditioner is CurvatureKind.NONE:
            raise ConfigError("volume.estimator 'is' needs a preconditioner (hessian, "
                              "hutchinson, axes or given)")
        if self.estimator is not Estimator.NAIVE and self.directions.bias is BiasPolicy.ZERO:
            raise ConfigError(f"directions.bias 'zero' counts coordinates that no direction "
                              f"moves, a convention of the naive estimator; "
                              f"{self.estimator.value} integrates over the coordinates it "
                              f"moves: use bias 'exclude' (the same directions) or 'include'")
        if self.estimator is Estimator.NAIVE and self.preconditioner is not CurvatureKind.NONE:
            raise ConfigError(f"volume.preconditioner '{self.preconditioner.value}' shapes the "
                              f"is, gaussian and mcmc estimators; naive (the paper's) draws "
                              f"uniform directions: choose one of those estimators or none")
        check_shape_options(self.estimator, self.preconditioner, self.power, self.sigma,
                            self.walk_length)  # bad numbers, and options another one ignores
        # one spelling per power ("2.0", "2" -> "2"; "INF" -> "inf"): one result key each
        object.__setattr__(self, "power", power_text(self.proposal_power()))
        if self.mcmc_blocks != 1 and (self.estimator is not Estimator.MCMC
                                      or not 1 <= 2 * self.mcmc_blocks <= self.n_replicates):
            raise ConfigError(f"volume.mcmc_blocks={self.mcmc_blocks} needs the mcmc estimator "
                              f"and at least 2 of the {self.n_replicates} replicates per block")
        if self.n_chains < 2 or self.n_replicates < 2 or self.probes < 1:
            raise ConfigError("volume.n_chains and n_replicates must be >= 2 (an interval needs "
                              "independent draws) and probes >= 1")
        if not (self.cutoff > (1 if self.cutoff_kind is CutoffKind.RELATIVE else 0)
                and math.isfinite(self.cutoff)):  # relative: times the centre's loss
            raise ConfigError(f"volume.cutoff must be a positive number (> 1 if relative: at "
                              f"most the centre's loss leaves no basin), got {self.cutoff}")
        if not (self.r_max > 0 and math.isfinite(self.r_max)):
            raise ConfigError(f"volume.r_max must be positive, got {self.r_max}")
        if not 0 < self.rtol < 1:
            raise ConfigError(f"volume.rtol must be in (0, 1), got {self.rtol}")
        if self.n_directions < 1:
            raise ConfigError(f"volume.n_directions must be >= 1, got {self.n_directions}")
        if not (self.grid_points >= 2 and self.bracket_points >= 1 and self.bracket_ratio > 1
                and 0 < self.grid_power < math.inf):  # NaN too: no scan of [0, r_max]
            raise ConfigError("volume.grid_points must be >= 2, bracket_points >= 1, "
                              "bracket_ratio > 1 and grid_power a positive number")
        if self.n_bootstrap < 0 or not 0 <= self.seed < 2**32:  # -1: torch's 2**64-1, 2 keys
            raise ConfigError(f"volume.n_bootstrap must be >= 0 and seed in [0, 2**32), got "
                              f"{self.n_bootstrap} and {self.seed}")
        if self.memory_mb is not None and not (self.memory_mb > 0
                                               and math.isfinite(self.memory_mb)):
            raise ConfigError(f"volume.memory_mb must be a positive number, got {self.memory_mb}")
        check_owned_options(self)  # naive's radius search and precision, mcmc's chains


# --- results --------------------------------------------------------------------------------


class BasinWarning(UserWarning):
    """A basin estimate that the search range, not the loss, decided."""


@dataclass
class BasinResult:
    """Radii along ``+d_1..+d_K, -d_1..-d_K`` and the volume statistics derived from them.

    ``n_at_r_max`` counts the radii that reached ``r_max`` without crossing the
    cutoff: those are lower bounds, and since ``E[r^n]`` is dominated by the
    largest radius, one of them can set log V on its own (two learning rates then
    give the identical volume). :func:`basin_radii` warns when it is not zero.
    """

    radii: torch.Tensor  # (2K,) float64
    n: int  # perturbed coordinates
    centre_loss: float
    cutoff: float  # the absolute loss level used
    log10_volume: float
    n_mean_log10_r: float
    mean_radius: float
    ci_log10_volume: tuple[float, float]
    n_evaluations: int
    config: dict[str, Any]
    n_at_r_max: int = 0
    estimator: str = "naive"
    # ess, max_share, n_at_r_max, warnings, ... (see minefield.volume.VolumeEstimate)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"radii": self.radii.tolist(), "n": self.n, "centre_loss": self.centre_loss,
                "cutoff": self.cutoff, "log10_volume": self.log10_volume,
                "n_mean_log10_r": self.n_mean_log10_r, "mean_radius": self.mean_radius,
                "ci_log10_volume": list(self.ci_log10_volume),
                "n_evaluations": self.n_evaluations, "config": self.config,
                "n_at_r_max": self.n_at_r_max, "estimator": self.estimator,
                "diagnostics": self.diagnostics}

    @property
    def median_radius(self) -> float:
        """The median of the 2K radii (NaN for none, and for rays drawn from a
        preconditioner's proposal: :func:`minefield.netvolume.estimate_result`)."""
        if not len(self.radii) or self.diagnostics.get("rays") == "proposal":
            return math.nan
        return float(self.radii.double().quantile(0.5))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BasinResult:
        radii = torch.tensor(d["radii"], dtype=torch.float64)
        at_max = d.get("n_at_r_max")  # results saved before the count was recorded
        if at_max is None:
            at_max = int((radii >= d["config"].get("r_max", math.inf)).sum())
        return cls(radii, int(d["n"]), float(d["centre_loss"]), float(d["cutoff"]),
                   float(d["log10_volume"]), float(d["n_mean_log10_r"]), float(d["mean_radius"]),
                   tuple(d["ci_log10_volume"]), int(d["n_evaluations"]), d["config"],
                   int(at_max), d.get("estimator", "naive"), d.get("diagnostics", {}))


def volume_from_radii(radii: torch.Tensor, n: int, centre_loss: float, cutoff: float,
                      n_evaluations: int = 0, config: dict[str, Any] | None = None,
                      n_boot: int = 1000, seed: int = 0, r_max: float = math.inf
                      ) -> BasinResult:
    """A :class:`BasinResult` from radii ``+d_1..+d_K, -d_1..-d_K`` (``K >= 1`` pairs):
    log10 V, n mean(log10 r), mean r, how many radii reached ``r_max`` (the argument,
    else ``config``'s), the diagnostics of :mod:`minefield.volume` (ESS, largest share)
    and an interval widened by ``n log10(1 + rtol)`` of ``config``'s bisection: the
    bound of :func:`~minefield.volume.honest_interval` whatever the sample (uniform
    directions, ``sample_ok=False`` there; since 2026-12-02). Hall's skewness-corrected
    interval of the pair-averaged ``r^n`` (:func:`~minefield.intervals.weights_estimate`),
    reported where it passed that test until then, is ``diagnostics["ci_log10_normal"]``.
    The pairs' percentile bootstrap (:func:`bootstrap_log10_volume`, reported until
    2026-12-01) is ``diagnostics["ci_log10_bootstrap"]``: among the intervals labelled
    normal it covered 163 of 180 (10-d ellipsoid) and 87 of 98 (100-d) at 95%, Hall's 166 and 91."""
    r = radii.double().cpu()
    if len(r) < 2 or len(r) % 2:
        raise ConfigError(f"{len(r)} radii are not pairs along +d_1..+d_K, -d_1..-d_K")
    cfg = dict(config or {})
    bisect = cfg.get("method", "bisect") == "bisect"
    slack = n * math.log1p(cfg.get("rtol", 0.0)) / LN10 if bisect else 0.0
    lo, hi = bootstrap_log10_volume(r, n, n_boot, seed)
    limit = r_max if math.isfinite(r_max) else cfg.get("r_max", math.inf)
    at_max = int((r >= limit).sum())
    diag: dict[str, Any] = {"n_samples": len(r), "n_at_r_max": at_max, "warnings": []}
    log_omega = 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1)
    # one pair (2 radii) has no spread to read: its ESS and share, but no normal interval
    _, (dlo, dhi), diag["ess"], diag["max_share"] = weights_estimate(
        n * r.log(), len(r) >= 4, 0.95, slack * LN10)
    diag["ess_pairs"] = pair_ess(n * r.log())  # the draws: a pair's two radii are one
    diag["ci_log10_bootstrap"] = [lo - slack, hi + slack]
    normal = ((lo - slack) * LN10, (hi + slack) * LN10)  # one pair: no spread for Hall's
    if len(r) >= 4:
        diag["ci_log10_normal"] = [(dlo + log_omega) / LN10, (dhi + log_omega) / LN10]
        normal = (dlo + log_omega, dhi + log_omega)
    # heavy-tailed r^n (or too few pairs): no interval from the sample is to be trusted
    log_upper = log_omega + n * math.log(limit) if math.isfinite(limit) else math.inf
    (blo, bhi), diag["interval"] = honest_interval(  # uniform rays: the bound (sample_ok)
        log10_volume(r, n) * LN10, normal, diag["ess"], len(r), 0.95, log_upper,
        slack * LN10, diag["ess_pairs"], sample_ok=False)
    lo, hi = blo / LN10 + slack, bhi / LN10 - slack
    diag["warnings"].append(_warnings(diag["ess"], 0, len(r), limit, True, draws_ess=diag[
        "ess_pairs"], looked=light_tailed(normal, diag["ess"], len(r), slack * LN10,
                                           diag["ess_pairs"]))[0])
    if not bisect:
        diag["warnings"].append("grid radii: their interpolation error is not in the interval")
    return BasinResult(r, n, float(centre_loss), float(cutoff), log10_volume(r, n),
                       float(n * torch.log10(r).mean()), float(r.mean()),
                       (lo - slack, hi + slack), n_evaluations, cfg, at_max, "naive", diag)


def basin_radii(model: nn.Module, params: Params, data: Dataset | tuple[torch.Tensor, ...],
                cfg: VolumeConfig = VolumeConfig(), buffers: Params | None = None,
                bn: str = "eval") -> BasinResult:
    """Radii and log-volume of the train-loss basin of one model ``params`` ``(1, ...)``.

    ``data`` is a :class:`Dataset` (its train split is used) or ``(x, y)``.
    Directions come from ``cfg.directions``; the loss is the mean train NLL,
    evaluated by :func:`~minefield.engine.evaluate_points`. Estimators other than
    ``naive`` go to :func:`minefield.netvolume.basin_volume`.
    """
    if cfg.estimator is not Estimator.NAIVE:
        from .netvolume import basin_volume

        return basin_volume(model, params, data, cfg, buffers, bn)
    r, evals, centre_loss, cut, n, moved = direction_radii(model, params, data, cfg, buffers,
                                                           bn)
    return radii_result(r, n, centre_loss, cut, evals, cfg, bn, moved)


def direction_radii(model: nn.Module, params: Params, data: Dataset | tuple[torch.Tensor, ...],
                    cfg: VolumeConfig = VolumeConfig(), buffers: Params | None = None,
                    bn: str = "eval", block: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, int, float, float, int, int]:
    """The radii of :func:`basin_radii` along directions ``block = (a, b)`` of
    ``cfg.directions`` (default all): ``(radii (2(b-a),) for +d_a..+d_{b-1} then -d_a..,
    loss evaluations, centre loss, absolute cutoff, perturbed coordinates n, radii that
    a ``cfg.precision`` below float32 got wrong and float32 redid)``.

    Directions are drawn one after another from one generator and each radius
    depends on its own direction only, so the blocks of a split, put back in
    order, give the unsplit radii exactly (what :mod:`minefield.executor` tasks rely on).
    """
    a, b = block if block is not None else (0, cfg.n_directions)
    if not 0 <= a < b <= cfg.n_directions:
        raise ConfigError(f"direction block {(a, b)} is not inside [0, {cfg.n_directions})")
    x, y = train_xy(data)
    centre = check_single(params, "the model (use basin_members for a stack)")
    theta = member(centre, 0)
    spec = cfg.directions
    check_units(theta, spec.kind, spec.bias)  # a zero filter: every radius from the rest
    d = random_directions(theta, b - a, spec.kind, spec.bias, spec.generator(), skip=a)
    d = {k: torch.cat([v, -v]) for k, v in d.items()}  # (2K, ...): d and -d, the block's only
    k = 2 * (b - a)

    def loss_at(precision: Precision, d: Params = d) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda ts: evaluate_points(model, centre, d, ts, x, y, buffers, cfg.memory_mb,
                                          bn=bn, precision=precision)[0]

    first = one(d, 0)
    centre_loss = float(evaluate_points(model, centre, first, torch.zeros(1), x, y, buffers,
                                        cfg.memory_mb, bn=bn)[0][0])
    cut = cfg.cutoff * (centre_loss if cfg.cutoff_kind is CutoffKind.RELATIVE else 1.0)
    def radii(precision: Precision, d: Params = d) -> tuple[torch.Tensor, int]:
        return find_radii(loss_at(precision, d), len(next(iter(d.values()))), cut, cfg.r_max,
                          cfg.rtol, cfg.method, cfg.grid_points, cfg.grid, cfg.grid_power,
                          cfg.bracket_points, centre_loss, cfg.bracket_ratio)

    r, evals = radii(cfg.precision)
    moved = 0
    if cfg.precision is not Precision.FLOAT32:
        bad = ~check_radii(loss_at(Precision.FLOAT32), r, cut, cfg.rtol, cfg.r_max)
        moved, evals = int(bad.sum()), evals + 2 * k
        if moved:  # only those: the others passed, and a radius depends on its own direction
            r[bad], more = radii(Precision.FLOAT32, {n: v[bad] for n, v in d.items()})
            evals += more - 1  # the centre's loss is counted once (split blocks: the same sum)
    return r, evals, centre_loss, cut, n_perturbed(theta, spec.kind, spec.bias), moved


def radii_result(radii: torch.Tensor, n: int, centre_loss: float, cutoff: float, evals: int,
                 cfg: VolumeConfig, bn: str = "eval", moved: int = 0) -> BasinResult:
    """:func:`volume_from_radii` with ``cfg``'s bootstrap, warning when radii hit r_max;
    ``moved``: radii a low-precision pass got wrong and full precision redid."""
    r, cut = radii, cutoff
    res = volume_from_radii(r, n, centre_loss, cut, evals, {**cfg.to_dict(), "bn": bn},
                            cfg.n_bootstrap, cfg.seed, cfg.r_max)
    if cfg.precision is not Precision.FLOAT32:
        res.diagnostics["precision_moved"] = moved  # radii redone in full precision if > 0
    _warn_r_max(res, cfg.r_max, len(r))
    return res


def _warn_r_max(res: BasinResult, r_max: float, total: int | None = None) -> None:
    """A :class:`BasinWarning` when radii of ``res`` (of any estimator) reached ``r_max``."""
    if res.n_at_r_max:
        warnings.warn(BasinWarning(
            f"{res.n_at_r_max}{f' of {total}' if total else ''} radii reached r_max="
            f"{r_max:g} without crossing the cutoff {res.cutoff:.4g}: log10 V is a lower "
            f"bound set by r_max; raise r_max"), stacklevel=4)


def basin_members(model: nn.Module, params: Params | Sequence[Params],
                  data: Dataset | tuple[torch.Tensor, ...], cfg: VolumeConfig = VolumeConfig(),
                  buffers: Params | None = None, bn: str = "eval") -> list[BasinResult]:
    """:func:`basin_radii` of every member of a stack ``(M, ...)`` (or of a list of
    single-member checkpoints), each with directions from the same seed, on a fresh
    copy (``alone``): the same bits in a stack of any size (kernels round by alignment)."""
    items = ([alone(params, i) for i in range(n_members(params))]
             if isinstance(params, dict) else list(params))
    bufs = ([one(buffers, i) for i in range(len(items))] if buffers
            else [None] * len(items))
    return [basin_radii(model, p, data, cfg, b, bn) for p, b in zip(items, bufs)]
