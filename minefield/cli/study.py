"""``minefield study`` and ``minefield plot study``: grids of configs, one tidy table."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from ..basin import BasinWarning, VolumeConfig
from ..config import ConfigError
from ..directions import DirectionSpec
from ..files import unique_keys
from ..measures import MEASURES, SharpnessConfig
from ..options import Estimator
from ..plotting.study import study_figures
from ..runs import read_limited
from ..stages.study import load_study, study_run
from ..study import StudyConfig
from ._common import (
    executor_of,
    executor_options,
    friendly,
    main,
    open_run,
    parse_beta,
    plot,
    root_of,
)
from .sweep import parse_names
from .train import config_from_options, experiment_options


def _split_top(text: str) -> list[str]:
    """``"1,[2,3],4"`` -> ``["1", "[2,3]", "4"]``: commas inside brackets and inside JSON
    strings (``"a,b"``, with ``\\"`` escapes) stay."""
    out, depth, cur, quoted, escaped = [], 0, "", False, False
    for c in text:
        if quoted:
            quoted, escaped = escaped or c != '"', c == "\\" and not escaped
            cur += c
            continue
        quoted = c == '"'
        depth += c in "[{"
        depth -= c in "]}"
        if c == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
    return [s.strip() for s in out + [cur] if s.strip()]


def _value(item: str):
    try:
        return json.loads(item)
    except json.JSONDecodeError:
        return item  # a bare word: sgd, adam, ...


def parse_vary(text: str) -> tuple[str, list]:
    """``"train.lr=0.01,0.1"`` -> ``("train.lr", [0.01, 0.1])``; values are JSON
    (``null``, ``[16,16]``), bare words are strings, ``a:b:s`` is the integers
    ``a, a+s, ..., <= b``."""
    field, sep, values = text.partition("=")
    if not sep or not field.strip():
        raise click.BadParameter(f"expected FIELD=V1,V2,..., got {text!r}",
                                 param_hint="'--vary'")
    parts = _split_top(values)
    if len(parts) == 1 and parts[0].count(":") == 2 and not parts[0].startswith('"'):
        try:
            a, b, s = (int(x) for x in parts[0].split(":"))
        except ValueError:
            raise click.BadParameter(f"expected integers a:b:step, got {parts[0]!r}",
                                     param_hint="'--vary'") from None
        if s < 1 or b < a:
            raise click.BadParameter(f"a:b:step needs step >= 1 and b >= a, got {parts[0]!r}",
                                     param_hint="'--vary'")
        return field.strip(), list(range(a, b + 1, s))
    return field.strip(), [_value(p) for p in parts]


def _grid_file(path: Path) -> dict:
    """``{"grid": ...}`` or ``{"points": ...}`` from a JSON file (a bare object is a grid,
    a bare list the points)."""
    try:
        d = json.loads(read_limited(path, 2**20, "grid file"), object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"grid file {path} is not valid JSON: {e}") from None
    if isinstance(d, list):
        return {"points": tuple(d)}
    if isinstance(d, dict) and {"grid", "points"} & set(d) and set(d) - {"grid", "points"}:
        raise ConfigError(f"grid file {path}: unknown key(s) "
                          f"{sorted(set(d) - {'grid', 'points'})} beside 'grid' / 'points' "
                          "(a file with either holds only those two)")
    if isinstance(d, dict) and set(d) <= {"grid", "points"} and d:
        return {k: tuple(v) if k == "points" and isinstance(v, list) else v
                for k, v in d.items()}
    if isinstance(d, dict):
        return {"grid": d}
    raise ConfigError(f"grid file {path} must hold an object (a grid) or a list (points)")


@main.command()
@experiment_options
@click.option("--beta", callback=parse_beta, help="Poison factor of every model unless varied.")
@click.option("--vary", "vary", multiple=True, metavar="FIELD=V1,V2",
              help="A field and its values, e.g. train.lr=0.01,0.1 (repeat: a grid).")
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON grid {field: [values]}, list of points [{field: value}, ...], or "
                   "{\"points\": [...], \"grid\": {...}} (each point x the grid); --vary "
                   "adds to the grid.")
