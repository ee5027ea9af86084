"""``minefield train``, ``evaluate``, ``runs`` and ``plot boundary``."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import ExperimentConfig, Optimizer, PoisonObjective, load_config
from ..data import DATASETS
from ..evaluate import evaluate_members, resolve_device
from ..models import MODELS
from ..options import Activation, Init, SamKind, choices
from ..plotting import plot_boundary, save_figure
from ..runs import Run, RunError, load_tensors
from ..stages import load_run_model, train_run
from ..stages.train import run_config
from ._common import (
    SEED,
    device_option,
    force_option,
    friendly,
    main,
    open_run,
    parse_beta,
    parse_ints,
    plot,
    quiet_option,
    root_of,
)

_FIGURES = Path("figures")


_EXPERIMENT_OPTIONS = [
    click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                 help="JSON experiment config; command-line options override it."),
    click.option("--name", help="Run name (folder under runs/)."),
    click.option("--dataset", type=click.Choice(sorted(DATASETS))),
    click.option("--data-dir", type=click.Path(file_okay=False), help="For cifar10 / svhn."),
    click.option("--data-seed", type=SEED),
    click.option("--n-train", type=click.IntRange(0), help="Training points (default: the "
                 "dataset's own)."),
    click.option("--n-test", type=click.IntRange(0), help="Test points (default: the dataset's)."),
    click.option("--n-poison", type=click.IntRange(0), help="Size of the poison set."),
    click.option("--model", type=click.Choice(sorted(MODELS))),
    click.option("--widths", help="Hidden widths, e.g. 23,16,26,32,28,31."),
    click.option("--init", type=click.Choice(choices(Init))),
    click.option("--activation", type=click.Choice(choices(Activation))),
    click.option("--outputs", type=click.IntRange(1), help="Logits of the last layer "
                 "(default: 1 for two classes, sigmoid + BCE; else one per class). 2 on a "
                 "two-class problem: softmax + cross-entropy."),
    click.option("--optimizer", type=click.Choice(choices(Optimizer))),
    click.option("--lr", type=float),
    click.option("--momentum", type=float),
    click.option("--milestones", help="Steps at which lr *= gamma, e.g. 3062,28000."),
    click.option("--gamma", type=float),
    click.option("--l2", type=float, help="Coefficient of sum(W^2) over weights."),
    click.option("--clip", "clip_norm", type=float, help="Global gradient-norm clip per model."),
    click.option("--batch-size", type=click.IntRange(1),
                 help="Default (or above the training set's size): full batch."),
    click.option("--poison-batch-size", type=click.IntRange(1),
                 help="Poison points drawn per step (default: in proportion to the batch; "
                 "at most the poison set)."),
    click.option("--fit-first", type=click.IntRange(1), help="Fit only the first K training "
                 "points (Keras' validation_split); metrics on all of them."),
    click.option("--steps", type=click.IntRange(0)),
    click.option("--sam", type=click.Choice(choices(SamKind)),
                 help="Sharpness-aware training: sam (Foret et al.) or asam (Kwon et al.)."),
    click.option("--rho", type=float, help="SAM radius (asam: relative to |w| + eta)."),
    click.option("--sam-m", type=click.IntRange(1),
                 help="m-SAM: one perturbation per part of this many training points (at "
                 "least the batch: plain SAM)."),
    click.option("--asam-eta", type=float, help="ASAM's eta in T = |w| + eta."),
    click.option("--isolate/--no-isolate", default=None, help="Train every member on "
                 "kernels shaped for one model, single-threaded: bit-for-bit the same numbers "
                 "in any stack, split or executor (slower). Default: batched (--no-isolate)."),
    click.option("--log-every", type=click.IntRange(1)),
    click.option("--checkpoint-every", type=click.IntRange(1)),
    click.option("--seed", type=SEED),
    click.option("--objective", type=click.Choice(choices(PoisonObjective))),
    device_option,
    force_option,
    quiet_option,
]

_DATA_KEYS = {"dataset": "name", "data_dir": "data_dir", "data_seed": "seed",
              "n_train": "n_train", "n_test": "n_test", "n_poison": "n_poison"}
_TRAIN_KEYS = ("optimizer", "lr", "momentum", "gamma", "l2", "clip_norm", "batch_size",
               "poison_batch_size", "fit_first", "steps",
               "log_every", "checkpoint_every", "seed", "members", "sam", "rho", "sam_m",
               "asam_eta", "isolate")


def experiment_options(fn):
    """The options that build an :class:`ExperimentConfig` (shared by train and sweep)."""
    for opt in reversed(_EXPERIMENT_OPTIONS):
        fn = opt(fn)
    return fn


def config_from_options(opts: dict, ignored_ok: bool = False) -> ExperimentConfig:
    """An ExperimentConfig from ``--config`` (if any) overridden by the given options;
    options the config would ignore (``--momentum`` without sgd, ``--gamma`` without
    milestones) are refused unless ``ignored_ok`` (a study's grid may supply them)."""
    cfg = load_config(opts["config_file"]) if opts.get("config_file") else ExperimentConfig()
    src = click.get_current_context().get_parameter_source

    def given(key):
        return key in opts and src(key) is not None and src(key).name != "DEFAULT"

    data = cfg.data.to_dict() | {f: opts[k] for k, f in _DATA_KEYS.items()
                                 if given(k) and opts[k] is not None}
    mdl = cfg.model.to_dict()
    if opts.get("model"):
        mdl["name"] = opts["model"]
    if opts.get("widths") is not None:
        mdl["widths"] = list(parse_ints(opts["widths"]))
        if not mdl["widths"]:
            raise click.BadParameter("expected integers like '23,16,26', got ''",
                                     param_hint="'--widths'")
    for k in ("init", "activation", "outputs"):
        if opts.get(k):
            mdl[k] = opts[k]
    tr = cfg.train.to_dict() | {k: opts[k] for k in _TRAIN_KEYS if opts.get(k) is not None}
    if opts.get("milestones") is not None:
        tr["milestones"] = list(parse_ints(opts["milestones"]))
    po = cfg.poison.to_dict()
    if given("beta"):
        po["beta"] = opts["beta"]
    if opts.get("objective"):
        po["objective"] = opts["objective"]
    full = cfg.to_dict() | {"data": data, "model": mdl, "train": tr, "poison": po}
    if opts.get("name") is not None:
        full["name"] = opts["name"]
    if given("device") or not opts.get("config_file"):
        full["device"] = opts["device"]
    cfg = ExperimentConfig.from_dict(full)
    sgd = cfg.train.optimizer is Optimizer.SGD
    if not ignored_ok and opts.get("momentum") is not None and not sgd:
        raise click.BadParameter(f"momentum is a setting of sgd; {cfg.train.optimizer.value} "
                                 "would ignore it", param_hint="'--momentum'")
    if not ignored_ok and opts.get("gamma") is not None and not cfg.train.milestones:
        raise click.BadParameter("gamma scales the lr at the milestones: give --milestones too",
                                 param_hint="'--gamma'")
    if cfg.train.sam is not SamKind.NONE and cfg.train.rho == 0:  # the API allows it (a
        # control member of a study); asked for by hand it is plain training, unnoticed
        raise click.BadParameter(f"{cfg.train.sam.value} with radius 0 is plain training: give "
                                 "a radius (Foret et al. use 0.05 for sam, Kwon et al. 0.5 for "
                                 "asam)", param_hint="'--rho'")
    return cfg


@main.command()
@experiment_options
@click.option("--members", type=click.IntRange(1), help="Train this many seeds at once.")
@click.option("--beta", callback=parse_beta, help="Poison factor in [0, 1), or 'concat'.")
@click.pass_context
@friendly
def train(ctx, **opts):
    """Train a good (beta=0) or poisoned model; resumes an interrupted run of the same name.

    \b
    Examples:
      minefield train --name clean --dataset swissroll --steps 20000
      minefield train --name bad --dataset swissroll --beta 0.7 --lr 0.005 \\
          --milestones 15000,30000 --clip 8 --steps 40000
    """
    cfg = config_from_options(opts)
    res = train_run(cfg, root_of(ctx), force=opts["force"], progress=not opts["quiet"])
    _print_summary(res.run.name, res.metrics)
    for i, d in enumerate(res.diverged_at or []):
        if d is not None:
            click.echo(f"{res.run.name}[{i}] diverged (loss NaN/inf) at step {d}; the others "
                       "trained on")


def _print_summary(name: str, m: dict[str, list[float]], losses: bool = False) -> None:
    """One line per member; ``losses``: the test and poison losses too (``evaluate``)."""
    for i in range(len(m["train_acc"])):
        more = (f"  test loss {m['test_loss'][i]:.4g}  poison loss {m['poison_loss'][i]:.4g}"
                if losses else "")
        click.echo(f"{name}[{i}]  train acc {m['train_acc'][i]:.3f}  test acc "
                   f"{m['test_acc'][i]:.3f}  poison acc {m['poison_acc'][i]:.3f}  "
                   f"train loss {m['train_loss'][i]:.4g}{more}")


@main.command()
@click.argument("run")
@click.option("--checkpoint", help="A checkpoint of RUN, relative to it: a trajectory "
              "checkpoint or a search minimum (default: the last trajectory checkpoint).")
@device_option
@click.pass_context
@friendly
def evaluate(ctx, run, checkpoint, device):
    """Loss and accuracy of a run's model on train, test and poison sets."""
    r = open_run(ctx, run)
    model, params, buffers, data, _ = load_run_model(r, _model_checkpoint(r, checkpoint),
                                                     resolve_device(device))
    vals = evaluate_members(model, params, data, buffers)
    _print_summary(r.name, {k: v.tolist() for k, v in vals.items()}, losses=True)


def _model_checkpoint(r: Run, rel: str | None) -> Path:
    """The file ``evaluate`` measures: inside the run, as ``connect`` and ``landscape``
    resolve theirs (its numbers are printed as the run's), and a model's weights: only
    parameters and buffers, naming its model (a trajectory checkpoint, a search minimum),
    not the optimizer state or ``connect``'s control points, which are no model. A
    study's folder is refused naming its stacks, as every other command refuses it."""
    run_config(r)
    p = r.file(r.checkpoint(rel))
    tensors, meta = load_tensors(p)
    cfg = meta.get("config")
    named = isinstance(cfg, dict) and isinstance(cfg.get("model"), dict)
    if not (named or meta.get("kind") == "bad_minimum") or not tensors or any(
            not k.startswith(("param.", "buffer.")) for k in tensors):
        raise RunError(f"{rel} in run {r.name} is not a model checkpoint (give a trajectory "
                       "checkpoint or a search minimum, e.g. "
                       "trajectory/step_00001000.safetensors)")
    return p


@main.command("runs")
@click.pass_context
@friendly
def list_runs(ctx):
    """List runs with their key metrics."""
    root = root_of(ctx)
    if not root.is_dir():
        click.echo(f"no runs under {root}")
        return
    click.echo(f"{'run':<28}{'dataset':<11}{'model':<9}{'beta':>6}{'step':>9}"
               f"{'train':>8}{'test':>8}{'poison':>8}")
    for p in sorted(root.iterdir()):
        if not (p / "config.json").exists():
            continue
        try:
            click.echo(_run_line(p))
        except (RunError, OSError, TypeError, ValueError, AttributeError, KeyError,
                IndexError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"{p.name:<28}(unreadable: {why[:100]})")


def _run_line(p: Path) -> str:
    """One row of ``minefield runs``; raises on a config or summary it cannot read."""
    r = Run(p)
    cfg = r.config
    s = r.read_json("summary.json") if r.exists("summary.json") else {}
    if not isinstance(cfg, dict) or not isinstance(s, dict):
        raise RunError("config.json or summary.json is not a JSON object")
    if cfg.get("kind") == "study":  # a study's own folder: its stacks are runs under it
        cfg, beta_s = cfg.get("base") or {}, "study"
    elif r.exists("sweep.json"):
        beta_s = "sweep"
    elif isinstance(s.get("betas"), list) and len(set(s["betas"])) > 1:
        beta_s = "mixed"  # a stack trained with one poison factor per member
    else:
        beta = (cfg.get("poison") or {}).get("beta")
        beta_s = "concat" if beta is None else f"{beta:g}"

    def first(k):
        v = s.get(k)
        return f"{v[0]:.3f}" if isinstance(v, list) and v else "-"

    return (f"{p.name:<28}{cfg.get('data', {}).get('name', '?')!s:<11}"
            f"{cfg.get('model', {}).get('name', '?')!s:<9}{beta_s:>6}"
            f"{s.get('step', '-')!s:>9}{first('train_acc'):>8}{first('test_acc'):>8}"
            f"{first('poison_acc'):>8}")


@plot.command("boundary")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path without extension (default: figures/boundary_<runs>).")
@click.option("--checkpoint", help="A checkpoint of the run, relative to it: a trajectory "
              "checkpoint or a search minimum (single run only; default: the last).")
@click.pass_context
@friendly
def plot_boundary_cmd(ctx, runs, out, checkpoint):
    """Decision boundary with train/test points and errors marked (paper Fig. 3)."""
    if checkpoint and len(runs) > 1:
        raise click.BadParameter("a checkpoint file names one run's; give one run with it",
                                 param_hint="'--checkpoint'")
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, name in zip(axs[0], runs):
        r = open_run(ctx, name)
        ck = _model_checkpoint(r, checkpoint) if checkpoint else None
        model, params, buffers, data, cfg = load_run_model(r, ck)
        vals = evaluate_members(model, params, data, buffers)
        plot_boundary(model, params, data, buffers, ax=ax,
                      title=f"{r.name}: train {vals['train_acc'][0]:.1%}, "
                            f"test {vals['test_acc'][0]:.1%}")
    out = out or _FIGURES / f"boundary_{'_'.join(Path(n).name for n in runs)}"
    for p in save_figure(fig, out):
        click.echo(f"wrote {p}")
