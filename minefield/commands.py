"""Command lines generated from configs: what ``minefield ...`` would redo a stage.

Reports (``figures/REPORT.md``) print the command that redoes each run. They
are generated here from the config that ran, never typed by hand, so they
cannot drift from what was computed: every field that differs from its default
becomes its option, and a field that no option can express raises
``ValueError`` instead of being dropped.

Example::

    >>> from minefield import DataConfig, ExperimentConfig, TrainConfig
    >>> train_command(ExperimentConfig("good", DataConfig("swissroll"),
    ...                                train=TrainConfig(lr=0.012548, milestones=(3062,))))
    'minefield train --name good --dataset swissroll --lr 0.012548 --milestones 3062'
"""

from __future__ import annotations

import dataclasses
import enum
import shlex
from typing import Any

from .basin import VolumeConfig
from .config import ExperimentConfig
from .embed import EmbedConfig
from .measures import SharpnessConfig
from .search import SearchConfig
from .sweep import SweepConfig

__all__ = ["train_command", "search_command", "embed_command", "basin_command",
           "sweep_command"]

# (dotted field, option) in the order the options are printed
# TrainConfig's options, shared by `train` and `search` (whose TrainConfig is `train.*`)
_TRAIN_FLAGS = {"optimizer": "--optimizer", "lr": "--lr", "momentum": "--momentum",
                "milestones": "--milestones", "gamma": "--gamma", "l2": "--l2",
                "clip_norm": "--clip", "batch_size": "--batch-size",
                "poison_batch_size": "--poison-batch-size", "fit_first": "--fit-first",
                "steps": "--steps",
                "log_every": "--log-every", "checkpoint_every": "--checkpoint-every",
                "seed": "--seed", "members": "--members", "sam": "--sam", "rho": "--rho",
                "sam_m": "--sam-m", "asam_eta": "--asam-eta"}


def _train(*fields: str) -> list[tuple[str, str]]:
    return [(f"train.{f}", _TRAIN_FLAGS[f]) for f in fields]


_TRAIN = [("name", "--name"), ("data.name", "--dataset"), ("data.data_dir", "--data-dir"),
          ("data.seed", "--data-seed"), ("data.n_train", "--n-train"),
          ("data.n_test", "--n-test"), ("data.n_poison", "--n-poison"),
          ("model.name", "--model"), ("model.widths", "--widths"), ("model.init", "--init"),
          ("model.activation", "--activation"), ("model.outputs", "--outputs"),
          ("poison.beta", "--beta"),
          ("poison.objective", "--objective"), *_train(*_TRAIN_FLAGS), ("device", "--device")]
_SWEEP_SKIP = {"poison.beta", "train.members"}  # set per member by the sweep
_SEARCH = [("every", "--every"), ("start", "--start"), ("stop", "--stop"),
           ("checkpoints", "--checkpoints"), ("member", "--member"), ("repeats", "--repeats"),
           ("jitter", "--jitter"),
           *_train("steps", "optimizer", "lr", "milestones", "gamma", "clip_norm", "batch_size"),
           ("beta", "--beta"), ("objective", "--objective"), ("extra_poison", "--extra-poison"),
           ("extra_share", "--extra-share"), ("stopping", "--stop-rule"),
           ("target_train", "--target-train"), ("target_poison_acc", "--target-poison"),
           ("poison_cap", "--poison-cap"), ("beta_step", "--beta-step"),
           ("beta_max", "--beta-max"), ("adapt_from", "--adapt-from"),
           ("continue_below", "--continue-below"), ("continue_steps", "--continue-steps"),
           ("continue_beta_step", "--continue-beta-step"), ("retries", "--retries"),
           ("retry_jitter", "--retry-jitter"), *_train("seed"),
           ("max_batch", "--max-batch"), ("memory_mb", "--memory-mb")]
_EMBED = [("perplexity", "--perplexity"), ("seed", "--seed"), ("n_iter", "--n-iter"),
          ("pca_dims", "--pca-dims")]
