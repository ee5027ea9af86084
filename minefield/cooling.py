"""Multiphase Monte Carlo volume by Gaussian cooling (Cousins & Vempala 2015, 2018).

The basin ``K`` (sub-cutoff region within ``r_max``) need not be quadratic, nor
convex: only star-shaped around the centre, with connected chords. In rounded
coordinates ``y`` (``x = T y``, ``T T^T = C^-1`` of a
:class:`~minefield.precondition.Preconditioner`; identity without one) define

    Z(beta) = int_K exp(-beta |y|^2 / 2) dy,       vol(K_x) = |det T| Z(0).

1. *Start*: ``beta_0 = 1 / sigma_0^2`` with ``sigma_0 = rho_min / (sqrt(n) + 4)``
   (``rho_min``: the smallest radius along a pilot set of rays), so the Gaussian
   hardly leaves ``K``; ``Z(beta_0) = (2 pi sigma_0^2)^(n/2) mu_0`` with
   ``mu_0 = E_u[F_n(rho(u) / sigma_0)]`` the Gaussian mass of ``K``
   (:func:`~minefield.volume.log_chi_cdf`) from each replicate's own rays.
2. *Phases*: ``Z(beta_{i+1}) / Z(beta_i) = E_{beta_i}[exp((beta_i - beta_{i+1}) |y|^2 / 2)]``,
   the expectation over the Gaussian restricted to ``K``, estimated by the chains'
   mean. The next ``beta`` is the smallest whose ratio has relative variance
   ``<= ratio_var`` over the chains (the adaptive cooling of volesti's
   ``CoolingGaussian``; Cousins & Vempala prove that steps ``1 + 1/sqrt(n)`` in
   ``sigma^2`` keep it O(1) for convex K), down to ``beta = 0``: the uniform measure,
   reached only from ``beta <= 2 / rho_max^2`` so that the last ratio's weights stay
   below ``e`` on the pilot rays (a sample variance misses a heavy tail).
3. *Chains*: ``walk_length`` hit-and-run steps per phase (Smith 1984): a uniform
   direction ``w`` in ``y``, the chord of ``K`` through the chain from the batched
   bisection of :func:`~minefield.basin.find_radii` on both sides (shrunk by
   ``1 + rtol`` so it stays inside), then a draw of the 1-D Gaussian ``N(-y.w, 1/beta)``
   truncated to the chord (uniform at ``beta = 0``). All chains of all replicates
   move in one batched call per step, and they start warm (from the previous phase).

Why Gaussian cooling and not nested balls ``K cap B(r_i)`` (Lovasz & Vempala): with
balls, ``n log(R/r)`` phases; with Gaussians ``~ sqrt(n) log(R/r)``, and each phase's
ratio has bounded variance even for a thin body, and the first phase needs no
inscribed ball (only that ``mu_0`` be estimated, which is easy when ``sigma_0`` is small).

*Weights*: the chains are a sequential Monte Carlo sampler (Del Moral, Doucet & Jasra
2006): each carries a weight, multiplied by its ratio ``Y`` at every phase, and a
replicate's chains are resampled when their ESS drops below half. Then every
replicate's product of weighted ratio means is an unbiased estimate of ``Z(0)`` however
slowly the chains mix (plain means of unweighted chains are biased low when the walk
is short: the chains lag behind the cooling); slow mixing shows as spread instead.

*Uncertainty*: a pilot run of ``n_replicates / 4`` replicates chooses the schedule (the
``beta`` s); then ``n_replicates`` independent replicates of ``n_chains`` chains, each with
its own start rays, follow it. Their log-volumes ``L_r`` are about normal (logs of
products of many ratios), so the estimate of ``log E[Z]`` is Cox's ``mean(L) + s^2/2``
with the interval ``+- t_{R-1} sqrt(s^2/R + s^4/(2(R-1)))`` (Land 1972), widened by
``n log(1 + rtol)``. Coverage is tested at small ``n`` (``tests/test_cooling.py``).

Example (a 3-ball of radius 1: log V = log(4 pi / 3) = 1.4324)::

    >>> from minefield.bodies import Ellipsoid
    >>> body = Ellipsoid(torch.ones(3, dtype=torch.float64))
    >>> est = cooling_volume(body, 3, body.cutoff, generator=torch.Generator().manual_seed(0),
    ...                      r_max=4.0)
    >>> est.ci[0] < 1.4324 < est.ci[1]
    True
"""

from __future__ import annotations

import math

import torch
from scipy.stats import t as student_t

