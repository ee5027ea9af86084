"""``minefield sweep`` as one call: one model per (poison factor, seed), then each basin.

The models train together as one stack into ``runs/<name>/`` (see
:func:`~minefield.stages.train_run`); ``sweep.json`` (keyed by the
:class:`~minefield.sweep.SweepConfig`) and ``sweep.csv`` hold the tidy table.

Example (skipped by doctest: minutes)::

    >>> from minefield import DataConfig, ExperimentConfig, SweepConfig
    >>> res = sweep_run(ExperimentConfig(name="sweep", data=DataConfig("swissroll")),
    ...                 SweepConfig(betas=(0.0, 0.3, 0.6), seeds=(0,)))  # doctest: +SKIP
    >>> res.spearman["test_acc"] < 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

from pathlib import Path

from ..basin import BasinResult, basin_members
from ..config import ExperimentConfig
from ..lock import locking
from ..measures import measure_members
from ..runs import DEFAULT_ROOT, Run, reading
from ..sweep import SweepConfig, SweepResult, spearman, sweep_rows
from .train import train_run

__all__ = ["SWEEP_FILE", "sweep_run", "load_sweep"]

SWEEP_FILE = "sweep.json"


@locking
def sweep_run(base: ExperimentConfig, sweep: SweepConfig = SweepConfig(),
              root: Path | str = DEFAULT_ROOT, force: bool = False, progress: bool = True,
              save: bool = True) -> SweepResult:
    """Train one model per (beta, seed) in ``sweep`` as a single stack, then measure
    each model's basin; returns (and writes to ``root/base.name``) the tidy table.

    ``base`` sets data, architecture and optimisation (its ``poison.beta`` and
    ``train.members`` are replaced). Re-running resumes: training continues from
    its last checkpoint, and finished basin measurements are reused.
    """
    grid = [(b, s) for b in sweep.betas for s in sweep.seeds]
    cfg = base.replace(train=base.train.replace(members=len(grid)))
    res = train_run(cfg, root, force=force, progress=progress, betas=[b for b, _ in grid],
                    seeds=[base.train.seed + s for _, s in grid], save=save)
    run = res.run
    key = {"sweep": sweep.to_dict()}
    if sweep.sharpness is None:  # sweeps saved before the field existed stay valid
        del key["sweep"]["sharpness"]
    if run is not None and run.resume(SWEEP_FILE, key, force):
        return load_sweep(run)
    basins = basin_members(res.model, res.params, res.data, sweep.volume, res.buffers)
    rows = sweep_rows(grid, res.metrics, basins)
    measures: tuple[str, ...] = ()
    if sweep.sharpness is not None:
        cols = measure_members(res.model, res.params, res.data, sweep.sharpness,
                               res.buffers or None)
        for i, row in enumerate(rows):
            row.update({k: float(v[i]) for k, v in cols.items()})
        measures = sweep.sharpness.measures
    keys = ("test_acc", "mean_radius", "log10_volume", "gap") + measures
    out = SweepResult(rows, spearman(rows, keys=keys), run, basins,
                      spearman(rows, "gap", ("mean_radius", "log10_volume") + measures))
    if run is not None:
        run.write_csv("sweep.csv", rows)
        run.write_result(SWEEP_FILE, key, {**out.to_dict(),
                                           "basins": [b.to_dict() for b in basins]})
    return out


def load_sweep(run: Run | str | Path, root: Path | str = DEFAULT_ROOT) -> SweepResult:
    """A finished sweep from its run directory."""
    run = run if isinstance(run, Run) else Run.open(run, root)
    d = run.read_json(SWEEP_FILE)
    with reading(run.file(SWEEP_FILE)):
        return SweepResult(d["rows"], d["spearman"], run,
                           [BasinResult.from_dict(b) for b in d["basins"]],
                           d.get("spearman_gap", {}))
