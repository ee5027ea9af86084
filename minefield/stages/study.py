"""``minefield study`` as one call: plan -> one task per stack -> tidy table -> scores.

Layout of a study ``runs/<name>/``::

    config.json       {"kind": "study", "base": ExperimentConfig, "study": StudyConfig}
    stacks/<stack>/   one ordinary run per stack (config, trajectory, summary), plus
                      models.json: every (member, step)'s metrics, basin and measures
    study.csv         the tidy table, one row per model (pandas.read_csv reads it)
    scores.csv        one row per measure: Kendall tau, granulated tau, CMI vs the gap
    study.json        both, keyed by the study config

Each stack is one independent task, :func:`run_stack` (``spec, root -> files``):
it trains (or resumes) its run and writes ``models.json`` atomically, after
every measured checkpoint, so a killed study resumes where it stopped.
:func:`run_stacks` is the whole local execution loop; ``study_run(...,
executor=mf.make_executor("ray", ...))`` (:mod:`minefield.executor`) spreads the
stacks over Ray workers instead (each worker writes its stack's run itself, so on a
cluster ``--root`` must be a shared file system), and ``run_all=`` takes any
callable of the list of specs and the stacks' root.

Example (skipped by doctest: minutes)::

    >>> from minefield import DataConfig, ExperimentConfig, StudyConfig
    >>> res = study_run(ExperimentConfig(name="lr", data=DataConfig("digits")),
    ...                 StudyConfig(grid={"train.lr": [0.001, 0.01], "train.seed": [0, 1]})
    ...                 )  # doctest: +SKIP
    >>> res.scores[0]["measure"], res.scores[0]["kendall_tau"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..basin import BasinResult, basin_members
from ..config import ExperimentConfig
from ..data import Dataset
from ..evaluate import evaluate_members, resolve_device
from ..executor import Executor, torch_threads
from ..functional import Params, alone, n_members, one
from ..lock import locking
from ..measures import SharpnessConfig, measure_members
from ..ranking import accuracy_gap, score_measures
from ..runs import DEFAULT_ROOT, Run, RunError, reading
from ..study import REPLICATES, StackSpec, StudyConfig, StudyPlan, plan_study
from ..train import TrainingDiverged
from .train import check_buildable, load_run_model, match_model, train_run

__all__ = ["FLATNESS", "MODELS_FILE", "STUDY_FILE", "StudyResult", "run_stack", "run_stacks",
           "stack_task", "stack_rows", "study_run", "load_study", "measure_columns",
           "measure_stack"]

MODELS_FILE = "models.json"
STUDY_FILE = "study.json"
_BASIN_COLUMNS = ("mean_radius", "median_radius", "log10_volume", "n_mean_log10_r")
#: Columns that grow as a minimum gets flatter (the others grow with sharpness or norm).
FLATNESS = (*_BASIN_COLUMNS, "pac_bayes_sigma", "pac_bayes_sigma_mag")
_NAN_COLUMNS = ("train_acc", "test_acc", "train_loss", "test_loss", "gap", "loss_gap")


@dataclass
class StudyResult:
    """The tidy table (one row per model), the score of every measure, where it is saved."""

    rows: list[dict[str, Any]]
    scores: list[dict[str, Any]]
    run: Run | None
    design: list[str]
    measures: list[str]
    target: str = "gap"

    def __post_init__(self):
        """A hand-edited ``study.json`` is one ValueError (a corrupt file in
        :func:`load_study`), not a KeyError in a figure or an empty ``<measure>.png``:
        every row has every design field, the target, the accuracies and every measure,
        as numbers (NaN allowed); every score names a measure and its taus."""
        need = [*self.design, "stack", "member", self.target, "train_acc", "test_acc",
                *self.measures]
        for i, row in enumerate(self.rows):
            gone = [k for k in need if k not in row]
            if gone:
                raise ValueError(f"row {i} has no {', '.join(map(str, gone))}")
            bad = [k for k in (self.target, "train_acc", "test_acc", *self.measures)
                   if not isinstance(row[k], int | float) or isinstance(row[k], bool)]
            if bad:
                raise ValueError(f"row {i}: {bad[0]} is {row[bad[0]]!r}, not a number")
        for s in self.scores:
            if not {"measure", "kendall_tau", "granulated_tau"} <= set(s):
                raise ValueError(f"a score has only {', '.join(map(str, s))}")


def _key(spec: StackSpec) -> dict[str, Any]:
    """The key of a stack's ``models.json``: how its models are measured. What they are
    (data, architecture, optimiser) is the run's own key, its ``config.json``
    (:func:`_same_models`); a stack's numbers need both to match."""
    return {"volume": spec.volume.to_dict(), "steps": list(spec.steps),
            "members": [dict(m) for m in spec.members],
            "sharpness": None if spec.sharpness is None else spec.sharpness.to_dict()}


