"""Studies: a grid (or list) of configs -> stacks of models -> one tidy table.

A study varies any fields of an :class:`~minefield.config.ExperimentConfig`,
named by their dotted path (``train.lr``, ``train.batch_size``,
``model.widths``, ``train.optimizer``, ``poison.beta``, ``train.l2``,
``train.seed``, ``train.steps``, ...). :func:`plan_study` turns the grid into
*stacks*: models that share everything except the fields in :data:`STACKABLE`
train together as one stack (:func:`minefield.train.fit`), one run each; values
of ``train.steps`` are checkpoints of one trajectory, not separate trainings
(a run trained to the largest value is measured at every asked step: the
parameters at step s do not depend on how long the run continues).

Each stack is a :class:`StackSpec`, the unit of work of
:func:`minefield.stages.study.run_stack`; the table, the scores of every
measure against the generalization gap (:mod:`minefield.ranking`) and the
figures come from :func:`minefield.stages.study_run`.

*Stacked seeds*: ``train.seed`` stacked sets each member's **init** seed; the
minibatch order of a stack comes from the base config's ``train.seed``, the
same for all members (as in the poison sweep).

Example::

    >>> from minefield import DataConfig, ExperimentConfig
    >>> base = ExperimentConfig(name="lr-bs", data=DataConfig("digits"))
    >>> plan = plan_study(base, StudyConfig(grid={"train.batch_size": [16, 64],
    ...                                          "train.seed": [0, 1, 2]}))
    >>> len(plan.stacks), [len(s.members) for s in plan.stacks]
    (2, [3, 3])
    >>> plan_study(base, StudyConfig(grid={"train.lrr": [0.1]}))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    minefield.options.ConfigError: study: unknown field 'train.lrr' (did you mean train.lr?)...
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .basin import VolumeConfig
from .config import ConfigError, ExperimentConfig, _coerce, _Config
from .measures import SharpnessConfig, check_measurable

__all__ = ["STACKABLE", "TRAJECTORY", "REPLICATES", "StudyConfig", "StackSpec", "StudyPlan",
           "plan_study", "field_value", "with_field", "MAX_CHECKPOINTS", "check_sharpness"]

#: Fields that may differ between the members of one stack, and the keyword of
#: :func:`minefield.stages.train_run` that takes their per-member values. Adding a
#: field here (once ``train_run`` takes it per member) is all a study needs.
STACKABLE: dict[str, str] = {
    "train.seed": "seeds",
    "poison.beta": "betas",
    "train.l2": "l2s",
    "train.lr": "lrs",
    "train.rho": "rhos",
}

#: The field whose values are checkpoints along one trajectory.
TRAJECTORY = "train.steps"

#: Fields that only replicate a model (held fixed, not an axis, in the granulated tau).
REPLICATES = ("train.seed", "data.seed")

#: Most checkpoints a trajectory study may write per stack (max step / gcd of the steps).
MAX_CHECKPOINTS = 2000

_SECTIONS = ("data", "model", "poison", "train")
_MANAGED = ("train.members", "train.checkpoint_every", "train.log_every")


def _all_fields() -> dict[str, Any]:
    """``{"train.lr": float, ...}``: every settable field with its type hint."""
    hints = typing.get_type_hints(ExperimentConfig)
    out = {}
    for s in _SECTIONS:
        cls = hints[s]
        sub = typing.get_type_hints(cls)
        out.update({f"{s}.{f.name}": sub[f.name] for f in dataclasses.fields(cls)
                    if f"{s}.{f.name}" not in _MANAGED})
    return out


def field_value(cfg: ExperimentConfig, path: str) -> Any:
    """The value of dotted field ``path`` (``"train.lr"``) of ``cfg``."""
    section, name = path.split(".", 1)
    return getattr(getattr(cfg, section), name)


def with_field(cfg: ExperimentConfig, path: str, value: Any) -> ExperimentConfig:
    """``cfg`` with dotted field ``path`` set to ``value`` (checked like any config)."""
    section, name = path.split(".", 1)
    return cfg.replace(**{section: getattr(cfg, section).replace(**{name: value})})


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v.value if hasattr(v, "value") else v))


@dataclass(frozen=True)
class StudyConfig(_Config):
    """What a study varies and how each model is measured.

    ``grid``: ``{field: [values]}``, every combination (a product); ``points``: a
    list of ``{field: value}`` (every point names the same fields), e.g. optimizers
    with their own settings; both: every point with every grid combination. ``volume``:
    the basin radius and volume estimate (:mod:`minefield.basin`); ``sharpness``:
    the curvature / sharpness columns (:mod:`minefield.measures`; ``None``: none);
    ``target``: the column the measures are ranked against (``gap``: train minus
    test accuracy; ``loss_gap``: test minus train loss).
    """

    grid: dict[str, list] = field(default_factory=dict)
    points: tuple[dict, ...] = ()
    volume: VolumeConfig = field(default_factory=lambda: VolumeConfig(n_directions=100))
    sharpness: SharpnessConfig | None = None
    target: str = "gap"
    _section: ClassVar[str] = "study"

    def _validate(self):
        if not isinstance(self.grid, dict):
            raise ConfigError(f"study.grid must be an object {{field: [values]}}, got "
                              f"{type(self.grid).__name__}")
        if not self.grid and not self.points:
            raise ConfigError("study: the grid is empty (vary at least one field)")
        for k, v in self.grid.items():
            if not isinstance(v, list | tuple) or not v:
                raise ConfigError(f"study: field {k!r} needs a non-empty list of values, got "
                                  f"{v!r}")
        if self.points:
            names = [sorted(p) if isinstance(p, dict) else None for p in self.points]
            if any(n is None or not n for n in names) or any(n != names[0] for n in names):
                raise ConfigError("study.points must be non-empty objects that all name the "
                                  "same fields")
            both = sorted(set(names[0]) & set(self.grid))
            if both:
                raise ConfigError(f"study: {', '.join(both)} is in both the points and the grid")
        if self.target not in ("gap", "loss_gap"):
            raise ConfigError(f"study.target must be 'gap' or 'loss_gap', got {self.target!r}")

    def design(self) -> list[str]:
        """The varied fields, in the order given (the points' first)."""
        return (list(self.points[0]) if self.points else []) + list(self.grid)


@dataclass(frozen=True)
class StackSpec:
    """One unit of work: a stack of members trained as one run, measured at ``steps``.

    ``config`` is the run's config (``train.members`` = number of members,
    ``train.steps`` = the last of ``steps``); ``members[i]`` holds member i's value of
    every :data:`STACKABLE` field. Plain data: it travels to another process as JSON
    (:meth:`to_dict` / :meth:`from_dict`).
    """

    name: str
    config: ExperimentConfig
    members: tuple[dict[str, Any], ...]
    steps: tuple[int, ...]
    volume: VolumeConfig
    sharpness: SharpnessConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config.to_dict(),
                "members": [dict(m) for m in self.members], "steps": list(self.steps),
                "volume": self.volume.to_dict(),
                "sharpness": None if self.sharpness is None else self.sharpness.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackSpec:
        return cls(d["name"], ExperimentConfig.from_dict(d["config"]),
                   tuple(d["members"]), tuple(d["steps"]), VolumeConfig.from_dict(d["volume"]),
                   None if d["sharpness"] is None else SharpnessConfig.from_dict(d["sharpness"]))

    def train_kwargs(self) -> dict[str, list]:
        """Per-member keywords of :func:`~minefield.stages.train_run` (see :data:`STACKABLE`)."""
        return {kw: [m[f] for m in self.members] for f, kw in STACKABLE.items()}

    def design(self, member: int, step: int, fields: list[str]) -> dict[str, Any]:
        """Model (member, step)'s value of each design field."""
        cfg = with_field(self.config, TRAJECTORY, step) if TRAJECTORY in fields else self.config
        return {f: self.members[member][f] if f in STACKABLE else
                _jsonable(field_value(cfg, f)) for f in fields}


@dataclass(frozen=True)
class StudyPlan:
    """The stacks of a study and its points (each a ``{field: value}`` to report)."""

    stacks: list[StackSpec]
    points: list[dict[str, Any]]
    design: list[str]


def _check_field(path: str, known: dict[str, Any]) -> None:
    if path in known:
        return
    if path in _MANAGED:
        raise ConfigError(f"study: {path} is set by the study itself and cannot be varied")
    close = difflib.get_close_matches(path, list(known), n=1, cutoff=0.6)
    if not close and "." not in path:
        close = [k for k in known if k.endswith("." + path)][:2]
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConfigError(f"study: unknown field {path!r}{hint}; fields are "
                      f"{', '.join(sorted(known))}")


def _points(study: StudyConfig, known: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's points with every value type-checked (``ConfigError`` naming it)."""
    fields = study.design()
    for f in fields:
        _check_field(f, known)
    points = [dict(p) for p in study.points] or [{}]
    for i, p in enumerate(points):
        points[i] = {f: _coerce(known[f], v, f"study: point {i}, {f}") for f, v in p.items()}
    grid = {f: [_coerce(known[f], v, f"study: {f}") for v in vs] for f, vs in study.grid.items()}
    out = [{**p, **dict(zip(grid, combo))} for p in points
           for combo in itertools.product(*grid.values())]
    keys = [json.dumps(_jsonable_point(p), sort_keys=True) for p in out]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"study: the point {dup} appears more than once")
    return out


def _jsonable_point(p: dict[str, Any]) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in p.items()}


