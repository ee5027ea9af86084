"""Gaussian cooling in independent blocks of replicates: the unit of an MCMC task.

:func:`~minefield.cooling.cooling_volume` runs ``R`` replicates of ``N`` chains and
reports Cox's lognormal-mean estimate and interval over the replicates' log-volumes
``L_r`` (each ``exp(L_r)`` an unbiased estimate of the volume). Its chains interact
within a replicate (weights, resampling) and its replicates share one pilot
schedule and one generator, so they cannot be cut apart. A *block* is a whole
cooling run (its own pilot, schedule, start and chains) of ``R_b`` of the
replicates; block ``j`` of ``B`` draws from a generator seeded by its identity
(:func:`~minefield.executor.task_seed` of ``("mcmc", seed, j)``), never by the
order blocks run in. Blocks are independent, so their replicates pool:

    L = (L_1, ..., L_R) over all blocks,  log V = mean(L) + s^2 / 2,
    CI = log V +- t_{R-1} sqrt(s^2 / R + s^4 / (2 (R - 1))) + n log(1 + rtol)

(Cox's interval, Land 1972, exactly as within one run). Each replicate is
unbiased given its block's schedule and independent of the other blocks', so
the pooled estimate keeps the single run's guarantees; the interval is tested
for coverage on a body of known volume (``tests/test_cooling_blocks.py``).
``blocks = 1`` is :func:`~minefield.cooling.cooling_volume` itself, on the
caller's generator (the numbers of an unblocked estimate do not change).
Each block costs its own pilot run (``max(2, R_b / 4)`` replicates).

Example (a 3-ball of radius 1 in two blocks of 4 replicates)::

    >>> from minefield.bodies import Ellipsoid
    >>> body = Ellipsoid(torch.ones(3, dtype=torch.float64))
    >>> parts = [cooling_block(body, 3, body.cutoff, j, 2, seed=0, n_replicates=8,
    ...                        r_max=4.0) for j in range(2)]
    >>> est = merge_blocks(parts, rtol=1e-6)
    >>> len(est.details["replicates"]), est.ci[0] <= math.log(4 * math.pi / 3) <= est.ci[1]
    (8, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ConfigError
from .cooling import CHORD_BRACKET, cooling_volume, run_sizes
from .executor import task_seed
from .intervals import replicate_estimate
from .precondition import Preconditioner
from .volume import LineLoss, VolumeEstimate

__all__ = ["block_replicates", "cooling_block", "merge_blocks", "CoolingCost", "cooling_cost"]

SPREAD = 1.0  # replicate spread (nats) above which cooling_volume warns; pooled the same


def block_replicates(n_replicates: int, blocks: int) -> list[int]:
    """Replicates of each block: ``n_replicates`` shared as evenly as possible, the
    first blocks one more.

    Raises:
        ConfigError: fewer than 1 block, or a block with fewer than 2 replicates.
    """
    if blocks < 1 or n_replicates < 2 * blocks:
        raise ConfigError(f"{n_replicates} replicates cannot make {blocks} blocks of at "
                          f"least 2 (each block's interval needs 2)")
    q, extra = divmod(n_replicates, blocks)
    return [q + (j < extra) for j in range(blocks)]


def cooling_block(line_loss: LineLoss, n: int, cutoff: float, block: int, blocks: int,
                  seed: int = 0, n_chains: int = 64, n_replicates: int = 8,
                  generator: torch.Generator | None = None, r_max: float = 1.0,
                  rtol: float = 1e-6, preconditioner: Preconditioner | None = None,
                  walk_length: int | None = None) -> VolumeEstimate:
    """Block ``block`` of ``blocks``: :func:`~minefield.cooling.cooling_volume` of its
    share of the ``n_replicates`` replicates (:func:`block_replicates`) on a generator
    seeded by ``(seed, block)``. With ``blocks = 1`` the run uses ``generator``
    (default: seeded by ``seed``), as an unblocked estimate does.

    Raises:
        ConfigError: ``block`` not in ``range(blocks)``, or see :func:`block_replicates`.
    """
    reps = block_replicates(n_replicates, blocks)
    if not 0 <= block < blocks:
        raise ConfigError(f"block {block} is not one of the {blocks} blocks")
    if blocks == 1:
        g = generator if generator is not None else torch.Generator().manual_seed(seed)
    else:
        g = torch.Generator().manual_seed(task_seed("mcmc", int(seed), block))
    return cooling_volume(line_loss, n, cutoff, n_chains, reps[block], g, r_max, rtol,
                          preconditioner, walk_length)


def merge_blocks(parts: Sequence[VolumeEstimate], rtol: float) -> VolumeEstimate:
    """One estimate from the blocks' estimates (in block order): Cox's estimate and
    interval over all their replicates (module docstring); ESS, chains, rays at
    ``r_max`` and evaluations summed; warnings of every block, once each.

    Raises:
        ConfigError: no parts, or parts of another estimator or dimension.
    """
    if not parts or any(p.estimator != "mcmc" or p.n != parts[0].n for p in parts):
        raise ConfigError("merge_blocks needs the mcmc estimates of one body")
    if len(parts) == 1:
        return parts[0]
    p0, n = parts[0], parts[0].n
    log_vol = torch.tensor([v for p in parts for v in p.details["replicates"]],
                           dtype=torch.float64)
    log_ball = p0.log_volume - p0.details["log_ball_ratio"]  # the volume within r_max
    est, ci, capped = replicate_estimate(log_vol, p0.level, n * math.log1p(rtol), log_ball)
    warns = list(dict.fromkeys(w for p in parts for w in p.warnings
                               if not w.startswith("Cox's estimate"))) + capped
    if float(log_vol.std()) > SPREAD and not any("replicates spread" in w for w in warns):
        warns.append(f"replicates spread {float(log_vol.std()):.2f} nats over the blocks: the "
                     f"chains have not mixed, the estimate runs low and its interval is not "
                     f"trustworthy; use more chains and a longer walk")
    details = {"blocks": len(parts), "replicates": log_vol.tolist(),
               "phases": [p.details["phases"] for p in parts],
               "betas": [p.details["betas"] for p in parts],
               "sigma0": [p.details["sigma0"] for p in parts],
               "walk_length": p0.details["walk_length"], "walk": p0.details["walk"],
               "lag_correlation": max(p.details["lag_correlation"] for p in parts),
               "log_ball_ratio": est - log_ball}
    return VolumeEstimate("mcmc", est, ci, p0.level, n,
                          sum(p.ess for p in parts), sum(p.n_samples for p in parts),
                          float("nan"), sum(p.n_at_r_max for p in parts),
                          sum(p.n_evaluations for p in parts), warns, details)


@dataclass(frozen=True)
class CoolingCost:
    """Lower bounds on the work of one :func:`~minefield.cooling.cooling_volume` run."""

    phases: int
    evaluations: float  # loss evaluations (a float: it overflows int64 in large n)

    def hours(self, evaluations_per_second: float) -> float:
        """The bound in hours at a measured evaluation rate."""
        return self.evaluations / evaluations_per_second / 3600


def cooling_cost(n: int, n_chains: int = 64, n_replicates: int = 8,
                 walk_length: int | None = None, max_step: float = 2.0) -> CoolingCost:
    """How much Gaussian cooling costs at least in ``n`` dimensions, before running it:
    what a block or a Ray task must budget, and whether to start at all.

    The schedule starts at ``beta_0 = ((sqrt(n) + 4) / rho_min)^2`` and divides ``beta``
    by at most ``max_step`` per phase until ``beta < 1 / rho_max^2``, then needs one more
    phase to reach 0; as ``rho_max >= rho_min``,

        phases >= ceil(2 ln(sqrt(n) + 4) / ln(max_step)) + 1.

    Each phase moves every chain of the pilot (``max(2, R / 4)`` replicates) and of the
    ``R`` replicates ``walk_length`` steps (default ``max(10, 2 n)``), and each step
    brackets its chord on both sides with ``CHORD_BRACKET`` = 12 evaluations before
    bisecting, so

        evaluations >= phases (R + max(2, R / 4)) n_chains walk_length 2 CHORD_BRACKET.

    Both are bounds: a basin whose radii spread needs more phases, and each chord
    more evaluations (about ``log2(1 / rtol)`` bisection steps).

    Example (the swiss-roll MLP: n = 3457 weights)::

        >>> c = cooling_cost(3457)
        >>> c.phases, f"{c.evaluations:.2e}"
        (13, '1.38e+09')
    """
    if n < 1 or n_chains < 2 or n_replicates < 2 or max_step <= 1:
        raise ConfigError(f"cooling_cost needs n >= 1, >= 2 chains and replicates and "
                          f"max_step > 1; got n={n}, {n_chains}, {n_replicates}, {max_step}")
    phases = math.ceil(2 * math.log(math.sqrt(n) + 4) / math.log(max_step)) + 1
    steps, pilot = run_sizes(n, n_replicates, walk_length)
    chains = (n_replicates + pilot) * n_chains
    return CoolingCost(phases, float(phases) * chains * steps * 2 * CHORD_BRACKET)
