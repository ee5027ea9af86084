"""Multiphase Monte Carlo volume by Gaussian cooling (Cousins & Vempala 2015, 2018).

The basin ``K`` (sub-cutoff region within ``r_max``) need not be quadratic, nor
convex: only star-shaped around the centre, with connected chords. In rounded
coordinates ``y`` (``x = T y``, ``T T^T = C^-1`` of a
:class:`~minefield.precondition.Preconditioner`; identity without one) define

    Z(beta) = int_K exp(-beta |y|^2 / 2) dy,       vol(K_x) = |det T| Z(0).

In polar coordinates ``y = s u`` the Gaussian restricted to ``K`` has the direction
marginal ``h_beta(u) = int_0^rho(u) s^(n-1) exp(-beta s^2 / 2) ds`` (``rho(u)``: the radius
of ``K`` along ``u``; :func:`_log_h`, closed form through the chi CDF), so
``Z(beta) = int_S h_beta(u) du`` and ``h_0(u) = rho(u)^n / n``.

1. *Start*: ``beta_0 = 1 / sigma_0^2`` with ``sigma_0 = rho_min / (sqrt(n) + 4)``
   (``rho_min``: the smallest radius along a pilot set of rays), so the Gaussian
   hardly leaves ``K``; ``Z(beta_0) = |S^(n-1)| E_u[h_beta_0(u)]`` from each replicate's
   own uniform rays (the variance is tiny: ``h_beta_0`` is nearly constant).
2. *Phases*: ``Z(beta') / Z(beta) = E_beta[h_beta'(u) / h_beta(u)]``, the Rao-Blackwellised
   form of Cousins & Vempala's ``E_beta[exp((beta - beta') |y|^2 / 2)]`` (its expectation
   given the direction; the radial part is integrated exactly, so a ball takes one
   phase with no variance), estimated by the chains' weighted mean. The next ``beta'``
   is the smallest whose ratio has relative variance ``<= ratio_var`` over the chains
   (the adaptive cooling of volesti's ``CoolingGaussian``), but no smaller than
   ``beta / max_step`` until ``beta < 1 / rho_max^2`` (the chains must follow the
   cooling: a sample variance cannot see the directions the chains never reached).
3. *Chains*: ``walk_length`` steps per phase, the weights from ``rho(u)``, then one exact
   Gibbs step of ``|y|`` given the direction *at the new beta* (a truncated chi; at the old
   one the direction-only weights left ``|y|`` unweighted: a rotated 5-d ellipsoid came
   out 0.11 nats low, 23 of 40 intervals covering). A step (Smith 1984) picks ``w`` in
   ``y``: an axis of the rounded coordinates (``walk='coordinate'``, volesti's default
   CDHR: on a box rounded by its axes each step is an exact Gibbs update, where
   hit-and-run needs ``~n^2`` steps to cross it), the axes in a fresh random order per
   chain and sweep, so every axis moves once per ``n`` steps (a random axis per step
   leaves ``exp(-L/n)`` of them where the last phase left them after ``L`` steps, a lag
   every replicate shares: it made the 20-d box's interval miss, -0.17 [-0.33, -0.01]
   nats), or a uniform direction shaped by the chains' covariance (``'hit_and_run'``);
   the chord of ``K`` through the chain comes from the batched bisection of
   :func:`~minefield.basin.find_radii` on both sides (shrunk by ``1 + rtol``), then a
   draw of ``N(-y.w, 1/beta)`` truncated to the chord. All chains of all replicates
   move in one batched call per step, starting warm (from the previous phase).
4. *Mixing check*: the correlation across chains of ``log rho(u)`` before and after a
   phase's walk (``details['lag_correlation']``, the largest over phases); above
   ``LAG`` = 0.2 a warning says the walk is shorter than the mixing time and the
   estimate runs low (20-d boxes: 5 random-axis steps 0.74, -0.75 nats; 50 steps
   0.12-0.18, -0.07 to -0.21 nats; one sweep 0.02-0.09, -0.07 to +0.01 nats, covering).

Why Gaussian cooling and not nested balls ``K cap B(r_i)`` (Lovasz & Vempala): with
balls, ``n log(R/r)`` phases; with Gaussians ``~ sqrt(n) log(R/r)``, and each phase's
ratio has bounded variance even for a thin body, and the first phase needs no
inscribed ball (only that ``mu_0`` be estimated, which is easy when ``sigma_0`` is small).

*Weights*: the chains are a sequential Monte Carlo sampler (Del Moral, Doucet & Jasra
2006): each carries a weight, multiplied by its ratio ``Y`` at every phase, and a
replicate's chains are resampled when their ESS drops below half. Then every
replicate's product of weighted ratio means is an unbiased estimate of ``Z(0)`` however
slowly the chains mix, but with a short walk its distribution is so skewed that every
replicate lands low and the replicates agree: slow mixing does *not* show as spread,
hence the mixing check. In high dimension the walk is the cost
(:func:`~minefield.cooling_blocks.cooling_cost`: hours on 2 cores at n = 3457).

*Uncertainty*: a pilot run of ``n_replicates / 4`` replicates chooses the schedule (the
``beta`` s); ``n_replicates`` independent replicates of ``n_chains`` chains, each with
its own start rays, follow it. Their log-volumes ``L_r`` are about normal (logs of products
of many ratios), so the estimate of ``log E[Z]`` is Cox's ``mean(L) + s^2/2``
with the interval ``+- t_{R-1} sqrt(s^2/R + s^4/(2(R-1)))`` (Land 1972,
:func:`replicate_interval`), widened by ``n log(1 + rtol)``; they cannot see a bias they
share (hence the sweeps and the mixing check). Coverage is tested at n = 3 and 20.

Example (a 3-ball of radius 1: log V = log(4 pi / 3); exact on a ball, up to the bisection)::

    >>> from minefield.bodies import Ellipsoid
    >>> body = Ellipsoid(torch.ones(3, dtype=torch.float64))
    >>> est = cooling_volume(body, 3, body.cutoff, generator=torch.Generator().manual_seed(0),
    ...                      r_max=4.0)
    >>> est.ci[0] <= math.log(4 * math.pi / 3) <= est.ci[1], round(est.log_volume, 4)
    (True, 1.4324)
"""

