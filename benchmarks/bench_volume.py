"""Benchmark of the volume estimators against bodies of known volume (run by hand).

Prints one table, measured in one run: for each oracle at ``n`` = 3457 (the
swiss-roll net's weights) with ``--decades`` of semi-axis spread, each
estimator's log10 error (estimate - truth), its 95% interval relative to the
truth, ESS, loss evaluations and wall time (one run per row; the machine's load
is stated by the caller). Oracles (:mod:`minefield.bodies`):

- ``ball``: unit ball;
- ``ellipsoid``: axis-aligned, semi-axes log-spaced over ``--decades``;
- ``rotated``: the same, rotated by a Haar-random orthogonal matrix;
- ``box``: ``max_i |x_i| / a_i < 1`` (zero Hessian: curvature cannot see it);
- ``network``: :class:`~minefield.bodies.QuadraticNet`, the rotated ellipsoid as
  a user ``nn.Module`` run through the public network API (``basin_radii``).

Estimators: ``naive`` (the paper's), ``is`` with a preconditioner computed the
way a user would (Hutchinson diagonal by autodiff; the dense Hessian of the network
row through ``basin_radii(..., preconditioner='hessian')``, i.e.
:func:`minefield.curvature.dense_hessian`; the rotated body's closed-form curvature;
the curvature-free axis radii for the box; its cost is included in the first row that
uses it: each preconditioner is made once per body), ``is`` with the
proposal's shape (the l_p power) learnt from pilot rays (``power='auto'``,
:func:`minefield.volume.fit_power`; the row names the power chosen), ``gaussian`` where
the Gaussian mass has a closed form (ball, box) and ``mcmc`` (Gaussian cooling,
coordinate walk of one sweep of the ``n`` axes per phase) on a box of ``--mcmc-n``
dimensions: at n = 3457 a sweep is ``n`` coordinate steps per chain per phase, each a
bisection of O(n) losses, over ~100 phases (hours on 2 cores), beside ``is`` on the
same small box. Intervals of heavy-tailed weights (ESS below half the draws, or 20) are the
honest bound of :func:`minefield.volume.honest_interval`: a Markov lower bound up to
the volume within ``r_max``.

    PYTHONPATH=. python benchmarks/bench_volume.py --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from minefield.basin import VolumeConfig, basin_radii
from minefield.bodies import (
    Box,
    Ellipsoid,
    QuadraticNet,
    log_spaced_axes,
    random_rotation,
)
from minefield.cooling import cooling_volume
from minefield.directions import DirectionSpec
from minefield.precondition import Preconditioner, floor_curvature
from minefield.volume import LN10, star_volume

SPENT = [0]  # loss evaluations of the axis radii, added to the row that used them
ROW = "{:<10} {:<24} {:>9} {:>22} {:>8} {:>11} {:>8}"


def hutchinson(loss, n: int, probes: int, g: torch.Generator) -> torch.Tensor:
    """Diagonal of the Hessian of ``loss`` at 0, ``E[z * H z]`` over Rademacher ``z``."""
    grad = torch.func.grad(loss)
    z = torch.randint(0, 2, (probes, n), generator=g).double() * 2 - 1
    x0 = torch.zeros(n, dtype=torch.float64)
    hz = torch.stack([torch.func.jvp(grad, (x0,), (zi,))[1] for zi in z])
    return (z * hz).mean(0)


def axis_curvature(body, n: int, r_max: float, rtol: float) -> torch.Tensor:
    from minefield.volume import ray_radii

    eye = torch.eye(n, dtype=torch.float64)
    r, evals = ray_radii(body, torch.cat([eye, -eye]), body.cutoff, r_max, rtol)
    SPENT[0] += evals
    return 1 / (r[:n] * r[n:])


def row(oracle: str, name: str, truth: float, est_log10: float, ci: tuple[float, float],
        ess: float, evals: int, seconds: float) -> None:
    err = est_log10 - truth
    lo, hi = ci[0] - truth, ci[1] - truth
    mark = "" if lo <= 0 <= hi else " (misses)"
    print(ROW.format(oracle, name, f"{err:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]{mark}",
                     f"{ess:.1f}", str(evals), f"{seconds:.1f}"))


def run_body(oracle: str, body, n: int, args, g_seed: int, curv: dict) -> None:
    truth = body.log_volume / LN10
    for name, make in curv.items():
        t0, SPENT[0] = time.perf_counter(), 0
        pre = make() if make is not None else None
        est = star_volume(body, n, body.cutoff, "naive" if pre is None else "is",
                          args.directions, torch.Generator().manual_seed(g_seed), args.r_max,
                          args.rtol, pre, power="auto" if "learnt" in name else None)
        if "learnt" in name:
            name = f"{name}: {est.details['power']:g}"
        row(oracle, name, truth, est.log10_volume, est.ci_log10, est.ess,
            est.n_evaluations + SPENT[0], time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3457)
    ap.add_argument("--decades", type=float, default=2.0)
    ap.add_argument("--directions", type=int, default=100, help="pairs u, -u per estimate")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--r-max", type=float, default=100.0)
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson probes")
    ap.add_argument("--sigma", type=float, default=0.05, help="Gaussian-measure std")
    ap.add_argument("--mcmc-n", type=int, default=20, help="dimension of the mcmc box")
    ap.add_argument("--mcmc-chains", type=int, default=64)
    ap.add_argument("--mcmc-replicates", type=int, default=8)
    ap.add_argument("--mcmc-walk", type=int, default=None,
                    help="steps per phase (default n: one sweep of the axes)")
    ap.add_argument("--mcmc-kind", default="coordinate", choices=["coordinate", "hit_and_run"])
    ap.add_argument("--no-mcmc", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="cpu only: its comparators (PyHessian, exact oracles) are CPU code")
    args = ap.parse_args()
    if args.device != "cpu":
        raise SystemExit(f"{ap.prog}: --device {args.device}: this benchmark runs on the CPU "
                         "only (see bench_real.py and bench_engine.py for the GPU)")
    torch.set_num_threads(args.threads)
    n, t_all = args.n, time.perf_counter()
    g = torch.Generator().manual_seed(0)
    a = log_spaced_axes(n, args.decades)
    rot = random_rotation(n, g)
    print(f"n = {n}, semi-axes 10^-{args.decades:g} .. 1, {args.directions} direction pairs, "
          f"rtol {args.rtol:g}, {args.threads} threads")
    print(ROW.format("oracle", "estimator", "log10 err", "95% CI - truth", "ESS", "evals",
                     "time s"))

    ball = Ellipsoid(torch.ones(n, dtype=torch.float64))
    ell = Ellipsoid(a)
    rotated = Ellipsoid(a, rot)
    box = Box(a)

    def hutch(body):
        return lambda: Preconditioner.diagonal(floor_curvature(
            hutchinson(body.loss, n, args.probes, torch.Generator().manual_seed(1)), 1e-12))

    made = {}  # preconditioners made once per body: the first row to use one pays for it

    def once(key, build):
        def make():
            if key not in made:
                made[key] = build()
            return made[key]
        return make

    def exact(body):  # R diag(1/a^2) R^T in closed form (positive definite: no floor; one
        # n^3 product and a Cholesky); the network row below computes the same matrix as a
        # user would (minefield.curvature.dense_hessian)
        return once(("exact", id(body)), lambda: Preconditioner.dense(body.curvature()))

    def axes(body):
        return once(("axes", id(body)), lambda: Preconditioner.diagonal(
            axis_curvature(body, n, args.r_max, args.rtol)))

    run_body("ball", ball, n, args, 2, {"naive": None, "is (hutchinson)": hutch(ball)})
    est = star_volume(ball, n, ball.cutoff, "gaussian", args.directions,
                      torch.Generator().manual_seed(2), args.r_max, args.rtol,
                      sigma=args.sigma)
    row("ball", "gaussian (mass)", ball.gaussian_log_mass(args.sigma) / LN10, est.log10_volume,
        est.ci_log10, est.ess, est.n_evaluations, 0.0)
    run_body("ellipsoid", ell, n, args, 3, {"naive": None, "is (hutchinson)": hutch(ell),
                                             "is (axes, learnt p)": axes(ell)})
    run_body("rotated", rotated, n, args, 4, {"naive": None, "is (hutchinson)": hutch(rotated),
                                               "is (exact curvature)": exact(rotated),
                                               "is (same C, learnt p)": exact(rotated)})
    run_body("box", box, n, args, 5, {"naive": None, "is (axes, learnt p)": axes(box),
                                      "is (axis radii)": axes(box)})
    for name, make in (("gaussian (mass)", None), ("gaussian, is (axes)", axes(box))):
        t0, SPENT[0] = time.perf_counter(), 0
        est = star_volume(box, n, box.cutoff, "gaussian", args.directions,
                          torch.Generator().manual_seed(6), args.r_max, args.rtol,
                          make() if make else None, sigma=args.sigma)
        row("box", name, box.gaussian_log_mass(args.sigma) / LN10, est.log10_volume,
            est.ci_log10, est.ess, est.n_evaluations + SPENT[0], time.perf_counter() - t0)
    if not args.no_mcmc:  # at n = 3457 its schedule alone is ~800 phases: a smaller box
        m = args.mcmc_n
        small = Box(log_spaced_axes(m, args.decades))
        t0 = time.perf_counter()
        pre = Preconditioner.diagonal(axis_curvature(small, m, args.r_max, args.rtol))
        est = cooling_volume(small, m, small.cutoff, args.mcmc_chains, args.mcmc_replicates,
                             torch.Generator().manual_seed(7), args.r_max, args.rtol, pre,
                             args.mcmc_walk or m, walk=args.mcmc_kind)
        lag = est.details["lag_correlation"]
        row(f"box n={m}", f"mcmc ({est.details['phases']} ph, lag {lag:.2f})",
            small.log_volume / LN10,
            est.log10_volume, est.ci_log10, est.ess, est.n_evaluations,
            time.perf_counter() - t0)
        small_is = star_volume(small, m, small.cutoff, "is", args.directions,
                               torch.Generator().manual_seed(7), args.r_max, args.rtol, pre)
        row(f"box n={m}", "is (axis radii)", small.log_volume / LN10, small_is.log10_volume,
            small_is.ci_log10, small_is.ess, small_is.n_evaluations, 0.0)

    net = QuadraticNet((rot * a.pow(-2)) @ rot.T)
    params = {k: v.detach()[None].clone() for k, v in net.named_parameters()}
    truth = net.body().log_volume / LN10
    for name, estimator, pre in [("naive", "naive", "none"), ("is (dense hessian)", "is",
                                                                "hessian")]:
        t0 = time.perf_counter()
        res = basin_radii(net, params, QuadraticNet.data(), VolumeConfig(
            cutoff=QuadraticNet.cutoff, r_max=args.r_max, rtol=args.rtol,
            n_directions=args.directions, estimator=estimator, preconditioner=pre,
            directions=DirectionSpec("gaussian", seed=8), n_bootstrap=0))
        ci = (res.ci_log10_volume if estimator != "naive"
              else tuple(res.diagnostics["ci_log10_normal"]))
        row("network", name, truth, res.log10_volume, ci, res.diagnostics.get("ess", math.nan),
            res.n_evaluations, time.perf_counter() - t0)
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