from .basin import find_radii
from .bodies import log_ball_volume
from .config import ConfigError
from .precondition import Preconditioner
from .volume import LineLoss, VolumeEstimate, _warnings, log_chi_cdf, ray_radii

__all__ = ["cooling_volume"]


def _capped(line_loss: LineLoss, r_max: float) -> LineLoss:
    """The loss, but ``+inf`` at distance ``>= r_max`` from the centre: K within r_max."""
    def f(x0, v, t):
        out = line_loss(x0, v, t).double()
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


def _relvar(w: torch.Tensor, log_y: torch.Tensor) -> float:
    """Relative variance of the ratio ``Y`` under the normalised weights ``w``."""
    y = torch.exp(log_y - log_y.max())
    wy = w * y
    return float((wy * y).sum() / wy.sum() ** 2 - 1)


def _next_beta(beta: float, sq: torch.Tensor, log_wt: torch.Tensor, ratio_var: float
               ) -> float:
    """The smallest ``beta' < beta`` whose ratio ``exp((beta - beta') |y|^2 / 2)`` has
    relative variance ``<= ratio_var`` over the weighted chains (0 when even that holds)."""
    w = torch.softmax(log_wt, 1) / log_wt.shape[0]  # each replicate weighs the same
    if _relvar(w, 0.5 * beta * sq) <= ratio_var:
        return 0.0
    lo, hi = 0.0, beta  # step sizes: lo is feasible, hi is not
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _relvar(w, 0.5 * mid * sq) <= ratio_var else (lo, mid)
    return beta - lo


