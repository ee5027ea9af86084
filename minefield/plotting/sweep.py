"""Poison-factor sweep figures (the paper's Figs 5 and 6)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..functional import one
from .boundary import plot_boundary
from .style import BAD, GOOD, axes, note_minus_inf, save_figure

__all__ = ["plot_sweep_accuracy", "plot_sweep_geometry", "boundary_grid_figure",
           "sweep_figures"]

_LABEL = {"mean_radius": "mean basin radius", "log10_volume": "log10 basin volume",
          "gap": "generalisation gap (train - test acc.)", "beta": "poison factor beta",
          "n_mean_log10_r": "n mean(log10 r)"}


def _by_beta(rows, key):
    groups = defaultdict(list)
    for r in rows:
        groups[r["beta"]].append(r[key])
    betas = sorted(groups)
    return np.array(betas), [np.array(groups[b]) for b in betas]


def _beta_axis(ax, betas):
    positive = betas[betas > 0]
    if len(positive):
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlabel(_LABEL["beta"])


def plot_sweep_accuracy(result, ax=None):
    """Train and test accuracy against the poison factor: each model a dot, the mean a line."""
    ax = axes(ax)
    for key, color, name in (("train_acc", GOOD, "train"), ("test_acc", BAD, "test")):
        betas, vals = _by_beta(result.rows, key)
        for b, v in zip(betas, vals):
            ax.scatter(np.full(len(v), b), v, s=10, color=color, alpha=0.5)
        ax.plot(betas, [v.mean() for v in vals], "-o", color=color, ms=3, label=name)
    _beta_axis(ax, betas)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title(f"accuracy vs poisoning (Spearman rho test: "
                 f"{result.spearman['test_acc']:.2f})")
    return ax


def plot_sweep_geometry(result, x: str = "gap", y: str = "mean_radius", ax=None):
    """Basin size (``mean_radius``, ``log10_volume``...) against ``gap`` or ``beta``,
    each model a dot coloured by its poison factor."""
    ax = axes(ax)
    xs = np.array([r[x] for r in result.rows])
    ys = np.array([r[y] for r in result.rows])
    cs = np.array([r["beta"] for r in result.rows])
    sc = ax.scatter(xs, ys, c=cs, cmap="plasma", s=22, edgecolors="k", linewidths=0.3)
    plt.colorbar(sc, ax=ax, label=_LABEL["beta"])
    if x == "beta":
        _beta_axis(ax, np.unique(cs))
    else:
        ax.set_xlabel(_LABEL.get(x, x))
    if y == "mean_radius" and (ys > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel(_LABEL.get(y, y))
    note_minus_inf(ax, xs, ys, y)
    rho = result.spearman.get(y)
    ax.set_title(f"{_LABEL.get(y, y)} vs {x}"
                 + (f" (Spearman rho with beta: {rho:.2f})" if rho is not None else ""))
    return ax


def boundary_grid_figure(model, params, data, rows, buffers=None, seed=None):
    """Decision boundaries of one model per poison factor (first seed), in a grid."""
    seed = rows[0]["seed"] if seed is None else seed
    chosen = [r for r in rows if r["seed"] == seed]
    ncol = min(4, len(chosen))
    nrow = -(-len(chosen) // ncol)
    fig, axs = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax in axs.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, r in zip(axs.flat, chosen):
        i = r["member"]
        plot_boundary(model, one(params, i), data, one(buffers or None, i), ax=ax, resolution=150,
                      title=f"beta={r['beta']:g}: train {r['train_acc']:.0%}, "
                            f"test {r['test_acc']:.0%}")
        if ax.get_legend():
            ax.get_legend().remove()
    return fig


def sweep_figures(result, model, params, data, buffers, stem: str | Path) -> list[Path]:
    """Figs 5/6 of a finished sweep as ``<stem>_sweep`` (accuracy, radius vs beta, volume
    vs gap) and, for 2-D data, ``<stem>_boundaries``; PNG and PDF. Returns the paths."""
    fig, axs = plt.subplots(1, 3, figsize=(14, 4))
    plot_sweep_accuracy(result, ax=axs[0])
    plot_sweep_geometry(result, "beta", "mean_radius", ax=axs[1])
    plot_sweep_geometry(result, "gap", "log10_volume", ax=axs[2])
    written = save_figure(fig, f"{stem}_sweep")
    if data.input_shape == (2,):
        written += save_figure(boundary_grid_figure(model, params, data, result.rows, buffers),
                               f"{stem}_boundaries")
    return written