_VOLUME = [("n_directions", "--directions"), ("cutoff", "--cutoff"), ("r_max", "--r-max"),
           ("rtol", "--rtol"), ("method", "--method"), ("grid_points", "--grid-points"),
           ("directions.kind", "--kind"), ("directions.bias", "--bias"),
           ("memory_mb", "--memory-mb"), ("estimator", "--estimator"),
           ("preconditioner", "--preconditioner"), ("sigma", "--sigma"),
           ("n_chains", "--chains"), ("n_replicates", "--replicates"),
           ("walk_length", "--walk"), ("power", "--power"),
           ("precision", "--precision")]


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _options(cfg: Any, default: Any, table: list[tuple[str, str]],
             special: dict[str, str] | None = None, skip: set[str] = frozenset(),
             always: set[str] = frozenset({"name", "data.name"})) -> list[str]:
    """Options for every field of ``cfg`` that differs from ``default`` (and ``always``
    those); ValueError for a differing field without an option."""
    special = special or {}
    covered = {f for f, _ in table} | set(special) | set(skip)
    _check_covered(cfg, default, covered, "")
    out = []
    for dotted, flag in table:
        if dotted in skip:
            continue
        value = _get(cfg, dotted)
        if value != _get(default, dotted) or dotted in always:
            text = special.get(dotted) or (_text(value) if value is not None else "none")
            out += [flag, text]
    return out


def _check_covered(cfg: Any, default: Any, covered: set[str], prefix: str) -> None:
    for f in dataclasses.fields(cfg):
        name = prefix + f.name
        value, ref = getattr(cfg, f.name), getattr(default, f.name)
        if name in covered or value == ref:
            continue
        if dataclasses.is_dataclass(value):
            _check_covered(value, ref, covered, name + ".")
        else:
            raise ValueError(f"{name}={value!r} has no command-line option")


def _join(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def train_command(cfg: ExperimentConfig) -> str:
    """``minefield train ...`` that trains ``cfg``."""
    special = {"poison.beta": "concat"} if cfg.poison.beta is None else {}
    return _join(["minefield", "train", *_options(cfg, ExperimentConfig(), _TRAIN, special)])


def search_command(run: str, cfg: SearchConfig) -> str:
    """``minefield search RUN ...`` that runs the search ``cfg``."""
    special = {"beta": "concat"} if cfg.beta is None else {}
    if cfg.train.milestones == ():
        special["train.milestones"] = ""
    words = _options(cfg, SearchConfig(), _SEARCH, special, skip={"isolate", "continue_poison"})
    return _join(["minefield", "search", run, *words, *([] if cfg.isolate else ["--no-isolate"]),
                  *([] if cfg.continue_poison else ["--no-continue-poison"])])


def embed_command(run: str, cfg: EmbedConfig, all_checkpoints: bool = False) -> str:
    """``minefield embed RUN ...`` that makes the embedding ``cfg``."""
    words = ["minefield", "embed", run, *_options(cfg, EmbedConfig(), _EMBED,
                                                  skip={"kernels_only"})]
    words += [] if cfg.kernels_only else ["--all-params"]
    return _join(words + (["--all-checkpoints"] if all_checkpoints else []))


def basin_command(run: str, cfg: VolumeConfig, tag: str = "default",
                  n_rollouts: int = 20) -> str:
    """``minefield basin RUN ...`` that measures ``cfg`` into ``basin/<tag>.json``."""
    words = ["minefield", "basin", run]
    if cfg.seed != cfg.directions.seed:
        raise ValueError("the CLI draws directions and bootstrap from one --seed")
    words += _options(cfg, VolumeConfig(), _VOLUME, skip={"seed", "directions.seed",
                                                         "cutoff_kind"})
    words += ["--relative"] if cfg.cutoff_kind.value == "relative" else []
    words += ["--seed", str(cfg.seed)] if cfg.seed else []
    words += ["--rollouts", str(n_rollouts)] if n_rollouts != 20 else []
    return _join(words + (["--tag", tag] if tag != "default" else []))


def sweep_command(base: ExperimentConfig, sweep: SweepConfig) -> str:
    """``minefield sweep ...`` that runs the poison-factor study ``sweep`` on ``base``."""
    words = ["minefield", "sweep", *_options(base, ExperimentConfig(), _TRAIN, skip=_SWEEP_SKIP)]
    words += ["--betas", _text(sweep.betas), "--seeds", _text(sweep.seeds)]
    if sweep.sharpness is not None:  # the CLI offers the measures at default settings
        if sweep.sharpness != SharpnessConfig(measures=sweep.sharpness.measures):
            raise ValueError("sweep.sharpness settings other than the measures have no "
                             "command-line option")
        words += ["--measures", _text(sweep.sharpness.measures)]
    vol, ref = sweep.volume, SweepConfig().volume
    _check_covered(vol, ref, {"volume.n_directions", "volume.cutoff", "volume.rtol"}, "volume.")
    for field, flag in (("n_directions", "--directions"), ("cutoff", "--cutoff"),
                        ("rtol", "--rtol")):
        if getattr(vol, field) != getattr(ref, field):
            words += [flag, _text(getattr(vol, field))]
    return _join(words)
