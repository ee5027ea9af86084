"""The paper's Figure 1: the SGD trajectory threading through a minefield of bad minima."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..embed import EmbedResult
from .style import CMAP_ACC, CMAP_STEP, GOOD, axes, save_figure

__all__ = ["plot_minefield", "outlier_mask", "minefield_figure"]


def outlier_mask(xy: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """True for points farther than ``sigma`` std from the mean in *both* coordinates.

    The paper's plotting code drops such bad minima (``sigma = 1.5``).
    """
    z = np.abs(xy - xy.mean(0)) / np.where(xy.std(0) > 0, xy.std(0), 1.0)
    return (z > sigma).all(1)


def plot_minefield(result: EmbedResult, ax=None, drop_outliers: bool = False,
                   sigma: float = 1.5, title: str | None = None):
    """Draw Fig. 1 from an :class:`~minefield.embed.EmbedResult`; returns the Axes.

    SGD iterates are coloured by step and joined faintly in order; bad minima are
    coloured by their test accuracy (colour bar); the final iterate is a star.
    Points added later into the fitted map (kind ``"added"``,
    :meth:`~minefield.embed.TSNEMap.transform`) are open black triangles.
    The title states the final iterate's accuracies and the bad minima's ranges.
    ``drop_outliers`` hides bad minima beyond ``sigma`` std in both coordinates,
    as the paper's plots did (off by default; the title says how many were hidden).
    """
    import matplotlib.pyplot as plt

    ax = axes(ax, figsize=(5.5, 4.6))
    xy = result.coords.numpy()
    traj, bad = result.mask("trajectory").numpy(), result.mask("bad").numpy()
    steps = np.asarray(result.step)
    test, train = result.test_acc.numpy(), result.train_acc.numpy()
    hidden = 0
    if drop_outliers and bad.any():
        out = np.zeros_like(bad)
        out[bad] = outlier_mask(xy[bad], sigma)
        hidden = int(out.sum())
        bad = bad & ~out
    ti = np.flatnonzero(traj)
    ti = ti[np.argsort(steps[ti], kind="stable")]
    if len(ti):
        ax.plot(xy[ti, 0], xy[ti, 1], color=GOOD, lw=0.6, alpha=0.3, zorder=1)
        ax.scatter(xy[ti, 0], xy[ti, 1], c=steps[ti], cmap=CMAP_STEP, s=14, zorder=2,
                   edgecolors="none", label="SGD iterates (colour: step)")
    if bad.any():
        sc = ax.scatter(xy[bad, 0], xy[bad, 1], c=test[bad] * 100, cmap=CMAP_ACC, s=14,
                        marker="s", zorder=2, edgecolors="none", label="bad minima")
        plt.colorbar(sc, ax=ax, label="bad minima: test accuracy (%)", shrink=0.8)
    added = result.mask("added").numpy()
    if added.any():
        ax.scatter(xy[added, 0], xy[added, 1], marker="^", s=36, facecolors="none",
                   edgecolors="k", linewidths=0.9, zorder=4, label="added to the map")
    if len(ti):
        last = ti[-1]
        ax.scatter(xy[last, 0], xy[last, 1], marker="*", s=220, c=GOOD, edgecolors="k",
                   linewidths=0.7, zorder=3, label="final iterate")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=7)
    if title is None:
        parts = []
        if len(ti):
            parts.append(f"final iterate: train {train[ti[-1]]:.1%}, test {test[ti[-1]]:.1%}")
        allbad = result.mask("bad").numpy()
        if allbad.any():
            parts.append(f"{int(allbad.sum())} bad minima: train >= {train[allbad].min():.1%}, "
                         f"test <= {test[allbad].max():.1%}")
        if added.any():
            parts.append(f"{int(added.sum())} points added to the fitted map (triangles)")
        if hidden:
            parts.append(f"{hidden} outliers (> {sigma:g} std) not drawn")
        title = "\n".join(parts)
    ax.set_title(title, fontsize=8)
    return ax


def minefield_figure(result: EmbedResult, path: str | Path) -> list[Path]:
    """Fig. 1 of ``result`` written as ``path.png`` and ``path.pdf``; returns the paths."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    plot_minefield(result, ax=ax)
    return save_figure(fig, path)
