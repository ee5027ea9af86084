"""``minefield sweep`` as one call: a study over (poison factor, seed), one stack.

The sweep is the study (:mod:`minefield.stages.study`) of the grid
``{"poison.beta": betas, "train.seed": seeds}``: every model shares the
architecture, so all of them train as one stack, here in ``runs/<name>/``
itself (:func:`~minefield.stages.study.run_stack`: trajectory, ``models.json``).
``sweep.json`` (keyed by the :class:`~minefield.sweep.SweepConfig`) and
``sweep.csv`` hold the sweep's own tidy table and its Spearman correlations.

Example (skipped by doctest: minutes)::

    >>> from minefield import DataConfig, ExperimentConfig, SweepConfig
    >>> res = sweep_run(ExperimentConfig(name="sweep", data=DataConfig("swissroll")),
    ...                 SweepConfig(betas=(0.0, 0.3, 0.6), seeds=(0,)))  # doctest: +SKIP
    >>> res.spearman["test_acc"] < 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from ..basin import BasinResult
from ..config import ConfigError, ExperimentConfig
from ..data import load_dataset
from ..executor import Executor, LocalExecutor, TaskStore, run_tasks, torch_threads
from ..lock import locking
from ..runs import DEFAULT_ROOT, Run, reading
from ..study import StackSpec, StudyConfig, check_sharpness, plan_study
from ..sweep import SweepConfig, SweepResult, spearman, sweep_rows
from ..train import TrainingDiverged
from .study import MODELS_FILE, measure_stack, run_stack
from .train import check_data_files, files_digest, train_run

__all__ = ["SWEEP_FILE", "sweep_run", "load_sweep", "sweep_spec"]

SWEEP_FILE = "sweep.json"


def sweep_spec(base: ExperimentConfig, sweep: SweepConfig) -> StackSpec:
    """The sweep's one stack, named ``base.name``: members in (beta, seed) order, member
    seeds ``base.train.seed + s`` (:func:`_member_seeds`)."""
    study = StudyConfig(grid={"poison.beta": list(sweep.betas),
                              "train.seed": _member_seeds(base, sweep)},
                        volume=sweep.volume, sharpness=sweep.sharpness)
    (spec,) = plan_study(base, study).stacks
    return dataclasses.replace(spec, name=base.name, config=spec.config.replace(name=base.name))


def _member_seeds(base: ExperimentConfig, sweep: SweepConfig) -> list[int]:
    """Each sweep seed ``s`` as the init seed ``base.train.seed + s``, refused outside
    [0, 2**32): torch keeps the low 32 bits, so 2**32 would be seed 0's model again."""
    seeds = [base.train.seed + s for s in sweep.seeds]
    if max(seeds) >= 2**32:
        raise ConfigError(f"sweep: seed {base.train.seed} + {max(sweep.seeds)} = {max(seeds)} "
                          "is outside [0, 2**32); lower --seed or --seeds")
    return seeds


