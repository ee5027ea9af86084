"""``minefield basin``, ``landscape``, ``plot basin`` and ``plot landscape``.

Each command is one call into :mod:`minefield.stages` (``basin_run``,
``landscape_run``), which owns the files (``basin/<tag>.json``,
``landscape/<tag>.safetensors``) and the resume rule: the same settings reuse
(or, for an interrupted surface, resume) a saved result; different settings
under the same tag need ``--force``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import click
import torch

from ..basin import BasinWarning, VolumeConfig
from ..config import ConfigError
from ..directions import BiasPolicy, DirectionKind, DirectionSpec
from ..landscape import LandscapeConfig, Slice, Surface
from ..options import CurvatureKind, Estimator, Precision
from ..stages import basin_run, landscape_run, load_basin, load_landscape
from ..stages.basin import check_tag
from ..stages.train import run_config
from ._common import (
    SEED,
    device_option,
    executor_of,
    executor_options,
    force_option,
    friendly,
    main,
    open_run,
    plot,
)

_FIGURES = Path("figures")

tag_option = click.option("--tag", default="default", show_default=True,
                          help="Name of this result inside the run (different settings: "
                               "different tags).")
kind_option = click.option("--kind", "dir_kind",
                           type=click.Choice([k.value for k in DirectionKind]),
                           default="filter", show_default=True, help="Direction normalisation.")
bias_option = click.option("--bias", type=click.Choice([b.value for b in BiasPolicy]),
                           default="exclude", show_default=True,
                           help="Biases/BN: exclude (not moved, not counted in n: the "
                                "paper's n), zero (not moved, counted; naive only), include.")
memory_option = click.option("--memory-mb", type=click.FloatRange(min=0, min_open=True),
                             default=None, help="Engine chunk budget (default: 256 on a "
                             "CPU, half the free memory on CUDA).")


def _tag(tag: str) -> str:
    try:
        return check_tag(tag)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--tag'") from None


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise click.BadParameter(f"{what} needs {n} numbers like '-1,1', got {text!r}")
    return vals


# --- basin ------------------------------------------------------------------------------------


@main.command()
@click.argument("run")
@click.option("--checkpoint", help="A trajectory checkpoint file (default: the last).")
@click.option("--directions", "n_directions", type=click.IntRange(1), default=100,
              show_default=True, help="Random directions; d and -d give two radii.")
@click.option("--cutoff", type=float, default=1.0, show_default=True,
              help="Train-loss level bounding the basin (with --relative: x centre loss).")
@click.option("--relative", is_flag=True, help="Cutoff is a multiple of the centre's loss.")
@click.option("--r-max", type=float, default=1.0, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--method", type=click.Choice(["bisect", "grid"]), default="bisect",
              show_default=True)
@click.option("--grid-points", type=click.IntRange(2), default=100, show_default=True,
              help="Points of the grid method (t = r_max u^5).")
@click.option("--estimator", type=click.Choice([e.value for e in Estimator]), default="naive",
              show_default=True, help="Volume estimator: naive (the paper's), is "
              "(preconditioned importance sampling), mcmc (Gaussian cooling), gaussian "
              "(mass under N(theta, sigma^2 I)).")
@click.option("--preconditioner", type=click.Choice([*(c.value for c in CurvatureKind
                                                       if c.value != "given"), "adam"]),
              default=None, help="Shape of is/mcmc/gaussian proposals (default: hessian for "
              "is, none otherwise); adam: the run's Adam second moments.")
@click.option("--power", default="2", show_default=True, help="is/gaussian: shape of the "
              "proposal body, an l_p ball of the preconditioner (2: its ellipsoid, inf: its "
              "box, auto: learnt from pilot rays).")
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True),
              help="Gaussian-measure std (default r_max / sqrt(n)).")
@click.option("--chains", type=click.IntRange(2), default=64, show_default=True,
              help="mcmc: chains per replicate.")
@click.option("--replicates", type=click.IntRange(2), default=8, show_default=True,
              help="mcmc: independent replicates (the interval comes from them).")
@click.option("--walk", type=click.IntRange(1), help="mcmc: walk steps per phase (default "
              "max(10, 2 n): two sweeps of the axes; mf.cooling_cost bounds the cost).")
@click.option("--blocks", "mcmc_blocks", type=click.IntRange(1), default=1, show_default=True,
              help="mcmc: independent blocks of replicates, each seeded by its index (one "
                   "task each with --executor; the estimate pools their replicates).")
@kind_option
@bias_option
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--rollouts", "n_rollouts", type=click.IntRange(0), default=20, show_default=True,
              help="Directions whose loss curve is stored for 'plot basin'.")
@click.option("--precision", type=click.Choice([p.value for p in Precision]),
              default="float32", show_default=True,
              help="Bisect in bf16/tf32, then check every radius in float32 (those that "
                   "moved beyond --rtol are redone); the naive estimator's.")
@tag_option
@device_option
@memory_option
@force_option
@click.option("--directions-per-task", type=click.IntRange(1), help="naive: split each "
              "member's directions into tasks of this many (the result is the same).")
@executor_options
@click.pass_context
@friendly
def basin(ctx, run, checkpoint, n_directions, cutoff, relative, r_max, rtol, method,
          grid_points, estimator, preconditioner, power, sigma, chains, replicates, walk,
          mcmc_blocks,
          dir_kind, bias, seed, n_rollouts, precision, tag, device, memory_mb, force,
          directions_per_task,
          **ex_opts):
    """Basin radii along random directions and log10 of the basin volume (paper Sec. 5).

    \b
    Example:
      minefield basin good --directions 100 --cutoff 1.0
      minefield basin good --estimator is --preconditioner hessian --kind gaussian
    """
    _tag(tag)
    if estimator == "naive" and preconditioner not in (None, "none"):
        raise ConfigError(f"--preconditioner {preconditioner} shapes the is, gaussian and mcmc "
                          f"estimators; naive (the default) draws uniform directions: add "
                          f"--estimator is (or gaussian, mcmc)")
    pre = preconditioner or ("hessian" if estimator == "is" else "none")
    cfg = VolumeConfig(cutoff=cutoff, cutoff_kind="relative" if relative else "abs",
                       r_max=r_max, n_directions=n_directions, rtol=rtol, method=method,
                       grid_points=grid_points, directions=DirectionSpec(dir_kind, bias, seed),
                       memory_mb=memory_mb, seed=seed, estimator=estimator,
                       preconditioner="given" if pre == "adam" else pre, power=power,
                       sigma=sigma, n_chains=chains, n_replicates=replicates,
                       walk_length=walk, mcmc_blocks=mcmc_blocks, precision=precision)
    executor = executor_of(ex_opts)
    with warnings.catch_warnings():  # said below in one line per member instead
        warnings.simplefilter("ignore", BasinWarning)
        try:
            res = basin_run(open_run(ctx, run), cfg, tag=tag, checkpoint=checkpoint,
                            n_rollouts=n_rollouts, device=device, force=force,
                            adam=pre == "adam", executor=executor,
                            directions_per_task=directions_per_task)
        finally:
            if executor is not None:
                executor.close()
    click.echo(f"({'reusing' if res.reused else 'wrote'} {res.path})")
    for i, m in enumerate(res.members):
        lo, hi = m.ci_log10_volume
        click.echo(f"{run}[{i}]  n {m.n}  centre loss {m.centre_loss:.4g}  "
                   f"mean radius {m.mean_radius:.4g}  log10 V {m.log10_volume:.6g} "
                   f"[{lo:.6g}, {hi:.6g}]  n*mean(log10 r) {m.n_mean_log10_r:.6g}"
                   + (f"  ({m.n_at_r_max} radii at r_max: a lower bound; raise --r-max)"
                      if m.n_at_r_max else ""))
        d = m.diagnostics
        if d:
            click.echo(f"  {m.estimator}: ESS {d.get('ess', float('nan')):.1f} of "
                       f"{d.get('n_samples', 0)}, largest share "
                       f"{d.get('max_share', float('nan')):.3g}")
        for w in d.get("warnings", []):
            click.echo(f"  warning: {w}")


@plot.command("basin")
@click.argument("runs", nargs=-1, required=True)
@tag_option
@click.option("--member", type=click.IntRange(0), default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path without extension (default: figures/basin_<runs>).")
@click.pass_context
@friendly
def plot_basin_cmd(ctx, runs, tag, member, out):
    """Loss along random directions and radius histograms, side by side (paper Fig. 5)."""
    import matplotlib.pyplot as plt

    from ..plotting.basin import plot_radius_hist, plot_rollouts
    from ..plotting.style import save_figure

    _tag(tag)
    results, ros = {}, {}
    for name in runs:
        saved = load_basin(open_run(ctx, name), tag)
        if member >= len(saved.members):
            raise click.BadParameter(f"{name} has {len(saved.members)} member(s)")
        results[Path(name).name] = saved.members[member]
        ros[Path(name).name] = saved.rollouts[member]  # None: no curves, but its colour
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    if any(ro is not None for ro in ros.values()):
        plot_rollouts(ros, ax=a1)
    else:
        a1.set_axis_off()
    plot_radius_hist(results, ax=a2)
    out = out or _FIGURES / f"basin_{'_'.join(Path(n).name for n in runs)}"
    for p in save_figure(fig, out):
        click.echo(f"wrote {p}")


# --- landscape --------------------------------------------------------------------------------


@main.command()
@click.argument("run")
@click.option("--other", help="Second run: the slice is the line from RUN (t=0) to it (t=1).")
@click.option("--checkpoint", help="Checkpoint file of RUN, relative to it (default: the last).")
@click.option("--dim", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--points", type=click.IntRange(2), default=51, show_default=True,
              help="Points per axis.")
@click.option("--span", help="Range of t (per axis), e.g. '-1,1' (default: -1,1; "
                             "with --other: -0.5,1.5).")
@click.option("--splits", default="train,test", show_default=True)
@click.option("--member", type=click.IntRange(0), default=0, show_default=True)
@click.option("--block-rows", type=click.IntRange(1), default=4, show_default=True,
              help="2-D rows per saved block (resume granularity).")
@kind_option
@bias_option
@click.option("--seed", type=SEED, default=0, show_default=True)
@tag_option
@device_option
@memory_option
@force_option
@executor_options
@click.pass_context
@friendly
def landscape(ctx, run, other, checkpoint, dim, points, span, splits, member, block_rows,
              dir_kind, bias, seed, tag, device, memory_mb, force, **ex_opts):
    """1-D slices and 2-D surfaces of the loss; an interrupted surface resumes.

    \b
    Examples:
      minefield landscape good --other bad --points 101
      minefield landscape good --dim 2 --points 41 --span=-1,1
    """
    _tag(tag)
    try:  # options that cannot make a landscape are usage errors (exit 2)
        cfg = LandscapeConfig(other=other, checkpoint=checkpoint, dim=int(dim), points=points,
                              span=_floats(span, 2, "--span") if span else None,
                              splits=tuple(x for x in splits.replace(",", " ").split() if x),
                              member=member, directions=DirectionSpec(dir_kind, bias, seed))
    except ConfigError as e:
        if str(e).startswith("--"):  # a bad option value: a usage error (exit 2)
            raise click.BadParameter(str(e)) from None
        raise
    r = open_run(ctx, run)
    members = run_config(r).train.members  # a study's folder is refused, naming its stacks
    if member >= members:
        raise click.BadParameter(f"{run} has no member {member}", param_hint="'--member'")
    executor = executor_of(ex_opts)
    try:  # with an executor, each block of --block-rows rows of a surface is a task
        res = landscape_run(r, cfg, tag=tag, device=device, memory_mb=memory_mb,
                            block_rows=block_rows, force=force, log=click.echo,
                            executor=executor)
    finally:
        if executor is not None:
            executor.close()
    click.echo(f"wrote {open_run(ctx, run).file('landscape', f'{tag}.safetensors')}")
    _summary(res)


def _summary(res: Slice | Surface) -> None:
    for k, v in res.values.items():
        finite = v[torch.isfinite(v)]
        if len(finite):
            click.echo(f"  {k}: min {float(finite.min()):.4g}  max {float(finite.max()):.4g}")


@plot.command("landscape")
@click.argument("run")
@tag_option
@click.option("--kind", "plot_kind", type=click.Choice(["contour", "contourf", "surface3d"]),
              default="contour", show_default=True, help="For 2-D surfaces.")
@click.option("--metric", help="2-D: which values (train_loss, test_acc, ...; default "
              "train_loss); 1-D: loss or acc of every split (default loss), or one split's "
              "(test_loss, ...).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path without extension (default: figures/landscape_<run>_<tag>).")
@click.pass_context
@friendly
def plot_landscape_cmd(ctx, run, tag, plot_kind, metric, out):
    """Draw a saved landscape: a 1-D slice, or a 2-D surface as contours or in 3-D."""
    from ..plotting.landscape import plot_slice, plot_surface
    from ..plotting.style import save_figure

    r = open_run(ctx, run)
    res, cfg = load_landscape(r, _tag(tag))
    if isinstance(res, Slice):
        ax = plot_slice(res, metric=metric or "loss",
                        ends=(r.name, cfg.other) if cfg.other else None)
    else:
        ax = plot_surface(res, kind=plot_kind, metric=metric or "train_loss")
    out = out or _FIGURES / f"landscape_{r.name}_{tag}"
    for p in save_figure(ax.figure, out):
        click.echo(f"wrote {p}")
