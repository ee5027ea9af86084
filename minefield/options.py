"""Every fixed option set of minefield, as ``str, Enum`` in one place.

A string and its enum member always mean the same thing: configs coerce
strings to members at construction (an unknown string raises
:class:`ConfigError` naming the field and the choices), and functions that take an option call
:func:`option` on it. Compare members with ``is`` only after that coercion.

Example::

    >>> Optimizer("sgd") is Optimizer.SGD
    True
    >>> option(Grid, "cubic", "grid")
    Traceback (most recent call last):
    ...
    minefield.options.ConfigError: grid: 'cubic' is not one of power, linear
"""

from __future__ import annotations

import enum
import numbers
from typing import Any

__all__ = ["ConfigError", "option", "choices", "Optimizer", "PoisonObjective", "StopRule",
           "CutoffKind", "RadiusMethod", "Grid", "DirectionKind", "BiasPolicy", "BNPolicy",
           "EnginePath", "Init", "Activation", "Split", "EmbedCheckpoints", "Estimator",
           "CurvatureKind", "ExecutorKind", "SamKind", "Precision"]


class ConfigError(ValueError):
    """A config that cannot be used: wrong key, wrong type, out-of-range value or an
    option outside its set (re-exported by :mod:`minefield.config`)."""


def integers(**values: Any) -> None:
    """ConfigError unless every value is an integer (not a bool): ``k=2.5`` had failed
    deep inside torch. Ranges are each caller's to check.

    >>> integers(k=2, n_iter=80)
    >>> integers(k=2.5)
    Traceback (most recent call last):
    ...
    minefield.options.ConfigError: k must be an integer, got 2.5
    """
    for name, v in values.items():
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):  # numpy's too
            raise ConfigError(f"{name} must be an integer, got {v!r}")


def choices(cls: type[enum.Enum]) -> list[str]:
    """The values of an option set, in definition order (for ``click.Choice``)."""
    return [m.value for m in cls]


def option(cls: type[enum.Enum], value: Any, what: str):
    """``cls(value)``, or a :class:`ConfigError` naming ``what`` and the allowed values."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not one of "
                          f"{', '.join(choices(cls))}") from None


class Optimizer(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    RMSPROP = "rmsprop"


class SamKind(str, enum.Enum):
    """Sharpness-aware training (:mod:`minefield.sam`): none, SAM, or adaptive ASAM."""

    NONE = "none"
    SAM = "sam"
    ASAM = "asam"


class PoisonObjective(str, enum.Enum):
    """How poison points enter the loss.

    ``complement``: the paper's final form, ``-log(1 - p(y|x))`` on true labels.
    ``flip``: the authors' code for Fig. 1, cross-entropy on a flipped label
    (binary: identical to ``complement``; K classes: the next class, ``(y+1) % K``).
    """

    COMPLEMENT = "complement"
    FLIP = "flip"


class StopRule(str, enum.Enum):
    """``fixed``: every search runs ``steps`` steps (the paper). ``target``: stop early."""

    FIXED = "fixed"
    TARGET = "target"


class CutoffKind(str, enum.Enum):
    ABS = "abs"  # the loss level itself (1.0: the paper's swiss-roll cutoff; 0.1: [D])
    RELATIVE = "relative"  # k x the centre's loss


class RadiusMethod(str, enum.Enum):
    BISECT = "bisect"
    GRID = "grid"


class Grid(str, enum.Enum):
    """Spacing of the ``grid`` radius scan: ``t = r_max u^p`` (the paper's u^5) or linear."""

    POWER = "power"
    LINEAR = "linear"


class DirectionKind(str, enum.Enum):
    FILTER = "filter"
    LAYER = "layer"
    GAUSSIAN = "gaussian"


class BiasPolicy(str, enum.Enum):
    ZERO = "zero"
    INCLUDE = "include"
    EXCLUDE = "exclude"


class BNPolicy(str, enum.Enum):
    """BatchNorm while evaluating perturbed points: the centre's running stats, or each
    point's own batch statistics."""

    EVAL = "eval"
    BATCH = "batch"

    @classmethod
    def of(cls, value: Any) -> BNPolicy:
        """``value`` as a policy, or a :class:`ConfigError` naming the allowed ones."""
        return option(cls, value, "BatchNorm policy")


class EnginePath(str, enum.Enum):
    """How the engine batches points (:mod:`minefield.engine`). ``probe``: the fastest
    of the paths below by a cached timing probe (:mod:`minefield.autotune`); ``auto``:
    the probe on CUDA, and on a CPU a fixed rule measured by ``benchmarks/bench_real.py``
    (plain MLPs ``mlp``; conv nets ``loop_cl`` with BatchNorm and ``loop`` without;
    others ``vmap``), so that the same seed gives the same numbers whatever the
    machine's load (paths agree only to rounding); or force one: ``mlp`` (batched
    matmuls, plain MLPs), ``vmap`` (every point of a chunk in one call), ``loop`` (one
    point at a time on the whole data batch), ``loop_cl`` (``loop`` with channels_last
    images)."""

    AUTO = "auto"
    PROBE = "probe"
    MLP = "mlp"
    VMAP = "vmap"
    LOOP = "loop"
    LOOP_CL = "loop_cl"


class Precision(str, enum.Enum):
    """Arithmetic of an engine evaluation: ``float32`` (the parameters' own dtype, exact
    reference), ``bf16`` (autocast to bfloat16) or ``tf32`` (TF32 matmuls and convolutions
    on CUDA; on a CPU the same as ``float32``)."""

    FLOAT32 = "float32"
    BF16 = "bf16"
    TF32 = "tf32"


class Init(str, enum.Enum):
    GLOROT_NORMAL = "glorot_normal"
    GLOROT_UNIFORM = "glorot_uniform"
    HE_NORMAL = "he_normal"
    TORCH = "torch"


class Activation(str, enum.Enum):
    RELU = "relu"
    TANH = "tanh"
    LEAKY_RELU = "leaky_relu"


class Split(str, enum.Enum):
    TRAIN = "train"
    TEST = "test"
    POISON = "poison"


class EmbedCheckpoints(str, enum.Enum):
    """Which trajectory checkpoints an embedding shows: the searched ones, or all."""

    SEARCHED = "searched"
    ALL = "all"


class Estimator(str, enum.Enum):
    """Basin-volume estimator (:mod:`minefield.volume`, :mod:`minefield.cooling`)."""

    NAIVE = "naive"
    IS = "is"
    MCMC = "mcmc"
    GAUSSIAN = "gaussian"


class CurvatureKind(str, enum.Enum):
    """Curvature that preconditions importance-sampled directions (:mod:`minefield.netvolume`)."""

    NONE = "none"
    HESSIAN = "hessian"
    HUTCHINSON = "hutchinson"
    AXES = "axes"
    GIVEN = "given"  # a diagonal passed in (Adam's second moments, a Fisher diagonal)


class ExecutorKind(str, enum.Enum):
    """Where the tasks of a multi-task stage run (:mod:`minefield.executor`)."""

    LOCAL = "local"
    RAY = "ray"