@locking
def sweep_run(base: ExperimentConfig, sweep: SweepConfig = SweepConfig(),
              root: Path | str = DEFAULT_ROOT, force: bool = False, progress: bool = True,
              save: bool = True, executor: Executor | None = None,
              models_per_task: int | None = None) -> SweepResult:
    """Train one model per (beta, seed) in ``sweep`` as a single stack, then measure
    each model's basin; returns (and writes to ``root/base.name``) the tidy table.

    ``base`` sets data, architecture and optimisation (its ``poison.beta`` and
    ``train.members`` are replaced). Re-running resumes: training continues from
    its last checkpoint, and finished measurements are reused. ``save=False`` works
    in a temporary folder and keeps nothing. The sweep is one stack of a study
    (:func:`sweep_spec`, :func:`~minefield.stages.study.run_stack`).

    With an ``executor`` (:mod:`minefield.executor`) or ``models_per_task``, the
    grid is split into tasks of ``models_per_task`` models (default: all), each
    trained as its own stack and measured by a pure task function; finished tasks
    are kept in ``tasks/`` and a rerun redoes only the missing ones. The run then
    holds the final weights of all models as one checkpoint (no trajectory).
    Every model's seed and batches come from its own (beta, seed), so the split
    changes no logic; a stack's size would change float rounding, so a split
    (``models_per_task`` below the number of models) needs isolated members
    (``base.train.isolate``): then every split, on any executor, gives the numbers
    of the unsplit ``sweep_run`` bit for bit. Without a split, Ray trains the one
    stack as one task, like the local run (same numbers at the same thread count).

    Raises:
        ConfigError: a split of members that are not isolated, ``models_per_task`` < 1, or
            measures the training set cannot give (``m`` of ``m_sharpness`` > N).
    """
    check_sharpness(base, sweep.sharpness)  # before anything is trained or written
    _member_seeds(base, sweep)
    if executor is not None or models_per_task is not None:
        return _sweep_tasks(base, sweep, root, force, save, executor or LocalExecutor(),
                            models_per_task)
    if not save:
        with tempfile.TemporaryDirectory() as tmp:
            return dataclasses.replace(sweep_run(base, sweep, tmp, progress=progress),
                                       run=None)
    grid = [(b, s) for b in sweep.betas for s in sweep.seeds]
    spec = sweep_spec(base, sweep)
    key = _sweep_key(sweep)
    same = False  # the same models: --force measures them again, keeping what is there
    if (Path(root) / base.name / SWEEP_FILE).exists():  # decided before any training
        run = Run.open(Path(root) / base.name).lock()
        # the same models (else run_stack refuses, or with force retrains them), then the
        # same measurements (else refused here)
        same = _same_models(run, spec)
        if same and run.resume(SWEEP_FILE, key, force):
            return load_sweep(run)
    # force with the same models replaces models.json and sweep.json only when they are
    # written (a killed or refused redo leaves the old ones); other models are retrained
    run_stack(spec, root, progress=progress, force=force and not same,
              remeasure=force and same)
    run = Run.open(Path(root) / base.name)
    if run.resume(SWEEP_FILE, key, force):
        return load_sweep(run)
    saved = run.read_json(MODELS_FILE)
    with reading(run.file(MODELS_FILE)):
        if saved.get("diverged"):  # every model: the message the split sweep gives too
            raise TrainingDiverged(saved["diverged"])
        _all_finite(saved.get("diverged_at"), grid)
        at = saved["steps"][str(spec.config.train.steps)]
        basins = [BasinResult.from_dict(b) for b in at["basins"]]
        rows = sweep_rows(grid, at["metrics"], basins)
        for i, row in enumerate(rows):
            row.update({k: float(v[i]) for k, v in at["measures"].items()})
    measures = () if sweep.sharpness is None else sweep.sharpness.measures
    keys = ("test_acc", "mean_radius", "log10_volume", "gap") + measures
    out = SweepResult(rows, spearman(rows, keys=keys), run, basins,
                      spearman(rows, "gap", ("mean_radius", "log10_volume") + measures))
    run.write_csv("sweep.csv", rows)
    run.write_result(SWEEP_FILE, key, {**out.to_dict(), "basins": [b.to_dict() for b in basins]})
    return out


def _same_models(run: Run, spec: StackSpec) -> bool:
    """Whether ``run`` holds ``spec``'s trained models: its config (data, architecture,
    optimiser) and every member's beta and seed, which config.json does not hold (other
    betas of the same count had passed for the same models: --force then kept the run and
    refused to resume it)."""
    if run.config != json.loads(json.dumps(spec.config.to_dict())):
        return False
    if not run.exists(MODELS_FILE):  # a split sweep: its tasks' models (sweep.json's key)
        return True
    with reading(run.file(MODELS_FILE)):
        members = run.read_json(MODELS_FILE)["key"]["members"]
    return members == json.loads(json.dumps([dict(m) for m in spec.members]))


def _all_finite(diverged_at: list[int | None] | None, grid: list[tuple[float, int]]) -> None:
    """A sweep correlates all of its models: one whose loss diverged (frozen by
    :func:`~minefield.train.fit`, the others trained on) ends it, in one line."""
    bad = [i for i, d in enumerate(diverged_at or []) if d is not None]
    if bad:
        (b, s), d = grid[bad[0]], diverged_at[bad[0]]
        raise TrainingDiverged(f"the loss of {len(bad)} of {len(grid)} models became NaN/inf "
                               f"(the first: beta {b:g}, seed {s}, at step {d})")


def _sweep_key(sweep: SweepConfig) -> dict:
    """What a sweep's numbers depend on: not how it was split or executed (a split needs
    isolated members, which give the unsplit numbers bit for bit)."""
    key = {"sweep": sweep.to_dict()}
    if sweep.sharpness is None:  # sweeps saved before the field existed stay valid
        del key["sweep"]["sharpness"]
    return key