def cooling_volume(line_loss: LineLoss, n: int, cutoff: float, n_chains: int = 64,
                   n_replicates: int = 8, generator: torch.Generator | None = None,
                   r_max: float = 1.0, rtol: float = 1e-6,
                   preconditioner: Preconditioner | None = None,
                   walk_length: int | None = None, ratio_var: float = 0.5,
                   n_rays: int = 16, level: float = 0.95, max_phases: int = 100000
                   ) -> VolumeEstimate:
    """log vol of ``{L < cutoff}`` within ``r_max`` by Gaussian cooling (module docstring).

    Args:
        line_loss, n, cutoff, r_max, rtol: as :func:`~minefield.volume.star_volume`.
        n_chains: chains per replicate; n_replicates: independent replicates (>= 2).
        preconditioner: rounding ``x = T y`` (a good one makes ``K_y`` round).
        walk_length: hit-and-run steps per phase (default ``max(10, n)``).
        ratio_var: target relative variance of one chain's phase ratio.
        n_rays: ray pairs per replicate for the start.
    Returns:
        A :class:`~minefield.volume.VolumeEstimate` (``ess``: the smallest, over
        phases, of the chains' weight ESS summed over replicates; ``details``: phases,
        betas, replicate estimates).
    Raises:
        ConfigError: fewer than 2 replicates or chains, bad numbers, a start outside K.
    """
    if n_replicates < 2 or n_chains < 2 or n_rays < 2:
        raise ConfigError(f"mcmc needs >= 2 replicates, chains and rays for an interval; got "
                          f"{n_replicates}, {n_chains}, {n_rays}")
    if not (ratio_var > 0 and 0 < rtol < 1 and r_max > 0 and math.isfinite(cutoff)):
        raise ConfigError("mcmc needs ratio_var > 0, 0 < rtol < 1, r_max > 0, a finite cutoff")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    p = preconditioner.check(n) if preconditioner is not None else None
    apply = p.apply if p is not None else (lambda z: z.double())
    f = _capped(line_loss, r_max)
    walk = max(10, n) if walk_length is None else int(walk_length)
    m = n_replicates * n_chains
    evals = 0

    # 1. start: sigma_0 from pilot rays; mu_0 per replicate from its own rays
    w = _unit(n_replicates * n_rays, n, g)
    tw = apply(torch.cat([w, -w]))
    length = tw.norm(dim=1)
    s, evals = ray_radii(line_loss, tw / length[:, None], cutoff, r_max, rtol)
    rho = s / length  # radii in y
    rho_max = float(rho.max())
    if float(rho.min()) <= 0:
        raise ConfigError("the centre is not inside the basin (a radius is 0)")
    sigma0 = float(rho.min()) / (math.sqrt(n) + 4) / (1 + rtol)
    lf = log_chi_cdf(rho / sigma0, n).reshape(2, n_replicates, n_rays)
    log_mu0 = torch.logsumexp(lf.permute(1, 0, 2).reshape(n_replicates, -1), 1) - math.log(
        2 * n_rays)
    log_z = 0.5 * n * math.log(2 * math.pi * sigma0**2) + log_mu0  # (R,)

    def hit_and_run(y: torch.Tensor, beta: float) -> torch.Tensor:
        nonlocal evals
        k, sd = len(y), 1 / math.sqrt(beta) if beta > 0 else math.inf
        shape = _round(y.reshape(-1, n_chains, n))
        for _ in range(walk):  # 3. all chains at once
            z = torch.randn(k // n_chains, n_chains, n, generator=g, dtype=torch.float64)
            w = (z * shape if shape.shape[1] == 1 else z @ shape).reshape(k, n)
            w = w / w.norm(dim=1, keepdim=True)
            tw = apply(w)
            length = tw.norm(dim=1)
            v, x = tw / length[:, None], apply(y)
            x2, v2 = torch.cat([x, x]), torch.cat([v, -v])
            s, e = find_radii(lambda ts, x2=x2, v2=v2: f(x2, v2, ts), 2 * k,
                              cutoff, 2 * r_max, rtol, "bisect", bracket_points=12,
                              centre_loss=-math.inf)
            evals += e
            s = s / (1 + rtol) / length.repeat(2)
            y = y + _truncnorm(-(y * w).sum(1), sd, -s[k:], s[:k], g)[:, None] * w
        return y

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

    def smc(reps: int, schedule: list[float] | None) -> tuple[torch.Tensor, list[float], float]:
        """Sum of the phases' log-ratios per replicate, the betas, the smallest ESS."""
        y, beta, betas = start(reps * n_chains), 1 / sigma0**2, [1 / sigma0**2]
        log_r = torch.zeros(reps, dtype=torch.float64)
        log_wt = torch.zeros(reps, n_chains, dtype=torch.float64)
        min_ess = float(reps * n_chains)
        while beta > 0 and len(betas) <= max_phases:
            y = hit_and_run(y, beta)
            sq = y.pow(2).sum(1).reshape(reps, n_chains)
            if schedule is None:
                nxt = _next_beta(beta, sq, log_wt, ratio_var)
                if nxt > 0 or 0.5 * beta * rho_max**2 > 1:
                    # never faster than Cousins & Vempala's sigma^2 -> sigma^2 (1 + 1/sqrt(n)):
                    # resampled chains, not yet diverse, underrate the ratio's variance
                    nxt = max(nxt, beta / (1 + n**-0.5))
            else:
                nxt = schedule[len(betas)]
            log_y = 0.5 * (beta - nxt) * sq  # (R, N): log f_next / f_beta
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
            beta = nxt
            betas.append(beta)
        if beta > 0:
            raise ConfigError(f"mcmc did not reach the uniform measure in {max_phases} phases")
        return log_r, betas, min_ess

    # 2. the schedule from a pilot run, then independent replicates that follow it
    _, schedule, _ = smc(max(2, n_replicates // 4), None)
    log_r, betas, min_ess = smc(n_replicates, schedule)
    log_z = log_z + log_r
    log_vol = log_z + (p.log_abs_det_t() if p is not None else 0.0)  # (R,)
    # each replicate's Z is unbiased and ~lognormal: Cox's interval for a lognormal mean
    var = float(log_vol.var())
    est = float(log_vol.mean()) + var / 2
    half = float(student_t.ppf(0.5 + level / 2, n_replicates - 1)) * math.sqrt(
        var / n_replicates + var**2 / (2 * (n_replicates - 1)))
    slack = n * math.log1p(rtol)
    warns = _warnings(min_ess, 0, m, r_max)
    if n_chains < 32:
        warns.append(f"{n_chains} chains per replicate: intervals were measured to cover "
                     f"at their rate with 64; with few chains they run narrow and low")
    if float(log_vol.std()) > 1.0:
        warns.append(f"replicates spread {float(log_vol.std()):.2f} nats: the chains have "
                     f"not mixed, the estimate runs low and its interval is not trustworthy; "
                     f"use more chains and a longer walk")
    return VolumeEstimate("mcmc", est, (est - half - slack, est + half + slack), level, n,
                          min_ess, m, float("nan"), int((s >= r_max).sum()), evals, warns,
                          {"phases": len(betas) - 1, "betas": betas, "sigma0": sigma0,
                           "replicates": log_vol.tolist(), "walk_length": walk,
                           "log_ball_ratio": est - log_ball_volume(n, r_max)})
