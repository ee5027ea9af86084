"""Poison-factor studies (the paper's Figs 5 and 6): generalisation gap vs basin size.

One model per (poison factor beta, seed) is trained, all of them *together* as
one stack (they share an architecture; see :func:`minefield.train.fit`), with the
same init for equal seeds, as the paper does. Each model's basin is then measured
with :func:`minefield.basin.basin_members`. The result is a tidy table, one row
per model, that ``pandas.DataFrame(result.rows)`` reads directly;
:func:`minefield.stages.sweep_run` runs it into a run directory.

The paper's claim, checked by ``spearman``: as poisoning rises, test accuracy
*and* basin radius both fall. With ``SweepConfig(sharpness=SharpnessConfig(...))``
every curvature and sharpness measure of :mod:`minefield.measures` becomes a
column too, and ``spearman_gap`` holds each geometry column's Spearman
correlation with the generalization gap (train minus test accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy.stats import spearmanr

from .basin import BasinResult, VolumeConfig
from .config import ConfigError, _Config
from .measures import SharpnessConfig
from .ranking import accuracy_gap
from .runs import Run

__all__ = ["SweepConfig", "SweepResult", "log_spaced_betas", "sweep_rows", "spearman"]


def log_spaced_betas(lo: float, hi: float, n: int, zero: bool = True) -> tuple[float, ...]:
    """``n`` factors log-spaced in ``[lo, hi]``, with 0 (clean) first when ``zero``.

    ``lo`` and ``hi`` are kept as given; the factors between are rounded to 6
    significant digits (more where 6 would make two equal), so none leaves ``[lo, hi]``:
    rounding to 6 *decimals* made 1e-7 a 0 and 0.9999999 a 1.0.

    Example::

        >>> log_spaced_betas(0.001, 0.6, 3)
        (0.0, 0.001, 0.0244949, 0.6)
        >>> log_spaced_betas(1e-7, 1e-5, 3)
        (0.0, 1e-07, 1e-06, 1e-05)
        >>> log_spaced_betas(0.9999991, 0.9999999, 3, zero=False)
        (0.9999991, 0.9999995, 0.9999999)
    """
    if (not 0 < lo < hi < 1 or isinstance(n, bool) or not isinstance(n, int | np.integer)
            or n < 1):
        raise ConfigError(f"need 0 < lo < hi < 1 and an integer n >= 1, got lo={lo}, hi={hi}, "
                          f"n={n}")
    raw = np.geomspace(lo, hi, n).tolist()
    for digits in range(6, 18):  # 17 significant digits hold any float exactly
        vals = [lo, *(float(f"{v:.{digits}g}") for v in raw[1:-1]), hi][:n]
        if all(a < b for a, b in zip(vals, vals[1:])):
            return tuple(([0.0] if zero else []) + vals)
    raise ConfigError(f"{n} factors in [{lo}, {hi}] are not distinct floats; give fewer "
                      "or a wider range")


@dataclass(frozen=True)
class SweepConfig(_Config):
    """Poison factors x seeds, and how each model's basin is measured."""

    betas: tuple[float, ...] = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6)
    seeds: tuple[int, ...] = (0, 1)
    volume: VolumeConfig = field(default_factory=lambda: VolumeConfig(n_directions=200))
    sharpness: SharpnessConfig | None = None  # None: no curvature / sharpness columns
    _section: ClassVar[str] = "sweep"

    def _validate(self):
        if not self.betas or not self.seeds:
            raise ConfigError("a sweep needs at least one beta and one seed")
        bad = [b for b in self.betas if not 0.0 <= b < 1.0]
        if bad:
            raise ConfigError(f"poison factors must be in [0, 1), got {bad}")
        for s in self.seeds:
            if not 0 <= s < 2**32:
                raise ConfigError(f"sweep: seed {s} is outside 0 to {2**32 - 1}")
        for what, values in (("beta", self.betas), ("seed", self.seeds)):
            twice = [v for i, v in enumerate(values) if v in values[:i]]
            if twice:  # the same model twice would count twice in the correlations
                raise ConfigError(f"sweep: {what} {twice[0]:g} is given twice")


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


def spearman(rows: list[dict[str, Any]], by: str = "beta",
             keys: tuple[str, ...] = ("test_acc", "mean_radius", "log10_volume", "gap")
             ) -> dict[str, float]:
    """Spearman rank correlation of each column ``keys`` with column ``by`` (NaN when
    either is constant)."""
    x = [r[by] for r in rows]
    out = {}
    for key in keys:
        vals = [r[key] for r in rows]
        ok = len(set(x)) > 1 and len(set(vals)) > 1
        out[key] = float(spearmanr(x, vals).statistic) if ok else float("nan")
    return out


def sweep_rows(grid: list[tuple[float, int]], metrics: dict[str, list[float]],
               basins: list[BasinResult]) -> list[dict[str, Any]]:
    """One tidy row per model: its (beta, seed), accuracies and losses, basin statistics."""
    rows = []
    for i, ((beta, seed), b) in enumerate(zip(grid, basins)):
        m = {k: metrics[k][i] for k in ("train_acc", "test_acc", "poison_acc", "train_loss",
                                        "test_loss")}
        rows.append({"member": i, "beta": beta, "seed": seed, **m,
                     "gap": accuracy_gap(m["train_acc"], m["test_acc"]),
                     "mean_radius": b.mean_radius,
                     "median_radius": b.median_radius,
                     "log10_volume": b.log10_volume, "n_mean_log10_r": b.n_mean_log10_r,
                     "log10_volume_ci_low": b.ci_log10_volume[0],
                     "log10_volume_ci_high": b.ci_log10_volume[1], "centre_loss": b.centre_loss,
                     "n_at_r_max": b.n_at_r_max})
    return rows