@click.option("--directions", type=click.IntRange(1), default=100, show_default=True,
              help="Random filter-normalised directions per model (each counted +/-).")
@click.option("--cutoff", type=float, default=1.0, show_default=True,
              help="Train-loss level that ends the basin.")
@click.option("--r-max", type=float, default=1.0, show_default=True)
@click.option("--estimator", type=click.Choice([e.value for e in Estimator]), default="naive",
              show_default=True, help="Volume estimator (see `minefield basin`).")
@click.option("--measures", help="Curvature / sharpness columns, comma-separated, or 'all'.")
@click.option("--target", type=click.Choice(["gap", "loss_gap"]), default="gap",
              show_default=True, help="What the measures are ranked against.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              default=Path("figures"), show_default=True)
@click.option("--models-per-task", type=click.IntRange(1), help="Split every stack into "
              "tasks of at most this many models. Needs --isolate: then every split gives "
              "the unsplit numbers.")
@executor_options
@click.pass_context
@friendly
def study(ctx, vary, grid_file, directions, cutoff, r_max, estimator, measures, target, figures,
          models_per_task, **opts):
    """Train a grid of configs (stacking what can be stacked), measure every model, and
    rank every measure against the generalization gap.

    \b
    Example (learning rate x batch size on digits):
      minefield study --name lr-bs --dataset digits --model mlp --widths 64 \\
          --steps 3000 --vary train.lr=0.003,0.01,0.03 \\
          --vary train.batch_size=16,64,null --vary train.seed=0,1 --measures lambda_max
    """
    spec = _grid_file(grid_file) if grid_file else {}
    grid: dict[str, list] = dict(spec.get("grid") or {})
    for text in vary:
        field, values = parse_vary(text)
        if field in grid:
            raise click.BadParameter(f"{field} is varied twice", param_hint="'--vary'")
        grid[field] = values
    spec["grid"] = grid
    executor = executor_of(opts)
    opts = {**opts, "members": None}
    base = config_from_options(opts, ignored_ok=True)  # the grid may set optimizer, milestones
    vol = VolumeConfig(cutoff=cutoff, r_max=r_max, n_directions=directions,
                       directions=DirectionSpec(seed=0), estimator=estimator)
    sharp = (SharpnessConfig(measures=tuple(MEASURES) if measures.strip() == "all" else
                             parse_names(measures)) if measures else None)
    cfg = StudyConfig(**spec, volume=vol, sharpness=sharp, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BasinWarning)  # counted in the table: n_at_r_max
        res = study_run(base, cfg, root_of(ctx), force=opts["force"],
                        progress=not opts["quiet"], executor=executor,
                        models_per_task=models_per_task)
    _echo(res)
    for p in study_figures(res, figures / res.run.name):
        click.echo(f"wrote {p}")


def _echo(res) -> None:
    diverged = sum(bool(r["diverged"]) for r in res.rows)  # rows of NaN, no basin
    at_max = sum(not r["diverged"] and r["n_at_r_max"] > 0 for r in res.rows)
    click.echo(f"{len(res.rows)} models in {len({r['stack'] for r in res.rows})} stacks; "
               f"table: {res.run.file('study.csv')}")
    if diverged:
        click.echo(f"{diverged} model(s) diverged (loss NaN/inf): rows of NaN, left out of "
                   "the scores")
    if at_max:
        click.echo(f"{at_max} model(s) have radii at r_max: their volume is a lower bound")
    click.echo(f"{'measure':<22}{'n':>4}{'Kendall tau':>13}{'granulated':>12}{'CMI':>8}")
    for s in res.scores:
        click.echo(f"{s['measure']:<22}{s['n']:>4}{s['kendall_tau']:>13.3f}"
                   f"{s['granulated_tau']:>12.3f}{s['cmi']:>8.3f}")


@plot.command("study")
@click.argument("run")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              default=Path("figures"), show_default=True)
@click.pass_context
@friendly
def plot_study(ctx, run, figures):
    """Redraw the figures of a finished study."""
    res = load_study(open_run(ctx, run))
    for p in study_figures(res, figures / res.run.name):
        click.echo(f"wrote {p}")