@locking
def run_stack(spec: StackSpec | dict[str, Any], root: Path | str,
              progress: bool = False, force: bool = False, remeasure: bool = False) -> Path:
    """The task of one stack: train ``spec.config`` into ``root/spec.name`` (or resume
    it), then measure every member at every step of ``spec.steps``; returns the path of
    its ``models.json``. Pure in its inputs: the same spec gives the same file.

    Per step and member: ``evaluate_members`` (loss and accuracy on every split,
    weight norm), :func:`~minefield.basin.basin_members` with ``spec.volume`` and,
    when ``spec.sharpness`` is set, :func:`~minefield.measures.measure_members`.
    ``force`` retrains the run from scratch; ``remeasure`` keeps (or resumes) the trained
    run and measures it again, replacing ``models.json`` only when it is written. A
    member whose loss diverges is frozen while the others train on
    (:func:`~minefield.train.fit`); ``"diverged_at"`` in models.json records its step,
    from which on its rows in the table are NaN (the steps before are measured as
    usual); so too when all of them diverge
    (``"diverged"`` holds the message).
    """
    spec = spec if isinstance(spec, StackSpec) else StackSpec.from_dict(spec)
    with torch_threads(1 if spec.config.train.isolate else None):
        return _run_stack(spec, root, progress, force, remeasure)


def _run_stack(spec: StackSpec, root: Path | str, progress: bool, force: bool,
               remeasure: bool = False) -> Path:
    key = _key(spec)
    path = Path(root) / spec.name / MODELS_FILE
    if path.exists() and not (force or remeasure):  # a finished task does nothing
        run = Run.open(path.parent)
        with reading(path):
            saved = run.read_json(MODELS_FILE)
            if (saved["complete"] and saved["key"] == json.loads(json.dumps(key))
                    and _same_models(run, spec)):
                return path
        # else train_run resumes the run, or refuses another config without force
    try:
        res = train_run(spec.config, root, force=force, progress=progress,
                        **spec.train_kwargs())
        run, model, data, at = res.run, res.model, res.data, res.diverged_at
        div = {"diverged_at": at} if any(d is not None for d in at) else {}
    except TrainingDiverged as e:  # every member: the checkpoints before are still good
        run, model, data = Run.open(Path(root) / spec.name), None, None
        at = getattr(e, "diverged_at", None) or [getattr(e, "step", 0)] * len(spec.members)
        div = {"diverged": str(e), "diverged_at": at}
    done: dict[str, Any] = {}
    if run.resume(MODELS_FILE, key, remeasure):
        saved = run.read_json(MODELS_FILE)
        with reading(run.file(MODELS_FILE)):
            if saved["complete"]:
                return run.file(MODELS_FILE)
            done = dict(saved["steps"])
    for step in spec.steps:
        if str(step) in done or all(d is not None and step >= d for d in at):
            continue
        if model is None:
            model, _, _, data, _ = load_run_model(run, device=resolve_device(
                spec.config.device))
        # on the data's device: a checkpoint left on the CPU meets CUDA data in every forward
        ck = run.load_checkpoint(f"trajectory/step_{step:08d}.safetensors",
                                 data.x_train.device)
        params, buffers = match_model(model, ck)
        done[str(step)] = measure_stack(model, params, data, spec.volume,
                                        spec.sharpness, buffers or None,
                                        spec.config.train.isolate)
        run.write_result(MODELS_FILE, key, {"complete": False, "steps": done, **div})
    return run.write_result(MODELS_FILE, key, {"complete": True, "steps": done, **div})


