"""``minefield sweep`` and ``minefield plot sweep``: poison-factor studies (Figs 5, 6)."""

from __future__ import annotations

from pathlib import Path

import click

from ..basin import VolumeConfig
from ..directions import DirectionSpec
from ..measures import MEASURES, SharpnessConfig
from ..plotting.sweep import sweep_figures
from ..stages import load_run_model, load_sweep, sweep_run
from ..sweep import SweepConfig, log_spaced_betas
from ._common import (
    executor_of,
    executor_options,
    friendly,
    main,
    open_run,
    parse_floats,
    parse_ints,
    plot,
    root_of,
)
from .train import config_from_options, experiment_options


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.replace(",", " ").split() if t)


def _figures(res, out_dir: Path) -> list[Path]:
    model, params, buffers, data, _ = load_run_model(res.run)
    return sweep_figures(res, model, params, data, buffers, out_dir / res.run.name)


@main.command()
@experiment_options
@click.option("--betas", help="Poison factors, e.g. 0,0.001,0.01,0.1,0.3,0.6.")
@click.option("--beta-range", help="lo,hi,n: 0 plus n log-spaced factors in [lo, hi].")
@click.option("--seeds", default="0,1", show_default=True, help="Init seeds per factor.")
@click.option("--directions", type=click.IntRange(1), default=200, show_default=True,
              help="Random filter-normalised directions per model (each counted +/-).")
@click.option("--cutoff", type=float, default=1.0, show_default=True,
              help="Train-loss level that ends the basin.")
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--measures", help="Curvature / sharpness columns (see `minefield sharpness`), "
                                 "comma-separated, or 'all'; default settings.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              default=Path("figures"), show_default=True)
@click.option("--models-per-task", type=click.IntRange(1), help="Split the models into "
              "tasks of this many, each trained as its own stack (default: one stack of "
              "all). Needs --isolate: then every split gives the unsplit numbers.")
@executor_options
@click.pass_context
@friendly
def sweep(ctx, betas, beta_range, seeds, directions, cutoff, rtol, measures, figures,
          models_per_task, **opts):
    """Train one model per poison factor and seed (batched), then measure each basin.

    \b
    Example (the paper's Figs 5/6 on the swiss roll):
      minefield sweep --name sweep --dataset swissroll --lr 0.005 --clip 8 \\
          --milestones 10000,17000 --steps 20000 --n-poison 4000 \\
          --poison-batch-size 200 --betas 0,0.001,0.003,0.01,0.03,0.1,0.3,0.6
    The same on a Ray cluster, one model per task (isolated members: the
    numbers of the unsplit `minefield sweep ... --isolate`, bit for bit):
      ... --isolate --models-per-task 1 --executor ray --address auto
    """
    executor = executor_of(opts)
    if betas is not None and beta_range is not None:
        raise click.UsageError("give --betas or --beta-range, not both")
    if beta_range is not None:
        vals = parse_floats(beta_range)
        if len(vals) != 3:
            raise click.UsageError(f"--beta-range needs lo,hi,n, got {beta_range!r}")
        lo, hi, n = vals
        if not (n >= 1 and n.is_integer()):  # NaN too; int(2.7) silently trained 2
            raise click.BadParameter(f"n (the number of factors) must be an integer >= 1, "
                                     f"got {beta_range.replace(',', ' ').split()[2]}",
                                     param_hint="'--beta-range'")
        factors = log_spaced_betas(lo, hi, int(n))
    else:
        # an empty --betas (an unset shell variable) is refused, not the default sweep
        factors = parse_floats(betas) if betas is not None else SweepConfig().betas
    cfg = config_from_options({**opts, "members": None})
    vol = VolumeConfig(cutoff=cutoff, rtol=rtol, n_directions=directions,
                       directions=DirectionSpec(seed=0))
    sharp = SharpnessConfig(measures=tuple(MEASURES) if measures.strip() == "all" else
                            parse_names(measures)) if measures else None
    sc = SweepConfig(betas=factors, seeds=parse_ints(seeds), volume=vol, sharpness=sharp)
    try:
        res = sweep_run(cfg, sc, root_of(ctx), force=opts["force"], progress=not opts["quiet"],
                        executor=executor, models_per_task=models_per_task)
    finally:
        if executor is not None:
            executor.close()
    click.echo(f"{'beta':>7}{'seed':>6}{'train':>8}{'test':>8}{'mean r':>10}{'log10 V':>12}")
    for r in res.rows:
        click.echo(f"{r['beta']!r:>7}{r['seed']:>6}{r['train_acc']:>8.3f}{r['test_acc']:>8.3f}"
                   f"{r['mean_radius']:>10.4f}{r['log10_volume']:>12.1f}")
    click.echo("Spearman rho with beta: " + ", ".join(f"{k} {v:.2f}"
                                                      for k, v in res.spearman.items()))
    click.echo("Spearman rho with the generalization gap: " + ", ".join(
        f"{k} {v:.2f}" for k, v in res.spearman_gap.items()))
    click.echo(f"table: {res.run.file('sweep.csv')}")
    for p in _figures(res, figures):
        click.echo(f"wrote {p}")


@plot.command("sweep")
@click.argument("run")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              default=Path("figures"), show_default=True)
@click.pass_context
@friendly
def plot_sweep(ctx, run, figures):
    """Redraw the figures of a finished sweep."""
    r = open_run(ctx, run)
    if not r.exists("sweep.json"):
        raise click.ClickException(f"{r.path} has no sweep results (run `minefield sweep`)")
    for p in _figures(load_sweep(r), figures):
        click.echo(f"wrote {p}")