def _sweep_tasks(base: ExperimentConfig, sweep: SweepConfig, root: Path | str, force: bool,
                 save: bool, executor: Executor, per_task: int | None) -> SweepResult:
    """:func:`sweep_run` as tasks of ``per_task`` models each, run and merged."""
    grid = [(b, s) for b in sweep.betas for s in sweep.seeds]
    per = per_task or len(grid)
    if per < 1:
        raise ConfigError(f"models_per_task must be >= 1, got {per}")
    if per < len(grid) and not base.train.isolate:
        raise ConfigError(f"models_per_task={per} splits the sweep's stack of {len(grid)} "
                          "models, which changes how their numbers round; isolate the "
                          "members (train.isolate, --isolate) to split it")
    cfg = base.replace(train=base.train.replace(members=len(grid)))
    key = _sweep_key(sweep)
    executor.check()  # before the run is written
    run = Run.create(cfg.name, cfg.to_dict(), root, force) if save else None
    if run is not None and run.resume(SWEEP_FILE, key, force):
        return load_sweep(run)
    if run is not None and cfg.data.data_dir is not None:
        # the files its tasks read, recorded as train_run does: tasks kept from before
        # the files changed were merged with new ones, and later commands not checked
        check_data_files(run, cfg, files_digest(cfg, load_dataset(cfg.data)), record=True)
    specs = {f"models{a:05d}-{min(a + per, len(grid)) - 1:05d}":
             {"base": base, "grid": grid[a:a + per], "sweep": sweep}
             for a in range(0, len(grid), per)}
    store = TaskStore(run, "tasks", {**key, "models_per_task": per,
                                     "experiment": cfg.to_dict()}, force) if run else None
    parts = list(run_tasks(executor, sweep_task, specs, store).values())
    metrics = {k: [v for p in parts for v in p["metrics"][k]] for k in parts[0]["metrics"]}
    basins = [BasinResult.from_dict(b) for p in parts for b in p["basins"]]
    rows = sweep_rows(grid, metrics, basins)
    measures = sweep.sharpness.measures if sweep.sharpness is not None else ()
    columns = {c: [v for p in parts for v in p["measures"][c]] for c in parts[0]["measures"]}
    for i, row in enumerate(rows):  # every column of a measure (its residual, interval...)
        row.update({c: float(v[i]) for c, v in columns.items()})
    keys = ("test_acc", "mean_radius", "log10_volume", "gap") + measures
    out = SweepResult(rows, spearman(rows, keys=keys), run, basins,
                      spearman(rows, "gap", ("mean_radius", "log10_volume") + measures))
    if run is not None:
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]
                   if k.startswith(("param.", "buffer."))}
        seeds = [base.train.seed + s for _, s in grid]  # checked by _member_seeds
        meta = {"config": cfg.to_dict(), "seeds": seeds, "betas": [b for b, _ in grid],
                "members": len(grid), "step": cfg.train.steps, "metrics": {}}
        run.save_checkpoint(f"trajectory/step_{cfg.train.steps:08d}.safetensors",
                            {k[6:]: v for k, v in tensors.items() if k.startswith("param.")},
                            {k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")},
                            meta)
        run.write_json("summary.json", {"step": cfg.train.steps, "seeds": seeds,
                                        "betas": meta["betas"], **metrics})
        run.write_csv("sweep.csv", rows)
        run.write_result(SWEEP_FILE, key, {**out.to_dict(),
                                           "basins": [b.to_dict() for b in basins]})
    return out


def sweep_task(spec: dict) -> dict:
    """One task of a sweep (pure: nothing read or written): train its models as one
    stack, measure each basin (and the sharpness columns); metrics, basins, measures
    and the final weights (``param.*``, ``buffer.*``, stacked over its models)."""
    base, grid, sweep = spec["base"], spec["grid"], spec["sweep"]
    cfg = base.replace(train=base.train.replace(members=len(grid)))
    with torch_threads(1 if cfg.train.isolate else None):
        res = train_run(cfg, progress=False, betas=[b for b, _ in grid],
                        seeds=[base.train.seed + s for _, s in grid], save=False)
        _all_finite(res.diverged_at, grid)
        out = measure_stack(res.model, res.params, res.data, sweep.volume, sweep.sharpness,
                            res.buffers or None, cfg.train.isolate)
    out.update({f"param.{k}": v.detach().cpu() for k, v in res.params.items()})
    out.update({f"buffer.{k}": v.detach().cpu() for k, v in (res.buffers or {}).items()})
    return out


def load_sweep(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> SweepResult:
    """A finished sweep from its run directory."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    d = run.read_json(SWEEP_FILE)
    with reading(run.file(SWEEP_FILE)):
        return SweepResult(d["rows"], d["spearman"], run,
                           [BasinResult.from_dict(b) for b in d["basins"]],
                           d.get("spearman_gap", {}))
