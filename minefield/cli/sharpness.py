"""``minefield sharpness``: curvature and sharpness measures of every member of a run.

Results live in the run as ``sharpness/<tag>.json``: the settings, and one list
per column (one value per member). Each measure is saved as soon as it is done,
so an interrupted command resumes where it stopped, and a later call with more
``--measures`` adds columns; other settings under the same tag need ``--force``.
The settings hold the measured checkpoint by name and content
(:meth:`~minefield.runs.Run.fingerprint`): "the last checkpoint" moves when the
run trains further, and values of the old one are then refused, never reused.
"""

from __future__ import annotations

import click

from ..evaluate import resolve_device
from ..measures import MEASURES, SharpnessConfig, check_measurable, measure_members
from ..runs import RunError, reading
from ..stages import load_run_model
from ..stages.train import run_config
from ._common import SEED, device_option, force_option, friendly, main, open_run
from .basin import _tag, tag_option

_DEFAULT = SharpnessConfig()


def _check_settings(path, old: dict | None, new: dict) -> None:
    """Refuse stored values made with other settings or of another checkpoint (one
    file never mixes two)."""
    if old == new:
        return
    if isinstance(old, dict) and old.get("config") == new["config"]:
        was = old.get("checkpoint") or "the run's last checkpoint when they were measured"
        raise RunError(f"{path} holds values of {was}, not of {new['checkpoint']} (was the "
                       "run trained further or retrained?); use --force or another --tag")
    raise RunError(f"{path} holds results for other settings; use --force or another --tag")


def _measures(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return tuple(MEASURES)
    return tuple(t for t in text.replace(",", " ").split() if t)


@main.command()
@click.argument("run")
@click.option("--measures", default="all", show_default=True,
              help=f"Comma-separated, from: {', '.join(MEASURES)}; or 'all'.")
@click.option("--checkpoint", help="Checkpoint file of RUN (default: the last).")
@click.option("--rho", type=float, default=_DEFAULT.rho, show_default=True,
              help="L2 ball radius of worst_l2 and m_sharpness (parameter units).")
@click.option("--rho-linf", type=float, default=_DEFAULT.rho_linf, show_default=True)
@click.option("--rho-adaptive", type=float, default=_DEFAULT.rho_adaptive, show_default=True,
              help="ASAM radius, in units of |w| + eta.")
@click.option("--sigma", type=float, default=_DEFAULT.sigma, show_default=True,
              help="Noise std of the average-case measure.")
@click.option("--m", "m_size", type=int, default=_DEFAULT.m, show_default=True,
              help="Subset size of m-sharpness.")
@click.option("--bound", type=float, default=_DEFAULT.bound, show_default=True,
              help="Loss increase that defines the PAC-Bayes sigma'.")
@click.option("--steps", type=int, default=_DEFAULT.steps, show_default=True)
@click.option("--restarts", type=int, default=_DEFAULT.restarts, show_default=True,
              help="Random starts of the worst cases (worst_l2, worst_linf, asam, "
                   "m_sharpness).")
@click.option("--samples", type=int, default=_DEFAULT.n_samples, show_default=True,
              help="Antithetic noise pairs (average, PAC-Bayes).")
@click.option("--trace-rtol", type=float, default=_DEFAULT.trace_rtol, show_default=True)
@click.option("--bn", type=click.Choice(["eval", "batch"]), default="eval", show_default=True)
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64",
              show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@tag_option
@device_option
@force_option
@click.pass_context
@friendly
def sharpness(ctx, run, measures, checkpoint, rho, rho_linf, rho_adaptive, sigma, m_size, bound,
              steps, restarts, samples, trace_rtol, bn, dtype, seed, tag, device, force):
    """Hessian spectrum, traces and sharpness (worst-case, ASAM, average, m-, PAC-Bayes).

    \b
    Examples:
      minefield sharpness good
      minefield sharpness bad --measures lambda_max,trace,worst_l2 --rho 0.1
    """
    _tag(tag)
    cfg = SharpnessConfig(measures=_measures(measures), rho=rho, rho_linf=rho_linf,
                          rho_adaptive=rho_adaptive, sigma=sigma, m=m_size, bound=bound,
                          steps=steps, restarts=restarts, n_samples=samples,
                          trace_rtol=trace_rtol, bn=bn, dtype=dtype, seed=seed)
    r = open_run(ctx, run)
    rel = f"sharpness/{tag}.json"
    run_config(r)  # a study's folder is refused here, pointing at its stacks
    checkpoint = r.checkpoint(checkpoint, inside=False)  # or the last one now
    # the checkpoint by name and content: "the last" moves when the run trains further
    settings = {"config": cfg.without_measures(),
                "checkpoint": r.fingerprint(checkpoint, named=False)}  # valid if renamed
    done: dict[str, list[float]] = {}
    if r.exists(rel) and not force:
        old = r.read_json(rel)
        with reading(r.file(rel)):
            _check_settings(r.file(rel), old.get("settings"), settings)
            done = {k: [float(x) for x in v] for k, v in old["columns"].items()}
    todo = [name for name in cfg.measures if name not in done]
    if todo:
        r.lock()  # one writer per run: refused here, before any work
    model, params, buffers, data, _ = load_run_model(r, checkpoint, resolve_device(device))
    check_measurable(cfg, len(data.y_train))
    if todo:
        click.echo(f"measuring {', '.join(todo)} on {r.name} "
                   f"({next(iter(params.values())).shape[0]} member(s))")

    def save(name, cols):
        done.update({k: v.tolist() for k, v in cols.items()})
        r.write_json(rel, {"settings": settings, "columns": done})
        click.echo(f"  {name}: " + ", ".join(f"{v:.4g}" for v in cols[name].tolist()))

    cols = measure_members(model, params, data, cfg, buffers or None, done, save)
    if not todo:
        click.echo(f"(reusing {r.file(rel)})")
    else:
        click.echo(f"wrote {r.file(rel)}")
    for name in cfg.measures:
        spread = cols.get(f"{name}_spread")  # worst cases: how far apart the restarts ended
        click.echo(f"{name:>20}  " + "  ".join(f"{v:.4g}" for v in cols[name].tolist())
                   + ("" if spread is None else "   (spread over restarts: "
                      + "  ".join(f"{v:.2g}" for v in spread.tolist()) + ")"))
