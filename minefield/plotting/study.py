"""Study figures: each measure against the generalization gap, the scores, a trajectory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..study import REPLICATES, TRAJECTORY
from .style import CMAP_ACC, axes, save_figure

__all__ = ["plot_measure", "plot_scores", "plot_trajectory", "study_figures"]

_TARGET = {"gap": "generalization gap (train - test accuracy)",
           "loss_gap": "test loss - train loss"}


def _colour_field(design: list[str]) -> str | None:
    axes_ = [d for d in design if d not in REPLICATES]
    return axes_[0] if axes_ else (design[0] if design else None)


def plot_measure(result, measure: str, target: str = "gap", ax=None):
    """``measure`` (y) against the gap (x), one dot per model, coloured by the study's
    first varied field; the title holds its Kendall tau and granulated tau."""
    ax = axes(ax)
    rows = result.rows
    x = np.array([r[target] for r in rows], dtype=float)
    y = np.array([r.get(measure, np.nan) for r in rows], dtype=float)
    by = _colour_field(result.design)
    if by is None:
        ax.scatter(x, y, s=14)
    else:
        values = sorted({json.dumps(r[by]) for r in rows})
        cmap = plt.get_cmap(CMAP_ACC, max(len(values), 2))
        for k, v in enumerate(values):
            sel = np.array([json.dumps(r[by]) == v for r in rows])
            ax.scatter(x[sel], y[sel], s=14, color=cmap(k), label=f"{by} {v}")
        if len(values) <= 12:
            ax.legend(fontsize=7)
    score = next((s for s in result.scores if s["measure"] == measure), None)
    title = measure
    if score is not None:
        title += f"  (tau {score['kendall_tau']:+.2f}, Psi {score['granulated_tau']:+.2f})"
    ax.set_title(title)
    ax.set_xlabel(_TARGET.get(target, target))
    ax.set_ylabel(measure)
    return ax


def plot_scores(result, ax=None):
    """Kendall tau and granulated tau of every measure against the gap, as bars."""
    ax = axes(ax, figsize=(6.0, 0.35 * len(result.scores) + 1.2))
    names = [s["measure"] for s in result.scores]
    pos = np.arange(len(names))
    ax.barh(pos - 0.2, [s["kendall_tau"] for s in result.scores], 0.4, label="Kendall tau")
    ax.barh(pos + 0.2, [s["granulated_tau"] for s in result.scores], 0.4,
            label="granulated tau")
    ax.set_yticks(pos, names)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlim(-1, 1)
    ax.invert_yaxis()
    ax.set_xlabel("rank correlation with the generalization gap")
    ax.legend(fontsize=7)
    return ax


def plot_trajectory(result, columns: tuple[str, ...] = ("mean_radius", "lambda_max",
                                                         "test_err"), x: str = TRAJECTORY):
    """One panel per column against the step, one line per model of the study
    (``test_err`` is 1 - test accuracy). Returns the figure."""
    cols = [c for c in columns if c == "test_err" or any(c in r for r in result.rows)]
    fig, axs = plt.subplots(len(cols), 1, figsize=(4.5, 1.9 * len(cols)), sharex=True,
                            squeeze=False)
    lines: dict[tuple, list] = {}
    for r in result.rows:
        lines.setdefault((r["stack"], r["member"]), []).append(r)
    for ax, c in zip(axs[:, 0], cols):
        for rs in lines.values():
            rs = sorted(rs, key=lambda r: r[x])
            ys = [1 - r["test_acc"] if c == "test_err" else r[c] for r in rs]
            ax.plot([r[x] for r in rs], ys, "-o", ms=2, lw=1)
        ax.set_ylabel(c)
    axs[-1, 0].set_xlabel(x)
    return fig


def study_figures(result, out_dir: str | Path) -> list[Path]:
    """Every figure of a study: ``<measure>.png`` per measure, ``scores.png`` and, when the
    study varies ``train.steps``, ``trajectory.png``; returns the written paths."""
    out_dir = Path(out_dir)
    paths = []
    target = result.target
    for m in result.measures:
        ax = plot_measure(result, m, target)
        paths += save_figure(ax.figure, out_dir / m, ("png",))
    paths += save_figure(plot_scores(result).figure, out_dir / "scores", ("png",))
    if TRAJECTORY in result.design:
        paths += save_figure(plot_trajectory(result), out_dir / "trajectory", ("png",))
    return paths
