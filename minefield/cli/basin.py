"""``minefield basin``, ``landscape``, ``plot basin`` and ``plot landscape``.

Results live in the run: ``basin/<tag>.json`` (radii, volume statistics and
rollouts of every member) and ``landscape/<tag>.safetensors`` (coordinates,
metrics with NaN where not computed, settings in the metadata). The same
settings reuse (or, for an interrupted surface, resume) a saved result;
different settings under the same tag need ``--force``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import click
import torch

from ..basin import BasinResult, Rollouts, VolumeConfig, basin_members, member_stack, rollouts
from ..directions import BiasPolicy, DirectionKind, DirectionSpec, random_directions
from ..evaluate import resolve_device
from ..landscape import Slice, Surface, line_direction, plane_directions, slice_1d, surface
from ..netvolume import CurvatureKind, adam_curvature, basin_volume
from ..runs import RunError, load_tensors, reading, save_tensors
from ..train import load_run_model
from ..volume import Estimator
from ._common import device_option, force_option, friendly, main, open_run, plot

_FIGURES = Path("figures")
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")

tag_option = click.option("--tag", default="default", show_default=True,
                          help="Name of this result inside the run (different settings: "
                               "different tags).")
kind_option = click.option("--kind", "dir_kind",
                           type=click.Choice([k.value for k in DirectionKind]),
                           default="filter", show_default=True, help="Direction normalisation.")
bias_option = click.option("--bias", type=click.Choice([b.value for b in BiasPolicy]),
                           default="exclude", show_default=True,
                           help="Biases/BN: exclude (not moved, not counted in n: the "
                                "paper's n), zero (not moved, counted), include.")
memory_option = click.option("--memory-mb", type=click.FloatRange(min=0, min_open=True),
                             default=256.0, show_default=True, help="Engine chunk budget.")


def _check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise click.BadParameter(f"tag {tag!r} may hold only letters, digits, '_', '.', '-'")
    return tag


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
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True),
              help="Gaussian-measure std (default r_max / sqrt(n)).")
@click.option("--chains", type=click.IntRange(2), default=64, show_default=True,
              help="mcmc: chains per replicate.")
@click.option("--replicates", type=click.IntRange(2), default=8, show_default=True,
              help="mcmc: independent replicates (the interval comes from them).")
@click.option("--walk", type=click.IntRange(1), help="mcmc: hit-and-run steps per phase "
              "(default max(10, n)).")
@kind_option
@bias_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rollouts", "n_rollouts", type=click.IntRange(0), default=20, show_default=True,
              help="Directions whose loss curve is stored for 'plot basin'.")
@tag_option
@device_option
@memory_option
@force_option
@click.pass_context
@friendly
def basin(ctx, run, checkpoint, n_directions, cutoff, relative, r_max, rtol, method,
          grid_points, estimator, preconditioner, sigma, chains, replicates, walk, dir_kind,
          bias, seed, n_rollouts, tag, device, memory_mb, force):
    """Basin radii along random directions and log10 of the basin volume (paper Sec. 5).

    \b
    Example:
      minefield basin good --directions 100 --cutoff 1.0
      minefield basin good --estimator is --preconditioner hessian --kind gaussian
    """
    _check_tag(tag)
    pre = preconditioner or ("hessian" if estimator == "is" else "none")
    cfg = VolumeConfig(cutoff=cutoff, cutoff_kind="relative" if relative else "abs",
                       r_max=r_max, n_directions=n_directions, rtol=rtol, method=method,
                       grid_points=grid_points, directions=DirectionSpec(dir_kind, bias, seed),
                       memory_mb=memory_mb, seed=seed, estimator=estimator,
                       preconditioner="given" if pre == "adam" else pre, sigma=sigma,
                       n_chains=chains, n_replicates=replicates, walk_length=walk)
    r = open_run(ctx, run)
    rel = f"basin/{tag}.json"
    settings = {"config": cfg.to_dict(), "checkpoint": checkpoint, "rollouts": n_rollouts}
    if pre == "adam":
        settings["curvature"] = "adam"
        if not r.exists("state.safetensors"):
            raise RunError(f"{r.path} has no optimizer state (state.safetensors) for "
                           f"--preconditioner adam")
    if r.exists(rel) and not force:
        old = r.read_json(rel)
        with reading(r.file(rel)):
            if old.get("settings") != settings:
                raise RunError(f"{r.file(rel)} holds results for other settings; use --force "
                               f"or another --tag")
            results = [BasinResult.from_dict(m) for m in old["members"]]
        click.echo(f"(reusing {r.file(rel)})")
    else:
        r.lock()
        model, params, buffers, data, _ = load_run_model(r, checkpoint, resolve_device(device))
        if pre == "adam":
            tensors, _ = load_tensors(r.file("state.safetensors"))
            results = [basin_volume(model, member_stack(params, i), data, cfg,
                                    member_stack(buffers, i) if buffers else None,
                                    curvature=adam_curvature(tensors, list(params), i))
                       for i in range(next(iter(params.values())).shape[0])]
        else:
            results = basin_members(model, params, data, cfg, buffers or None)
        ts = torch.linspace(-r_max / 2, r_max / 2, 101, dtype=torch.float64)
        ros = [rollouts(model, member_stack(params, i), data, n_rollouts, ts, cfg.directions,
                        member_stack(buffers, i) if buffers else None, memory_mb, res.cutoff)
               .to_dict() if n_rollouts else None for i, res in enumerate(results)]
        r.write_json(rel, {"settings": settings, "members": [x.to_dict() for x in results],
                           "rollouts": ros})
        click.echo(f"wrote {r.file(rel)}")
    for i, res in enumerate(results):
        lo, hi = res.ci_log10_volume
        click.echo(f"{r.name}[{i}]  n {res.n}  centre loss {res.centre_loss:.4g}  "
                   f"mean radius {res.mean_radius:.4g}  log10 V {res.log10_volume:.6g} "
                   f"[{lo:.6g}, {hi:.6g}]  n*mean(log10 r) {res.n_mean_log10_r:.6g}")
        d = res.diagnostics
        if d:
            click.echo(f"  {res.estimator}: ESS {d.get('ess', float('nan')):.1f} of "
                       f"{d.get('n_samples', 0)}, largest share "
                       f"{d.get('max_share', float('nan')):.3g}, at r_max "
                       f"{d.get('n_at_r_max', 0)}")
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

    _check_tag(tag)
    results, ros = {}, {}
    for name in runs:
        r = open_run(ctx, name)
        rel = f"basin/{tag}.json"
        if not r.exists(rel):
            raise RunError(f"no basin result {r.file(rel)}; run 'minefield basin {name}' first")
        saved = r.read_json(rel)
        with reading(r.file(rel)):
            if member >= len(saved["members"]):
                raise click.BadParameter(f"{name} has {len(saved['members'])} member(s)")
            results[r.name] = BasinResult.from_dict(saved["members"][member])
            ro = (saved.get("rollouts") or [None] * (member + 1))[member]
            if ro is not None:
                ros[r.name] = Rollouts.from_dict(ro)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    if ros:
        plot_rollouts(ros, ax=a1)
    else:
        a1.set_axis_off()
    plot_radius_hist(results, ax=a2)
    out = out or _FIGURES / f"basin_{'_'.join(Path(n).name for n in runs)}"
    for p in save_figure(fig, out):
        click.echo(f"wrote {p}")


# --- landscape --------------------------------------------------------------------------------


def _load_landscape(path: Path) -> tuple[Slice | Surface, dict]:
    tensors, meta = load_tensors(path)
    values = {k[7:]: v for k, v in tensors.items() if k.startswith("values.")}
    with reading(path):
        if "ts" in tensors:
            return Slice(tensors["ts"], values, meta["settings"]), meta
        return Surface(tensors["xs"], tensors["ys"], values, tensors["done"].bool(),
                       meta["settings"]), meta


def _save_landscape(path: Path, res: Slice | Surface, settings: dict) -> None:
    tensors = {f"values.{k}": v for k, v in res.values.items()}
    if isinstance(res, Slice):
        tensors["ts"] = res.ts
    else:
        tensors.update(xs=res.xs.clone(), ys=res.ys.clone(), done=res.done.to(torch.uint8))
    save_tensors(path, tensors, {"settings": settings})


@main.command()
@click.argument("run")
@click.option("--other", help="Second run: the slice is the line from RUN (t=0) to it (t=1).")
@click.option("--checkpoint", help="Checkpoint file of RUN (default: the last).")
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
@click.option("--seed", type=int, default=0, show_default=True)
@tag_option
@device_option
@memory_option
@force_option
@click.pass_context
@friendly
def landscape(ctx, run, other, checkpoint, dim, points, span, splits, member, block_rows,
              dir_kind, bias, seed, tag, device, memory_mb, force):
    """1-D slices and 2-D surfaces of the loss; an interrupted surface resumes.

    \b
    Examples:
      minefield landscape good --other bad --points 101
      minefield landscape good --dim 2 --points 41 --span=-1,1
    """
    _check_tag(tag)
    if other and dim == "2":
        raise click.BadParameter("--other draws a line: use it with --dim 1")
    lo, hi = _floats(span or ("-0.5,1.5" if other else "-1,1"), 2, "--span")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise click.BadParameter(f"--span needs two finite numbers, low < high; got {span!r}")
    if points > 10_000:
        raise click.BadParameter(f"--points is per axis: at most 10000, got {points}")
    split_list = [s for s in splits.replace(",", " ").split() if s]
    if not split_list:
        raise click.BadParameter(f"--splits needs train, test and/or poison, got {splits!r}")
    settings = {"run_other": other, "checkpoint": checkpoint, "dim": int(dim), "points": points,
                "span": [lo, hi], "splits": split_list, "member": member,
                "directions": DirectionSpec(dir_kind, bias, seed).to_dict()}
    r = open_run(ctx, run)
    path = r.file(f"landscape/{tag}.safetensors")
    partial = None
    if path.exists() and not force:
        res, meta = _load_landscape(path)
        if meta.get("settings") != settings:
            raise RunError(f"{path} holds a landscape with other settings; use --force or "
                           f"another --tag")
        if isinstance(res, Slice) or res.complete:
            click.echo(f"(reusing {path})")
            _summary(res)
            return
        partial = res
        click.echo(f"resuming {path}: {int(res.done.sum())}/{len(res.done)} rows done")
    r.lock()
    dev = resolve_device(device)
    model, params, buffers, data, _ = load_run_model(r, checkpoint, dev)
    if member >= next(iter(params.values())).shape[0]:
        raise click.BadParameter(f"{run} has no member {member}")
    centre = member_stack(params, member)
    bufs = member_stack(buffers, member) if buffers else None
    ts = torch.linspace(lo, hi, points, dtype=torch.float64)
    spec = DirectionSpec(dir_kind, bias, seed)
    if dim == "1":
        if other:
            _, p2, _, _, _ = load_run_model(open_run(ctx, other), None, dev)
            if member >= next(iter(p2.values())).shape[0]:
                raise click.BadParameter(f"{other} has no member {member}")
            d = line_direction(centre, member_stack(p2, member))
        else:
            d = random_directions({k: v[0] for k, v in centre.items()}, 1, spec.kind, spec.bias,
                                  spec.generator())
        res = slice_1d(model, centre, d, ts, data, split_list, bufs, memory_mb, settings)
        _save_landscape(path, res, settings)
    else:
        dirs = plane_directions({k: v[0] for k, v in centre.items()}, spec)
        res = surface(model, centre, dirs, ts, ts, data, split_list, bufs, memory_mb,
                      partial=partial, on_block=lambda s: _save_landscape(path, s, settings),
                      block_rows=block_rows, config=settings)
        _save_landscape(path, res, settings)
    click.echo(f"wrote {path}")
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
@click.option("--metric", default="train_loss", show_default=True,
              help="2-D: which values (train_loss, test_acc, ...); 1-D: loss or acc.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path without extension (default: figures/landscape_<run>_<tag>).")
@click.pass_context
@friendly
def plot_landscape_cmd(ctx, run, tag, plot_kind, metric, out):
    """Draw a saved landscape: a 1-D slice, or a 2-D surface as contours or in 3-D."""
    from ..plotting.landscape import plot_slice, plot_surface
    from ..plotting.style import save_figure

    _check_tag(tag)
    r = open_run(ctx, run)
    path = r.file(f"landscape/{tag}.safetensors")
    if not path.exists():
        raise RunError(f"no landscape {path}; run 'minefield landscape {run}' first")
    res, meta = _load_landscape(path)
    if isinstance(res, Slice):
        m = metric.split("_")[-1]
        other = meta["settings"].get("run_other")
        ax = plot_slice(res, metric=m, ends=(r.name, other) if other else None)
    else:
        ax = plot_surface(res, kind=plot_kind, metric=metric)
    out = out or _FIGURES / f"landscape_{r.name}_{tag}"
    for p in save_figure(ax.figure, out):
        click.echo(f"wrote {p}")
