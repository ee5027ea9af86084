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
from .data import Dataset
from .directions import DirectionSpec, n_perturbed, random_directions
from .engine import evaluate_points
from .functional import Params, check_single, member, n_members, one
from .options import CurvatureKind, CutoffKind, Estimator, Grid, Precision, RadiusMethod, option
from .volume import VolumeEstimate, weights_estimate

__all__ = ["CutoffKind", "RadiusMethod", "VolumeConfig", "BasinResult", "BasinWarning",
           "Rollouts", "find_radii", "check_radii", "radius_grid", "log_volume", "log10_volume",
           "bootstrap_log10_volume",
           "basin_radii", "basin_members", "rollouts", "volume_from_radii"]

LN10 = math.log(10.0)


@dataclass(frozen=True)
class VolumeConfig(_Config):
    """Settings of one basin-radius / volume estimate (all recorded with the result).

    ``n_directions`` random directions give ``2 * n_directions`` radii (d and -d).
    ``rtol``: bisection stops when ``hi - lo <= 2 rtol lo``. ``grid_points``,
    ``grid`` (``power``: ``t = r_max u^grid_power``, the paper's u^5; ``linear``)
    configure the ``grid`` method. ``memory_mb`` bounds the engine's chunks
    (``None``: the device's default, :func:`minefield.autotune.memory_budget_mb`);
    ``seed`` drives the bootstrap (directions use ``directions.seed``).
    ``estimator`` (:mod:`minefield.volume`): ``naive`` (the paper's), ``is``,
    ``gaussian`` (mass under ``N(theta, sigma^2 I)``, default ``sigma = r_max / sqrt(n)``)
    or ``mcmc`` (``n_chains`` x ``n_replicates`` chains, ``walk_length`` hit-and-run
    steps per phase); ``preconditioner`` (:mod:`minefield.netvolume`) shapes the
    last three (``probes``: Hutchinson probes). ``precision``: ``bf16`` / ``tf32`` run
    the bisection in that arithmetic, then every radius is checked in the parameters'
    own precision (:func:`check_radii`); if any moved beyond ``rtol`` all are redone.
    """

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
    precision: Precision = Precision.FLOAT32

    _section: ClassVar[str] = "volume"

    def _validate(self):
        if self.estimator is Estimator.IS and self.preconditioner is CurvatureKind.NONE:
            raise ConfigError("volume.estimator 'is' needs a preconditioner (hessian, "
                              "hutchinson, axes or given)")
        if self.sigma is not None and not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ConfigError(f"volume.sigma must be a positive number, got {self.sigma}")
        if self.n_chains < 2 or self.n_replicates < 2 or self.probes < 1:
            raise ConfigError("volume.n_chains and n_replicates must be >= 2 (an interval needs "
                              "independent draws) and probes >= 1")
        if not (self.cutoff > 0 and math.isfinite(self.cutoff)):
            raise ConfigError(f"volume.cutoff must be a positive number, got {self.cutoff}")
        if not (self.r_max > 0 and math.isfinite(self.r_max)):
            raise ConfigError(f"volume.r_max must be positive, got {self.r_max}")
        if not 0 < self.rtol < 1:
            raise ConfigError(f"volume.rtol must be in (0, 1), got {self.rtol}")
        if self.n_directions < 1:
            raise ConfigError(f"volume.n_directions must be >= 1, got {self.n_directions}")
        if self.grid_points < 2 or self.bracket_points < 1 or self.bracket_ratio <= 1:
            raise ConfigError("volume.grid_points must be >= 2, bracket_points >= 1 and "
                             "bracket_ratio > 1")
        if self.n_bootstrap < 0:
            raise ConfigError(f"volume.n_bootstrap must be >= 0, got {self.n_bootstrap}")
        if self.memory_mb is not None and not (self.memory_mb > 0
                                               and math.isfinite(self.memory_mb)):
            raise ConfigError(f"volume.memory_mb must be a positive number, got {self.memory_mb}")


# --- radii along fixed directions -------------------------------------------------------


def radius_grid(r_max: float, points: int, kind: Grid | str = Grid.POWER, power: float = 5.0
                ) -> torch.Tensor:
    """The paper's scan ``t_j = r_max u_j^power``, ``u_j`` = linspace(0, 1, points)."""
    u = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    return r_max * (u ** power if option(Grid, kind, "grid") is Grid.POWER else u)


