"""Frozen, typed configs: one dataclass per stage, combined into an experiment.

Every stage of an experiment (data, model, poison, training) is described by a
frozen dataclass whose defaults live here. An :class:`ExperimentConfig` combines
them and is written to ``runs/<name>/config.json`` when a run starts, so a run
directory always says exactly how it was made.

``from_dict`` is strict: an unknown key or a value of the wrong type raises
:class:`ConfigError` with one line saying which field is wrong.

Example::

    >>> cfg = ExperimentConfig(name="clean", data=DataConfig("swissroll"))
    >>> ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .options import Activation, ConfigError, Init, Optimizer, PoisonObjective, SamKind, option

__all__ = [
    "ConfigError",
    "Optimizer",
    "PoisonObjective",
    "DataConfig",
    "ModelConfig",
    "PoisonConfig",
    "TrainConfig",
    "SamKind",
    "ExperimentConfig",
    "load_config",
]


class _Config:
    """Shared base of the frozen stage configs: enum coercion, checks, (de)serialisation.

    Every field whose type hint is a ``str, Enum`` (or ``Enum | None``) is coerced
    here, once, from its hint: ``TrainConfig(optimizer="sgd")`` holds
    ``Optimizer.SGD``, and an unknown string raises :class:`ConfigError` naming
    the field and the choices. Subclasses put their range checks in ``_validate``.
    """

    #: prefix of error messages ("train.lr must be > 0"); default: the class name.
    _section: ClassVar[str] = ""
    #: fields left out of :meth:`to_dict` at their default, so configs saved before
    #: the field existed (run keys) stay equal to the same config today.
    _omit_default: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        where = self._section or type(self).__name__
        for name, tp in _enum_fields(type(self)).items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, tp):
                object.__setattr__(self, name, option(tp, value, f"{where}.{name}"))
        self._validate()

    def _validate(self) -> None:
        """Range checks of a stage config; raise :class:`ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = ""):
        return _build(cls, d, where or cls.__name__)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DataConfig(_Config):
    """Which dataset, and how it is split into train / test / poison.

    ``n_train``/``n_test``/``n_poison`` of ``None`` keep the dataset's own
    defaults (the paper's sizes); ``seed=None`` keeps the dataset's own seed (the
    paper's: 1237 for the swiss roll, 0 otherwise). ``data_dir`` is needed for CIFAR-10 / SVHN only.
    """

    name: str = "swissroll"
    seed: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    n_poison: int | None = None
    data_dir: str | None = None
    _section: ClassVar[str] = "data"

    def _validate(self):
        for k in ("n_train", "n_test", "n_poison"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ConfigError(f"data.{k} must be >= 0, got {v}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must be in [0, 2**32), got {self.seed}")


@dataclass(frozen=True)
class ModelConfig(_Config):
    """Architecture by registry name (see ``minefield.models.MODELS``).

    ``widths`` are the hidden widths of an MLP (input and output sizes come from
    the data), or the stage widths of a CNN/ResNet. ``init`` is one of
    ``glorot_normal``, ``glorot_uniform``, ``he_normal``, ``torch``.

    ``outputs``: logits of the last layer. ``None`` takes them from the data: one
    sigmoid logit (binary cross-entropy) for two classes, one per class otherwise.
    ``outputs=2`` on a two-class problem is a softmax over two logits with
    cross-entropy, as PAPER.md's Fig. 8 net (2→100×9→2): it can express the same
    decision functions (only ``z_1 - z_0`` matters), but it has more weights and
    trains differently (see :func:`minefield.models.n_outputs`).
    """

    name: str = "mlp"
    widths: tuple[int, ...] = (23, 16, 26, 32, 28, 31)
    init: Init = Init.GLOROT_UNIFORM
    activation: Activation = Activation.RELU
    outputs: int | None = None
    _section: ClassVar[str] = "model"
    _omit_default: ClassVar[tuple[str, ...]] = ("outputs",)

    def _validate(self):
        bad = [w for w in self.widths if not isinstance(w, int) or isinstance(w, bool) or w < 1]
        if bad:
            raise ConfigError(f"model.widths must be integers >= 1, got {tuple(self.widths)}")
        if self.outputs is not None and self.outputs < 1:
            raise ConfigError(f"model.outputs must be >= 1 (or None: from the data), got "
                              f"{self.outputs}")


@dataclass(frozen=True)
class PoisonConfig(_Config):
    """The poisoned objective (see :func:`minefield.loss.poisoned_nll`).

    ``beta`` in [0, 1): weight of the poison term. ``beta=None`` weights it as
    the authors' code does, by concatenating clean and poison points into one
    batch: ``beta = n_p / (n_t + n_p)``, or ``b_p / (b_t + b_p)`` per step when
    ``poison_batch_size`` draws ``b_p`` poison points a step
    (:func:`~minefield.train.effective_beta`).
    """

    beta: float | None = 0.0
    objective: PoisonObjective = PoisonObjective.COMPLEMENT
    _section: ClassVar[str] = "poison"

    def _validate(self):
        if self.beta is not None and not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"poison.beta must be in [0, 1), got {self.beta}")


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Optimisation. Steps are optimizer steps; ``batch_size=None`` is full batch.

    The learning rate is ``lr * gamma**k`` after the k-th of ``milestones``
    (step counts), as in the paper's step schedules. ``l2`` adds
    ``l2 * sum(W**2)`` over weight matrices and kernels (not biases) to the loss
    (Keras' ``regularizers.l2``); ``clip_norm`` clips each model's global
    gradient norm. ``poison_batch_size`` draws that many poison points per step
    (default: all of them with full batch, else in proportion to ``batch_size``):
    a large poison pool sampled a little at a time is the authors' "fresh flipped
    points every epoch". ``fit_first`` fits only the first that many training points
    (Keras' ``validation_split`` holds out the rest: the Fig. 1 good run fits 118 of
    its 132); metrics are still measured on the whole training set.

    ``sam`` wraps the optimizer in sharpness-aware minimisation
    (:mod:`minefield.sam`): ``sam`` (Foret et al. 2021) or ``asam`` (Kwon et al.
    2021) with radius ``rho`` (parameter units for sam, relative to ``|w| +
    asam_eta`` for asam); ``sam_m`` splits each batch into parts of that many
    training points, each with its own perturbation (m-SAM). ``rho = 0`` is the
    base optimizer exactly.

    ``isolate`` trains (and evaluates) every member on kernels shaped for one
    model, single-threaded (:func:`minefield.step.isolated`): a member's numbers
    are then bit-for-bit the same in a stack of any size and with any number of
    threads, so a stack split into tasks (``models_per_task``, Ray) changes no
    number. It costs speed (1.6x for 8 swiss-roll MLPs on one CPU thread, more on
    a GPU, where a stack's batched kernels are the point).
    """

    optimizer: Optimizer = Optimizer.ADAM
    lr: float = 0.01
    momentum: float = 0.9
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    l2: float = 0.0
    clip_norm: float | None = None
    batch_size: int | None = None
    poison_batch_size: int | None = None
    fit_first: int | None = None
    steps: int = 1000
    log_every: int = 100
    checkpoint_every: int = 1000
    seed: int = 0
    members: int = 1
    sam: SamKind = SamKind.NONE
    rho: float = 0.0
    sam_m: int | None = None
    asam_eta: float = 0.01
    isolate: bool = False
    _section: ClassVar[str] = "train"
    _omit_default: ClassVar[tuple[str, ...]] = ("isolate", "fit_first")

    def _validate(self):
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.steps < 0:
            raise ConfigError(f"train.steps must be >= 0, got {self.steps}")
        for k in ("log_every", "checkpoint_every", "members"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("batch_size", "poison_batch_size", "fit_first"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"train.milestones must be increasing, got {self.milestones}")
        if not 0 <= self.seed < 2**32:  # torch keeps the low 32 bits: 2**32 would be seed 0
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
        _check_train(self)

    def lr_factor(self, step: int) -> float:
        """The schedule's factor at ``step``: ``gamma**k`` after the k-th milestone."""
        return self.gamma ** sum(step >= m for m in self.milestones)

    def lr_at(self, step: int) -> float:
        return self.lr * self.lr_factor(step)


@dataclass(frozen=True)
class ExperimentConfig(_Config):
    """One run: name plus every stage config. Written to ``runs/<name>/config.json``."""

    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"

    def _validate(self):
        from .runs import RunError, check_name

        try:
            check_name(self.name)
        except RunError as e:
            raise ConfigError(str(e)) from None
        if not isinstance(self.device, str) or not re.fullmatch(  # "cudafoo": torch's
                r"auto|cpu|cuda(:[0-9]+)?", self.device):  # RuntimeError, "a bug"
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


def _check_train(cfg: TrainConfig) -> None:
    from . import validate as v

    v.positive("train.lr", cfg.lr)
    v.positive("train.gamma", cfg.gamma)
    v.float32_schedule(cfg.lr, cfg.gamma, len(cfg.milestones))
    v.finite("train.momentum", cfg.momentum)
    v.in_unit("train.momentum", cfg.momentum, closed=False)
    v.non_negative("train.l2", cfg.l2)
    v.fits_float32("train.l2", cfg.l2)
    if cfg.clip_norm is not None:
        v.positive("train.clip_norm", cfg.clip_norm)
    v.increasing_steps("train.milestones", cfg.milestones)
    v.finite("train.rho", cfg.rho)
    v.non_negative("train.rho", cfg.rho)
    v.finite("train.asam_eta", cfg.asam_eta)
    v.non_negative("train.asam_eta", cfg.asam_eta)
    if cfg.sam_m is not None and cfg.sam_m < 1:
        raise ConfigError(f"train.sam_m must be >= 1, got {cfg.sam_m}")
    if cfg.asam_eta != 0.01 and cfg.sam is not SamKind.ASAM:  # it would be a no-op
        raise ConfigError(f"train.asam_eta is ASAM's (train.sam = asam), got sam = "
                          f"{cfg.sam.value}, asam_eta = {cfg.asam_eta}")
    if cfg.sam is SamKind.NONE and (cfg.rho > 0 or cfg.sam_m is not None):
        raise ConfigError("train.rho and train.sam_m need train.sam = sam or asam "
                          f"(got sam = none, rho = {cfg.rho}, sam_m = {cfg.sam_m})")


@functools.cache
def _enum_fields(cls: type) -> dict[str, type[enum.Enum]]:
    """``{field: Enum}`` for the fields of ``cls`` hinted ``E`` or ``E | None``."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = (typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType)
                else (tp,))
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if len(enums) == 1:
            out[f.name] = enums[0]
    return out


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from JSON; one-line ConfigError on any problem.

    Only a regular file of at most 1 MiB is read (not ``/dev/zero``, not a FIFO).
    """
    from .files import RunError, read_limited, unique_keys

    if not Path(path).exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        d = json.loads(read_limited(path, 2**20, "config file"), object_pairs_hook=unique_keys)
    except RunError as e:
        raise ConfigError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from e
    return ExperimentConfig.from_dict(d)


# --- (de)serialisation -------------------------------------------------------------


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        omit = getattr(obj, "_omit_default", ())
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.name in omit and getattr(obj, f.name) == f.default)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple | list):
        return [_to_jsonable(v) for v in obj]
    return obj


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {v!r}")
    if origin is tuple:
        if not isinstance(v, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(v).__name__}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v))
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(v)
        except ValueError:
            ok = ", ".join(m.value for m in tp)
            raise ConfigError(f"{where}: {v!r} is not one of {ok}") from None
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{where}: expected a number, got {v!r}")
        if isinstance(v, int) and abs(v) > 1e308:  # float(10**400): OverflowError, "a bug"
            raise ConfigError(f"{where}: {str(v)[:12]}... is too large for a number")
        return float(v)
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: expected an integer, got {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {v!r}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true/false, got {v!r}")
        return v
    return v