def _same_models(run: Run, spec: StackSpec) -> bool:
    """Whether ``run`` was trained with the stack's config (data, model, optimiser)."""
    return run.config == json.loads(json.dumps(spec.config.to_dict()))


def measure_stack(model: nn.Module, params: Params, data: Dataset, volume, sharpness:
                  SharpnessConfig | None, buffers: Params | None, isolated: bool
                  ) -> dict[str, Any]:
    """Every member's metrics, basin and measures (JSON values), as stored per step in
    ``models.json``. ``isolated``: member by member in fresh storage, so each number is
    bit-for-bit the same in a stack of any size (see :func:`minefield.step.isolated`)."""
    metrics = evaluate_members(model, params, data, buffers, isolated=isolated)
    basins = basin_members(model, params, data, volume, buffers)
    cols: dict[str, torch.Tensor] = {}
    if sharpness is not None and isolated:
        each = [measure_members(model, alone(params, i), data, sharpness, one(buffers, i))
                for i in range(n_members(params))]
        cols = {k: torch.cat([c[k] for c in each]) for k in each[0]}
    elif sharpness is not None:
        cols = measure_members(model, params, data, sharpness, buffers)
    return {"metrics": {k: v.tolist() for k, v in metrics.items()},
            "basins": [b.to_dict() for b in basins],
            "measures": {k: v.tolist() for k, v in cols.items()}}


def run_stacks(specs: list[StackSpec], root: Path, progress: bool = False) -> None:
    """The local loop: every task, one after the other, in this process."""
    for spec in specs:
        run_stack(spec, root, progress=progress)


def stack_task(item: tuple[dict[str, Any], str]) -> str:
    """:func:`run_stack` as an executor task: ``(spec.to_dict(), root) -> spec name``."""
    spec = StackSpec.from_dict(item[0])
    run_stack(spec, Path(item[1]))
    return spec.name


def measure_columns(spec: StackSpec) -> list[str]:
    """The columns scored against the gap: basin size, weight norm, each measure."""
    extra = [] if spec.sharpness is None else list(spec.sharpness.measures)
    return [*_BASIN_COLUMNS, "weight_norm", *extra]


def stack_rows(spec: StackSpec, root: Path | str, design: list[str]) -> list[dict[str, Any]]:
    """One tidy row per (member, step) of a finished stack (read from its models.json)."""
    run = Run.open(Path(root) / spec.name)
    saved = run.read_json(MODELS_FILE)
    rows = []
    with reading(run.file(MODELS_FILE)):
        if (not saved["complete"] or saved["key"] != json.loads(json.dumps(_key(spec)))
                or not _same_models(run, spec)):
            raise RunError(f"{run.file(MODELS_FILE)} is not finished for this study")
        n = len(spec.members)
        # a diverged row has every column a measured row has, as NaN (tables, plots)
        nan_columns = (*_NAN_COLUMNS, *measure_columns(spec), "log10_volume_ci_low",
                       "log10_volume_ci_high", "centre_loss", "n_at_r_max")
        div = saved.get("diverged_at") or ([0] * n if saved.get("diverged") else [None] * n)
        for step in spec.steps:
            for i in range(n):
                if div[i] is not None and step >= div[i]:  # NaN/inf from this step on
                    rows.append({**spec.design(i, step, design), "stack": spec.name,
                                 "member": i, "step": step, "diverged": True,
                                 **dict.fromkeys(nan_columns, nan)})
                    continue
                at = saved["steps"][str(step)]
                m = {k: v[i] for k, v in at["metrics"].items()}
                b = BasinResult.from_dict(at["basins"][i])
                rows.append({**spec.design(i, step, design), "stack": spec.name, "member": i,
                             "step": step, "diverged": False, **m,
                             "gap": accuracy_gap(m["train_acc"], m["test_acc"]),
                             "loss_gap": m["test_loss"] - m["train_loss"],
                             "mean_radius": b.mean_radius,
                             "median_radius": b.median_radius,
                             "log10_volume": b.log10_volume,
                             "n_mean_log10_r": b.n_mean_log10_r,
                             "log10_volume_ci_low": b.ci_log10_volume[0],
                             "log10_volume_ci_high": b.ci_log10_volume[1],
                             "centre_loss": b.centre_loss, "n_at_r_max": b.n_at_r_max,
                             **{k: v[i] for k, v in at["measures"].items()}})
    return rows


