"""``minefield connect`` and ``plot connect``: line and Bezier curve between two minima."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import Optimizer
from ..connectivity import CURVE_TRAIN, ConnectConfig
from ..options import choices
from ..plotting import save_figure
from ..plotting.connect import plot_connect
from ..stages.connect import connect_run, load_connect
from ._common import SEED, device_option, force_option, friendly, main, open_run, plot, root_of
from .basin import _tag, tag_option

_FIGURES = Path("figures")


@main.command("connect")
@click.argument("run_a")
@click.argument("run_b")
@click.option("--checkpoint-a", help="Checkpoint of RUN_A, relative to it (default: the last).")
@click.option("--checkpoint-b", help="Checkpoint of RUN_B, relative to it (default: the last).")
@click.option("--member-a", type=click.IntRange(0), default=0, show_default=True)
@click.option("--member-b", type=click.IntRange(0), default=0, show_default=True)
@click.option("--minima", is_flag=True,
              help="Connect to every bad minimum of RUN_B's search (one curve each, one stack).")
@click.option("--points", type=click.IntRange(2), default=41, show_default=True,
              help="Values of t in [0, 1] evaluated.")
@click.option("--steps", type=click.IntRange(0), default=CURVE_TRAIN.steps, show_default=True,
              help="Training steps of the control points.")
@click.option("--optimizer", type=click.Choice(choices(Optimizer)),
              default=CURVE_TRAIN.optimizer.value, show_default=True)
@click.option("--lr", type=float, default=CURVE_TRAIN.lr, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), help="Default: full batch.")
@click.option("--l2", type=float, default=0.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the sampled t (with each pair's endpoints) and the minibatches.")
@click.option("--isolate/--no-isolate", default=True, show_default=True,
              help="Each curve on kernels shaped for one model: a pair's numbers do not "
                   "depend on the other pairs. --no-isolate: one batched pass for all curves.")
@tag_option
@device_option
@force_option
@click.pass_context
@friendly
def connect_cmd(ctx, run_a, run_b, checkpoint_a, checkpoint_b, member_a, member_b, minima,
                points, steps, optimizer, lr, batch_size, l2, seed, isolate, tag, device, force):
    """Loss barrier along the straight line and a trained Bezier curve between two minima.

    \b
    Examples:
      minefield connect good good --minima          # good model to each bad minimum
      minefield connect good seed1 --points 61      # two good models of different seeds
    """
    tag = _tag(tag)
    cfg = ConnectConfig(n_points=points, train=CURVE_TRAIN.replace(
        steps=steps, optimizer=optimizer, lr=lr, batch_size=batch_size, l2=l2, seed=seed,
        log_every=max(steps, 1), checkpoint_every=max(steps, 1)), isolate=isolate)
    a, b = open_run(ctx, run_a), open_run(ctx, run_b)
    res = connect_run(a, b, cfg, checkpoint_a=checkpoint_a, checkpoint_b=checkpoint_b,
                      member_a=member_a, member_b=member_b, minima=minima, tag=tag,
                      root=root_of(ctx), device=device, force=force)
    if res.reused:
        click.echo(f"reusing {res.path}")
    r = res.result
    click.echo(f"{'pair':<6}{'endpoint b':<44}{'line max':>10}{'curve max':>10}"
               f"{'line barrier':>14}{'curve barrier':>15}{'line acc gap':>14}")
    for i, pair in enumerate(res.pairs):
        click.echo(f"{i:<6}{_end(pair['b']):<44}"
                   f"{r.line['train_max_loss'][i]:>10.4g}{r.curve['train_max_loss'][i]:>10.4g}"
                   f"{r.line['train_loss_barrier'][i]:>14.4g}"
                   f"{r.curve['train_loss_barrier'][i]:>15.4g}"
                   f"{r.line['train_acc_barrier'][i]:>14.3f}")
    click.echo(f"wrote {res.path}")


def _end(end: list) -> str:
    """``run[member] checkpoint`` of a saved endpoint ``[run, checkpoint, member]``."""
    run, ck, member = end
    return f"{run}[{member}] {Path(ck).stem}"


@plot.command("connect")
@click.argument("run")
@tag_option
@click.option("--pair", type=click.IntRange(0), default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path without extension (default: figures/connect_<run>_<tag>).")
@click.pass_context
@friendly
def plot_connect_cmd(ctx, run, tag, pair, out):
    """Loss and accuracy along t: line (dashed) and Bezier curve (solid)."""
    r = open_run(ctx, run)
    saved = load_connect(r, _tag(tag))
    if pair >= len(saved.pairs):
        raise click.BadParameter(f"{len(saved.pairs)} pairs saved, no pair {pair}",
                                 param_hint="'--pair'")
    axs = plot_connect(saved.result, pair=pair, title=f"{_end(saved.pairs[pair]['a'])} -> "
                       f"{_end(saved.pairs[pair]['b'])}")
    for p in save_figure(axs[0].figure, out or _FIGURES / f"connect_{r.name}_{tag}"):
        click.echo(f"wrote {p}")
