"""Poison-factor studies (the paper's Figs 5 and 6): generalisation gap vs basin size.

One model per (poison factor beta, seed) is trained, all of them *together* as
one stack (they share an architecture; see :func:`minefield.train.fit`), with the
same init for equal seeds, as the paper does. Each model's basin is then measured
with :func:`minefield.basin.basin_members`. The result is a tidy table, one row
per model, that ``pandas.DataFrame(result.rows)`` reads directly::

    >>> from minefield import ExperimentConfig, DataConfig, SweepConfig, poison_sweep
    >>> res = poison_sweep(ExperimentConfig(name="sweep", data=DataConfig("swissroll")),
    ...                    SweepConfig(betas=(0.0, 0.3, 0.6), seeds=(0,)))  # doctest: +SKIP
    >>> res.spearman["test_acc"] < 0  # doctest: +SKIP
    True

The paper's claim, checked by ``spearman``: as poisoning rises, test accuracy
*and* basin radius both fall. With ``SweepConfig(sharpness=SharpnessConfig(...))``
every curvature and sharpness measure of :mod:`minefield.measures` becomes a
column too, and ``spearman_gap`` holds each geometry column's Spearman
correlation with the generalization gap (train minus test accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from .basin import BasinResult, VolumeConfig, basin_members
from .config import ConfigError, ExperimentConfig, _Config
from .lock import locking
from .measures import SharpnessConfig, measure_members
from .runs import DEFAULT_ROOT, Run, reading
from .train import train_run

__all__ = ["SweepConfig", "SweepResult", "poison_sweep", "log_spaced_betas", "load_sweep"]


def log_spaced_betas(lo: float, hi: float, n: int, zero: bool = True) -> tuple[float, ...]:
    """``n`` factors log-spaced in ``[lo, hi]``, with 0 (clean) first when ``zero``."""
    if not 0 < lo < hi < 1 or n < 1:
        raise ConfigError(f"need 0 < lo < hi < 1 and n >= 1, got lo={lo}, hi={hi}, n={n}")
    vals = np.geomspace(lo, hi, n).round(6).tolist()
    return tuple(([0.0] if zero else []) + vals)


@dataclass(frozen=True)
class SweepConfig(_Config):
    """Poison factors x seeds, and how each model's basin is measured."""

    betas: tuple[float, ...] = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6)
    seeds: tuple[int, ...] = (0, 1)
    volume: VolumeConfig = field(default_factory=lambda: VolumeConfig(n_directions=200))
    sharpness: SharpnessConfig | None = None  # None: no curvature / sharpness columns

    def __post_init__(self):
        if not self.betas or not self.seeds:
            raise ConfigError("a sweep needs at least one beta and one seed")
        bad = [b for b in self.betas if not 0.0 <= b < 1.0]
        if bad:
            raise ConfigError(f"poison factors must be in [0, 1), got {bad}")


@dataclass
class SweepResult:
    """Rows (one per model), Spearman correlations with beta and with the
    generalization gap, and where it was saved."""

    rows: list[dict[str, Any]]
    spearman: dict[str, float]
    run: Run | None
    basins: list[BasinResult]
    spearman_gap: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "spearman": self.spearman, "spearman_gap": self.spearman_gap}


def _spearman(rows: list[dict[str, Any]], by: str = "beta",
              keys: tuple[str, ...] = ("test_acc", "mean_radius", "log10_volume", "gap")
              ) -> dict[str, float]:
    x = [r[by] for r in rows]
    out = {}
    for key in keys:
        vals = [r[key] for r in rows]
        ok = len(set(x)) > 1 and len(set(vals)) > 1
        out[key] = float(spearmanr(x, vals).statistic) if ok else float("nan")
    return out


@locking
def poison_sweep(base: ExperimentConfig, sweep: SweepConfig = SweepConfig(),
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
    if run is not None and run.exists("sweep.json"):
        old = run.read_json("sweep.json")
        with reading(run.file("sweep.json")):
            if old.get("key") == key and not force:
                return SweepResult(old["rows"], old["spearman"], run,
                                   [BasinResult.from_dict(b) for b in old["basins"]],
                                   old.get("spearman_gap", {}))
    basins = basin_members(res.model, res.params, res.data, sweep.volume, res.buffers)
    rows = []
    for i, ((beta, seed), b) in enumerate(zip(grid, basins)):
        m = {k: res.metrics[k][i] for k in ("train_acc", "test_acc", "poison_acc",
                                             "train_loss", "test_loss")}
        rows.append({"member": i, "beta": beta, "seed": seed, **m,
                     "gap": m["train_acc"] - m["test_acc"], "mean_radius": b.mean_radius,
                     "median_radius": float(b.radii.median()),
                     "log10_volume": b.log10_volume, "n_mean_log10_r": b.n_mean_log10_r,
                     "log10_volume_ci_low": b.ci_log10_volume[0],
                     "log10_volume_ci_high": b.ci_log10_volume[1], "centre_loss": b.centre_loss})
    measures: tuple[str, ...] = ()
    if sweep.sharpness is not None:
        cols = measure_members(res.model, res.params, res.data, sweep.sharpness,
                               res.buffers or None)
        for i, row in enumerate(rows):
            row.update({k: float(v[i]) for k, v in cols.items()})
        measures = sweep.sharpness.measures
    keys = ("test_acc", "mean_radius", "log10_volume", "gap") + measures
    out = SweepResult(rows, _spearman(rows, keys=keys), run, basins,
                      _spearman(rows, "gap", ("mean_radius", "log10_volume") + measures))
    if run is not None:
        run.write_csv("sweep.csv", rows)
        run.write_json("sweep.json", {"key": key, **out.to_dict(),
                                      "basins": [b.to_dict() for b in basins]})
    return out


def load_sweep(run: Run) -> SweepResult:
    """A finished sweep from its run directory."""
    d = run.read_json("sweep.json")
    return SweepResult(d["rows"], d["spearman"], run,
                       [BasinResult.from_dict(b) for b in d["basins"]], d.get("spearman_gap", {}))