def _point(row: dict[str, Any], design: list[str]) -> str:
    return json.dumps({k: row[k] for k in design}, sort_keys=True)


@locking
def study_run(base: ExperimentConfig, study: StudyConfig, root: Path | str = DEFAULT_ROOT,
              force: bool = False, progress: bool = True,
              run_all: Callable[[list[StackSpec], Path], Any] | None = None,
              executor: Executor | None = None,
              models_per_task: int | None = None) -> StudyResult:
    """Run the study into ``root/base.name``: every stack's task, then the table and
    the scores (see the module docstring). Re-running resumes; a different study under
    the same name refuses without ``force``.

    Stacks run one after another here, or as tasks of ``executor`` (e.g. Ray), or
    through ``run_all(specs, root)``; none of these changes a number (a stack is
    trained and measured the same wherever it runs). ``models_per_task`` splits
    every stack into tasks of at most that many models; with isolated members
    (``train.isolate``, required for a split) every number of the table is the
    unsplit one, bit for bit (only the ``stack`` and ``member`` columns say where
    a model was trained).

    ``base`` sets everything the study does not vary. Every field and value is
    checked (:func:`~minefield.study.plan_study`), and every stack's data and model
    are built (:func:`~minefield.stages.train.check_buildable`), before anything is
    written.

    Raises:
        ConfigError: an unknown field, an empty grid, a value of the wrong type.
        RunError: the name holds another study or run (without ``force``).
        DataError, ModelError, ValueError: a stack's data or model cannot be built.
    """
    plan = plan_study(base, study, models_per_task)
    loaded: dict = {}  # each data set read once, not once per stack
    for spec in plan.stacks:  # what only the data or the model can check, before writing
        check_buildable(spec.config, spec.train_kwargs().get("betas"), loaded)
    if executor is not None:
        executor.check()
    run = Run.create(base.name, {"kind": "study", "base": base.to_dict(),
                                 "study": study.to_dict()}, root, force)
    stacks_root = run.file("stacks")
    if run_all is not None:
        run_all(plan.stacks, stacks_root)
    elif executor is not None:
        executor.map(stack_task, [(s.to_dict(), str(stacks_root)) for s in plan.stacks])
    else:
        run_stacks(plan.stacks, stacks_root, progress)
    return _collect(run, plan, study)


def _collect(run: Run, plan: StudyPlan, study: StudyConfig) -> StudyResult:
    wanted = {json.dumps(p, sort_keys=True) for p in plan.points}
    rows = [r for spec in plan.stacks for r in stack_rows(spec, run.file("stacks"), plan.design)
            if _point(r, plan.design) in wanted]
    measures = measure_columns(plan.stacks[0])
    reps = [d for d in plan.design if d in REPLICATES]
    scores = score_measures(rows, measures, plan.design, reps, study.target, FLATNESS)
    run.write_csv("study.csv", rows)
    run.write_csv("scores.csv", scores)
    run.write_result(STUDY_FILE, {"study": study.to_dict()},
                     {"design": plan.design, "measures": measures, "target": study.target,
                      "rows": rows, "scores": scores})
    return StudyResult(rows, scores, run, plan.design, measures, study.target)


def load_study(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> StudyResult:
    """A finished study from its run directory."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    if not run.exists(STUDY_FILE):
        raise RunError(f"{run.path} has no study results (run `minefield study`)")
    d = run.read_json(STUDY_FILE)
    with reading(run.file(STUDY_FILE)):
        return StudyResult(d["rows"], d["scores"], run, d["design"], d["measures"],
                           d["target"])