def _first_crossing(loss: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Index of the first column with ``loss >= cutoff`` per row; ``T`` when none."""
    above = loss >= cutoff
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
    first bracket where it reaches ``cutoff`` until ``hi - lo <= 2 rtol lo``;
    the answer is the midpoint, so (the radius being >= lo) its relative error
    is at most ``rtol``.
    ``grid``: the first crossing on :func:`radius_grid`, linearly interpolated.
    Radii are 0 where the centre is already at or above the cutoff and ``r_max``
    where no crossing is found.
    Both methods see only crossings that cover one of their grid points: a
    bump above the cutoff narrower than a bracket interval is missed.
    """
    method = option(RadiusMethod, method, "method")
    grid = option(Grid, grid, "grid")
    if centre_loss is None:
        centre_loss = float(loss_fn(torch.zeros(k, dtype=torch.float64))[0])
    if centre_loss >= cutoff:
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
    for _ in range(200):
        if not bool(((hi - lo) > 2 * rtol * lo)[hit].any()):
            break
        mid = (lo + hi) / 2
        above = loss_fn(mid).double().cpu() >= cutoff
        evals += k
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    r = torch.where(hit, (lo + hi) / 2, torch.full_like(hi, r_max))
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
    ok_hit = (loss[:, 0] < cutoff) & (loss[:, 1] >= cutoff)
    ok_max = loss[:, 1] < cutoff
    return torch.where(hit, ok_hit, torch.where(r > 0, ok_max, torch.ones_like(ok_hit)))


# --- volume ---------------------------------------------------------------------------------


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
                           level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``log10 V``: resample the radii with replacement."""
    if n_boot == 0:
        return float("nan"), float("nan")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(len(radii), (n_boot, len(radii)), generator=g)
    vals = log_volume(radii.double()[idx], n) / LN10
    finite = vals[torch.isfinite(vals)]
    if len(finite) < n_boot:  # some replicates drew only zero radii: -inf is a valid quantile
        vals = vals.sort().values
        lo_i = int(math.floor((1 - level) / 2 * (n_boot - 1)))
        hi_i = int(math.ceil((1 + level) / 2 * (n_boot - 1)))
        return float(vals[lo_i]), float(vals[hi_i])
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(vals, q).tolist()
    return lo, hi


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

    @classmethod
    def from_estimate(cls, est: VolumeEstimate, centre_loss: float, cutoff: float,
                      config: dict[str, Any]) -> BasinResult:
        """A result of any estimator (radii: those of its rays, empty for mcmc)."""
        r = torch.tensor(est.details.get("radii", []), dtype=torch.float64)
        nm = float(est.n * torch.log10(r).mean()) if len(r) else math.nan
        diag = {"ess": est.ess, "n_samples": est.n_samples, "max_share": est.max_share,
                "n_at_r_max": est.n_at_r_max, "warnings": est.warnings,
                **{k: v for k, v in est.details.items() if k != "radii"}}
        return cls(r, est.n, float(centre_loss), float(cutoff), est.log10_volume, nm,
                   float(r.mean()) if len(r) else math.nan, est.ci_log10, est.n_evaluations,
                   dict(config), int(est.n_at_r_max), est.estimator, diag)


def volume_from_radii(radii: torch.Tensor, n: int, centre_loss: float, cutoff: float,
                      n_evaluations: int = 0, config: dict[str, Any] | None = None,
                      n_boot: int = 1000, seed: int = 0, r_max: float = math.inf
                      ) -> BasinResult:
    """A :class:`BasinResult` from radii: log10 V, n mean(log10 r), mean r, bootstrap CI
    (widened by ``n log10(1 + rtol)`` of ``config``'s bisection), how many radii reached
    ``r_max`` (the argument, else ``config``'s) and the diagnostics of
    :mod:`minefield.volume` (ESS, largest share, normal interval)."""
    r = radii.double().cpu()
    cfg = dict(config or {})
    bisect = cfg.get("method", "bisect") == "bisect"
    slack = n * math.log1p(cfg.get("rtol", 0.0)) / LN10 if bisect else 0.0
    lo, hi = bootstrap_log10_volume(r, n, n_boot, seed)
    limit = r_max if math.isfinite(r_max) else cfg.get("r_max", math.inf)
    at_max = int((r >= limit).sum())
    diag: dict[str, Any] = {"n_samples": len(r), "n_at_r_max": at_max, "warnings": []}
    if len(r) >= 4 and len(r) % 2 == 0:
        _, (dlo, dhi), diag["ess"], diag["max_share"] = weights_estimate(
            n * r.log(), True, 0.95, slack * LN10)
        log_omega = 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1)
        diag["ci_log10_normal"] = [(dlo + log_omega) / LN10, (dhi + log_omega) / LN10]
        if diag["ess"] < 10:
            diag["warnings"].append(f"ESS {diag['ess']:.1f} of {len(r)} radii: a handful of "
                                    f"directions decide log V; its interval is not "
                                    f"trustworthy")
    if not bisect:
        diag["warnings"].append("grid radii: their interpolation error is not in the interval")
    return BasinResult(r, n, float(centre_loss), float(cutoff), log10_volume(r, n),
                       float(n * torch.log10(r).mean()), float(r.mean()),
                       (lo - slack, hi + slack), n_evaluations, cfg, at_max, "naive", diag)


def _xy(data: Dataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return data.split("train") if isinstance(data, Dataset) else data


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
    x, y = _xy(data)
    centre = check_single(params, "the model (use basin_members for a stack)")
    theta = member(centre, 0)
    spec = cfg.directions
    d = random_directions(theta, cfg.n_directions, spec.kind, spec.bias, spec.generator())
    d = {k: torch.cat([v, -v]) for k, v in d.items()}  # (2K, ...): d and -d
    k = 2 * cfg.n_directions

    def loss_at(precision: Precision) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda ts: evaluate_points(model, centre, d, ts, x, y, buffers, cfg.memory_mb,
                                          bn=bn, precision=precision)[0]

    first = one(d, 0)
    centre_loss = float(evaluate_points(model, centre, first, torch.zeros(1), x, y, buffers,
                                        cfg.memory_mb, bn=bn)[0][0])
    cut = cfg.cutoff * (centre_loss if cfg.cutoff_kind is CutoffKind.RELATIVE else 1.0)

    def radii(precision: Precision) -> tuple[torch.Tensor, int]:
        return find_radii(loss_at(precision), k, cut, cfg.r_max, cfg.rtol, cfg.method,
                          cfg.grid_points, cfg.grid, cfg.grid_power, cfg.bracket_points,
                          centre_loss, cfg.bracket_ratio)

    r, evals = radii(cfg.precision)
    moved = 0
    if cfg.precision is not Precision.FLOAT32:
        moved = int((~check_radii(loss_at(Precision.FLOAT32), r, cut, cfg.rtol,
                                  cfg.r_max)).sum())
        evals += 2 * k
        if moved:
            r, more = radii(Precision.FLOAT32)
            evals += more
    n = n_perturbed(theta, spec.kind, spec.bias)
    res = volume_from_radii(r, n, centre_loss, cut, evals, {**cfg.to_dict(), "bn": bn},
                            cfg.n_bootstrap, cfg.seed, cfg.r_max)
    if cfg.precision is not Precision.FLOAT32:
        res.diagnostics["precision_moved"] = moved  # radii redone in full precision if > 0
    if res.n_at_r_max:
        warnings.warn(BasinWarning(
            f"{res.n_at_r_max} of {len(r)} radii reached r_max={cfg.r_max:g} without crossing "
            f"the cutoff {cut:.4g}: log10 V is a lower bound set by r_max; raise r_max"),
            stacklevel=2)
    return res


def basin_members(model: nn.Module, params: Params | Sequence[Params],
                  data: Dataset | tuple[torch.Tensor, ...], cfg: VolumeConfig = VolumeConfig(),
                  buffers: Params | None = None, bn: str = "eval") -> list[BasinResult]:
    """:func:`basin_radii` of every member of a stack ``(M, ...)`` (or of a list of
    single-member checkpoints), each with directions from the same seed."""
    items = ([one(params, i) for i in range(n_members(params))]
             if isinstance(params, dict) else list(params))
    bufs = ([one(buffers, i) for i in range(len(items))] if buffers
            else [None] * len(items))
    return [basin_radii(model, p, data, cfg, b, bn) for p, b in zip(items, bufs)]


# --- rollouts (paper Fig. 5) ----------------------------------------------------------------


@dataclass
class Rollouts:
    """Train loss along K random directions at signed distances ``ts`` (Fig. 5)."""

    ts: torch.Tensor  # (T,)
    loss: torch.Tensor  # (K, T)
    acc: torch.Tensor  # (K, T)
    cutoff: float = float("nan")
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts.tolist(), "loss": self.loss.tolist(), "acc": self.acc.tolist(),
                "cutoff": self.cutoff, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollouts:
        t = torch.tensor
        return cls(t(d["ts"], dtype=torch.float64), t(d["loss"], dtype=torch.float64),
                   t(d["acc"], dtype=torch.float64), float(d["cutoff"]), d.get("config", {}))


def rollouts(model: nn.Module, params: Params, data: Dataset | tuple[torch.Tensor, ...],
             n_directions: int = 20, ts: torch.Tensor | None = None,
             spec: DirectionSpec = DirectionSpec(), buffers: Params | None = None,
             memory_mb: float | None = None, cutoff: float = float("nan")) -> Rollouts:
    """Loss along the first ``n_directions`` directions of ``spec`` (the same ones
    :func:`basin_radii` uses), at signed distances ``ts`` (default linspace(-0.5, 0.5, 101))."""
    x, y = _xy(data)
    centre = check_single(params, "the model (use basin_members for a stack)")
    ts = torch.linspace(-0.5, 0.5, 101, dtype=torch.float64) if ts is None else ts.double()
    d = random_directions(member(centre, 0), n_directions, spec.kind, spec.bias,
                          spec.generator())
    loss, acc = evaluate_points(model, centre, d, ts.expand(n_directions, -1), x, y, buffers,
                                memory_mb)
    return Rollouts(ts, loss, acc, cutoff, {"n_directions": n_directions,
                                            "directions": spec.to_dict()})
