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
import tempfile
from pathlib import Path

from ..basin import BasinResult
from ..config import ExperimentConfig
from ..lock import locking
from ..runs import DEFAULT_ROOT, Run, reading
from ..study import StackSpec, StudyConfig, plan_study
from ..sweep import SweepConfig, SweepResult, spearman, sweep_rows
from .study import MODELS_FILE, run_stack

__all__ = ["SWEEP_FILE", "sweep_run", "load_sweep", "sweep_spec"]

SWEEP_FILE = "sweep.json"


def sweep_spec(base: ExperimentConfig, sweep: SweepConfig) -> StackSpec:
    """The sweep's one stack, named ``base.name``: members in (beta, seed) order, member
    seeds ``base.train.seed + s``."""
    study = StudyConfig(grid={"poison.beta": list(sweep.betas),
                              "train.seed": [base.train.seed + s for s in sweep.seeds]},
                        volume=sweep.volume, sharpness=sweep.sharpness)
    (spec,) = plan_study(base, study).stacks
    return dataclasses.replace(spec, name=base.name, config=spec.config.replace(name=base.name))


@locking
def sweep_run(base: ExperimentConfig, sweep: SweepConfig = SweepConfig(),
              root: Path | str = DEFAULT_ROOT, force: bool = False, progress: bool = True,
              save: bool = True) -> SweepResult:
    """Train one model per (beta, seed) in ``sweep`` as a single stack, then measure
    each model's basin; returns (and writes to ``root/base.name``) the tidy table.

    ``base`` sets data, architecture and optimisation (its ``poison.beta`` and
    ``train.members`` are replaced). Re-running resumes: training continues from
    its last checkpoint, and finished measurements are reused. ``save=False`` works
    in a temporary folder and keeps nothing.
    """
    if not save:
        with tempfile.TemporaryDirectory() as tmp:
            return dataclasses.replace(sweep_run(base, sweep, tmp, progress=progress),
                                       run=None)
    grid = [(b, s) for b in sweep.betas for s in sweep.seeds]
    spec = sweep_spec(base, sweep)
    run_stack(spec, root, progress=progress, force=force)
    run = Run.open(Path(root) / base.name)
    key = {"sweep": sweep.to_dict()}
    if sweep.sharpness is None:  # sweeps saved before the field existed stay valid
        del key["sweep"]["sharpness"]
    if run.resume(SWEEP_FILE, key, force):
        return load_sweep(run)
    saved = run.read_json(MODELS_FILE)
    with reading(run.file(MODELS_FILE)):
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


def load_sweep(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> SweepResult:
    """A finished sweep from its run directory."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    d = run.read_json(SWEEP_FILE)
    with reading(run.file(SWEEP_FILE)):
        return SweepResult(d["rows"], d["spearman"], run,
                           [BasinResult.from_dict(b) for b in d["basins"]],
                           d.get("spearman_gap", {}))