def _stack_name(cfg: ExperimentConfig, members: list[dict], steps: list[int],
                fields: list[str]) -> str:
    """A readable, unique run name: the stack's non-stacked values and a hash of all."""
    label = "_".join(f"{f.split('.', 1)[1]}-{json.dumps(_jsonable(field_value(cfg, f)))}"
                     for f in fields if f not in STACKABLE and f != TRAJECTORY)
    label = "".join(c if c.isalnum() or c in "._-" else "" for c in label)[:60] or "stack"
    digest = hashlib.sha1(json.dumps([cfg.to_dict(), members, steps], sort_keys=True)
                          .encode()).hexdigest()[:8]
    return f"{label}-{digest}"


def _apply(base: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """``base`` with all of ``point``'s fields set at once, so the point is checked as the
    config it is (``{"train.sam": "none", "train.rho": 0.0}`` on a SAM base is valid in
    any order; set one at a time, ``sam = none`` beside the base's ``rho`` was refused)."""
    changes: dict[str, dict[str, Any]] = {}
    for f, v in point.items():
        section, name = f.split(".", 1)
        changes.setdefault(section, {})[name] = v
    try:
        return base.replace(**{s: getattr(base, s).replace(**c) for s, c in changes.items()})
    except ConfigError as e:
        raise ConfigError(f"study: the point {json.dumps(_jsonable_point(point))} is not a "
                          f"valid config: {e}") from None


def _shared(cfg: ExperimentConfig, base: ExperimentConfig) -> ExperimentConfig:
    """The stack's run config from one member's ``cfg``: every :data:`STACKABLE` field at
    ``base``'s value (members get their own; ``train.seed`` is the stack's minibatch
    order) and ``base``'s steps. A base value the stack's own settings refuse (a base
    ``rho`` > 0 in a stack of ``sam = none``, whose members all have ``rho`` = 0) is
    left at the member's value."""
    shared = cfg
    for f in (*STACKABLE, TRAJECTORY):
        try:
            shared = with_field(shared, f, field_value(base, f))
        except ConfigError:
            pass
    return shared


def _split(groups, per: int | None):
    """Each ``(config, members, steps)`` group as groups of at most ``per`` members."""
    for shared, members, steps in groups:
        if per is None or per >= len(members):
            yield shared, members, steps
            continue
        if not shared.train.isolate:
            raise ConfigError(f"models_per_task={per} splits a stack of {len(members)} "
                              "models, which changes how their numbers round; isolate the "
                              "members (train.isolate, --isolate) to split it")
        for a in range(0, len(members), per):
            yield shared, members[a:a + per], steps


def check_sharpness(cfg: ExperimentConfig, sharpness: SharpnessConfig | None) -> None:
    """Refuse, before any training, measures ``cfg``'s training set cannot give
    (:func:`~minefield.measures.check_measurable`: ``m_sharpness`` needs ``m <= N``)."""
    if sharpness is None or "m_sharpness" not in sharpness.measures:
        return
    n = cfg.data.n_train
    if n is None:  # the dataset's own size
        from .data import load_dataset

        n = len(load_dataset(cfg.data).y_train)
    check_measurable(sharpness, n)


def plan_study(base: ExperimentConfig, study: StudyConfig,
               models_per_task: int | None = None) -> StudyPlan:
    """Check every field and value of ``study`` against ``base`` and group the points
    into stacks. Nothing is trained or written.

    ``models_per_task`` splits every stack into stacks (tasks) of at most that many
    members, in order. A split stack trains other kernels, so it needs isolated
    members (``train.isolate``): then every split gives the unsplit numbers.

    Raises:
        ConfigError: an unknown field, a value of the wrong type or out of range
            (checked by building its config), a repeated point, a trajectory whose
            steps would need more than :data:`MAX_CHECKPOINTS` checkpoints, a
            split of a stack whose members are not isolated, or measures a stack's
            training set cannot give (:func:`check_sharpness`).
    """
    if models_per_task is not None and models_per_task < 1:
        raise ConfigError(f"models_per_task must be >= 1, got {models_per_task}")
    known = _all_fields()
    # one spelling per value (as a config file gives it): gamma=1 and gamma=1.0 named two
    # stacks (a rerun retrained the other's models)
    base = ExperimentConfig.from_dict(base.to_dict())
    fields = study.design()
    points = _points(study, known)
    groups: dict[str, tuple[ExperimentConfig, list[dict], list[int]]] = {}
    for p in points:
        cfg = _apply(base, p)
        member = {f: _jsonable(field_value(cfg, f)) for f in STACKABLE}
        step = cfg.train.steps
        d = cfg.to_dict()
        for f in (*STACKABLE, TRAJECTORY):  # a stack: the same config but for these
            section, name = f.split(".", 1)
            del d[section][name]
        key = json.dumps(d, sort_keys=True)
        if key not in groups:
            groups[key] = (_shared(cfg, base), [], [])
        _, members, steps = groups[key]
        if member not in members:
            members.append(member)
        if step not in steps:
            steps.append(step)
    stacks = []
    for shared, members, steps in _split(groups.values(), models_per_task):
        steps = sorted(steps)
        train = shared.train.replace(members=len(members), steps=steps[-1])
        if len(steps) > 1:
            every = math.gcd(*steps)
            if steps[-1] // every > MAX_CHECKPOINTS:
                shown = steps if len(steps) <= 6 else [*steps[:3], "...", *steps[-2:]]
                raise ConfigError(f"study: the {len(steps)} steps [{', '.join(map(str, shown))}]"
                                  f" need a checkpoint every {every} "
                                  f"steps ({steps[-1] // every} checkpoints, more than "
                                  f"{MAX_CHECKPOINTS}); use steps with a larger common divisor")
            train = train.replace(checkpoint_every=every)
        cfg = shared.replace(train=train)
        check_sharpness(cfg, study.sharpness)
        name = _stack_name(cfg, members, steps, fields)
        stacks.append(StackSpec(name, cfg.replace(name=name), tuple(members), tuple(steps),
                                study.volume, study.sharpness))
    return StudyPlan(stacks, [_jsonable_point(p) for p in points], fields)