from __future__ import annotations

import math

import torch

from .basin import find_radii
from .bodies import log_ball_volume
from .config import ConfigError
from .intervals import replicate_estimate, replicate_interval
from .precondition import Preconditioner
from .volume import LineLoss, VolumeEstimate, _check, _warnings, log_chi_cdf, ray_radii

__all__ = ["cooling_volume", "replicate_interval", "replicate_estimate"]

CHORD_BRACKET = 12  # bracket evaluations per side of a chord before bisection


def run_sizes(n: int, n_replicates: int, walk_length: int | None) -> tuple[int, int]:
    """``(walk steps per phase: max(10, 2 n) unless given, pilot replicates: max(2, R/4))``."""
    if walk_length is not None and not walk_length >= 1:
        raise ConfigError(f"walk_length must be >= 1 (None: max(10, 2 n)), got {walk_length}")
    return max(10, 2 * n) if walk_length is None else int(walk_length), max(2, n_replicates // 4)


def _capped(line_loss: LineLoss, r_max: float) -> LineLoss:
    """The loss, but ``+inf`` at distance ``>= r_max`` from the centre: K within r_max."""
    def f(x0, v, t):
        out = line_loss(x0, v, t).double().cpu()  # a line loss may answer from a GPU
        tt = t.double() if t.dim() == 2 else t.double()[:, None]
        p = tt[..., None] * v[:, None, :] + (0 if x0 is None else x0[:, None, :])
        far = p.norm(dim=-1).reshape(t.shape) >= r_max
        return torch.where(far, torch.full_like(out, math.inf), out)
    return f


def _unit(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(k, n, generator=g, dtype=torch.float64)
    return w / w.norm(dim=1, keepdim=True)


def _truncnorm(mu: torch.Tensor, sd: float, lo: torch.Tensor, hi: torch.Tensor,
               g: torch.Generator) -> torch.Tensor:
    """Draws of ``N(mu, sd^2)`` truncated to ``[lo, hi]`` by inverse CDF (``sd = inf``: uniform)."""
    u = torch.rand(mu.shape, generator=g, dtype=torch.float64)
    if math.isinf(sd):
        return lo + u * (hi - lo)
    a, b = (lo - mu) / sd, (hi - mu) / sd
    flip = (a + b) > 0  # work in the lower tail, where the CDF keeps its precision
    a, b = torch.where(flip, -b, a), torch.where(flip, -a, b)
    pa, pb = torch.special.ndtr(a), torch.special.ndtr(b)
    z = torch.special.ndtri((pa + u * (pb - pa)).clamp(min=1e-300)).clamp(a, b)
    return mu + sd * torch.where(flip, -z, z)


def _round(y: torch.Tensor) -> torch.Tensor:
    """``S`` ``(R, n, n)`` with ``S^T S`` = the covariance of each replicate's chains ``y``
    ``(R, N, n)`` (shrunk; diagonal unless ``N >= 2n``): hit-and-run directions ``z S``
    follow the body's shape, and replicates stay independent of each other."""
    r, m, n = y.shape
    yc = y - y.mean(1, keepdim=True)
    if m < 2 * n:
        var = yc.pow(2).mean(1)  # (R, n)
        mean = var.mean(1, keepdim=True)
        var = torch.where(mean > 0, var + 1e-3 * mean, torch.ones_like(var))  # collapsed: round
        return var.sqrt()[:, None, :]  # (R, 1, n)
    cov = yc.transpose(1, 2) @ yc / (m - 1)
    eye = torch.eye(n, dtype=y.dtype)
    cov = cov + 1e-3 * cov.diagonal(0, 1, 2).mean(1)[:, None, None] * eye
    chol, info = torch.linalg.cholesky_ex(cov)
    return torch.where((info == 0)[:, None, None], chol, eye).transpose(1, 2)


def _log_h(beta: float, rho: torch.Tensor, n: int) -> torch.Tensor:
    """``log h_beta(rho)``, ``h_beta(rho) = int_0^rho s^(n-1) exp(-beta s^2 / 2) ds``: the
    direction marginal of the Gaussian restricted to K along a ray of radius ``rho``."""
    if beta == 0:
        return n * rho.log() - math.log(n)
    return (-0.5 * n * math.log(beta) + (0.5 * n - 1) * math.log(2) + math.lgamma(0.5 * n)
            + log_chi_cdf(rho * math.sqrt(beta), n))


def _truncchi(rho: torch.Tensor, beta: float, n: int, g: torch.Generator) -> torch.Tensor:
    """Radii ``s`` with density ``~ s^(n-1) exp(-beta s^2 / 2)`` on ``[0, rho]`` (inverse CDF
    by bisection on :func:`~minefield.volume.log_chi_cdf`; ``s = rho U^(1/n)`` at beta = 0)."""
    u = torch.rand(rho.shape, generator=g, dtype=torch.float64)
    if beta == 0:
        return rho * u.pow(1 / n)
    sd = 1 / math.sqrt(beta)
    target = u.log() + log_chi_cdf(rho / sd, n)
    lo, hi = torch.zeros_like(rho), rho.clone()
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = log_chi_cdf(mid / sd, n) < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _relvar(w: torch.Tensor, log_y: torch.Tensor) -> float:
    """Relative variance of the ratio ``Y`` under the normalised weights ``w``."""
    y = torch.exp(log_y - log_y.max())
    wy = w * y
    return float((wy * y).sum() / wy.sum() ** 2 - 1)


def _next_beta(beta: float, rho: torch.Tensor, log_wt: torch.Tensor, ratio_var: float,
               n: int) -> float:
    """The smallest ``beta' < beta`` whose Rao-Blackwellised ratio ``h_beta'(rho) /
    h_beta(rho)`` has relative variance ``<= ratio_var`` over the weighted chains."""
    w = torch.softmax(log_wt, 1) / log_wt.shape[0]  # each replicate weighs the same
    here = _log_h(beta, rho, n)

    def ok(b: float) -> bool:
        return _relvar(w, _log_h(b, rho, n) - here) <= ratio_var

    if ok(0.0):
        return 0.0
    lo, hi = 0.0, 1.0  # fractions of log beta: lo feasible, hi not (beta' = beta^(1-x) ...)
    for _ in range(40):  # bisect in log beta: steps span decades early, fractions late
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ok(beta * math.exp(-mid * _SPAN)) else (lo, mid)
    return beta * math.exp(-lo * _SPAN)


def _lag_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over replicates of the correlation across chains of ``a`` and ``b`` ``(R, N)``:
    near 1 when a phase's walk left every chain's direction statistic where it was."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    ok = den > 1e-12 * (1 + a.abs().amax(1) * b.abs().amax(1))
    return float(((a * b).sum(1)[ok] / den[ok]).mean()) if bool(ok.any()) else 0.0


LAG = 0.2  # lag correlation above which the chains are called unmixed (measured on boxes)
_SPAN = 60.0  # log-beta range searched for one step (e^60: beyond any schedule's jump)


def cooling_volume(line_loss: LineLoss, n: int, cutoff: float, n_chains: int = 64,
                   n_replicates: int = 8, generator: torch.Generator | None = None,
                   r_max: float = 1.0, rtol: float = 1e-6,
                   preconditioner: Preconditioner | None = None,
                   walk_length: int | None = None, ratio_var: float = 0.5,
                   n_rays: int = 16, level: float = 0.95, max_phases: int = 100000,
                   max_step: float = 2.0, walk: str = "coordinate") -> VolumeEstimate:
    """log vol of ``{L < cutoff}`` within ``r_max`` by Gaussian cooling (module docstring).

    Args:
        line_loss, n, cutoff, r_max, rtol: as :func:`~minefield.volume.star_volume`.
        n_chains: chains per replicate; n_replicates: independent replicates (>= 2).
        preconditioner: rounding ``x = T y`` (a good one makes ``K_y`` round).
        walk_length: steps per phase (default ``max(10, 2 n)``: two sweeps of the
            axes); walk: ``coordinate`` or ``hit_and_run`` (module docstring).
        max_step: the largest factor ``beta / beta'`` of one phase before ``beta < 1 /
            rho_max^2``.
        ratio_var: target relative variance of one chain's phase ratio.
        n_rays: ray pairs per replicate for the start.
    Returns:
        A :class:`~minefield.volume.VolumeEstimate` (``ess``: the smallest, over
        phases, of the chains' weight ESS summed over replicates; ``details``: phases,
        betas, replicate estimates).
    Raises:
        ConfigError: fewer than 2 replicates or chains, bad numbers, a start outside K.
    """
    counts = (n_replicates, n_chains, n_rays, max_phases)
    if any(isinstance(c, bool) or not isinstance(c, int) for c in counts):
        raise ConfigError(f"mcmc's replicates, chains, rays and max_phases must be integers; "
                          f"got {n_replicates!r}, {n_chains!r}, {n_rays!r}, {max_phases!r}")
    if min(counts[:3]) < 2 or max_phases < 1 or not ratio_var > 0 or not max_step > 1:
        raise ConfigError(f"mcmc needs >= 2 replicates, chains and rays, max_phases >= 1, "
                          f"ratio_var > 0 and max_step > 1; got "
                          f"{n_replicates}, {n_chains}, {n_rays}, {max_phases}, {ratio_var}, "
                          f"{max_step}")
    _check(n, cutoff, n_rays, r_max, rtol, level, line_loss)  # r_max finite: a ball to start
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    p = preconditioner.check(n) if preconditioner is not None else None
    apply = p.apply if p is not None else (lambda z: z.double())
    f = _capped(line_loss, r_max)
    if walk not in ("coordinate", "hit_and_run"):
        raise ConfigError(f"walk must be 'coordinate' or 'hit_and_run', got {walk!r}")
    coordinate = walk == "coordinate"
    steps, pilot = run_sizes(n, n_replicates, walk_length)
    m = n_replicates * n_chains
    evals, at_max = 0, []

    def radii(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rho(u)``, the radius of K_y along each chain's direction ``u = y / |y|``
        (relative error <= rtol: for weights), and the same shrunk to lie inside K."""
        nonlocal evals
        tu = apply(y / y.norm(dim=1, keepdim=True))
        length = tu.norm(dim=1)
        s, e = ray_radii(line_loss, tu / length[:, None], cutoff, r_max, rtol)
        evals += e
        at_max.append(int((s >= r_max).sum()))
        return s / length, s / (1 + rtol) / length

    # 1. start: sigma_0 from pilot rays; Z(beta_0) per replicate from its own rays
    w = _unit(n_replicates * n_rays, n, g)
    rho, inside = radii(torch.cat([w, -w]))  # radii in y
    if float(rho.min()) <= 0:
        raise ConfigError("the centre is not inside the basin (a radius is 0)")
    sigma0 = float(inside.min()) / (math.sqrt(n) + 4)
    beta0 = 1 / sigma0**2
    beta_end = 1 / float(rho.max())**2  # below this, h_beta is about h_0 on every ray
    lh = _log_h(beta0, rho, n).reshape(2, n_replicates, n_rays)
    log_sphere = math.log(n) + log_ball_volume(n)  # the sphere's area n omega_n
    log_z = log_sphere + torch.logsumexp(lh.permute(1, 0, 2).reshape(n_replicates, -1),
                                         1) - math.log(2 * n_rays)  # (R,)

    def hit_and_run(y: torch.Tensor, beta: float) -> torch.Tensor:
        nonlocal evals
        k, sd = len(y), 1 / math.sqrt(beta) if beta > 0 else math.inf
        shape = _round(y.reshape(-1, n_chains, n)) if not coordinate else None
        for step in range(steps):  # 3. all chains at once
            if coordinate:  # the axes of the rounded coordinates, in a random order per
                if step % n == 0:  # chain and sweep: every axis once per n steps
                    order = torch.rand(k, n, generator=g).argsort(1)
                w = torch.zeros(k, n, dtype=torch.float64)
                w[torch.arange(k), order[:, step % n]] = 1.0
            else:
                z = torch.randn(k // n_chains, n_chains, n, generator=g, dtype=torch.float64)
                w = (z * shape if shape.shape[1] == 1 else z @ shape).reshape(k, n)
                w = w / w.norm(dim=1, keepdim=True)
            tw = apply(w)
            length = tw.norm(dim=1)
            v, x = tw / length[:, None], apply(y)
            x2, v2 = torch.cat([x, x]), torch.cat([v, -v])
            s, e = find_radii(lambda ts, x2=x2, v2=v2: f(x2, v2, ts), 2 * k,
                              cutoff, 2 * r_max, rtol, "bisect", bracket_points=CHORD_BRACKET,
                              centre_loss=-math.inf)
            evals += e
            s = s / (1 + rtol) / length.repeat(2)
            y = y + _truncnorm(-(y * w).sum(1), sd, -s[k:], s[:k], g)[:, None] * w
        return y

    def radial(y: torch.Tensor, inside: torch.Tensor, beta: float) -> torch.Tensor:
        """The exact Gibbs step of ``|y|`` given the direction (``inside``: its radius)."""
        s = _truncchi(inside, beta, n, g)
        return y * (s / y.norm(dim=1))[:, None]

    def start(k: int) -> torch.Tensor:
        nonlocal evals
        y = torch.randn(k, n, generator=g, dtype=torch.float64) * sigma0
        for _ in range(100):  # rejection: the rare start outside K is drawn again
            x = apply(y)
            norm = x.norm(dim=1)
            out = ~(f(None, x / norm[:, None], norm) < cutoff)
            evals += k
            if not bool(out.any()):
                return y
            y[out] = torch.randn(int(out.sum()), n, generator=g, dtype=torch.float64) * sigma0
        raise ConfigError("could not start the chains inside the basin")

    def smc(reps: int, schedule: list[float] | None
            ) -> tuple[torch.Tensor, list[float], float, float]:
        """Sum of the phases' log-ratios per replicate, the betas, the smallest ESS."""
        y, beta, betas = start(reps * n_chains), beta0, [beta0]
        log_r = torch.zeros(reps, dtype=torch.float64)
        log_wt = torch.zeros(reps, n_chains, dtype=torch.float64)
        min_ess, lag, before = float(reps * n_chains), 0.0, None
        while beta > 0 and len(betas) <= max_phases:
            y = hit_and_run(y, beta)
            rho, inside = (r.reshape(reps, n_chains) for r in radii(y))
            if before is not None:  # how much a walk moved each chain's direction
                lag = max(lag, _lag_correlation(before.log(), rho.log()))
            if schedule is None:  # never below beta / max_step: the chains must follow
                nxt = _next_beta(beta, rho, log_wt, ratio_var, n)
                nxt = nxt if nxt >= beta / max_step or beta < beta_end else beta / max_step
            else:
                nxt = schedule[len(betas)]
            log_y = _log_h(nxt, rho, n) - _log_h(beta, rho, n)  # (R, N): E[f_next/f | u]
            log_r += torch.logsumexp(log_wt + log_y, 1) - torch.logsumexp(log_wt, 1)
            log_wt = log_wt + log_y
            w = torch.softmax(log_wt, 1)
            ess = 1 / w.pow(2).sum(1)  # (R,)
            min_ess = min(min_ess, float(ess.sum()))
            low = ess < n_chains / 2
            if bool(low.any()) and nxt > 0:  # resample those replicates within themselves
                idx = torch.multinomial(w[low], n_chains, replacement=True, generator=g)
                yr = y.reshape(reps, n_chains, n)
                yr[low] = torch.gather(yr[low], 1, idx[..., None].expand(-1, -1, n))
                y, log_wt[low] = yr.reshape(-1, n), 0.0
                rho[low] = torch.gather(rho[low], 1, idx)
                inside[low] = torch.gather(inside[low], 1, idx)
            if nxt > 0:  # |y| given u at the new beta: weights in u alone leave it at beta's
                y = radial(y, inside.reshape(-1), nxt)
            before = rho
            beta = nxt
            betas.append(beta)
        if beta > 0:
            raise ConfigError(f"mcmc did not reach the uniform measure in {max_phases} phases")
        return log_r, betas, min_ess, lag

    # 2. the schedule from a pilot run, then independent replicates that follow it
    _, schedule, _, _ = smc(pilot, None)
    log_r, betas, min_ess, lag = smc(n_replicates, schedule)
    log_z = log_z + log_r
    log_vol = log_z + (p.log_abs_det_t() if p is not None else 0.0)  # (R,)
    ball = log_ball_volume(n, r_max)  # the volume within r_max: no estimate exceeds it
    est, ci, capped = replicate_estimate(log_vol, level, n * math.log1p(rtol), ball)
    warns = _warnings(min_ess, at_max[0], m, r_max, rays=2 * n_replicates * n_rays) + capped
    if n_chains < 32:
        warns.append(f"{n_chains} chains per replicate: intervals were measured to cover "
                     f"at their rate with 64; with few chains they run narrow and low")
    if lag > LAG:
        warns.append(f"a phase's walk left the chains' directions correlated {lag:.2f} with "
                     f"where they started: the walk is shorter than the mixing time, the "
                     f"estimate runs low and its interval is not trustworthy; lengthen "
                     f"walk_length")
    if float(log_vol.std()) > 1.0:
        warns.append(f"replicates spread {float(log_vol.std()):.2f} nats: the chains have "
                     f"not mixed, the estimate runs low and its interval is not trustworthy; "
                     f"use more chains and a longer walk")
    return VolumeEstimate("mcmc", est, ci, level, n, min_ess, m, float("nan"), at_max[0],
                          evals, warns,
                          {"phases": len(betas) - 1, "betas": betas, "sigma0": sigma0,
                           "replicates": log_vol.tolist(), "walk_length": steps, "walk": walk,
                           "lag_correlation": lag,
                           "log_ball_ratio": est - ball})
