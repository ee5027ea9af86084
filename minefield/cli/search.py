"""``minefield search``, ``embed`` and ``plot minefield`` (the paper's Fig. 1)."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..config import Optimizer, PoisonObjective
from ..embed import EmbedConfig
from ..plotting.minefield import plot_minefield
from ..plotting.style import save_figure
from ..search import SearchConfig, StopRule
from ..stages import embed_run, load_embedding, search_run
from ..stages.embed import EMBED_FILE
from ._common import (
    SEED,
    device_option,
    executor_of,
    executor_options,
    force_option,
    friendly,
    main,
    open_run,
    parse_beta,
    parse_cap,
    parse_ints,
    plot,
    quiet_option,
)

_D = SearchConfig()


@main.command()
@click.argument("run")
@click.option("--every", type=click.IntRange(1), default=_D.every, show_default=True,
              help="Start from every k-th trajectory checkpoint ...")
@click.option("--start", type=click.IntRange(0), default=_D.start, show_default=True,
              help="... beginning at this index (0 = initialisation) ...")
@click.option("--stop", type=click.IntRange(0), default=None,
              help="... up to this index, not included (start:stop:every).")
@click.option("--checkpoints", help="Explicit start steps instead, e.g. 40,400,8000.")
@click.option("--member", type=click.IntRange(0), default=0, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=1, show_default=True,
              help="Searches per checkpoint (needs --jitter > 0).")
@click.option("--jitter", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Filter-normalised perturbation of each start.")
@click.option("--steps", type=click.IntRange(1), default=_D.steps, show_default=True)
@click.option("--optimizer", type=click.Choice([o.value for o in Optimizer]),
              default=_D.train.optimizer.value, show_default=True)
@click.option("--lr", type=float, default=_D.train.lr, show_default=True)
@click.option("--milestones", default=",".join(map(str, _D.train.milestones)), show_default=True,
              help="Steps at which lr *= gamma ('' for none).")
@click.option("--gamma", type=float, default=_D.train.gamma, show_default=True)
@click.option("--clip", "clip_norm", type=float, default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Default (or above the training set's size): full batch.")
@click.option("--beta", callback=parse_beta, default=str(_D.beta), show_default=True,
              help="Poison factor in [0, 1), or 'concat' (n_p / (n_t + n_p), the paper).")
@click.option("--objective", type=click.Choice([o.value for o in PoisonObjective]),
              default=_D.objective.value, show_default=True)
@click.option("--extra-poison", type=click.IntRange(0), default=None,
              help="Fresh points drawn from the data distribution added to the poison set "
                   "[default: 400 on spiral and swissroll, 0 elsewhere; 0: the paper's "
                   "untraining set alone].")
@click.option("--extra-share", type=click.FloatRange(0, 1, max_open=True),
              default=_D.extra_share, show_default=True,
              help="Share of the poison term carried by the fresh points.")
@click.option("--stop-rule", "stopping", type=click.Choice([s.value for s in StopRule]),
              default=_D.stopping.value, show_default=True)
@click.option("--target-train", type=click.FloatRange(0, 1), default=_D.target_train,
              show_default=True)
@click.option("--target-poison", type=click.FloatRange(0, 1), default=_D.target_poison_acc,
              show_default=True, help="Stop when poison accuracy (true labels) <= this.")
@click.option("--poison-cap", callback=parse_cap, default=str(_D.poison_cap),
              show_default=True,
              help="Raise the poison factor of searches whose poison accuracy (true labels) "
                   "is above this, every 500 steps from --adapt-from to the first milestone "
                   "('none': one fixed poison factor).")
@click.option("--beta-step", type=click.FloatRange(0), default=_D.beta_step, show_default=True,
              help="How much --poison-cap raises the poison factor each time.")
@click.option("--beta-max", type=click.FloatRange(0, 1, max_open=True), default=_D.beta_max,
              show_default=True, help="The highest poison factor --poison-cap may raise to.")
@click.option("--adapt-from", type=click.IntRange(0), default=_D.adapt_from, show_default=True,
              help="First step at which --poison-cap raises the poison factor.")
@click.option("--continue-below", callback=parse_cap, default=str(_D.continue_below),
              show_default=True,
              help="Searches below this train accuracy at the end keep training ('none': "
                   "never).")
@click.option("--continue-steps", type=click.IntRange(0), default=None,
              help="Most extra steps of a continued search [default: the steps after the "
                   "first milestone, or a quarter of --steps without one].")
@click.option("--continue-beta-step", type=click.FloatRange(0), default=_D.continue_beta_step,
              show_default=True,
              help="How much a continued search lowers (below --continue-below) or raises "
                   "(above --poison-cap) its poison factor at each check.")
@click.option("--continue-poison/--no-continue-poison", default=_D.continue_poison,
              show_default=True,
              help="Searches above --poison-cap at the end keep training with a rising "
                   "poison factor (a step of --continue-beta-step up to --beta-max).")
@click.option("--retries", type=click.IntRange(0), default=_D.retries, show_default=True,
              help="Searches still above --poison-cap at the end are searched again, this "
                   "many times at most, from their start moved by --retry-jitter.")
@click.option("--retry-jitter", type=click.FloatRange(0), default=_D.retry_jitter,
              show_default=True,
              help="How far a retry's start moves (filter-normalised units; at least "
              "--jitter).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=_D.max_batch, show_default=True,
              help="Searches trained together as one stacked model.")
@click.option("--memory-mb", type=float, default=_D.memory_mb, show_default=True)
@click.option("--isolate/--no-isolate", default=_D.isolate, show_default=True,
              help="Compute each search on kernels shaped for one model: minima do not "
                   "depend on --max-batch. --no-isolate: one batched pass per stack.")
@device_option
@force_option
@quiet_option
@executor_options
@click.pass_context
@friendly
def search(ctx, run, every, start, stop, checkpoints, member, repeats, jitter, steps, optimizer,
           lr, milestones, gamma, clip_norm, batch_size, beta, objective, extra_poison,
           extra_share, stopping, target_train, target_poison, poison_cap, beta_step, beta_max,
           adapt_from, continue_below, continue_steps, continue_beta_step, continue_poison,
           retries, retry_jitter, seed, max_batch, memory_mb, isolate, device, force, quiet,
           **ex_opts):
    """Search bad minima from checkpoints of RUN (paper Fig. 1); resumes if interrupted.

    \b
    Example:
      minefield search mf-good --every 10
    """
    cfg = SearchConfig.make(every=every, start=start, stop=stop,
                            checkpoints=parse_ints(checkpoints),
                       member=member, repeats=repeats, jitter=jitter, steps=steps,
                       optimizer=Optimizer(optimizer), lr=lr,
                       milestones=parse_ints(milestones) or (), gamma=gamma, clip_norm=clip_norm,
                       batch_size=batch_size, beta=beta, objective=PoisonObjective(objective),
                       extra_poison=extra_poison, extra_share=extra_share,
                       stopping=StopRule(stopping), target_train=target_train,
                       target_poison_acc=target_poison, poison_cap=poison_cap,
                       beta_step=beta_step, beta_max=beta_max, adapt_from=adapt_from,
                       continue_below=continue_below, continue_steps=continue_steps,
                       continue_beta_step=continue_beta_step,
                       continue_poison=continue_poison, retries=retries,
                       retry_jitter=retry_jitter, seed=seed, max_batch=max_batch,
                       memory_mb=memory_mb, isolate=isolate)
    r = open_run(ctx, run)

    def report(done, total):
        if not quiet:
            click.echo(f"  {done}/{total} bad minima", err=True)

    executor = executor_of(ex_opts)
    try:  # with an executor, each stack of --max-batch searches is a task
        s = search_run(r, cfg, device=device, force=force, progress=not quiet and not executor,
                       on_batch=report, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    click.echo(f"{'start':>10}{'rep':>4}{'steps':>7}{'beta':>7}{'train':>8}{'test':>8}"
               f"{'poison':>8}{'d_start':>10}{'d_final':>10}")
    for row in s.rows:  # distances in a width-safe format: one far minimum keeps its column
        click.echo(f"{row['start_step']:>10}{row['repeat']:>4}{row['steps']:>7}"
                   f"{row['beta']:>7.3f}"
                   f"{row['train_acc']:>8.3f}{row['test_acc']:>8.3f}{row['poison_acc']:>8.3f}"
                   f" {row['dist_start_filter']:>9.4g} {row['dist_final_filter']:>9.4g}")
    st = s.stats
    click.echo(f"{st['n']} bad minima ({s.new} new, {s.seconds:.1f}s): train median "
               f"{st['train_acc_median']:.3f} min {st['train_acc_min']:.3f}; test max "
               f"{st['test_acc_max']:.3f}; poison (true labels) max {st['poison_acc_max']:.3f}")
    click.echo(f"wrote {s.path / 'search.csv'}")


@main.command()
@click.argument("run")
@click.option("--perplexity", type=float, default=30.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--n-iter", type=click.IntRange(1), default=EmbedConfig.n_iter, show_default=True)
@click.option("--pca-dims", type=click.IntRange(2), default=50, show_default=True)
@click.option("--all-params", is_flag=True, help="Embed biases too (default: kernels only).")
@click.option("--all-checkpoints", is_flag=True,
              help="Embed the whole trajectory (default: the searched checkpoints).")
@click.option("--add", "add", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Place this checkpoint into RUN's existing map (openTSNE transform; the "
                   "map's points do not move). Repeatable. Without other options the map's "
                   "own settings are used.")
@force_option
@device_option
@click.pass_context
@friendly
def embed(ctx, run, perplexity, seed, n_iter, pca_dims, all_params, all_checkpoints, add,
          force, device):
    """t-SNE map of RUN's trajectory and bad minima; saved to RUN/embed/."""
    cfg = EmbedConfig(kernels_only=not all_params, pca_dims=pca_dims, perplexity=perplexity,
                      n_iter=n_iter, seed=seed)
    checkpoints = "all" if all_checkpoints else "searched"
    options = ("perplexity", "seed", "n_iter", "pca_dims", "all_params", "all_checkpoints")
    if add and all(ctx.get_parameter_source(o) is ParameterSource.DEFAULT for o in options):
        cfg = checkpoints = None  # add to the map that is there, whatever its settings
    r = open_run(ctx, run)
    # --force (or no map yet) fits a new map: its points are all placed by this call
    redo = force or not r.exists(EMBED_FILE)
    before = 0 if redo or not add else len(load_embedding(r).added)
    out = r.file("embed", "embed.json")
    stamp = out.stat().st_mtime_ns if out.exists() else None
    res = embed_run(r, cfg, device=device, checkpoints=checkpoints, add=add, force=force)
    wrote = "wrote" if stamp is None or out.stat().st_mtime_ns != stamp else "reused"
    click.echo(f"embedded {int(res.mask('trajectory').sum())} checkpoints and "
               f"{int(res.mask('bad').sum())} bad minima; {wrote} {out}")
    if add:
        kept = "a new map" if redo else "the map's points did not move"
        click.echo(f"placed {len(res.added) - before} new points into the map "
                   f"({len(res.added)} added in all; {kept})")


@plot.command("minefield")
@click.argument("run")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path without extension (default: figures/minefield_<run>).")
@click.option("--drop-outliers", is_flag=True,
              help="Hide bad minima beyond 1.5 std in both coordinates (as the paper did).")
@click.pass_context
@friendly
def plot_minefield_cmd(ctx, run, out, drop_outliers):
    """Figure 1: SGD iterates among bad minima (needs `minefield embed RUN` first)."""
    r = open_run(ctx, run)
    ax = plot_minefield(load_embedding(r), drop_outliers=drop_outliers)
    out = out or Path("figures") / f"minefield_{r.name}"
    for p in save_figure(ax.figure, out):
        click.echo(f"wrote {p}")
